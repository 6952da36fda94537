"""Loading a Flux transformer from the files users have.

Layouts: the official BFL file (flux1-dev.safetensors), ComfyUI all-in-one checkpoints (transformer under
`model.diffusion_model.`), diffusers `transformer/` folders (sharded, with an index) or single files with
diffusers names, fp8 files: plain casts, scaled fp8 (`scaled_fp8` marker + `<layer>.scale_weight`) and
the newer `<layer>.weight_scale` + `<layer>.comfy_quant` layout, and GGUF files (city96's Q8_0 ... Q2_K, kept
quantised: see gguf.py). The architecture is read from tensor shapes.
"""
import json
import logging
from dataclasses import fields
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import (
    CheckpointError,
    identify,
    kind_prefix,
    load_safetensors,
    load_weights,
    read_header,
    strip_prefix,
    weight_files,
    wrong_file_error,
)
from .gguf import dequantize, is_gguf, logical_shapes, read_flux_gguf, type_label, use_blocks
from .model import PRESETS, Flux, FluxParams
from .model import preset as named_preset
from .ops import FP8_DTYPES, Linear, enable_fp8_matmul
from .streaming import transformer_on

log = logging.getLogger(__name__)

# Not stored in any file; every FLUX.1 model uses them (head dim 128 = 16 + 56 + 56).
FLUX_AXES_DIM, FLUX_THETA = (16, 56, 56), 10_000

# BFL module or parameter <- its diffusers name(s); several names are concatenated along the output dim.
_DIFFUSERS_TOP = {
    "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
    "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
    "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
    "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
    "guidance_in.in_layer": ("time_text_embed.guidance_embedder.linear_1",),
    "guidance_in.out_layer": ("time_text_embed.guidance_embedder.linear_2",),
    "txt_in": ("context_embedder",),
    "img_in": ("x_embedder",),
    "final_layer.linear": ("proj_out",),
    "final_layer.adaLN_modulation.1": ("norm_out.linear",),  # diffusers stores (scale, shift): swapped back
}
_DIFFUSERS_DOUBLE = {
    "img_mod.lin": ("norm1.linear",),
    "txt_mod.lin": ("norm1_context.linear",),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm.scale": ("attn.norm_q.weight",),
    "img_attn.norm.key_norm.scale": ("attn.norm_k.weight",),
    "txt_attn.norm.query_norm.scale": ("attn.norm_added_q.weight",),
    "txt_attn.norm.key_norm.scale": ("attn.norm_added_k.weight",),
    "img_attn.proj": ("attn.to_out.0",),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
}
_DIFFUSERS_SINGLE = {
    "modulation.lin": ("norm.linear",),
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "norm.query_norm.scale": ("attn.norm_q.weight",),
    "norm.key_norm.scale": ("attn.norm_k.weight",),
}
# Per-layer keys of scaled fp8 files besides the weight; input scales only serve fp8 matmuls, which we skip.
_WEIGHT_SCALES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


def count_blocks(keys, prefix: str) -> int:
    """1 + the largest N of keys `<prefix>N.<...>`, e.g. the depth from "double_blocks."."""
    return 1 + max((int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)), default=-1)


