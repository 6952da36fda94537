"""VAE decode and encode nodes. Glue over flux_core.autoencoder; LATENT holds raw AE latents, as ComfyUI's."""
import torch

from flux_core.pipeline import from_unit_images, to_unit_images
from flux_core.streaming import decode_on

from . import bridge
from .common import CATEGORY, VAE


def crop16(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, ...) cropped to multiples of 16 (the AE and 2x2 packing need them); under 16 px is refused."""
    height, width = images.shape[1] // 16 * 16, images.shape[2] // 16 * 16
    if not height or not width:
        raise ValueError(f"image of {images.shape[2]}x{images.shape[1]} is smaller than 16x16 pixels")
    return images[:, :height, :width]


class FluxKitVAEDecode:
    DESCRIPTION = "Decodes a Flux latent to an image. Tiled decoding bounds memory for large images (2048 px and up)."
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode."}),
                "vae": (f"{VAE},VAE", {"tooltip": "From Load Flux VAE, or core's Load VAE (decodes as core's VAE Decode)."}),
                "tiled": ("BOOLEAN", {"default": False, "tooltip": "Decode in overlapping tiles with blended seams to save memory."}),
                "tile_size": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 32, "tooltip": "Tile size in pixels (tiled only)."}),
                "overlap": ("INT", {"default": 64, "min": 0, "max": 4096, "step": 32, "tooltip": "Overlap between tiles in pixels (tiled only)."}),
            }
        }  # fmt: skip

    @torch.inference_mode()
    def decode(self, samples, vae, tiled, tile_size, overlap):
        if bridge.is_core(vae):
            return (bridge.decode(vae, samples["samples"], tiled, tile_size, overlap).float().cpu(),)
        raw = samples["samples"].to(vae.device, vae.dtype)
        if tiled:
            decoded = vae.decode_tiled(raw, tile_size=tile_size, overlap=overlap, scaled=False)
        else:
            decoded = decode_on(vae, raw, raw.device, scaled=False)  # makes room; out of memory, it tiles
        return (to_unit_images(decoded).cpu(),)


class FluxKitVAEEncode:
    DESCRIPTION = "Encodes an image to a Flux latent (the posterior mean), for image-to-image with denoise below 1."
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latent; its size is the image's rounded down to a multiple of 16.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to encode, e.g. from Load Image."}),
                "vae": (f"{VAE},VAE", {"tooltip": "From Load Flux VAE, or core's Load VAE."}),
            }
        }

    @torch.inference_mode()
    def encode(self, pixels, vae):
        pixels = crop16(pixels)
        if bridge.is_core(vae):
            return ({"samples": bridge.encode_image(vae, pixels).float().cpu()},)
        image = from_unit_images(pixels).to(vae.device, vae.dtype)
        return ({"samples": vae.encode(image, scaled=False).float().cpu()},)


NODE_CLASS_MAPPINGS = {"FluxKitVAEDecode": FluxKitVAEDecode, "FluxKitVAEEncode": FluxKitVAEEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxKitVAEDecode": "Flux VAE Decode (FluxKit)", "FluxKitVAEEncode": "Flux VAE Encode (FluxKit)"}
