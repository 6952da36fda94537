"""LoRAs for Flux and its CLIP-L, in every format they ship in (told from the keys), applied to a twin of the model.

Names, told apart per key (one file may mix them):
  BFL / ComfyUI   double_blocks.0.img_attn.qkv.lora_A.weight (or lora_down / lora_up) + .alpha, bare or under
                  diffusion_model. / transformer. / base_model.model.
  kohya           lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight + .alpha; OneTrainer's
                  lora_transformer_<diffusers name>, SimpleTuner's lycoris_<diffusers name>
  diffusers/PEFT  transformer.transformer_blocks.0.attn.to_q.lora_A.weight: the separate q, k, v (and single-block
                  proj_mlp) of diffusers land on their rows of our fused qkv / linear1 weights; without .alpha keys,
                  the file's PEFT config (safetensors metadata "lora_adapter_metadata": lora_alpha, alpha_pattern)
  XLabs           double_blocks.0.processor.qkv_lora1.down.weight (no alpha: scale 1)
Changes: LoRA (strength * alpha / rank * up @ down), LyCORIS LoHa (hada_*) and LoKr (lokr_*) on Linear layers, full
differences (.diff, .diff_b), a LoRA's lora_B.bias. BFL's control LoRAs (flux1-canny-dev-lora, flux1-depth-dev-lora)
also widen img_in to 128 input channels (the control image's latent) and replace the QK norms' scales
(...norm.query_norm.scale): the twin becomes a Canny/Depth model (params.in_channels 128). CLIP-L parts (lora_te1_...,
text_encoder., ...) patch the text encoders when they are given; T5 parts are reported, not applied.

The model given is never changed: the patched one is its `Flux.twin()`, sharing every tensor it does not change. A
patched layer with float weights gets a merged copy (the change computed in float32, rounded once); an fp8 or GGUF
layer keeps its LoRAs low rank (ops.Linear lora_down / lora_up, stored in the compute dtype) and is never re-rounded:
each call adds them into the weight it upcasts anyway (fp8 on a GPU with Triton: in the upcast's own pass), or runs
them as a side path where that moves fewer bytes (few tokens, fp8 matmuls; see ops.Linear.lora_mode). Only a full-rank change (LoHa, LoKr, diff) makes it a merged layer in
the compute dtype.
"""
import copy
import dataclasses
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .checkpoint import CheckpointError, identify, load_safetensors, read_header, wrong_file_error
from .conditioning import TextEncoders
from .loading import _DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE, _DIFFUSERS_TOP
from .layers import RMSNorm
from .model import Flux
from .ops import FP8_DTYPES, Linear
from .tools import LATENT_TOKEN_CHANNELS

# The stored name of an adapter part (after the module name) -> what it is.
_PARTS = {
    "lora_A.weight": "down", "lora_down.weight": "down", "down.weight": "down",
    "lora_B.weight": "up", "lora_up.weight": "up", "up.weight": "up",
    "lora_B.bias": "up_bias", "lora_up.bias": "up_bias", "alpha": "alpha", "diff": "diff", "diff_b": "diff_b",
    "scale": "set",  # an RMSNorm's whole scale, replacing the model's (BFL control LoRAs)
    **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w2", "lokr_w1_a",
                      "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")},
}  # fmt: skip
_KNOWN_UNSUPPORTED = {"dora_scale": "DoRA", "hada_t1": "LoHa CP (conv layers)", "lokr_t2": "LoKr CP (conv layers)"}
FLUX_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.", "unet.")
CLIP_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.", "text_model.")
T5_PREFIXES = ("lora_te2_", "text_encoders.t5xxl.", "text_encoder_2.")
# Key fragments of LoRAs for other models (only looked for among keys nothing here maps).
_UNET = "a Stable Diffusion UNet"
_SDXL = ("lora_te2_", "text_encoder_2.", "transformer_blocks_1_", "transformer_blocks.1.")  # CLIP-G, 2+ blocks deep
_OTHER_MODELS = [
    (("lora_unet_down_blocks_", "lora_unet_input_blocks_", "lora_unet_mid_block", "down_blocks.", "input_blocks."), _UNET),
    (("joint_blocks", "context_block."), "Stable Diffusion 3"),
    ((".img_mlp.net.", ".txt_mlp.net.", "_img_mlp_net_", "img_mod.1"), "Qwen-Image"),
    (("double_stream_modulation", "single_stream_modulation"), "FLUX.2"),
    (("cross_attn", "self_attn.q.", "self_attn_q."), "Wan / a video model"),
    ((".attention.qkv", "_attention_qkv"), "Lumina 2 / Z-Image"),
]  # fmt: skip
_XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv", "proj_lora1": "img_attn.proj",
                 "proj_lora2": "txt_attn.proj"}  # fmt: skip
