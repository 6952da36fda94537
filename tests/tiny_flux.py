"""Tiny random-weight Flux transformers written to disk in every layout users have.

Each writer returns the weights the file stands for, in BFL names (dequantised for fp8 files), so a test
can compare what the loader built with what was written. Other test files import these helpers.
"""
import json
import types
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from flux_core.model import Flux, FluxParams
from flux_core.sampling import grid_ids

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def tiny_params(guidance: bool = True, in_channels: int = 64, **overrides) -> FluxParams:
    """A 256-wide Flux with head dim 128 (2 heads), so Flux's axes [16, 56, 56] apply unchanged."""
    base = dict(
        in_channels=in_channels, out_channels=64, vec_in_dim=32, context_in_dim=48, hidden_size=256,
        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56], theta=10_000,
        qkv_bias=True, guidance_embed=guidance,
    )  # fmt: skip
    return FluxParams(**{**base, **overrides})


def tiny_inputs(params: FluxParams, batch: int = 1, rows: int = 3, cols: int = 4, text: int = 5, dtype=torch.float32):
    """Keyword inputs of Flux.forward: random tokens, image ids on a rows x cols grid with axis 0 = 1 (as Kontext's
    reference image), random text ids (stronger than BFL's zeros at catching id-order bugs)."""
    gen = torch.Generator().manual_seed(1)
    img_ids = grid_ids(rows, cols).clone()
    img_ids[..., 0] = 1
    return dict(
        img=torch.randn(batch, rows * cols, params.in_channels, generator=gen, dtype=dtype),
        img_ids=img_ids.to(dtype),
        txt=torch.randn(batch, text, params.context_in_dim, generator=gen, dtype=dtype),
        txt_ids=torch.randint(0, 8, (1, text, 3), generator=gen).to(dtype),
        timesteps=torch.rand(batch, generator=gen, dtype=dtype),
        y=torch.randn(batch, params.vec_in_dim, generator=gen, dtype=dtype) if params.vec_in_dim else None,
        guidance=(torch.rand(batch, generator=gen, dtype=dtype) * 5 + 1) if params.guidance_embed else None,
    )


def random_weights(params: FluxParams, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Every tensor random (scaled in float64, so float32 and float64 copies agree): norm scales around 1,
    modulations strong enough that a swapped shift/scale/gate or a missing (1 + scale) moves the output."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(params).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen).double()
        modulation = "mod" in key or "adaLN" in key
        if key.endswith(".scale"):  # RMSNorm scales
            value = 1 + 0.5 * noise
        elif key.endswith(".bias"):
            value = (0.5 if modulation else 0.1) * noise
        else:
            value = (2.0 if modulation else 1.0) * noise / shape[1] ** 0.5
        weights[key] = value.to(dtype)
    return weights


def write_flux_bfl(
    path, params: FluxParams, dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = ""
) -> dict[str, Tensor]:
    """The official layout (flux1-dev.safetensors); `prefix` e.g. "model.diffusion_model."."""
    weights = random_weights(params, seed, dtype)
    save_file({prefix + k: v for k, v in weights.items()}, str(path))
    return weights


def write_flux_comfy_checkpoint(path, params: FluxParams, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A ComfyUI all-in-one checkpoint: the transformer under model.diffusion_model., plus (stub) VAE and
    text-encoder tensors under their real prefixes, which the transformer loader must ignore."""
    weights = random_weights(params, seed, dtype)
    others = {
        "vae.decoder.up.0.block.0.conv1.weight": torch.zeros(4, 4, 3, 3),
        "vae.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(8, 4),
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4),
    }
    save_file({**{"model.diffusion_model." + k: v for k, v in weights.items()}, **others}, str(path))
    return weights


def bfl_to_diffusers(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' own BFL -> diffusers converter, run with the model's real width and MLP ratio.

    `convert_flux_transformer_checkpoint_to_diffusers` hard-codes `inner_dim = 3072` and `mlp_ratio = 4.0`
    as local constants (used only to split single-block linear1). We run the same code object with those two
    constants replaced, so every mapping rule is diffusers' own, applied at the tiny width.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    width = weights["img_in.weight"].shape[0]
    mlp_ratio = weights["double_blocks.0.img_mlp.0.weight"].shape[0] / width
    code = convert.__code__
    ints = [c for c in code.co_consts if type(c) is int and c == 3072]
    floats = [c for c in code.co_consts if type(c) is float and c == 4.0]
    assert len(ints) == len(floats) == 1, "diffusers' converter changed: re-check its hard-coded width"
    consts = tuple(
        width if type(c) is int and c == 3072 else mlp_ratio if type(c) is float and c == 4.0 else c
        for c in code.co_consts
    )
    patched = types.FunctionType(code.replace(co_consts=consts), convert.__globals__, convert.__name__)
    return {k: v.contiguous() for k, v in patched(dict(weights)).items()}


def diffusers_config(params: FluxParams) -> dict:
    """FluxTransformer2DModel's config.json for these params (diffusers fixes mlp_ratio 4 and theta 10000)."""
    return {
        "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": params.in_channels,
        "out_channels": params.out_channels, "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks, "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim, "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
    }  # fmt: skip


def diffusers_pair(params: FluxParams, seed: int) -> tuple[Flux, torch.nn.Module]:
    """Our Flux and diffusers' FluxTransformer2DModel holding the same random weights (evaluation mode)."""
    from diffusers import FluxTransformer2DModel

    weights = random_weights(params, seed=seed)
    ours = Flux(params).eval()
    ours.load_state_dict(weights)
    ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(params).items() if not k.startswith("_")})
    ref.load_state_dict(bfl_to_diffusers(weights))
    return ours, ref.eval()


