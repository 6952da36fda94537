"""FLUX.1 Tools and Kontext nodes. Glue over flux_core.tools / canny / redux.

The conditioning nodes write ComfyUI's own CONDITIONING keys, so they mix with core nodes both ways:
`reference_latents` (raw latents, as core's ReferenceLatent), `concat_latent_image` (raw latent) and `concat_mask`
((B, 1, H, W), as core's InpaintModelConditioning / InstructPixToPixConditioning). The FluxKit sampler reads them
from the positive conditioning (image_conditioning below).
"""
import torch

from flux_core.canny import canny
from flux_core.pipeline import latent_from_raw
from flux_core.redux import Redux, append_tokens, load_redux_projector, load_siglip
from flux_core.tools import (
    ImageCond, combine, control_cond, fill_cond, kontext_cond, kontext_size, masked_image, outpaint_pad, resize_images,
)  # fmt: skip

from . import host
from .common import CATEGORY, LOADED, VAE, compute_dtype, file_fingerprint
from .vae import FluxKitVAEEncode, crop16

REDUX = "FLUXKIT_REDUX"
REDUX_FILE, SIGLIP_FILE = "flux1-redux-dev.safetensors", "sigclip_vision_patch14_384.safetensors"
PAD = {"default": 0, "min": 0, "max": 16384, "step": 8}


def image_conditioning(conditioning) -> ImageCond | None:
    """The image inputs (Kontext references, Fill / control latents) held by a CONDITIONING's first entry."""
    extras = conditioning[0][1] if conditioning else {}
    parts = []
    if extras.get("concat_latent_image") is not None:
        latent, mask = latent_from_raw(extras["concat_latent_image"].float()), extras.get("concat_mask")
        parts.append(control_cond(latent) if mask is None else fill_cond(latent, mask.reshape(-1, *mask.shape[-2:]).float()))
    if extras.get("reference_latents"):
        parts.append(kontext_cond([latent_from_raw(r.float()) for r in extras["reference_latents"]]))
    return combine(parts)


def _with(conditioning, **values):
    """A copy of every entry with these extra keys (reference_latents appended to, as ComfyUI's append=True)."""
    out = []
    for txt, extras in conditioning:
        extras = dict(extras)
        for key, value in values.items():
            extras[key] = extras.get(key, []) + value if key == "reference_latents" else value
        out.append([txt, extras])
    return out


def _encode(vae, pixels) -> torch.Tensor:
    return FluxKitVAEEncode().encode(pixels, vae)[0]["samples"]


class FluxKitKontextReference:
    DESCRIPTION = (
        "Adds a reference image for FLUX.1 Kontext (flux1-kontext-dev) to the conditioning: encoded by the VAE and "
        "appended to the image tokens as context. Chain several for several references. Same key as core's "
        "ReferenceLatent. The latent output is an empty latent of the reference's size, the usual output size."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("The conditioning with the reference added.", "An empty latent of the (resized) reference's size.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt (the edit instruction), or a previous Kontext Reference."}),
                "vae": (VAE, {"tooltip": "From Load Flux VAE."}),
                "image": ("IMAGE", {"tooltip": "The image to edit or take from."}),
                "kontext_resize": ("BOOLEAN", {"default": True, "tooltip": "Resize to the Kontext resolution closest in aspect ratio (about 1 megapixel, as Black Forest Labs' reference and core's FluxKontextImageScale). Off keeps the size (cropped to a multiple of 16)."}),
            }
        }  # fmt: skip

    def apply(self, conditioning, vae, image, kontext_resize):
        if kontext_resize:
            image = resize_images(image, *kontext_size(image.shape[2], image.shape[1]))
        raw = _encode(vae, image)
        empty = torch.zeros(1, *raw.shape[1:])
        return _with(conditioning, reference_latents=[raw]), {"samples": empty}


