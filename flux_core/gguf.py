"""GGUF files: city96's quantised Flux transformers (BFL names) and llama.cpp's T5 encoders, kept quantised in memory.

The `gguf` package parses the file; tensors are views of one private memory map, as for safetensors. A Linear whose
weight is quantised becomes a GGUFLinear: its `weight` is the raw blocks, a frozen uint8 parameter (out_features,
bytes per row) that moves, streams and slices by rows like any weight, and each call dequantises it in torch to the
compute dtype (under torch.compile the unpacking fuses into one kernel feeding the matmul). Other tensors (norms,
biases, embeddings) are read as plain float tensors.
"""
import os
from pathlib import Path

import gguf
import torch
from torch import Tensor, nn

from .checkpoint import KIND_LOADERS, CheckpointError, identify
from .ops import Linear

Q = gguf.GGMLQuantizationType
NATIVE = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
EAGER_CHUNK = 2**24  # weights dequantised at once outside torch.compile

# The usual GGUF types: bits per weight (scales included) and quality as they are commonly described; for tooltips.
QUANT_NOTES = {
    "Q8_0": (8.5, "indistinguishable from bf16"),
    "Q6_K": (6.56, "near bf16"),
    "Q5_K": (5.5, "close to bf16"),
    "Q4_K": (4.5, "small changes in detail"),
    "Q4_0": (4.5, "small changes in detail, a little below Q4_K"),
    "Q3_K": (3.44, "visible loss of detail"),
    "Q2_K": (2.63, "strong degradation"),
}
FLUX_DEV_WEIGHTS, T5_XXL_WEIGHTS = 11.9e9, 4.76e9  # parameters, for file sizes in tooltips


def quant_guide(weights: float) -> str:
    """What each usual GGUF type costs for a model of `weights` parameters: bits, file (and memory) size, quality."""
    rows = [
        f"{name} {bits} bits/weight, {weights * bits / 8e9:.1f} GB: {note}"
        for name, (bits, note) in QUANT_NOTES.items()
    ]
    return "; ".join(rows) + f" (bf16: 16 bits, {weights * 2 / 1e9:.1f} GB)"


# general.architecture values of GGUF files that are not what a loader wants, and what they are.
_IMAGE_ARCHS = {
    "sd1": "a Stable Diffusion 1.x UNet", "sdxl": "an SDXL UNet", "sd3": "a Stable Diffusion 3 transformer",
    "aura": "an AuraFlow transformer", "hidream": "a HiDream transformer", "cosmos": "a Cosmos transformer",
    "ltxv": "an LTX-Video transformer", "hyvid": "a HunyuanVideo transformer", "wan": "a Wan video transformer",
    "lumina2": "a Lumina 2 transformer", "qwen_image": "a Qwen-Image transformer",
}  # fmt: skip
_T5_ARCHS = ("t5", "t5encoder")
_SD_KEYS = ("input_blocks.", "down_blocks.", "joint_blocks.")  # SD UNets (original, diffusers), SD3's MMDiT

# llama.cpp's T5 names -> transformers' (per block: enc.blk.N.<name>.weight -> encoder.block.N.<target>.weight)
_T5_BLOCK = {
    "attn_q": "layer.0.SelfAttention.q", "attn_k": "layer.0.SelfAttention.k", "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o", "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias", "ffn_norm": "layer.1.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0", "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
}  # fmt: skip
_T5_TOP = {"token_embd.weight": "shared.weight", "enc.output_norm.weight": "encoder.final_layer_norm.weight"}
_T5_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_o", "ffn_gate", "ffn_up", "ffn_down")


# --- dequantisation: (..., blocks, type_size) uint8 -> integer quants (..., groups, weights per group) with float32 ---
# --- scales and offsets (..., groups, 1): weight = quant * scale + offset, as ggml's reference computes it ----------