def diffusers_to_bfl(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and fuse) a diffusers FluxTransformer2DModel state dict to BFL names.

    q/k/v are concatenated into qkv, single-block linear1 = [to_q | to_k | to_v | proj_mlp], and norm_out's
    (scale, shift) halves are swapped back to (shift, scale). Keys no rule uses are passed through unchanged,
    so the model load reports them as unexpected.
    """
    table = dict(_DIFFUSERS_TOP)
    for i in range(count_blocks(state_dict, "transformer_blocks.")):
        table.update({f"double_blocks.{i}.{k}": tuple(f"transformer_blocks.{i}.{s}" for s in v) for k, v in _DIFFUSERS_DOUBLE.items()})
    for i in range(count_blocks(state_dict, "single_transformer_blocks.")):
        table.update({f"single_blocks.{i}.{k}": tuple(f"single_transformer_blocks.{i}.{s}" for s in v) for k, v in _DIFFUSERS_SINGLE.items()})
    out, used = {}, set()
    for target, sources in table.items():
        for suffix in ("",) if target.endswith(".scale") else (".weight", ".bias"):
            names = [s + suffix for s in sources]
            present = [n for n in names if n in state_dict]
            if not present:
                continue  # reported as a missing BFL key when loading
            if len(present) < len(names):
                missing = ", ".join(n for n in names if n not in state_dict)
                raise CheckpointError(f"diffusers weights lack {missing}, needed with {', '.join(present)}")
            parts = [state_dict[n] for n in names]
            value = parts[0] if len(parts) == 1 else torch.cat(parts)
            if target == "final_layer.adaLN_modulation.1":
                value = torch.cat(value.chunk(2)[::-1])
            out[target + suffix] = value
            used.update(names)
    out.update({k: v for k, v in state_dict.items() if k not in used})
    return out


def infer_flux_params(
    state_dict: dict[str, Tensor], axes_dim: list[int] | None = None, theta: int | None = None, source: str = "state dict"
) -> FluxParams:
    """FluxParams from the tensor shapes of a BFL-named state dict.

    axes_dim and theta are not in any file: they default to FLUX.1's [16, 56, 56] and 10000, which need head
    dim 128; other head dims must pass axes_dim (even sizes summing to the head dim).
    """
    for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight"):
        if key not in state_dict:
            raise CheckpointError(f"{source}: no {key} among the weights: not a Flux transformer (BFL names)")
    hidden, in_channels = state_dict["img_in.weight"].shape
    depth, single = count_blocks(state_dict, "double_blocks."), count_blocks(state_dict, "single_blocks.")
    norm = "double_blocks.0.img_attn.norm.query_norm.scale" if depth else "single_blocks.0.norm.query_norm.scale"
    if norm not in state_dict:
        raise CheckpointError(f"{source}: no {norm} among the weights: cannot tell the head dim")
    head_dim = state_dict[norm].shape[0]
    if depth:
        mlp_hidden = state_dict["double_blocks.0.img_mlp.0.weight"].shape[0]
    else:
        mlp_hidden = state_dict["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
    if axes_dim is None and head_dim != sum(FLUX_AXES_DIM):
        raise CheckpointError(
            f"{source} has head dim {head_dim}, but Flux's rotary axes {list(FLUX_AXES_DIM)} need 128; "
            f"pass axes_dim (even sizes summing to {head_dim}, e.g. one band per position axis)"
        )
    vector = state_dict.get("vector_in.in_layer.weight")
    return FluxParams(
        in_channels=in_channels,
        out_channels=state_dict["final_layer.linear.weight"].shape[0],
        vec_in_dim=0 if vector is None else vector.shape[1],
        context_in_dim=state_dict["txt_in.weight"].shape[1],
        hidden_size=hidden,
        mlp_ratio=mlp_hidden / hidden,
        num_heads=hidden // head_dim,
        depth=depth,
        depth_single_blocks=single,
        axes_dim=list(FLUX_AXES_DIM if axes_dim is None else axes_dim),
        theta=FLUX_THETA if theta is None else theta,
        qkv_bias=not depth or "double_blocks.0.img_attn.qkv.bias" in state_dict,
        guidance_embed="guidance_in.in_layer.weight" in state_dict,
    )


def match_preset(params: FluxParams) -> str | None:
    """The first named preset with exactly these params (dev, krea and kontext share one architecture)."""
    return next((name for name, known in PRESETS.items() if known == params), None)


def describe(params: FluxParams) -> str:
    n_params = _parameter_count(params)
    known = match_preset(params)
    return (
        f"{params.hidden_size} wide, {params.num_heads} heads, {params.depth} double + {params.depth_single_blocks} "
        f"single blocks, in {params.in_channels} ch, guidance {'embedded' if params.guidance_embed else 'none'}, "
        f"{n_params / 1e9:.2f}B parameters" + (f", architecture of {known}" if known else "")
    )


def _parameter_count(params: FluxParams) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Flux(params).parameters())


def _split_quantisation(state_dict: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, {layer: float32 scale}) with the scaled-fp8 bookkeeping keys removed."""
    weights, scales = {}, {}
    for key, value in state_dict.items():
        if key == "scaled_fp8" or key.endswith(_DROPPED_SUFFIXES):
            if key.endswith(".comfy_quant"):
                _check_quant_format(key, value, source)
            continue
        if key.endswith(_WEIGHT_SCALES):
            if value.numel() != 1:
                raise CheckpointError(
                    f"{source}: {key} holds {value.numel()} scales (per-row/block quantisation); only per-tensor "
                    "scaled fp8 is supported. Use a bf16 or a per-tensor fp8 file."
                )
            scales[key.rsplit(".", 1)[0]] = value.float().reshape(())
            continue
        weights[key] = value
    return weights, scales


