"""Tiny random CLIP-L and T5 text encoders written as users have them: ComfyUI single files (clip_l.safetensors,
t5xxl_fp16.safetensors, fp8 and scaled fp8), ComfyUI all-in-one checkpoints and diffusers folders.

The structure is the real one at a tiny width: CLIP-L's quick_gelu tower with the full 49408-token vocabulary and 77
positions, T5 v1.1's gated-GELU blocks with 32 relative-position buckets, the 32128-token vocabulary and head dim 64,
so the real tokenizers drive them. Writers return the weights they wrote in file key names (float32, dequantised for
fp8), from which a test builds transformers' reference model.
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_core.conditioning import BUNDLED_TOKENIZERS

CLIP_PREFIX, T5_PREFIX = "text_encoders.clip_l.transformer.", "text_encoders.t5xxl.transformer."  # ComfyUI all-in-one
FP8 = torch.float8_e4m3fn


def tiny_clip_config(width: int = 64, layers: int = 2, ff: int = 128, heads: int | None = None) -> CLIPTextConfig:
    """CLIP-L's text config (tests/configs/clip_l.json) at a tiny size; heads default to width / 64 as CLIP-L's."""
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads or width // 64, max_position_embeddings=77, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=49407, pad_token_id=1, projection_dim=width,
    )  # fmt: skip


def tiny_t5_config(
    width=32, heads=2, layers=2, ff=64, gated: bool = True, d_kv: int = 64, act: str | None = None
) -> T5Config:
    """T5 v1.1's config (tests/configs/t5_xxl.json) at a tiny size; `gated=False` gives the original ReLU T5."""
    return T5Config(
        vocab_size=32128, d_model=width, d_kv=d_kv, num_heads=heads, num_layers=layers, d_ff=ff,
        feed_forward_proj="gated-gelu" if gated else "relu",
        dense_act_fn=act or ("gelu_pytorch_tanh" if gated else "relu"), is_gated_act=gated,
    )  # fmt: skip


def _random(shapes: dict[str, torch.Size], seed: int) -> dict[str, Tensor]:
    """float32 draws: norm weights around 1, small biases, unit-variance outputs for linears, T5's query scaled
    by 1/sqrt(d_kv) as T5's own init (its attention has no 1/sqrt(d) factor)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        if key.endswith("bias"):
            weights[key] = 0.1 * noise
        elif len(shape) == 1:  # LayerNorm / T5LayerNorm weights
            weights[key] = 1 + 0.2 * noise
        elif "embedding" in key or key.startswith("shared") or "relative_attention_bias" in key:
            weights[key] = noise
        else:
            weights[key] = noise / shape[1] ** 0.5 / (8 if ".SelfAttention.q." in key else 1)
    return weights


def clip_weights(config: CLIPTextConfig | None = None, seed: int = 0, extras: bool = False) -> dict[str, Tensor]:
    """float32 weights in the file layout (`text_model.` keys). `extras` adds what some files carry beside the tower:
    text_projection.weight and old exports' text_model.embeddings.position_ids (stored as float)."""
    config = config or tiny_clip_config()
    with torch.device("meta"):
        tower = CLIPTextModel(config)
    nest = "" if hasattr(tower, "text_model") else "text_model."  # transformers 5 keeps no text_model. in memory
    weights = {nest + k: v for k, v in _random({k: v.shape for k, v in tower.state_dict().items()}, seed).items()}
    if extras:
        width = config.hidden_size
        weights["text_projection.weight"] = torch.randn(width, width, generator=torch.Generator().manual_seed(seed + 1))
        weights["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]
    return weights


def t5_weights(config: T5Config | None = None, seed: int = 0, embed_tokens: bool = False) -> dict[str, Tensor]:
    """float32 weights of a T5 encoder in the file layout; `embed_tokens` adds encoder.embed_tokens.weight (a copy of
    shared.weight, as some exports hold)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5EncoderModel(config or tiny_t5_config()).state_dict().items()}
    shapes.pop("encoder.embed_tokens.weight")
    weights = _random(shapes, seed)
    if embed_tokens:
        weights["encoder.embed_tokens.weight"] = weights["shared.weight"].clone()
    return weights


def to_fp8(weights: dict[str, Tensor], scaled: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(what an fp8 file stores, the float32 weights it dequantises to).

    Plain (t5xxl_fp8_e4m3fn): every 2-D tensor cast to fp8, embeddings too. Scaled (ComfyUI's "_scaled" files): linear
    weights divided by a per-tensor scale (max |w| / 448) then cast, with `<layer>.scale_weight`, `<layer>.scale_input`
    and the `scaled_fp8` marker; embeddings stay float16.
    """
    stored, dequantised = {}, {}
    for key, value in weights.items():
        linear = value.ndim == 2 and "embed" not in key and not key.startswith("shared") and "relative" not in key
        if value.ndim != 2 or (scaled and not linear):
            stored[key] = value.half()
            dequantised[key] = stored[key].float()
            continue
        scale = value.abs().max() / torch.finfo(FP8).max if scaled else torch.tensor(1.0)
        stored[key] = (value / scale).to(FP8)
        dequantised[key] = stored[key].float() * scale
        if scaled:
            layer = key.removesuffix(".weight")
            stored[f"{layer}.scale_weight"], stored[f"{layer}.scale_input"] = scale.reshape(()), torch.tensor(1.0)
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=FP8)
    return stored, dequantised


