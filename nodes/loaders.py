"""Loader nodes: transformer, text encoders (CLIP-L + T5), VAE. Glue over flux_core's loaders."""
from flux_core.autoencoder import load_autoencoder
from flux_core.conditioning import find_tokenizer, load_text_encoders
from flux_core.gguf import FLUX_DEV_WEIGHTS, T5_XXL_WEIGHTS, quant_guide
from flux_core.loading import load_flux
from flux_core.model import PRESETS

from . import bridge, host
from .common import (
    CATEGORY, LOADED, MODEL, TEXT_ENCODERS, VAE, WEIGHT_DTYPES, TextEncodersOn, compute_dtype, file_fingerprint,
)  # fmt: skip


class FluxKitModelLoader:
    DESCRIPTION = (
        "Loads a Flux transformer from models/diffusion_models (or unet): BFL files (flux1-dev, flux1-schnell, "
        "fill, canny, depth, kontext, krea), ComfyUI all-in-one checkpoints, diffusers transformer folders, fp8 "
        "files and GGUF quantisations (flux1-dev-Q8_0.gguf ...). The architecture is read from the weights, so any "
        "width loads."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MODEL, "MODEL")
    RETURN_NAMES = ("model", "MODEL")
    OUTPUT_TOOLTIPS = (
        "The Flux transformer, for the FluxKit sampler.",
        "The same weights (no copy) as ComfyUI's MODEL, for core nodes: KSampler, LoraLoaderModelOnly, "
        "ModelSamplingFlux... The FluxKit sampler takes it too, with the patches core nodes added.",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "unet_name": (host.model_list("diffusion_models"), {
                    "tooltip": "The transformer weights file or diffusers folder. GGUF files stay quantised in memory "
                    "and are dequantised layer by layer while computing: "
                    + quant_guide(FLUX_DEV_WEIGHTS) + ", for flux-dev.",
                }),
                "weight_dtype": (list(WEIGHT_DTYPES), {
                    "default": "default",
                    "tooltip": "How weights are kept in memory. default: as stored (bf16 on GPU, fp32 on CPU for "
                    "full-precision files); fp8 halves memory and is upcast layer by layer while computing; "
                    "fp8_e4m3fn_fast also multiplies in fp8 on RTX 40xx / H100 and newer GPUs: steps about 1.2x "
                    "faster than fp8_e4m3fn, slightly lower quality. GGUF files: default keeps them quantised; "
                    "another choice dequantises them once, at load.",
                }),
            },
            "optional": {
                "preset": (["auto", *PRESETS], {
                    "default": "auto",
                    "tooltip": "auto infers the architecture from the weights; a preset fixes the rotary axes and "
                    "theta, which the weights cannot tell, and checks the file against it.",
                }),
                "vram_budget_gb": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                    "tooltip": "GPU memory for the transformer's weights. 0 = automatic, like ComfyUI: when sampling, "
                    "ComfyUI first unloads what it holds if the model needs the room, then as many blocks as fit stay "
                    "on the GPU and the rest stream from RAM each step (measured on an emulated 12 GB card: flux-dev "
                    "bf16 at 0.85x ComfyUI's time per step, at the PCIe limit). A number caps it, e.g. to keep room "
                    "for other models.",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, unet_name):
        return host.missing_models("diffusion_models", unet_name) or True

    @classmethod
    def IS_CHANGED(cls, unet_name, weight_dtype, preset="auto", vram_budget_gb=0.0):
        return file_fingerprint(host.model_path("diffusion_models", unet_name))

    def load(self, unet_name, weight_dtype, preset="auto", vram_budget_gb=0.0):
        path = host.model_path("diffusion_models", unet_name)
        device = host.torch_device()
        storage = WEIGHT_DTYPES[weight_dtype]
        key = ("flux", file_fingerprint(path), weight_dtype, preset, str(device))
        model = LOADED.get(key, lambda: load_flux(
            path, dtype=compute_dtype(device, storage), weight_dtype=storage,
            preset=None if preset == "auto" else preset, fp8_matmul=weight_dtype == "fp8_e4m3fn_fast",
            device="cpu" if device.type == "cuda" else device,  # memory-mapped; the sampler places it on the GPU
        ))  # fmt: skip
        model.vram_budget = int(vram_budget_gb * 2**30) if vram_budget_gb > 0 else None
        return (model, bridge.core_model(model) if host.in_comfyui() else model)


