"""Prompt encoding, empty latent and the sampler node. Glue over flux_core.pipeline."""
import torch

from flux_core.pipeline import Conditioning, latent_from_raw, latent_to_raw, sample, seeded_noise
from flux_core.sampling import COMFY_GRID, MAX_BATCH, MAX_RESOLUTION, FlowMatch, check_image_size, check_latent, unpack

from . import bridge, host
from .common import CATEGORY, MODEL, TEXT_ENCODERS, encoders_on, place_transformer
from .tools import image_conditioning


MATCH = ("bfl", "comfyui")  # whose image the sampler reproduces: BFL's reference, or core KSampler's


class FluxKitTextEncode:
    DESCRIPTION = (
        "Encodes a prompt with CLIP-L (the pooled vector) and T5-XXL (the token sequence) into ComfyUI's standard "
        "CONDITIONING with the guidance value, as core's CLIPTextEncodeFlux: core samplers take it, and the FluxKit "
        "sampler reads its guidance (so FluxGuidance changes it) and averages combined prompts (ConditioningCombine) "
        "as core does; area, mask and timestep-range prompts need core's KSampler. Takes our text encoders or a core "
        "CLIP (DualCLIPLoader, type flux), which encodes as core does."
    )
    CATEGORY = f"{CATEGORY}/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("T5 tokens with the CLIP pooled vector and the guidance value.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoders": (f"{TEXT_ENCODERS},CLIP", {"tooltip": "From Load Flux Text Encoders, or a core CLIP (DualCLIPLoader, type flux)."}),
                "clip_l": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "Prompt for CLIP-L (77 tokens): short, tag-like."}),
                "t5xxl": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "Prompt for T5-XXL: the full description in natural language."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Distilled guidance stored in the conditioning (as core's CLIPTextEncodeFlux), read by core samplers and the FluxKit sampler; FluxGuidance replaces it."}),
                "t5_tokens": (["512", "256", "comfyui"], {"default": "512", "tooltip": "T5 padding: 512 tokens for dev-type models, 256 for schnell, as Black Forest Labs' reference (longer prompts are cut); comfyui: at least 256, longer prompts kept whole, as core's text encoders (for core's exact image). A core CLIP always encodes as core."}),
            }
        }  # fmt: skip

    def encode(self, text_encoders, clip_l, t5xxl, guidance, t5_tokens):
        if bridge.is_core(text_encoders):
            return (bridge.encode(text_encoders, clip_l, t5xxl, guidance),)
        encoders = text_encoders.encoders
        if t5_tokens == "comfyui":  # core pads T5 to 256 tokens and cuts nothing
            length = max(256, len(encoders.t5_tokenizer(t5xxl)["input_ids"]))
        else:
            length = int(t5_tokens)
        with encoders_on(encoders, text_encoders.device, length):  # on the GPU only while encoding
            txt, pooled = encoders.encode([clip_l], [t5xxl], t5_max_length=length)
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


# Conditioning keys that place a prompt in part of the image or of the schedule, or add a model: core's KSampler
# handles them; the FluxKit sampler refuses them rather than ignore them.
UNSUPPORTED_KEYS = {
    "area": "an area (ConditioningSetArea)", "mask": "a mask (ConditioningSetMask)",
    "timestep_start": "a timestep range (ConditioningSetTimestepRange)", "timestep_end": "a timestep range",
    "control": "a ControlNet (ControlNetApply)", "gligen": "GLIGEN boxes", "hooks": "hooks",
}  # fmt: skip


def _conditioning(conditioning, what: str) -> list[Conditioning]:
    """Our view of ComfyUI's CONDITIONING [[tokens, {"pooled_output", "guidance", "strength", ...}], ...]."""
    if not conditioning:
        raise ValueError(f"the {what} conditioning is empty; connect a FluxKit Text Encode node")
    entries = []
    for txt, extras in conditioning:
        for key, name in UNSUPPORTED_KEYS.items():
            if extras.get(key) is not None:
                raise ValueError(
                    f"the {what} conditioning holds {name}, which the FluxKit sampler does not support: sample with "
                    "core's KSampler (Load Flux Model's MODEL output feeds it), or leave that node out"
                )
        entries.append(Conditioning(txt, extras.get("pooled_output"), extras.get("guidance"), extras.get("strength", 1.0)))
    return entries