_NAMINGS = [("lora_unet_", "kohya"), ("lora_te", "kohya"), ("lora_transformer_", "OneTrainer"),
            ("lycoris_", "SimpleTuner LyCORIS"), ("text_encoder.", "diffusers/PEFT")]
_WIDTHS = {3072: "FLUX.1 (3072 wide)", 6144: "FLUX.2 dev (6144 wide)", 1536: "SD3 medium (1536 wide)"}
_TOOL_INPUTS = (128, 384)  # Canny/Depth, Fill: the img_in widths a LoRA may widen a plain model's img_in to

Target = tuple[str, slice | None, bool]  # (layer, its output rows or None for all, halves swapped)


@dataclass
class Lora:
    """A LoRA file parsed, independent of any model: its adapters by stored module name, and keys that are none."""

    name: str
    modules: dict[str, dict[str, Tensor]]  # e.g. "lora_unet_img_in" -> {"down": .., "up": .., "alpha": ..}
    keys: dict[str, list[str]]  # module -> its keys in the file
    stray: dict[str, str]  # key -> why it is no usable adapter part


@dataclass
class LoraReport:
    """What one LoRA did: formats seen, layers changed (and how), keys left unused with the reason."""

    name: str
    strength: float
    formats: list[str]
    layers: int = 0  # Flux layers it matched
    clip_layers: int = 0
    modes: dict[str, int] = field(default_factory=dict)  # "merged" / "side path" -> Flux layers
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why

    def __str__(self) -> str:
        how = ", ".join(f"{n} {mode}" for mode, n in sorted(self.modes.items()))
        text = f"{self.name} ({' + '.join(self.formats) or 'no adapters'}, strength {self.strength:g}): "
        text += f"{self.layers} Flux layers" + (f" ({how})" if how else "") + f", {self.clip_layers} CLIP-L layers"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            text += f"; {len(self.skipped)} keys skipped ({'; '.join(reasons[:3])}), e.g. {next(iter(self.skipped))}"
        return text


def read_lora(path: str | os.PathLike) -> Lora:
    """A LoRA .safetensors file (memory-mapped); another kind of weight file raises naming what it is."""
    path = Path(path)
    keys = read_header(path)[0]
    if (kind := identify(keys)) != "lora":
        raise wrong_file_error(path, kind, "a LoRA")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    try:
        peft_config = json.loads(raw) if raw else None
    except ValueError as err:
        raise CheckpointError(f"{path.name}: its lora_adapter_metadata is not JSON ({err})") from None
    return parse_lora(load_safetensors(path), path.name, peft_config)