def _f16(raw: Tensor) -> Tensor:  # (..., 2) uint8 -> (..., 1) float32
    """A float16 from two bytes. Eager, a view of the bytes; compiled, arithmetic on 16-bit integers (a same-size
    bitcast), which torch.compile keeps in the fused kernel where a view of a byte slice as float16 is copied out."""
    if not torch.compiler.is_compiling():
        return raw.view(torch.float16).float()
    return (raw[..., :1].to(torch.int16) | (raw[..., 1:].to(torch.int16) << 8)).view(torch.float16).float()


def _bits(raw: Tensor, width: int, count: int) -> Tensor:  # (..., n) uint8 -> (..., count, n)
    """The `count` fields of `width` bits of each byte, lowest first."""
    shifts = torch.arange(0, width * count, width, dtype=torch.uint8, device=raw.device)
    return (raw.unsqueeze(-2) >> shifts[:, None]).bitwise_and_(2**width - 1)


def _low_high(raw: Tensor) -> Tensor:  # (..., 16) uint8 -> (..., 32): low nibbles then high, as Q4_0/Q4_1/Q5_x
    return _bits(raw, 4, 2).flatten(-2)


def _high_bits32(raw: Tensor) -> Tensor:  # (..., 4) uint8, a little-endian uint32 -> (..., 32) its bits in order
    return _bits(raw, 1, 8).transpose(-1, -2).flatten(-2)


def _k_scales(b: Tensor) -> tuple[Tensor, Tensor]:  # d | dmin | 12 bytes: 8 six-bit scales and mins -> (..., 8) x 2
    """The group scales d * scale_j and mins dmin * min_j of a Q4_K / Q5_K super-block, both kinds at once."""
    low = b[..., 4:12].unflatten(-1, (2, 4))  # (..., 2, 4): scale | min bytes: groups 0-3, top bits of groups 4-7
    top = _bits(b[..., 12:16], 4, 2) | ((low >> 2) & 48)  # (..., 2, 4): groups 4-7
    first = torch.arange(2, device=b.device)[:, None] == 0  # groups 0-3 | 4-7, without a concatenation
    six_bits = torch.where(first, (low & 63).unsqueeze(-2), top.unsqueeze(-2)).flatten(-2)  # (..., 2, 8)
    return (_f16(b[..., :4].unflatten(-1, (2, 2))) * six_bits.float()).unbind(-2)


def _q8_0(b: Tensor):
    return b[..., 2:].view(torch.int8), _f16(b[..., :2]), None


def _q4_0(b: Tensor):  # (q - 8) * d as q * d - 8 * d: the same float32, both products exact, one quant pass less
    d = _f16(b[..., :2])
    return _low_high(b[..., 2:]), d, -8 * d


def _q4_1(b: Tensor):
    return _low_high(b[..., 4:]), _f16(b[..., :2]), _f16(b[..., 2:4])


def _q5_0(b: Tensor):
    d = _f16(b[..., :2])
    return _low_high(b[..., 6:]) | (_high_bits32(b[..., 2:6]) << 4), d, -16 * d


def _q5_1(b: Tensor):
    return _low_high(b[..., 8:]) | (_high_bits32(b[..., 4:8]) << 4), _f16(b[..., :2]), _f16(b[..., 2:4])


def _grouped(q: Tensor, scales: Tensor, mins: Tensor | None = None):
    """K-quant super-blocks: (..., 256) quants, their group's scale (..., groups) and min, split into groups."""
    return q.unflatten(-1, (scales.shape[-1], -1)), scales[..., None], None if mins is None else -mins[..., None]


def _q2_k(b: Tensor):  # 16 scale bytes (scale | min << 4) | 64 quant bytes | d | dmin
    scales, q = b[..., :16], _bits(b[..., 16:80].unflatten(-1, (2, 32)), 2, 4).flatten(-3)
    return _grouped(q, _f16(b[..., 80:82]) * (scales & 15).float(), _f16(b[..., 82:84]) * (scales >> 4).float())