class FluxKitTextEncoderLoader:
    DESCRIPTION = (
        "Loads CLIP-L and T5-XXL from models/text_encoders (or clip): clip_l.safetensors, t5xxl_fp16 / fp8 / GGUF "
        "files or "
        "diffusers text_encoder folders. The tokenizers are ComfyUI's, else the copy shipped with the pack."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (TEXT_ENCODERS, "CLIP")
    RETURN_NAMES = ("text_encoders", "CLIP")
    OUTPUT_TOOLTIPS = (
        "CLIP-L and T5-XXL with their tokenizers, for the FluxKit text encode node.",
        "The same weights (no copy) as ComfyUI's Flux CLIP, for core nodes: CLIPTextEncodeFlux, CLIPTextEncode... "
        "(not for scaled fp8 or GGUF T5 files: load those with DualCLIPLoader).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        names = host.model_list("text_encoders")
        return {
            "required": {
                "clip_name1": (names, {"tooltip": "CLIP-L, e.g. clip_l.safetensors."}),
                "clip_name2": (names, {
                    "tooltip": "T5-XXL, e.g. t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or a GGUF "
                    "(t5-v1_1-xxl-encoder-Q8_0.gguf), kept quantised: "
                    + quant_guide(T5_XXL_WEIGHTS) + ".",
                }),
                "device": (["default", "cpu"], {
                    "default": "default",
                    "tooltip": "cpu keeps the text encoders off the GPU entirely (slower prompts, more VRAM for the model).",
                }),
            }
        }

    @classmethod
    def VALIDATE_INPUTS(cls, clip_name1, clip_name2):
        """Both files there and both tokenizers found, before any model loads."""
        missing = host.missing_models("text_encoders", clip_name1, clip_name2)
        if missing:
            return missing
        for which, name in (("clip", clip_name1), ("t5", clip_name2)):
            path = host.model_path("text_encoders", name) if name is not None else None
            try:
                find_tokenizer(which, host.tokenizer_dirs(), path, host.comfy_root())
            except FileNotFoundError as e:
                return " ".join(str(e).split())  # one line
        return True

    @classmethod
    def IS_CHANGED(cls, clip_name1, clip_name2, device):
        return tuple(file_fingerprint(host.model_path("text_encoders", n)) for n in (clip_name1, clip_name2))

    def load(self, clip_name1, clip_name2, device):
        paths = [host.model_path("text_encoders", name) for name in (clip_name1, clip_name2)]
        run_device = host.torch_device() if device == "default" else host.offload_device()
        key = ("text", *(file_fingerprint(p) for p in paths), str(run_device))
        encoders = LOADED.get(key, lambda: load_text_encoders(
            paths[0], paths[1], tokenizer_dirs=host.tokenizer_dirs(), comfy_root=host.comfy_root(),
            dtype=compute_dtype(run_device, None), device=host.offload_device(),
        ))  # fmt: skip
        ours = TextEncodersOn(encoders, run_device)
        return (ours, bridge.core_clip(encoders, run_device) if host.in_comfyui() else ours)


class FluxKitVAELoader:
    DESCRIPTION = "Loads the Flux autoencoder (ae.safetensors, or a diffusers vae folder) from models/vae."
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (VAE, "VAE")
    RETURN_NAMES = ("vae", "VAE")
    OUTPUT_TOOLTIPS = (
        "The 16-channel Flux autoencoder.",
        "The same weights (no copy) as ComfyUI's VAE, for core nodes: VAEDecode, VAEEncode, InpaintModelConditioning...",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": (host.model_list("vae"), {"tooltip": "The Flux VAE, e.g. ae.safetensors."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, vae_name):
        return host.missing_models("vae", vae_name) or True

    @classmethod
    def IS_CHANGED(cls, vae_name):
        return file_fingerprint(host.model_path("vae", vae_name))

    def load(self, vae_name):
        path = host.model_path("vae", vae_name)
        device = host.torch_device()
        key = ("vae", file_fingerprint(path), str(device))
        ae = LOADED.get(key, lambda: load_autoencoder(path, dtype=compute_dtype(device, None), device=device))
        return (ae, bridge.core_vae(ae) if host.in_comfyui() else ae)


NODE_CLASS_MAPPINGS = {
    "FluxKitModelLoader": FluxKitModelLoader,
    "FluxKitTextEncoderLoader": FluxKitTextEncoderLoader,
    "FluxKitVAELoader": FluxKitVAELoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxKitModelLoader": "Load Flux Model (FluxKit)",
    "FluxKitTextEncoderLoader": "Load Flux Text Encoders (FluxKit)",
    "FluxKitVAELoader": "Load Flux VAE (FluxKit)",
}
