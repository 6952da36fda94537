"""The LoRA node: a Flux LoRA (and its CLIP-L part) on a twin of the model. Glue over flux_core.lora."""
import logging

from flux_core import streaming
from flux_core.lora import apply_loras, read_lora

from . import host
from .common import CATEGORY, MODEL, TEXT_ENCODERS, ModelCache, TextEncodersOn, file_fingerprint

log = logging.getLogger(__name__)
PARSED = ModelCache(size=8)  # parsed (memory-mapped) LoRA files: a new strength does not read the file again
LORA_FILE = "flux_lora.safetensors"  # the shipped workflow's name, listed while models/loras is empty


class FluxKitLoraLoader:
    DESCRIPTION = (
        "Applies a LoRA from models/loras to the Flux model and, when given, CLIP-L: kohya / OneTrainer, diffusers / "
        "PEFT (AI-Toolkit, SimpleTuner), XLabs, ComfyUI / BFL names, LyCORIS LoHa / LoKr and full-difference files, "
        "told apart by their keys. Chain several to stack them. The loaded model is left as it is (the output shares "
        "every weight the LoRA does not change); fp8 models keep the LoRA beside their fp8 weights, never rounded "
        "into them. BFL's Canny / Depth control LoRAs make flux1-dev a control model (feed it Flux Control "
        "Conditioning). A LoRA made for another model (SD 1.5, SDXL, another width) is refused, naming it."
    )
    CATEGORY = f"{CATEGORY}/loaders"
    RETURN_TYPES = (MODEL, TEXT_ENCODERS)
    RETURN_NAMES = ("model", "text_encoders")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA, for the FluxKit sampler or another LoRA node.",
        "The text encoders with the LoRA's CLIP-L part (as given when the LoRA has none; empty when none were given).",
    )
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        strength = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load Flux Model, a compile node or another LoRA node."}),
                "lora_name": (host.model_list("loras") or [LORA_FILE], {"tooltip": "The LoRA file (.safetensors) in models/loras."}),
                "strength_model": ("FLOAT", {**strength, "tooltip": "How strongly the LoRA changes the transformer; negative inverts it, 0 turns it off."}),
            },
            "optional": {
                "text_encoders": (TEXT_ENCODERS, {"tooltip": "From Load Flux Text Encoders, for LoRAs that also train CLIP-L (lora_te1_ keys)."}),
                "strength_clip": ("FLOAT", {**strength, "tooltip": "How strongly the LoRA changes CLIP-L."}),
                "apply": (["merge", "side path"], {
                    "default": "merge",
                    "tooltip": "merge: the LoRA is added into a copy of each layer it changes (full speed, memory for "
                    "those layers). side path: kept beside the weights (little memory, slightly slower steps). fp8 "
                    "and GGUF models keep the LoRA low rank, never rounded into their weights.",
                }),
            },
        }  # fmt: skip

    @classmethod
    def IS_CHANGED(cls, lora_name, **_constants):
        return file_fingerprint(host.model_path("loras", lora_name))

    def apply(self, model, lora_name, strength_model, text_encoders=None, strength_clip=1.0, apply="merge"):
        path = host.model_path("loras", lora_name)
        lora = PARSED.get(("lora", file_fingerprint(path)), lambda: read_lora(path))
        encoders = None if text_encoders is None else text_encoders.encoders
        streaming.unload(model)  # weights home first: the twin's patched layers are made there, the sampler places it
        model, encoders, (report,) = apply_loras(model, [(lora, strength_model, strength_clip)], encoders, apply == "merge")
        (log.warning if report.skipped else log.info)("LoRA %s", report)
        return model, None if encoders is None else TextEncodersOn(encoders, text_encoders.device)


NODE_CLASS_MAPPINGS = {"FluxKitLoraLoader": FluxKitLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxKitLoraLoader": "Load LoRA (FluxKit)"}