def _q3_k(b: Tensor):  # 32 high-bit bytes | 64 quant bytes | 12 scale bytes | d
    sc = b[..., 96:108]
    scales = (_bits(sc[..., :8], 4, 2).flatten(-2) | (_bits(sc[..., 8:], 2, 4).flatten(-2) << 4)).to(torch.int8) - 32
    low = _bits(b[..., 32:96].unflatten(-1, (2, 32)), 2, 4).flatten(-3)
    high = _bits(b[..., :32], 1, 8).flatten(-2)  # a clear bit subtracts 4
    return _grouped(low.to(torch.int8) - ((high ^ 1) << 2).to(torch.int8), _f16(b[..., 108:110]) * scales.float())


def _q4_k(b: Tensor):  # d | dmin | 12 scale bytes | 128 quant bytes
    return _grouped(_bits(b[..., 16:].unflatten(-1, (4, 32)), 4, 2).flatten(-3), *_k_scales(b))


def _q5_k(b: Tensor):  # d | dmin | 12 scale bytes | 32 high-bit bytes | 128 quant bytes
    q = _bits(b[..., 48:].unflatten(-1, (4, 32)), 4, 2).flatten(-3) | (_bits(b[..., 16:48], 1, 8).flatten(-2) << 4)
    return _grouped(q, *_k_scales(b))


def _q6_k(b: Tensor):  # 128 low-nibble bytes | 64 high-bit-pair bytes | 16 int8 scales | d
    low = _bits(b[..., :128].unflatten(-1, (2, 64)), 4, 2).flatten(-3)
    high = _bits(b[..., 128:192].unflatten(-1, (2, 32)), 2, 4).flatten(-3)
    scales = _f16(b[..., 208:210]) * b[..., 192:208].view(torch.int8).float()
    return _grouped((low | (high << 4)).to(torch.int8) - 32, scales)


_DEQUANTIZE = {
    Q.Q8_0: _q8_0, Q.Q5_1: _q5_1, Q.Q5_0: _q5_0, Q.Q4_1: _q4_1, Q.Q4_0: _q4_0,
    Q.Q6_K: _q6_k, Q.Q5_K: _q5_k, Q.Q4_K: _q4_k, Q.Q3_K: _q3_k, Q.Q2_K: _q2_k,
}  # fmt: skip
SUPPORTED = (*NATIVE, *_DEQUANTIZE)