def _check_quant_format(key: str, value: Tensor, source: str) -> None:
    try:
        fmt = json.loads(bytes(value.tolist()).decode()).get("format")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{source}: {key} is not a readable quantisation description") from None
    if fmt not in ("float8_e4m3fn", "float8_e5m2"):
        raise CheckpointError(
            f"{source}: layer {key.removesuffix('.comfy_quant')} is quantised as {fmt!r}; only fp8 (float8_e4m3fn, "
            "float8_e5m2, optionally scaled) is supported. Use a bf16 or fp8 release of this model."
        )


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict, str, list[Path]]:
    """BFL-named (still mmap'd where no fusing is needed) transformer tensors, the GGUF types of those stored as
    quantised blocks, a layout label and the files."""
    if is_gguf(path):
        return *read_flux_gguf(path), "GGUF", [path]
    files = weight_files(path, component="transformer")
    keys = [key for f in files for key in read_header(f)[0]]
    kind = identify(keys)
    if kind not in ("flux", "flux-diffusers"):
        raise wrong_file_error(path, kind, "a Flux transformer")
    prefix = kind_prefix(keys, kind)
    tensors = {}
    for f in files:
        tensors.update(load_safetensors(f))
    state_dict = strip_prefix(tensors, prefix)
    if kind == "flux":
        layout = f"ComfyUI checkpoint ({prefix}*)" if prefix else "BFL"
        return state_dict, {}, layout, files
    if any(k.endswith(_WEIGHT_SCALES) for k in state_dict):
        raise CheckpointError(
            f"{path.name}: scaled fp8 in diffusers layout is not supported (its q/k/v scales differ, they cannot be "
            "fused); use the BFL/ComfyUI-layout fp8 file, or a bf16 diffusers folder with weight_dtype fp8"
        )
    where = f"folder, {len(files)} shards" if len(files) > 1 else "folder" if path.is_dir() else "file"
    return diffusers_to_bfl(state_dict), {}, f"diffusers {where}" + (f" ({prefix}*)" if prefix else ""), files


def _diffusers_axes(files: list[Path]) -> list[int] | None:
    config = files[0].parent / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("axes_dims_rope")
    except json.JSONDecodeError:
        return None


def _storage_label(state_dict: dict[str, Tensor], scales: dict, qtypes: dict) -> str:
    if qtypes:
        return type_label(state_dict, qtypes)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state_dict.values() if v.ndim == 2})
    return "/".join(dtypes) + (" (scaled)" if scales else "")


def _check_preset(params: FluxParams, name: str, source: str) -> None:
    wanted = named_preset(name)
    diffs = [
        f"{f.name} {getattr(params, f.name)} (preset {getattr(wanted, f.name)})"
        for f in fields(FluxParams)
        if getattr(params, f.name) != getattr(wanted, f.name)
    ]
    if diffs:
        raise CheckpointError(f"{source} is not a {name} model: " + ", ".join(diffs) + ". Pick preset auto.")


