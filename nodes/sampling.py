"""Prompt encoding, empty latent and the sampler node. Glue over flux_core.pipeline."""
import torch

from ..flux_core.pipeline import Conditioning, latent_from_raw, latent_to_raw, sample
from ..flux_core.sampling import MAX_BATCH, MAX_RESOLUTION, FlowMatch, check_image_size, check_latent
from . import host
from .common import CATEGORY, MODEL, TEXT_ENCODERS
from .tools import image_conditioning


class FluxKitTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with CLIP-L (the pooled vector) and T5-XXL (the token sequence). Output is ComfyUI's "
        "standard CONDITIONING, so core conditioning nodes (FluxGuidance, combine, zero out) work on it."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("T5 tokens with the CLIP pooled vector and the guidance value.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoders": (TEXT_ENCODERS, {"tooltip": "From Load Flux Text Encoders."}),
                "clip_l": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "Prompt for CLIP-L (77 tokens): short, tag-like."}),
                "t5xxl": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "Prompt for T5-XXL: the full description in natural language."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Distilled guidance stored in the conditioning, read by core samplers; the FluxKit sampler has its own guidance input."}),
                "t5_tokens": (["512", "256"], {"default": "512", "tooltip": "T5 padding length: 512 for dev-type models, 256 for schnell, as Black Forest Labs' reference."}),
            }
        }  # fmt: skip

    def encode(self, text_encoders, clip_l, t5xxl, guidance, t5_tokens):
        with text_encoders.encoders.on(text_encoders.device):  # back to the offload device afterwards
            txt, pooled = text_encoders.encoders.encode([clip_l], [t5xxl], t5_max_length=int(t5_tokens))
        host.free_memory()
        txt, pooled = txt.float().cpu(), pooled.float().cpu()
        return ([[txt, {"pooled_output": pooled, "guidance": guidance}]],)


class FluxKitEmptyLatent:
    DESCRIPTION = "An empty 16-channel Flux latent, the same as core's EmptySD3LatentImage."
    CATEGORY = f"{CATEGORY}/latent"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("Zeros of shape (batch, 16, height/8, width/8).",)
    FUNCTION = "generate"

    @classmethod
    def INPUT_TYPES(cls):
        size = {"default": 1024, "min": 16, "max": MAX_RESOLUTION, "step": 16}
        return {
            "required": {
                "width": ("INT", {**size, "tooltip": "Image width in pixels, a multiple of 16."}),
                "height": ("INT", {**size, "tooltip": "Image height in pixels, a multiple of 16."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": MAX_BATCH, "tooltip": "Images per run."}),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, width, height):
        """The library's size check, run when the workflow is validated, before any model loads."""
        try:
            check_image_size(*(16 if v is None else v for v in (width, height)))  # a linked one is checked at run time
        except ValueError as e:
            return str(e)
        return True

    def generate(self, width, height, batch_size):
        check_image_size(width, height, batch_size)
        return ({"samples": torch.zeros(batch_size, 16, height // 8, width // 8)},)


def _conditioning(conditioning, what: str) -> Conditioning:
    """Our view of ComfyUI's CONDITIONING [[tokens, {"pooled_output": ...}]]."""
    if not conditioning:
        raise ValueError(f"the {what} conditioning is empty; connect a FluxKit Text Encode node")
    if len(conditioning) > 1:
        raise ValueError(
            f"the {what} conditioning holds {len(conditioning)} entries (combined or area prompts), which the FluxKit "
            "sampler does not support; encode one prompt instead"
        )
    txt, extras = conditioning[0]
    return Conditioning(txt, extras.get("pooled_output"))


class FluxKitSampler:
    DESCRIPTION = (
        "Samples a Flux latent with Euler on the flow-matching schedule of Black Forest Labs' reference: shifted by "
        "image size for dev-type models, linear for schnell. guidance is the distilled guidance of dev models; cfg "
        "above 1 adds true classifier-free guidance with the negative prompt (twice the compute)."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent, for VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load Flux Model."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
                "latent_image": ("LATENT", {"tooltip": "An empty latent for text-to-image, or an encoded image for image-to-image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed; image i of a batch uses seed + i."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps: 20-50 for dev, 4 for schnell."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Distilled guidance of dev-type models (ignored by schnell). Higher follows the prompt more closely."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "True classifier-free guidance. 1.0 is off (Flux's normal use); above 1 needs a negative prompt."}),
                "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift at 4096 image tokens (1024x1024)."}),
                "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift at 256 image tokens (256x256)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "1.0 for text-to-image; lower keeps more of the input latent (image-to-image)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "What the image should not show; used only when cfg > 1."}),
            },
        }  # fmt: skip

    def sample(self, model, positive, latent_image, seed, steps, guidance, cfg, max_shift, base_shift, denoise, negative=None):
        raw = latent_image["samples"]
        check_latent(raw)
        if cfg > 1 and negative is None:
            raise ValueError(f"cfg is {cfg}: connect a negative prompt, or set cfg to 1.0 (Flux's normal use)")
        flow = FlowMatch(shift=model.params.guidance_embed, base_shift=base_shift, max_shift=max_shift)
        host.check_interrupt()
        out = sample(
            model, _conditioning(positive, "positive"), latent_from_raw(raw), seed=seed, steps=steps,
            guidance=guidance, cfg=cfg, negative=None if negative is None else _conditioning(negative, "negative"),
            denoise=denoise, flow=flow, callback=host.step_callback(steps), image_cond=image_conditioning(positive),
        )  # fmt: skip
        return ({**latent_image, "samples": latent_to_raw(out)},)


NODE_CLASS_MAPPINGS = {
    "FluxKitTextEncode": FluxKitTextEncode,
    "FluxKitEmptyLatent": FluxKitEmptyLatent,
    "FluxKitSampler": FluxKitSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxKitTextEncode": "Flux Text Encode (FluxKit)",
    "FluxKitEmptyLatent": "Empty Flux Latent (FluxKit)",
    "FluxKitSampler": "Flux Sampler (FluxKit)",
}