def dequantize(raw: Tensor, qtype: Q, dtype: torch.dtype = torch.float32) -> Tensor:
    """(..., bytes per row) GGUF data -> (..., weights per row) in `dtype`: computed in float32 as ggml's reference,
    rounded once. Compiled, one expression that torch.compile fuses into one kernel. Eager, the integer quants are
    unpacked (one byte per weight) and one multiply(-add) of mixed dtypes writes `dtype` directly (CUDA converts in
    the kernel; the CPU makes float32 temporaries, so there a matrix goes EAGER_CHUNK weights at a time)."""
    if qtype in NATIVE:
        return raw.view(NATIVE[qtype]).to(dtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    unpack, blocks = _DEQUANTIZE[qtype], raw.unflatten(-1, (-1, type_size))  # (..., blocks, type_size)
    if torch.compiler.is_compiling():
        q, scale, offset = unpack(blocks)
        out = q.float() * scale if offset is None else q.float() * scale + offset
        return out.reshape(*raw.shape[:-1], -1).to(dtype)
    blocks = blocks.reshape(-1, *blocks.shape[-2:])  # (rows, blocks, type_size)
    out = raw.new_empty(len(blocks), blocks.shape[1] * block_size, dtype=dtype)
    rows = max(1, EAGER_CHUNK // out.shape[1]) if raw.device.type == "cpu" else len(out)
    for start in range(0, len(out), rows):
        q, scale, offset = unpack(blocks[start : start + rows])
        part = out[start : start + rows].view(q.shape)
        if offset is None:
            torch.mul(q, scale, out=part)
        else:
            torch.addcmul(offset, q, scale, out=part)
    return out.reshape(*raw.shape[:-1], -1)


class GGUFLinear(Linear):
    """A Linear whose weight stays GGUF-quantised: `weight` is the raw blocks (out_features, bytes per row), uint8,
    `qtype` their type; every call dequantises the rows it uses to the input's dtype (LoRA side paths, `rows`,
    forward_concat: all as Linear, which sees the dequantised weight)."""

    qtype: Q = Q.Q8_0

    def upcast(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        return super().upcast(dequantize(weight, self.qtype, dtype), bias, dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype.name}"


def use_blocks(model: nn.Module, qtypes: dict[str, Q]) -> None:
    """Turn the Linears (still on the meta device) whose `<layer>.weight` is quantised into GGUFLinears expecting
    raw blocks, so load_weights assigns them as stored."""
    for key, qtype in qtypes.items():
        try:
            layer = model.get_submodule(key.removesuffix(".weight"))
        except AttributeError:
            continue  # no such layer: load_weights names the unexpected key
        if not isinstance(layer, Linear) or not key.endswith(".weight"):
            raise CheckpointError(f"{key} is quantised ({qtype.name}) but is not a linear layer's weight")
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        layer.__class__, layer.qtype = GGUFLinear, qtype
        row_bytes = layer.in_features // block_size * type_size
        layer.weight = nn.Parameter(torch.empty(layer.out_features, row_bytes, dtype=torch.uint8, device="meta"), False)


def logical_shapes(state_dict: dict[str, Tensor], qtypes: dict[str, Q]) -> dict[str, Tensor]:
    """The state dict with each quantised tensor replaced by a meta tensor of the shape it stands for (to read an
    architecture off the shapes)."""
    shapes = dict(state_dict)
    for key, qtype in qtypes.items():
        raw = state_dict[key]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shapes[key] = torch.empty(*raw.shape[:-1], raw.shape[-1] // type_size * block_size, device="meta")
    return shapes


def type_label(state_dict: dict[str, Tensor], qtypes: dict[str, Q]) -> str:
    """The storage of the 2-D tensors, e.g. "Q4_K x 180, Q5_K x 24, F16 x 4"."""
    names = [qtypes[k].name if k in qtypes else str(v.dtype)[6:] for k, v in state_dict.items() if v.ndim == 2]
    return ", ".join(f"{n} x {names.count(n)}" for n in sorted(set(names), key=names.count, reverse=True))


# --- reading ----------------------------------------------------------------------------------------------------------


def is_gguf(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _field(reader: gguf.GGUFReader, name: str) -> str | None:
    field = reader.fields.get(name)
    if field is None or field.types != [gguf.GGUFValueType.STRING]:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Q], str | None]:
    """(tensors, qtypes, general.architecture) of a GGUF file. Tensors are views of a private memory map: native
    types (F32/F16/BF16) in their logical shape, quantised ones as raw blocks (*shape[:-1], bytes per row) with their
    type in `qtypes`. Types this module cannot dequantise are refused before anything is read."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError) as err:
        raise CheckpointError(
            f"{path.name} is a GGUF quantised file that cannot be read (truncated or corrupt: {err})"
        ) from None
    unsupported = [t for t in reader.tensors if t.tensor_type not in SUPPORTED]
    if unsupported:
        kinds = sorted({t.tensor_type.name for t in unsupported})
        known = ", ".join(t.name for t in SUPPORTED)
        raise CheckpointError(
            f"{path.name} stores {len(unsupported)} tensors as {'/'.join(kinds)} (e.g. {unsupported[0].name}), which "
            f"this loader does not dequantise; supported: {known}. Pick a Q8_0, Q6_K, Q5_K, Q4_K or Q4_0 file."
        )
    if reshaped := [f for f in reader.fields if f.startswith("comfy.gguf.orig_shape.")]:
        raise CheckpointError(f"{path.name} stores reshaped tensors ({reshaped[0]}): a UNet/video GGUF, not Flux or T5")
    size = path.stat().st_size
    storage = torch.UntypedStorage.from_file(os.fspath(path), shared=False, nbytes=size)
    data = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size,))
    tensors, qtypes = {}, {}
    for t in reader.tensors:
        shape = [int(n) for n in reversed(t.shape)]  # ggml lists dims innermost first
        raw = data[t.data_offset : t.data_offset + t.n_bytes]
        if t.tensor_type in NATIVE:
            tensors[t.name] = raw.view(NATIVE[t.tensor_type]).reshape(shape)
        else:
            tensors[t.name], qtypes[t.name] = raw.reshape(*shape[:-1], -1), t.tensor_type
    return tensors, qtypes, _field(reader, "general.architecture")


def _what(arch: str | None, keys) -> str:
    """What a GGUF file that is not the wanted model holds, from its architecture or its keys."""
    if arch in _IMAGE_ARCHS:
        return _IMAGE_ARCHS[arch]
    if arch in _T5_ARCHS:
        return f"a T5 text encoder. Load it with {KIND_LOADERS['t5']}"
    if arch == "flux":
        return f"a Flux transformer. Load it with {KIND_LOADERS['flux']}"
    if arch is not None:
        return f"a {arch!r} model (a llama.cpp language model or another network: neither Flux nor T5)"
    if any(k.startswith(_SD_KEYS) for k in keys):
        return "a Stable Diffusion UNet or SD3 transformer"
    return "not a model this pack knows (no Flux or T5 keys, no general.architecture)"


def read_flux_gguf(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Q]]:
    """A Flux transformer GGUF (city96's layout: BFL names, general.architecture "flux"; files without the
    architecture, as stable-diffusion.cpp writes them, are recognised by their keys)."""
    path = Path(path)
    tensors, qtypes, arch = read_gguf(path)
    prefix = "model.diffusion_model." if any(k.startswith("model.diffusion_model.") for k in tensors) else ""
    kind = identify(k.removeprefix(prefix) for k in tensors)
    if arch in ("flux", None) and kind == "flux-diffusers":
        raise CheckpointError(f"{path.name} is a Flux GGUF with diffusers names; only BFL names (city96's files) are read")
    if arch == "flux" and kind != "flux":
        raise CheckpointError(f"{path.name} says it is a Flux GGUF but has no Flux transformer keys (BFL names)")
    if arch is not None and arch != "flux" or kind != "flux":
        raise CheckpointError(f"{path.name} is a GGUF quantised file of {_what(arch, tensors)}, not a Flux transformer")
    strip = lambda d: {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}  # noqa: E731
    return strip(tensors), strip(qtypes)


def read_t5_gguf(path: str | os.PathLike, dtype: torch.dtype) -> tuple[dict[str, Tensor], dict[str, Q]]:
    """A T5 encoder GGUF in llama.cpp's names, renamed to transformers' T5EncoderModel. Linear weights stay
    quantised; the token embedding and position bias (looked up, not multiplied) are dequantised to `dtype`.
    Decoder and LM-head tensors of full T5 files are left out."""
    path = Path(path)
    tensors, qtypes, arch = read_gguf(path)
    if arch in _T5_ARCHS and "enc.blk.0.attn_q.weight" not in tensors:
        raise CheckpointError(f"{path.name} says it is a T5 GGUF but has no encoder (enc.blk.0.attn_q.weight)")
    if arch not in _T5_ARCHS:
        raise CheckpointError(f"{path.name} is a GGUF quantised file of {_what(arch, tensors)}, not a T5 text encoder")
    block = dict(_T5_BLOCK)
    if "enc.blk.0.ffn_gate.weight" not in tensors:  # the original T5: one ReLU input projection
        block["ffn_up"] = "layer.1.DenseReluDense.wi"
    state, kept = {}, {}
    for key, value in tensors.items():
        if key in _T5_TOP:
            name = _T5_TOP[key]
        elif key.startswith("enc.blk."):
            index, layer, suffix = key.removeprefix("enc.blk.").split(".", 2)
            name = f"encoder.block.{index}.{block.get(layer, layer)}.{suffix}"
            if key in qtypes and layer in _T5_LINEARS:
                state[name], kept[name] = value, qtypes[key]
                continue
        else:
            continue  # decoder (dec.*), LM head (output.*)
        state[name] = dequantize(value, qtypes[key], dtype) if key in qtypes else value
    return state, kept