def load_flux(
    path,
    dtype: torch.dtype = torch.bfloat16,
    weight_dtype: torch.dtype | None = None,
    axes_dim: list[int] | None = None,
    theta: int | None = None,
    preset: str | None = None,
    device: torch.device | str = "cpu",
    fp8_matmul: bool = False,
    stream: bool = False,
    budget_bytes: int | None = None,
) -> Flux:
    """A Flux transformer from a file or diffusers folder, computing in `dtype`.

    weight_dtype: how Linear weights are kept. None: as stored (fp8 stays fp8 and GGUF blocks stay quantised, both
    upcast per layer at compute time; other weights are cast to `dtype`); an fp8 dtype: cast to fp8 on load (like ComfyUI's weight_dtype);
    a float dtype: dequantised/cast to it. `preset` names the expected architecture (its axes and theta apply,
    and the file is checked against it). fp8_matmul: on CUDA, float8_e4m3fn weights feed the fp8 matrix units
    directly, bfloat16 activations quantised per token (GEMMs 1.7x faster on an H200, 8-bit activations; ComfyUI's
    fp8_e4m3fn_fast); elsewhere and in other dtypes they compute as without it. Built on the meta device and
    assigned the memory-mapped tensors: no random init, and no copy where the file already has the wanted dtype.
    The description of what was found is logged and kept as `model.description`.
    stream: the weights stay on the CPU (memory-mapped) and the model is placed on a CUDA `device` within
    `budget_bytes` (default: the free memory), the blocks that do not fit streamed each step (flux_core.streaming;
    placed for 1024 px and 512 text tokens, re-placed by generate() and the sampler node for their sizes).
    """
    if dtype in FP8_DTYPES or not dtype.is_floating_point:
        raise ValueError(f"dtype is the compute dtype (float32, bfloat16, float16), got {dtype}; for fp8 storage pass weight_dtype")
    if weight_dtype is not None and not weight_dtype.is_floating_point:
        raise ValueError(f"weight_dtype must be None, a float or an fp8 dtype, got {weight_dtype}")
    path = Path(path)
    state_dict, qtypes, layout, files = _read_weights(path)
    state_dict, scales = _split_quantisation(state_dict, path.name)
    if preset is not None:
        known = named_preset(preset)  # unknown names raise, listing the known ones
        axes_dim, theta = axes_dim or known.axes_dim, theta or known.theta
    elif axes_dim is None and layout.startswith("diffusers"):
        axes_dim = _diffusers_axes(files)
    params = infer_flux_params(logical_shapes(state_dict, qtypes), axes_dim, theta, source=path.name)
    if preset is not None:
        _check_preset(params, preset, path.name)
    stored = _storage_label(state_dict, scales, qtypes)

    with torch.device("meta"):
        model = Flux(params)
    linear_layers = {name for name, m in model.named_modules() if isinstance(m, Linear)}
    if unknown := sorted(set(scales) - linear_layers):
        raise CheckpointError(f"{path.name} has weight scales for layers the model lacks: {', '.join(unknown[:5])}")
    for layer in linear_layers:
        key = f"{layer}.weight"
        tensor = state_dict.get(key)
        if tensor is None:
            continue  # reported as missing by load_weights
        if key in qtypes:  # GGUF blocks: kept (dequantised per call), or dequantised now to weight_dtype
            if weight_dtype is not None:
                state_dict[key] = dequantize(tensor, qtypes.pop(key), weight_dtype)
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{path.name}: {key} is stored as {tensor.dtype}: only float and fp8 weights are supported "
                "(not int8/nf4/nvfp4 quantisations)"
            )
        if weight_dtype is not None and tensor.dtype != weight_dtype:
            scale = scales.pop(layer, None)
            state_dict[key] = (tensor if scale is None else tensor.float() * scale).to(weight_dtype)
    storage = f"{stored} weights"
    if (kept := _storage_label(state_dict, scales, qtypes)) != stored:
        storage += f" kept as {kept}"
    use_blocks(model, qtypes)
    load_weights(model, state_dict, dtype, path.name, weight_dtype=weight_dtype)
    for layer, scale in scales.items():
        model.get_submodule(layer).set_weight_scale(scale)
    if fp8_matmul:
        if not enable_fp8_matmul(model):
            raise ValueError(
                f"{path.name}: fp8_matmul needs float8_e4m3fn weights; pass weight_dtype=torch.float8_e4m3fn "
                "or load an fp8_e4m3fn file"
            )
        storage += ", fp8 matmuls"

    model.description = f"{path.name}: Flux transformer, {layout} layout, {storage}; {describe(params)}"
    log.info(model.description)
    if stream:
        transformer_on(model.eval(), device, 1, 4096, 512, budget_bytes)
        return model
    return model.eval().to(device)