class FluxKitSampler:
    DESCRIPTION = (
        "Samples a Flux latent with Euler on the flow-matching schedule of Black Forest Labs' reference: shifted by "
        "image size for dev-type models, linear for schnell. Each prompt's distilled guidance comes from its "
        "conditioning (text encode's guidance, FluxGuidance); combined prompts are averaged as core does. cfg above "
        "1 adds true classifier-free guidance with the negative prompt (twice the compute). match = comfyui gives "
        "core KSampler's image (euler, simple, ModelSamplingFlux with this max/base shift and the image's size)."
    )
    CATEGORY = f"{CATEGORY}/sampling"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent, for VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (f"{MODEL},MODEL", {"tooltip": "From Load Flux Model, or any core Flux MODEL (Load Diffusion Model, LoRA loaders...)."}),
                "positive": ("CONDITIONING", {"tooltip": "What the image should show."}),
                "latent_image": ("LATENT", {"tooltip": "An empty latent for text-to-image, or an encoded image for image-to-image."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True, "tooltip": "Noise seed; with match = bfl image i of a batch uses seed + i, with comfyui one generator draws the whole batch."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps: 20-50 for dev, 4 for schnell."}),
                "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "Distilled guidance for prompts whose conditioning holds none (core CLIPTextEncode); our text encode and FluxGuidance store their own. Ignored by schnell."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 100.0, "step": 0.1, "round": 0.01, "tooltip": "True classifier-free guidance. 1.0 is off (Flux's normal use); above 1 needs a negative prompt."}),
                "max_shift": ("FLOAT", {"default": 1.15, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift at 4096 image tokens (1024x1024)."}),
                "base_shift": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "Schedule shift at 256 image tokens (256x256). Set both shifts to 1.15 to match a core KSampler run without ModelSamplingFlux."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01, "tooltip": "1.0 for text-to-image; lower keeps more of the input latent (image-to-image)."}),
            },
            "optional": {
                "negative": ("CONDITIONING", {"tooltip": "What the image should not show; used only when cfg > 1."}),
                "match": (list(MATCH), {"default": "bfl", "tooltip": "bfl: Black Forest Labs' reference (exact schedule, noise seed + i per image). comfyui: core KSampler's (euler, simple) image: its sigma table (10000 entries, schnell 1000) and one noise generator for the batch; pair with t5_tokens = comfyui."}),
            },
        }  # fmt: skip

    def sample(self, model, positive, latent_image, seed, steps, guidance, cfg, max_shift, base_shift, denoise, negative=None, match="bfl"):
        raw = latent_image["samples"]
        check_latent(raw)
        if cfg > 1 and negative is None:
            raise ValueError(f"cfg is {cfg}: connect a negative prompt, or set cfg to 1.0 (Flux's normal use)")
        if match not in MATCH:
            raise ValueError(f"match must be one of {', '.join(MATCH)}, got {match!r}")
        positive_, negative_ = _conditioning(positive, "positive"), None if negative is None else _conditioning(negative, "negative")
        model = bridge.token_model(model)  # a core MODEL is loaded (and LoRA-patched) by ComfyUI here
        distilled = model.params.guidance_embed
        flow = FlowMatch(shift=distilled, base_shift=base_shift, max_shift=max_shift, grid=COMFY_GRID[distilled] if match == "comfyui" else 0)
        noise = seeded_noise(tuple(raw.shape), seed, per_item=False) if match == "comfyui" else None
        height, width = raw.shape[-2:]
        copies, text_tokens = 2 if cfg > 1 else 1, max(c.txt.shape[1] for c in positive_)
        place_transformer(model, raw.shape[0] * copies, (height // 2) * (width // 2), text_tokens)  # streams if short
        host.check_interrupt()
        out = sample(
            model, positive_, latent_from_raw(raw), seed=seed, steps=steps, guidance=guidance, cfg=cfg,
            negative=negative_, denoise=denoise, flow=flow, noise=noise, image_cond=image_conditioning(positive),
            callback=host.step_callback(steps, preview=lambda x: unpack(x, height, width)),
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