class FluxKitFillConditioning:
    DESCRIPTION = (
        "Inpainting / outpainting with FLUX.1 Fill (flux1-fill-dev): the image with the masked part blanked, encoded, "
        "plus the mask, are given to the model beside the noise. White (1) in the mask is repainted. Same keys as "
        "core's InpaintModelConditioning."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("The conditioning with the Fill inputs.", "The encoded image: sample it at denoise 1.0 (Fill's normal use).")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt: what to paint into the masked area."}),
                "vae": (VAE, {"tooltip": "From Load Flux VAE."}),
                "image": ("IMAGE", {"tooltip": "The image to inpaint (or the padded image to outpaint)."}),
                "mask": ("MASK", {"tooltip": "Where to repaint (1): Load Image's alpha, the mask editor, or Flux Outpaint Pad. Same size as the image."}),
            }
        }  # fmt: skip

    def apply(self, conditioning, vae, image, mask):
        mask = mask.reshape(-1, *mask.shape[-2:]).float()
        if mask.shape[-2:] != image.shape[1:3]:
            raise ValueError(
                f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is {image.shape[2]}x{image.shape[1]}: "
                "use the mask of the same image (Load Image's MASK output, or Flux Outpaint Pad's)"
                + ("; Load Image gives an empty 64x64 mask for an image without alpha: paint one in the mask editor"
                   if mask.shape[-2:] == (64, 64) and not mask.any() else "")
            )  # fmt: skip
        image, mask = crop16(image), crop16(mask)
        blanked = (masked_image(image.movedim(-1, 1)[:, :3] * 2 - 1, mask).movedim(1, -1) + 1) / 2
        conditioning = _with(conditioning, concat_latent_image=_encode(vae, blanked), concat_mask=mask[:, None])
        return conditioning, {"samples": _encode(vae, image)}


class FluxKitOutpaintPad:
    DESCRIPTION = "Pads an image for outpainting with Flux Fill: grey new borders and a mask that is 1 on them."
    CATEGORY = f"{CATEGORY}/image"
    RETURN_TYPES = ("IMAGE", "MASK")
    RETURN_NAMES = ("image", "mask")
    OUTPUT_TOOLTIPS = ("The padded image.", "1 on the added borders (and the feathered seam), 0 on the original.")
    FUNCTION = "pad"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image to extend."}),
                "left": ("INT", {**PAD, "tooltip": "Pixels to add on the left."}),
                "top": ("INT", {**PAD, "tooltip": "Pixels to add on top."}),
                "right": ("INT", {**PAD, "tooltip": "Pixels to add on the right."}),
                "bottom": ("INT", {**PAD, "tooltip": "Pixels to add at the bottom."}),
                "feathering": ("INT", {"default": 24, "min": 0, "max": 16384, "step": 1, "tooltip": "Pixels of the original, next to a padded side, that are partly repainted to hide the seam."}),
            }
        }  # fmt: skip

    def pad(self, image, left, top, right, bottom, feathering):
        return outpaint_pad(image, left, top, right, bottom, feathering)


class FluxKitControlConditioning:
    DESCRIPTION = (
        "Structure control with FLUX.1 Canny / Depth (flux1-canny-dev, flux1-depth-dev): the control image (an edge "
        "map from Flux Canny, or a depth map from any depth preprocessor) is encoded and given to the model beside "
        "the noise. Same key as core's InstructPixToPixConditioning."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING", "LATENT")
    RETURN_NAMES = ("conditioning", "latent")
    OUTPUT_TOOLTIPS = ("The conditioning with the control image.", "An empty latent of the control image's size.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt."}),
                "vae": (VAE, {"tooltip": "From Load Flux VAE."}),
                "control_image": ("IMAGE", {"tooltip": "Canny edges or a depth map; the output has its size (cropped to a multiple of 16)."}),
            }
        }  # fmt: skip

    def apply(self, conditioning, vae, control_image):
        raw = _encode(vae, control_image)
        return _with(conditioning, concat_latent_image=raw), {"samples": torch.zeros(1, *raw.shape[1:])}


class FluxKitCanny:
    DESCRIPTION = "Canny edge detection (pure torch, no extra pack): the control image for flux1-canny-dev."
    CATEGORY = f"{CATEGORY}/image"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("White edges on black.",)
    FUNCTION = "detect"

    @classmethod
    def INPUT_TYPES(cls):
        threshold = {"min": 0.01, "max": 0.99, "step": 0.01}
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The image whose edges guide the generation."}),
                "low_threshold": ("FLOAT", {**threshold, "default": 0.4, "tooltip": "Weaker edges are kept only where they connect to strong ones."}),
                "high_threshold": ("FLOAT", {**threshold, "default": 0.8, "tooltip": "Edges stronger than this are always kept. Lower both for more detail."}),
            }
        }  # fmt: skip

    def detect(self, image, low_threshold, high_threshold):
        return (canny(image, low_threshold, high_threshold),)