def peft_alpha(module: str, config: dict) -> float | None:
    """lora_alpha of a diffusers/PEFT `module` ("transformer.transformer_blocks.0.attn.to_q") from the PEFT config
    diffusers saves: keys bare (one model's) or prefixed by the component ("transformer.lora_alpha"); alpha_pattern
    entries override by module-name suffix, as PEFT matches them."""
    component, _, name = module.partition(".")
    own = {k[len(component) + 1 :]: v for k, v in config.items() if k.startswith(f"{component}.")} or config
    for pattern, alpha in (own.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", name):
            return float(alpha)
    return None if own.get("lora_alpha") is None else float(own["lora_alpha"])


def parse_lora(state_dict: dict[str, Tensor], name: str = "LoRA", peft_config: dict | None = None) -> Lora:
    """Group keys into adapters: "<module>.<part>" where part is e.g. lora_down.weight, alpha, hada_w1_a.
    `peft_config`: the file's PEFT config, whose lora_alpha scales adapters stored without .alpha."""
    modules, keys, stray = defaultdict(dict), defaultdict(list), {}
    for key, tensor in state_dict.items():
        module, part = _split(key)
        if part in _PARTS and module:
            modules[module][_PARTS[part]] = tensor
            keys[module].append(key)
        else:
            stray[key] = f"{_KNOWN_UNSUPPORTED[part]} is not supported" if part in _KNOWN_UNSUPPORTED else "not an adapter part"
    dora = {key.rpartition(".")[0] for key in stray if key.endswith(".dora_scale")}  # applied without it: wrong
    for module, parts in list(modules.items()):
        if module in dora or _kind(parts) is None:
            stray.update(dict.fromkeys(keys.pop(module), "DoRA is not supported" if module in dora else "incomplete adapter"))
            del modules[module]
        elif peft_config and "alpha" not in parts and (alpha := peft_alpha(module, peft_config)) is not None:
            parts["alpha"] = torch.tensor(alpha)
    return Lora(name, dict(modules), dict(keys), stray)


def _split(key: str) -> tuple[str, str]:
    """("module", "part"): the part is the last name, or the last two when they end in weight / bias."""
    head, _, last = key.rpartition(".")
    if last in ("weight", "bias"):
        module, _, part = head.rpartition(".")
        return module, f"{part}.{last}"
    return head, last


def _kind(parts: dict[str, Tensor]) -> str | None:
    """"LoRA", "LoHa", "LoKr" or "diff" when the parts make a whole adapter, else None."""
    has = parts.keys()
    if {"down", "up"} <= has:
        return "LoRA"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= has:
        return "LoHa"
    if all(f"lokr_{w}" in has or {f"lokr_{w}_a", f"lokr_{w}_b"} <= has for w in ("w1", "w2")):
        return "LoKr"
    if has & {"diff", "diff_b"}:
        return "diff"
    return "norm scale" if "set" in has else None


def _naming(module: str) -> str:
    """Which trainer's names a module has, for the report."""
    if label := next((label for prefix, label in _NAMINGS if module.startswith(prefix)), None):
        return label
    if ".processor." in module:
        return "XLabs"
    return "diffusers/PEFT" if "transformer_blocks." in module or "_embedder" in module else "BFL/ComfyUI"


def _spellings(name: str) -> list[str]:
    """A dotted module name as stored by each trainer: as is, kohya's / OneTrainer's / SimpleTuner's flat forms."""
    flat = name.replace(".", "_")
    return [name, f"lora_unet_{flat}", f"lora_transformer_{flat}", f"lycoris_{flat}"]


def flux_targets(model: Flux) -> dict[str, Target]:
    """Every name a LoRA may give a Linear of `model` -> (BFL layer, rows, halves swapped)."""
    p = model.params
    width, mlp = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    layers = (n for n, m in model.named_modules() if isinstance(m, nn.Linear | RMSNorm))  # norms: control LoRAs' scales
    names: dict[str, Target] = {n: (n, None, False) for n in layers}

    def diffusers(table: dict, bfl_prefix: str, prefix: str) -> None:
        for bfl, sources in table.items():
            if bfl_prefix + bfl not in names:
                continue  # norm scales, absent embedders
            sizes = [width] * 3 + [mlp]  # q, k, v (, mlp) rows of a fused weight
            start = 0
            for source, size in zip(sources, sizes):
                rows = None if len(sources) == 1 else slice(start, start + size)
                names[prefix + source] = (bfl_prefix + bfl, rows, bfl == "final_layer.adaLN_modulation.1")
                start += size

    diffusers(_DIFFUSERS_TOP, "", "")
    for i in range(p.depth):
        diffusers(_DIFFUSERS_DOUBLE, f"double_blocks.{i}.", f"transformer_blocks.{i}.")
        for xlabs, bfl in _XLABS_DOUBLE.items():
            names[f"double_blocks.{i}.processor.{xlabs}"] = (f"double_blocks.{i}.{bfl}", None, False)
    for i in range(p.depth_single_blocks):
        diffusers(_DIFFUSERS_SINGLE, f"single_blocks.{i}.", f"single_transformer_blocks.{i}.")
        qkv = (f"single_blocks.{i}.linear1", slice(0, 3 * width), False)  # ComfyUI's linear1_qkv, XLabs' qkv_lora
        names[f"single_blocks.{i}.linear1_qkv"] = names[f"single_blocks.{i}.processor.qkv_lora"] = qkv
        names[f"single_blocks.{i}.processor.proj_lora"] = (f"single_blocks.{i}.linear2", None, False)
    return {spelling: target for name, target in names.items() for spelling in _spellings(name)}


def clip_targets(clip: nn.Module) -> dict[str, Target]:
    """Every name a LoRA may give a Linear of CLIP-L's text tower (kohya lora_te1_ / lora_te_, diffusers, ComfyUI)."""
    names = {}
    for layer, module in clip.named_modules():
        if isinstance(module, nn.Linear):
            dotted = "text_model." + layer.removeprefix("text_model.")  # transformers 5 keeps no text_model.
            flat = dotted.replace(".", "_")
            spellings = (dotted, f"text_encoder.{dotted}", f"text_encoders.clip_l.transformer.{dotted}")
            names.update(dict.fromkeys((*spellings, f"lora_te1_{flat}", f"lora_te_{flat}"), (layer, None, False)))
    return names


def _resolve(module: str, targets: dict[str, Target]) -> Target | None:
    if module in targets:
        return targets[module]
    bare = (module[len(p) :] for p in FLUX_PREFIXES if module.startswith(p))
    return next((targets[name] for name in bare if name in targets), None)


@dataclass
class _Change:
    """One adapter's change to a layer's rows, scaled: low rank (up @ down) and/or dense, and a bias change."""

    rows: slice  # of the layer's output features
    down: Tensor | None = None  # (r, in)
    up: Tensor | None = None  # (rows, r), strength * alpha / rank folded in
    dense: Tensor | None = None  # (rows, in)
    bias: Tensor | None = None  # (rows,)


def _shape(parts: dict[str, Tensor]) -> tuple[int, ...]:
    """(out, in) of the change an adapter makes (in None for a bias-only difference); (dim,) of a norm scale."""
    if "set" in parts:
        return tuple(parts["set"].shape)
    if "down" in parts:
        return parts["up"].shape[0], parts["down"].flatten(1).shape[1]
    if "hada_w1_a" in parts:
        return parts["hada_w1_a"].shape[0], parts["hada_w1_b"].shape[1]
    if "diff" in parts:
        diff = parts["diff"]
        return (diff.shape[0], diff.shape[1] if diff.ndim == 2 else -1)
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        (a0, a1), (b0, b1) = (_lokr_factor_shape(parts, w) for w in ("w1", "w2"))
        return a0 * b0, a1 * b1
    return parts["diff_b"].shape[0], None


def _lokr_factor_shape(parts: dict[str, Tensor], w: str) -> tuple[int, int]:
    if f"lokr_{w}" in parts:
        return tuple(parts[f"lokr_{w}"].shape)
    return parts[f"lokr_{w}_a"].shape[0], parts[f"lokr_{w}_b"].shape[1]


def _change(parts: dict[str, Tensor], target: Target, strength: float, device, work: torch.dtype) -> _Change:
    """The scaled change of one adapter, in `work` precision on `device`."""
    get = {k: v.to(device, work) for k, v in parts.items()}.get
    alpha = float(parts["alpha"].float()) if "alpha" in parts else None
    change = _Change(slice(None) if target[1] is None else target[1])
    if "down" in parts:
        down = get("down").flatten(1)
        scale = strength * (1.0 if alpha is None else alpha / down.shape[0])
        change.down, change.up = down, get("up").flatten(1) * scale
        if "up_bias" in parts:
            change.bias = get("up_bias") * scale
    elif "hada_w1_a" in parts:
        scale = strength * (1.0 if alpha is None else alpha / parts["hada_w1_b"].shape[0])
        change.dense = (get("hada_w1_a") @ get("hada_w1_b")) * (get("hada_w2_a") @ get("hada_w2_b")) * scale
    elif "lokr_w1" in parts or "lokr_w1_a" in parts:
        factors, rank = [], None
        for w in ("w1", "w2"):
            if f"lokr_{w}" in parts:
                factors.append(get(f"lokr_{w}"))
            else:
                factors.append(get(f"lokr_{w}_a") @ get(f"lokr_{w}_b"))
                rank = parts[f"lokr_{w}_b"].shape[0]  # the last decomposed factor's rank sets the scale
        scale = strength * (alpha / rank if alpha is not None and rank else 1.0)
        change.dense = torch.kron(*factors) * scale
    elif "diff" in parts:
        change.dense = get("diff") * strength
    if "diff_b" in parts:
        change.bias = get("diff_b") * strength + (0 if change.bias is None else change.bias)
    if target[2]:  # diffusers' norm_out holds (scale, shift); ours (shift, scale)
        swap = lambda t: None if t is None else torch.cat(t.chunk(2)[::-1])  # noqa: E731
        change.up, change.dense, change.bias = swap(change.up), swap(change.dense), swap(change.bias)
    return change


def _patch(layer: Linear | RMSNorm, adapters: list[tuple], compute_dtype: torch.dtype, merge: bool = True) -> str:
    """Give `layer` (a twin's, never the base model's) its (parts, target, strength) adapters, computed here so that
    one layer's changes at a time are in memory; returns how: "merged", "side path" or "replaced" (a norm scale)."""
    if isinstance(layer, RMSNorm):  # as BFL's load_state_dict: the last LoRA's scale, whatever the strength
        scale = layer.scale
        layer.scale = nn.Parameter(adapters[-1][0]["set"].to(scale.device, scale.dtype), requires_grad=False)
        return "replaced"
    weight = layer.weight
    work = torch.promote_types(torch.float32, compute_dtype)
    changes = [_change(parts, target, strength, weight.device, work) for parts, target, strength in adapters]
    for c in changes:  # a plain LoRA's img_in on a control model: the control channels' columns unchanged
        if c.down is not None and c.down.shape[1] < layer.in_features:
            c.down = F.pad(c.down, (0, layer.in_features - c.down.shape[1]))
        if c.dense is not None and c.dense.shape[1] < layer.in_features:
            c.dense = F.pad(c.dense, (0, layer.in_features - c.dense.shape[1]))
    if any(c.bias is not None for c in changes):
        bias = layer.bias.to(work, copy=True) if layer.bias is not None else weight.new_zeros(layer.out_features, dtype=work)
        for c in (c for c in changes if c.bias is not None):
            bias[c.rows] += c.bias
        layer.bias = nn.Parameter(bias.to(compute_dtype if layer.bias is None else layer.bias.dtype), requires_grad=False)
    narrow = weight.dtype in FP8_DTYPES or not weight.dtype.is_floating_point  # fp8 or quantised (GGUF) storage
    if (narrow or not merge) and all(c.dense is None for c in changes):
        low_rank = [c for c in changes if c.down is not None]
        if low_rank:
            down = torch.cat([c.down for c in low_rank])  # (R, in): all ranks side by side
            up = torch.zeros(layer.out_features, down.shape[0], dtype=work, device=weight.device)  # (out, R)
            start = 0
            for c in low_rank:
                up[c.rows, start : start + c.down.shape[0]] = c.up
                start += c.down.shape[0]
            if layer.lora_up is not None:  # a LoRA applied before: keep it
                down, up = torch.cat((layer.lora_down.to(work), down)), torch.cat((layer.lora_up.to(work), up), dim=1)
            layer.lora_down, layer.lora_up = down.to(compute_dtype), up.to(compute_dtype)
        return "side path"
    merged = layer.upcast(weight, None, work)[0]  # dequantised, scaled
    if merged is weight:
        merged = merged.clone()
    for c in changes:
        view = merged[c.rows]
        if c.dense is not None:
            view += c.dense
        if c.down is not None:
            view.addmm_(c.up, c.down)
    # a full-rank change to fp8 / quantised weights: the layer becomes a plain one in the compute dtype instead
    layer.weight = nn.Parameter(merged.to(compute_dtype if narrow else weight.dtype), requires_grad=False)
    if narrow:
        layer.__class__, layer.weight_scale, layer.fp8_matmul = Linear, None, False
    return "merged"


def _match(lora: Lora, flux_names: dict, clip_names: dict | None, report: LoraReport):
    """([(module, target)] on Flux, the same on CLIP-L); keys that match nothing go to the report or raise."""
    flux, text, unmatched = [], [], []
    for module in lora.modules:
        why = None
        if (target := _resolve(module, flux_names)) is not None:
            flux.append((module, target))
        elif module.startswith(CLIP_PREFIXES):
            if clip_names is not None and module in clip_names:
                text.append((module, clip_names[module]))
            else:
                why = "CLIP-L part, no text encoders given" if clip_names is None else "no such CLIP-L layer"
        elif module.startswith(T5_PREFIXES):
            why = "T5 parts are not applied"
        else:
            unmatched.append(module)
            why = "no such layer in this model"
        if why:
            report.skipped.update(dict.fromkeys(lora.keys[module], why))
    if not lora.modules:
        raise CheckpointError(f"{lora.name} holds no LoRA adapters ({len(lora.stray)} keys, e.g. {next(iter(lora.stray), '-')})")
    other = next((what for fragments, what in _OTHER_MODELS if any(f in m for m in unmatched for f in fragments)), None)
    if other or (unmatched and not flux and not text):
        if other == _UNET:
            sdxl = any(f in m for m in lora.modules for f in _SDXL)
            other = "SDXL" if sdxl else "Stable Diffusion 1.x / 2.x"
        seems = f"it seems made for {other}" if other else "none of its layer names is a Flux or CLIP-L layer"
        raise CheckpointError(
            f"{lora.name} is not a LoRA for this Flux model: {len(unmatched)} of its {len(lora.modules)} layers match "
            f"nothing here ({seems}; e.g. {unmatched[0]}). Pick a LoRA made for FLUX.1."
        )
    return flux, text


def _wanted(layer: nn.Module, rows: slice | None) -> tuple[int, ...]:
    """The shape a change to `layer` has: (out, in) of a Linear's rows, (dim,) of a norm's scale."""
    if isinstance(layer, RMSNorm):
        return tuple(layer.scale.shape)
    return (layer.out_features if rows is None else len(range(layer.out_features)[rows]), layer.in_features)


def _fits(got: tuple, wanted: tuple, layer_name: str) -> bool:
    """A change fits its layer's shape; img_in also takes a LoRA for a plain model's 64 input channels on a tool model
    (the tool's channels left alone) and one widening a plain model to a tool's input (see _widen)."""
    if len(got) != len(wanted) or got[0] != wanted[0]:
        return False
    if len(got) == 1 or got[1] in (wanted[1], None):
        return True
    plain = LATENT_TOKEN_CHANNELS
    return layer_name == "img_in" and (got[1] == plain or (wanted[1] == plain and got[1] in _TOOL_INPUTS))


def _check_shapes(lora: Lora, root: nn.Module, matched: list, width: int) -> None:
    """Raise, naming the width the LoRA seems made for, when any change does not fit its layer."""
    mismatched = []
    for module, (layer_name, rows, _) in matched:
        got, wanted = _shape(lora.modules[module]), _wanted(root.get_submodule(layer_name), rows)
        if not _fits(got, wanted, layer_name):
            mismatched.append((layer_name, got, wanted))
    if not mismatched:
        return
    layer, got, wanted = mismatched[0]
    size = lambda shape: "x".join(map(str, shape))  # noqa: E731
    if all(name == "img_in" and len(got) == 2 and got[0] == wanted[0] for name, got, wanted in mismatched):
        raise CheckpointError(
            f"{lora.name} does not fit this model's input: its img_in takes {got[1]} channels, the model's "
            f"{wanted[1]}. Control LoRAs (Canny/Depth, 128 channels) go on a plain FLUX.1 dev (64); other LoRAs on a "
            "model of their own kind."
        )
    widths = Counter(got[1] for _, got, _ in mismatched if len(got) == 2 and got[1])
    seems = _WIDTHS.get(w := widths.most_common(1)[0][0], f"a model {w} wide") if widths else "another model"
    raise CheckpointError(
        f"{lora.name} does not fit this model ({width} wide): {len(mismatched)} of its layers have other shapes "
        f"(e.g. {layer}: LoRA {size(got)}, model {size(wanted)}); it seems made for {seems}. "
        "Pick a LoRA made for this model."
    )


def apply_loras(
    model: Flux, loras: list[tuple[Lora, float, float]], text_encoders: TextEncoders | None = None, merge: bool = True
) -> tuple[Flux, TextEncoders | None, list[LoraReport]]:
    """(patched twin of `model`, patched twin of `text_encoders` (or them as given), one report per LoRA).

    `loras`: (lora, strength_model, strength_clip), stacked in order; changes to one layer are summed in float32 and
    rounded once. Strengths may be negative; 0 leaves the model exactly as it was. A control LoRA's low-rank part
    scales with its strength; its norm scales (replacing the model's) and img_in's widening (zero columns) apply as
    they are at any strength but 0. Every LoRA is checked against the model before any work: one made for another
    model raises, naming it. `merge=False` keeps low-rank LoRAs as side paths on float weights too: no merged copy of
    the patched layers (memory), two thin GEMMs more per layer (time).
    """
    flux_names, clip = flux_targets(model), None if text_encoders is None else text_encoders.clip
    clip_names = None if clip is None else clip_targets(clip)
    width = model.params.hidden_size
    plans = []
    for lora, strength, clip_strength in loras:
        formats = sorted({f"{_naming(m)} {_kind(p)}" for m, p in lora.modules.items()})
        report = LoraReport(lora.name, strength, formats, skipped=dict(lora.stray))
        flux, text = _match(lora, flux_names, clip_names, report)
        _check_shapes(lora, model, flux, width)
        if text:
            _check_shapes(lora, clip, text, clip.config.hidden_size)
        report.layers, report.clip_layers = len({t[0] for _, t in flux}), len({t[0] for _, t in text})
        plans.append((lora, report, ((flux, strength), (text, clip_strength))))
    dtypes = (model.compute_dtype, None if text_encoders is None else text_encoders.dtype)
    adapters = (defaultdict(list), defaultdict(list))  # per model: layer -> [(parts, target, strength)], in order
    for lora, _, parts in plans:
        for plan, (matched, strength) in zip(adapters, parts):
            for module, target in matched if strength else ():  # strength 0: the base output exactly
                plan[target[0]].append((lora.modules[module], target, strength))
    inputs = {_shape(parts)[1] for parts, _, _ in adapters[0].get("img_in", ())}  # a control LoRA's is wider
    if len(inputs := inputs - {model.params.in_channels, LATENT_TOKEN_CHANNELS}) > 1:
        raise CheckpointError(f"these LoRAs widen img_in to {sorted(inputs)} channels: stack one control LoRA at most")
    twin = model.twin()
    if inputs:
        _widen(twin, inputs.pop())
    modes = {layer: _patch(twin.get_submodule(layer), a, dtypes[0], merge) for layer, a in adapters[0].items()}
    for lora, report, ((flux, _), _) in plans:
        report.modes = dict(Counter(modes[layer] for layer in {t[0] for _, t in flux} if layer in modes))
    names = ", ".join(f"{lora.name} ({strength:g})" for lora, strength, _ in loras)
    twin.description = f"{getattr(model, 'description', 'Flux')}; LoRAs: {names}"
    if not adapters[1]:
        return twin, text_encoders, [report for _, report, _ in plans]
    clip_twin, t5_twin = _twin(clip), _twin(text_encoders.t5)
    for layer, a in adapters[1].items():
        _patch(clip_twin.get_submodule(layer), a, dtypes[1], merge)
    encoders = TextEncoders(clip_twin, t5_twin, text_encoders.clip_tokenizer, text_encoders.t5_tokenizer)
    return twin, encoders, [report for _, report, _ in plans]


def _widen(model: Flux, in_channels: int) -> None:
    """Make `model` (a twin) take a tool's `in_channels` (e.g. 128 for Canny/Depth): img_in gets new zero columns for
    the extra channels (BFL's optionally_expand_state_dict), so only the control LoRA's change reads them."""
    layer, extra = model.img_in, in_channels - model.img_in.in_features
    wide = Linear(in_channels, layer.out_features, device="meta")
    weight = layer.upcast(layer.weight, None, model.compute_dtype)[0]  # fp8 / GGUF: dequantised, plain from here
    wide.weight, wide.bias = nn.Parameter(F.pad(weight, (0, extra)), requires_grad=False), layer.bias
    if layer.lora_up is not None:  # a side path from a LoRA applied before reads the latent channels only
        wide.lora_down, wide.lora_up = F.pad(layer.lora_down, (0, extra)), layer.lora_up
    model.img_in, model.in_channels = wide, in_channels
    model.params = dataclasses.replace(model.params, in_channels=in_channels)


def _twin(module: nn.Module) -> nn.Module:
    """A second module tree holding the very same tensors (as Flux.twin)."""
    return copy.deepcopy(module, memo={id(t): t for t in (*module.parameters(), *module.buffers())})