def _save(path, weights: dict[str, Tensor], dtype: torch.dtype | None, prefix: str = "") -> dict[str, Tensor]:
    """Save (cast to `dtype` unless None); returns the float32 values the file holds."""
    stored = {k: v if dtype is None else v.to(dtype) for k, v in weights.items()}
    save_file({prefix + k: v.contiguous() for k, v in stored.items()}, str(path))
    return {k: v.float() for k, v in stored.items()}


def write_clip_l(path, config=None, seed: int = 0, dtype=torch.float16, extras: bool = True, prefix: str = ""):
    """clip_l.safetensors as ComfyUI has it (float16 by default, with text_projection and position_ids)."""
    return _save(path, clip_weights(config, seed, extras), dtype, prefix)


def write_t5(path, config=None, seed=0, dtype=torch.float16, fp8: str | None = None, embed_tokens=False, prefix=""):
    """t5xxl_fp16.safetensors as ComfyUI has it; fp8="plain" / "scaled" writes the t5xxl_fp8_e4m3fn(_scaled) variant
    and returns its dequantised weights."""
    weights = t5_weights(config, seed, embed_tokens)
    if fp8 is None:
        return _save(path, weights, dtype, prefix)
    stored, dequantised = to_fp8(weights, scaled=fp8 == "scaled")
    _save(path, stored, None, prefix)
    return dequantised


def write_all_in_one(path, clip: dict[str, Tensor], t5: dict[str, Tensor]) -> None:
    """A ComfyUI all-in-one checkpoint: both encoders under their prefixes, beside stub transformer and VAE tensors."""
    tensors = {
        "model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": torch.ones(4),
        "vae.decoder.conv_in.weight": torch.ones(4, 4, 3, 3),
        **{CLIP_PREFIX + k: v for k, v in clip.items()},
        **{T5_PREFIX + k: v for k, v in t5.items()},
    }
    save_file(tensors, str(path))


def write_component(folder, weights: dict[str, Tensor], config, dtype=torch.float32, shards: int = 1) -> None:
    """A diffusers text_encoder(_2)/ folder: config.json, model.safetensors or `shards` model-0000N-of-0000M files
    with their index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / "config.json")
    if shards == 1:
        _save(folder / "model.safetensors", weights, dtype)
        return
    keys, weight_map = sorted(weights), {}
    for n in range(shards):
        name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
        _save(folder / name, {k: weights[k] for k in keys[n::shards]}, dtype)
        weight_map.update(dict.fromkeys(keys[n::shards], name))
    total = sum(v.numel() * dtype.itemsize for v in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_diffusers(root, clip: dict, clip_config, t5: dict, t5_config, dtype=torch.float32) -> Path:
    """A FLUX.1 diffusers pipeline folder's text half: text_encoder/, text_encoder_2/ (2 shards), tokenizer/ and
    tokenizer_2/ (copies of flux_core's bundled tokenizers), model_index.json."""
    root = Path(root)
    write_component(root / "text_encoder", clip, clip_config, dtype)
    write_component(root / "text_encoder_2", t5, t5_config, dtype, shards=2)
    shutil.copytree(BUNDLED_TOKENIZERS / "clip_l", root / "tokenizer")
    shutil.copytree(BUNDLED_TOKENIZERS / "t5_xxl", root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root