class FluxKitReduxLoader:
    DESCRIPTION = (
        "Loads FLUX.1 Redux: the SigLIP vision model (sigclip_vision_patch14_384.safetensors in models/clip_vision) "
        "and the Redux projector (flux1-redux-dev.safetensors in models/style_models)."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (REDUX,)
    RETURN_NAMES = ("redux",)
    OUTPUT_TOOLTIPS = ("SigLIP and the projector, for Flux Redux Apply.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                # with an empty folder the official name is offered, so loading says where to put it
                "redux_name": (host.model_list("style_models") or [REDUX_FILE], {"tooltip": f"The Redux projector, {REDUX_FILE}."}),
                "clip_vision_name": (host.model_list("clip_vision") or [SIGLIP_FILE], {"tooltip": f"SigLIP so400m, {SIGLIP_FILE}."}),
            }
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, redux_name, clip_vision_name):
        return file_fingerprint(host.model_path("style_models", redux_name)), file_fingerprint(host.model_path("clip_vision", clip_vision_name))

    def load(self, redux_name, clip_vision_name):
        paths = host.model_path("style_models", redux_name), host.model_path("clip_vision", clip_vision_name)
        device = host.torch_device()
        dtype = compute_dtype(device, None)
        key = ("redux", *(file_fingerprint(p) for p in paths), str(device))
        return (LOADED.get(key, lambda: Redux(load_siglip(paths[1], dtype, device), load_redux_projector(paths[0], dtype, device))),)


class FluxKitReduxApply:
    DESCRIPTION = (
        "Uses an image as a prompt (FLUX.1 Redux, with flux1-dev or schnell): its SigLIP features, projected to "
        "T5 tokens, are appended to the prompt's. Lower strength or downsample to let the text weigh more."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt with the image tokens appended.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING", {"tooltip": "The prompt (may be empty)."}),
                "redux": (REDUX, {"tooltip": "From Load Flux Redux."}),
                "image": ("IMAGE", {"tooltip": "The image to make variations of; several images give one token sequence."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01, "tooltip": "Multiplies the image tokens (core StyleModelApply's multiply)."}),
                "downsampling_factor": ("INT", {"default": 1, "min": 1, "max": 9, "tooltip": "Area-averages the 27x27 image tokens by this factor per side (3: 81 tokens), so the prompt weighs more."}),
                "crop": (["center", "none"], {"default": "center", "tooltip": "center: crop the middle square (as core's CLIP Vision Encode); none: squash the whole image (as BFL's reference)."}),
            }
        }  # fmt: skip

    def apply(self, conditioning, redux, image, strength, downsampling_factor, crop):
        tokens = redux.tokens(image, strength, downsampling_factor, crop == "center")
        return ([[append_tokens(txt, tokens), extras] for txt, extras in conditioning],)


NODE_CLASS_MAPPINGS = {
    "FluxKitKontextReference": FluxKitKontextReference,
    "FluxKitFillConditioning": FluxKitFillConditioning,
    "FluxKitOutpaintPad": FluxKitOutpaintPad,
    "FluxKitControlConditioning": FluxKitControlConditioning,
    "FluxKitCanny": FluxKitCanny,
    "FluxKitReduxLoader": FluxKitReduxLoader,
    "FluxKitReduxApply": FluxKitReduxApply,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxKitKontextReference": "Flux Kontext Reference (FluxKit)",
    "FluxKitFillConditioning": "Flux Fill Conditioning (FluxKit)",
    "FluxKitOutpaintPad": "Flux Outpaint Pad (FluxKit)",
    "FluxKitControlConditioning": "Flux Control Conditioning (FluxKit)",
    "FluxKitCanny": "Flux Canny (FluxKit)",
    "FluxKitReduxLoader": "Load Flux Redux (FluxKit)",
    "FluxKitReduxApply": "Flux Redux Apply (FluxKit)",
}
