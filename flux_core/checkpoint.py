"""Reading safetensors files lazily (memory-mapped), telling which model a file holds, loading into meta modules."""
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import Tensor, nn

from .ops import FP8_DTYPES, Linear

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20


class CheckpointError(ValueError):
    """A weight file that cannot be used as asked; the message names the file, the problem and the fix."""


def _not_safetensors(name: str, head: bytes, size: int, header_len: int) -> str:
    """What a file that does not parse as safetensors is, told by its first bytes, and what to do."""
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return (
            f"{name} is a pickle (.ckpt/.pt/.bin) checkpoint; pickles can run code when loaded and are refused. "
            "Use the .safetensors release of this model, or convert it with a trusted tool."
        )
    if head[:4] == b"GGUF":
        return (
            f"{name} is a GGUF quantised file; only the Flux model loader and the T5 text encoder loader read GGUF. "
            "Use a safetensors file here."
        )
    if head.startswith(b"version "):
        return (
            f"{name} is a Git LFS pointer ({size} bytes), not the weights: fetch them with `git lfs pull` "
            "or download the file itself."
        )
    if head.lower().startswith((b"<!doctyp", b"<html")):
        return f"{name} is a web page (HTML), not weights: the download failed, download it again"
    if len(head) < 8:
        return f"{name} is not a safetensors file (only {size} bytes)"
    if header_len > size - 8:
        return f"{name} is not a safetensors file or is truncated (header says {header_len} bytes, file has {size})"
    return f"{name} is not a safetensors file (no JSON header)"


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The safetensors JSON header (without __metadata__) and the byte offset where tensor data starts."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        raw = f.read(header_len) if header_len <= min(_MAX_HEADER, size - 8) else b""
    if not raw.startswith(b"{"):
        raise CheckpointError(_not_safetensors(name, head, size, header_len))
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a 5000-digit number, deep nesting
        raise CheckpointError(f"{name} is not a safetensors file (unreadable header: {err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} is not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    data_end = _check_entries(name, header)
    if data_start + data_end > size:
        raise CheckpointError(
            f"{name} is truncated: its tensors need {data_start + data_end} bytes but the file has {size}. "
            "Download it again."
        )
    return header, data_start


def _check_entries(name: str, header: dict) -> int:
    """Checks each tensor's dtype, shape and byte range, and that the ranges tile the data without overlap or gap
    (as the safetensors format requires); returns the end of the data. Raises CheckpointError naming the file."""

    def is_count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    def damaged(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{name} has a damaged header (tensor {key[:80]!r}: {problem}); download it again")

    ranges = []
    for key, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str):
            raise damaged(key, "no dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(map(is_count, shape)):
            raise damaged(key, f"shape {str(shape)[:80]} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))) or offsets[0] > offsets[1]:
            raise damaged(key, f"data_offsets {str(offsets)[:80]} is not a [begin, end] byte range")
        dtype, held = _DTYPES.get(info["dtype"]), offsets[1] - offsets[0]
        if dtype is not None and math.prod(shape) * dtype.itemsize != held:
            raise damaged(key, f"shape {shape} of {info['dtype']} needs {math.prod(shape) * dtype.itemsize} bytes, not {held}")
        ranges.append((offsets[0], offsets[1], key))
    end = 0
    for begin, stop, key in sorted(ranges):
        if begin != end:
            raise damaged(key, "its data overlaps the tensor before it" if begin < end else "a gap before its data")
        end = stop
    return end


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a file as views of one private memory map: nothing is read until it is used."""
    header, data_start = read_header(path)
    size = Path(path).stat().st_size
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    tensors = {}
    for key, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{Path(path).name}: tensor {key} has unsupported dtype {info['dtype']}")
        dtype = _DTYPES[info["dtype"]]
        begin, end = (data_start + int(o) for o in info["data_offsets"])
        chunk = raw[begin:end]
        if begin % dtype.itemsize:  # a misaligned tensor cannot be viewed in place
            chunk = chunk.clone()
        tensors[key] = chunk.view(dtype).reshape(info["shape"])
    return tensors


def weight_files(path: str | os.PathLike, component: str | None = None) -> list[Path]:
    """The safetensors files of a weight file or a diffusers folder, shards in index order.

    `component` (e.g. "transformer", "vae") picks that subfolder when `path` is a diffusers pipeline root.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    if component and (path / component).is_dir():
        path = path / component
    elif component and (path / "model_index.json").is_file():
        raise CheckpointError(f"{path.name} is a diffusers pipeline folder without a {component}/ subfolder")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path.name} holds several index files ({_summary([i.name for i in indexes])}); keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path.name}/{indexes[0].name} is not a valid shard index ({err!r})") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        if missing := [f.name for f in files if not f.is_file()]:
            raise CheckpointError(f"{path.name}: shards listed in {indexes[0].name} are missing: {_summary(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if files:
        raise CheckpointError(
            f"{path.name} holds {len(files)} .safetensors files but no *.safetensors.index.json telling how they "
            "fit together; pass one file"
        )
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    refused = f" (only pickle files {_summary(pickles)}, refused: pickles can run code when loaded)" if pickles else ""
    raise CheckpointError(f"{path.name} holds no .safetensors weights{refused}")


# What a file holds, told by one key each (after a known prefix is removed).
_SIGNATURES = [
    ("flux", "double_blocks.0.img_attn.norm.key_norm.scale"),
    ("flux-diffusers", "transformer_blocks.0.attn.norm_added_k.weight"),
    ("ae", "decoder.up.0.block.0.conv1.weight"),
    ("ae-diffusers", "decoder.up_blocks.0.resnets.0.conv1.weight"),
    ("clip_l", "text_model.encoder.layers.0.mlp.fc1.weight"),
    ("t5", "encoder.block.0.layer.0.SelfAttention.q.weight"),
]
# Stable Diffusion files (ComfyUI/A1111 layout), told by a key part each, in order: SDXL and SD2 also hold UNet keys.
_STABLE_DIFFUSION = [
    ("sdxl", "conditioner.embedders."),
    ("sdxl", "label_emb.0.0.weight"),
    ("sd2", "cond_stage_model.model."),
    ("sd1", "cond_stage_model.transformer."),
    ("sd3", "joint_blocks."),
    ("sd-unet", "input_blocks."),
]
KIND_NAMES = {
    "flux": "a Flux transformer (BFL layout)",
    "flux-diffusers": "a Flux transformer (diffusers layout)",
    "ae": "a Flux VAE / autoencoder",
    "ae-diffusers": "a VAE (diffusers layout)",
    "clip_l": "a CLIP text encoder",
    "t5": "a T5 text encoder",
    "lora": "a LoRA",
    "controlnet": "a ControlNet",
    "checkpoint": "an all-in-one checkpoint (model + VAE + text encoders)",
    "sd1": "a Stable Diffusion 1.x checkpoint",
    "sd2": "a Stable Diffusion 2.x checkpoint",
    "sdxl": "a Stable Diffusion XL checkpoint",
    "sd3": "a Stable Diffusion 3 model",
    "sd-unet": "a Stable Diffusion UNet",
}
KIND_LOADERS = {
    "flux": "the diffusion model loader (models/diffusion_models)",
    "flux-diffusers": "the diffusion model loader (models/diffusion_models)",
    "ae": "the VAE loader (models/vae)",
    "ae-diffusers": "the VAE loader (models/vae)",
    "clip_l": "the text encoder loader (models/text_encoders)",
    "t5": "the text encoder loader (models/text_encoders)",
    "lora": "a LoRA loader (models/loras)",
    "controlnet": "a ControlNet loader (models/controlnet)",
    **dict.fromkeys(("sd1", "sd2", "sdxl", "sd3"), "ComfyUI's core Load Checkpoint (FluxKit runs FLUX.1 models only)"),
    "sd-unet": "ComfyUI's core Load Diffusion Model (FluxKit runs FLUX.1 models only)",
}
KNOWN_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "vae.", "first_stage_model.")


def identify(keys) -> str:
    """Which model a state dict holds: a key of KIND_NAMES, or "unknown"."""
    keys = set(keys)
    # kohya/peft/BFL/XLabs LoRAs all say "lora" in their key names; LyCORIS uses hada_/lokr_, full differences .diff
    if any("lora" in k.lower() or ".hada_" in k or ".lokr_" in k or k.endswith((".diff", ".diff_b")) for k in keys):
        return "lora"
    if any("controlnet_blocks." in k or "input_hint_block." in k for k in keys):
        return "controlnet"
    for kind, part in _STABLE_DIFFUSION:  # before the VAE signature, which SD checkpoints hold too
        if any(k.startswith(part) or f".{part}" in k for k in keys):
            return kind
    for kind, signature in _SIGNATURES:
        if signature in keys or any(k.endswith("." + signature) for k in keys):
            return kind
    return "unknown"


def kind_prefix(keys, kind: str) -> str:
    """The prefix in front of `kind`'s keys, e.g. "model.diffusion_model." in a ComfyUI all-in-one checkpoint."""
    signature = dict(_SIGNATURES)[kind]
    for key in keys:
        if key == signature or key.endswith("." + signature):
            return key[: -len(signature)]
    raise KeyError(f"no {kind} signature key ({signature}) among the keys")


def wrong_file_error(path, found: str, wanted: str) -> CheckpointError:
    """The error for a file of one kind handed to the loader of another."""
    what = KIND_NAMES.get(found, "not a model this pack knows (no Flux, VAE, CLIP, T5 or LoRA keys)")
    advice = f" Load it with {KIND_LOADERS[found]}." if found in KIND_LOADERS else ""
    return CheckpointError(f"{Path(path).name} is {what}, not {wanted}.{advice}")


def strip_prefix(state_dict: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under `prefix`, renamed without it."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _summary(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{len(names)} ({shown}{', ...' if len(names) > limit else ''})"


def load_weights(
    module: nn.Module,
    state_dict: dict[str, Tensor],
    dtype: torch.dtype,
    source: str,
    keep_fp8: bool = True,
    weight_dtype: torch.dtype | None = None,
) -> None:
    """Assign `state_dict` into a module built on the meta device: no random init, no second copy.

    Tensors are cast to `dtype` except Linear weights that are fp8 (when `keep_fp8`) or already `weight_dtype`, and
    quantised blocks (uint8, where the module expects them: GGUF): those stay as they are and are cast per call.
    Missing or unexpected keys and shape mismatches raise with the names; `source` names the file.
    """
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = [f"{what} keys: {_summary(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(parts))
    linear_weights = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, Linear)}
    ready = {}
    for key, target in expected.items():
        tensor = state_dict[key]
        if tensor.shape != target.shape:
            raise CheckpointError(
                f"{source}: {key} has shape {tuple(tensor.shape)} but the model expects {tuple(target.shape)}"
            )
        keep = key in linear_weights and (keep_fp8 and tensor.dtype in FP8_DTYPES or tensor.dtype == weight_dtype)
        keep = keep or tensor.dtype == target.dtype == torch.uint8
        ready[key] = tensor if keep or tensor.dtype == dtype else tensor.to(dtype)
    module.load_state_dict(ready, assign=True)