def diffusers_component_folder(folder, component: str, config: dict, pipeline: bool) -> Path:
    """The folder a diffusers component's weights go in, made, with its config.json: `folder` itself, or with
    `pipeline` its `component`/ subfolder beside a model_index.json."""
    target = Path(folder) / component if pipeline else Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    if pipeline:
        (Path(folder) / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (target / "config.json").write_text(json.dumps(config))
    return target


def write_flux_diffusers_folder(
    folder, params: FluxParams, dtype: torch.dtype = torch.float32, seed: int = 0, shards: int = 2,
    pipeline: bool = False,
) -> dict[str, Tensor]:  # fmt: skip
    """A diffusers `transformer/` folder: config.json, `shards` diffusion_pytorch_model-0000N-of-0000M
    files and their index json. With `pipeline`, `folder` is the pipeline root holding transformer/."""
    weights = random_weights(params, seed, dtype)
    converted = bfl_to_diffusers(weights)
    target = diffusers_component_folder(folder, "transformer", diffusers_config(params), pipeline)
    keys = sorted(converted)
    weight_map = {}
    for n in range(shards):
        name = f"diffusion_pytorch_model-{n + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[n::shards]
        save_file({k: converted[k] for k in part}, str(target / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in converted.values())}, "weight_map": weight_map}
    (target / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return weights


def write_flux_diffusers_file(path, params: FluxParams, dtype: torch.dtype = torch.float32, seed: int = 0):
    """One safetensors file with diffusers key names (as some single-file downloads have)."""
    weights = random_weights(params, seed, dtype)
    save_file(bfl_to_diffusers(weights), str(path))
    return weights


def write_flux_fp8(
    path, params: FluxParams, fp8: torch.dtype = torch.float8_e4m3fn, scaled: str | None = None, seed: int = 0
) -> dict[str, Tensor]:
    """Linear weights stored in fp8, everything else bf16, as ComfyUI's fp8 releases.

    scaled=None: a plain cast. "scale_weight": the older scaled-fp8 layout (marker key `scaled_fp8`, per layer
    `<layer>.scale_weight` and `<layer>.scale_input`). "weight_scale": the newer layout (`<layer>.weight_scale`,
    `<layer>.input_scale` and a `<layer>.comfy_quant` JSON tensor). Returns the float32 weights the file
    dequantises to.
    """
    weights = random_weights(params, seed, torch.float32)
    out, dequantised = {}, {}
    for key, value in weights.items():
        layer = key.removesuffix(".weight")
        if value.ndim != 2:
            out[key] = value.to(torch.bfloat16)
            dequantised[key] = out[key].float()
            continue
        scale = value.abs().max() / FP8_MAX[fp8] if scaled else torch.tensor(1.0)
        out[key] = (value / scale).to(fp8)
        dequantised[key] = out[key].float() * scale
        if scaled == "scale_weight":
            out[f"{layer}.scale_weight"] = scale.reshape(())
            out[f"{layer}.scale_input"] = torch.tensor(1.0)
        elif scaled == "weight_scale":
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.input_scale"] = torch.tensor(0.5)
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps({"format": str(fp8)[6:]}).encode()), dtype=torch.uint8)
    if scaled == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=fp8)
    save_file(out, str(path))
    return dequantised
