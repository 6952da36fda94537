"""Shared node plumbing: categories, custom type names, weight dtypes, and the loaded-model cache."""
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import flux_core.model
import flux_core.streaming as streaming
import torch
from torch import nn

from . import host

log = logging.getLogger(__name__)
CATEGORY = "FluxKit"
MODEL = "FLUXKIT_MODEL"
TEXT_ENCODERS = "FLUXKIT_TEXT_ENCODERS"
VAE = "FLUXKIT_VAE"

# Weight storage choices of the model loader, as ComfyUI's "Load Diffusion Model" offers them.
WEIGHT_DTYPES = {
    "default": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,  # and fp8 matmuls (load_flux's fp8_matmul)
    "fp8_e5m2": torch.float8_e5m2,
}


def compute_dtype(device: torch.device, weight_dtype: torch.dtype | None) -> torch.dtype:
    """bf16 on accelerators, float32 on the CPU; fp16/bf16/fp32 weights compute in their own dtype."""
    if weight_dtype in (torch.bfloat16, torch.float16, torch.float32):
        return weight_dtype
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def file_fingerprint(path: Path) -> tuple:
    """Changes when the file (or a diffusers folder's contents) changes on disk."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return tuple((str(f), os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)


def tensor_bytes(value) -> int:
    """Bytes of the tensors a loaded model holds (an nn.Module, or an object whose attributes are modules)."""
    modules = [value] if isinstance(value, nn.Module) else [v for v in vars(value).values() if isinstance(v, nn.Module)]
    tensors = {t.data_ptr(): t.nbytes for m in modules for t in (*m.parameters(), *m.buffers())}
    return sum(tensors.values())


class ModelCache:
    """Keeps the last few loaded models so a re-run with unchanged loader inputs does not load again. On a CPU
    ComfyUI server RAM is the device memory: each entry is listed with ComfyUI, so its Unload Models / POST /free
    (and its own loads, when RAM is short) drop it from here."""

    def __init__(self, size: int = 2):
        self.size, self.entries = size, OrderedDict()

    def get(self, key, load):
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        value = load()
        self.entries[key] = value
        while len(self.entries) > self.size:
            self.drop(next(iter(self.entries.values())))
        if host.torch_device().type == "cpu":
            host.share_with_comfyui(value, tensor_bytes, self.drop)
        return value

    def drop(self, value) -> None:
        """Forget `value` (ComfyUI's caches may still hold it until their next reset)."""
        for key in [k for k, v in self.entries.items() if v is value]:
            del self.entries[key]
            log.info("FluxKit: unloaded %s (%.2f GB)", type(value).__name__, tensor_bytes(value) / 1e9)
        if isinstance(value, nn.Module):
            streaming.unload(value)  # its GPU memory goes now, not when ComfyUI's caches let go of it
        host.free_memory()


LOADED = ModelCache()


def place_transformer(model, batch: int, img_tokens: int, txt_tokens: int) -> None:
    """Our Flux (kept on the CPU by the loader) onto the GPU for sampling: ComfyUI first unloads its Flux models, and
    what else it holds if we need the room, then the blocks that still do not fit stream (flux_core.streaming);
    ComfyUI's Unload Models and its own loads can take the weights off again. `model.vram_budget` (the loader's)
    caps the GPU bytes."""
    device = host.torch_device()
    if device.type != "cuda" or not isinstance(model, flux_core.model.Flux):
        return  # core's transformers are placed by ComfyUI
    budget = getattr(model, "vram_budget", None)
    need = streaming.weight_bytes(model) + streaming.flux_activation_bytes(model, batch, img_tokens, txt_tokens)
    host.free_memory(need if budget is None else budget, keep=(streaming.placement_of(model),), transformers=True)
    placement = streaming.transformer_on(model, device, batch, img_tokens, txt_tokens, budget)
    if placement is not None:
        host.share_with_comfyui(placement, lambda p: p.resident_bytes, streaming.unload_placement)


@contextmanager
def encoders_on(encoders, device: torch.device, tokens: int):
    """Text encoders on `device` while encoding (ComfyUI frees the room first; T5 streams when it does not fit)."""
    if device.type == "cuda":
        host.free_memory(streaming.weight_bytes(encoders.clip, encoders.t5))
    with streaming.encoders_on(encoders, device, tokens):
        yield encoders



@dataclass
class TextEncodersOn:
    """Text encoders kept on the offload device, with the device they run on while encoding."""

    encoders: object  # flux_core.conditioning.TextEncoders
    device: torch.device
