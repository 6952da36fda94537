"""Layers whose weights may be stored narrower (fp8) than the dtype they compute in, and a faster CPU linear."""
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import kernels

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448

_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def onednn_inference(x: Tensor, *params: Tensor | None) -> bool:
    """Whether oneDNN's CPU kernels can take this call: x86, float32/bfloat16, no gradient wanted (they have none),
    and not inside torch.compile (Inductor cannot lower these calls; it picks its own CPU kernels)."""
    return (
        x.dtype in _ONEDNN_DTYPES
        and x.device.type == "cpu"
        and not needs_grad(x, *params)
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """F.linear, then GELU (tanh approximation) if `gelu`, fused into the GEMM where the backend can.

    PyTorch sends float32 CPU matmuls to MKL, which runs its AVX2 kernels on AMD CPUs (measured 2.4x slower than
    oneDNN on an EPYC), and re-packs bfloat16 weights on every call: CPU inference on x86 calls oneDNN, which
    also applies the GELU to its float32 accumulator. On CUDA, cuBLASLt applies it in the GEMM's epilogue.
    """
    if x.dim() >= 2 and weight.is_contiguous() and onednn_inference(x, weight, bias):  # strided weights: slow path
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *(("gelu", [], "tanh") if gelu else ("none", [], "")))
    if gelu and x.is_cuda and bias is not None and not needs_grad(x, weight, bias):
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)  # tanh form
        return out.unflatten(0, x.shape[:-1])
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor | None, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """linear(x, weight * weight_scale, bias) on the fp8 matrix units: x (bfloat16) is quantised to float8_e4m3fn
    row by row (each token scaled so its largest entry is the format's maximum, 448); the float8_e4m3fn weight is
    used as stored. On Hopper and Ada GPUs (measured on an H200: Flux's GEMMs in 46 ms per 1024 px step instead of
    79 ms in bf16), at 8-bit activation precision."""
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    amax = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True, dtype=torch.float32)  # (N, 1)
    inverse = (FP8_E4M3_MAX / amax.clamp_min(1e-12)).to(x.dtype)  # rounded once, then used both ways
    x8 = (rows * inverse).to(torch.float8_e4m3fn)  # two light passes, no float32 copy; <= 449.75 rounds to 448
    x_scale = inverse.float().reciprocal()
    w_scale = torch.ones((), device=x.device) if weight_scale is None else weight_scale
    w_scale = w_scale.float().expand(1, weight.shape[0]).contiguous()  # (1, M): row-wise scaling wants both
    # Inductor (torch 2.11) cannot lower _scaled_mm with a sliced bias; compiled, the add fuses into what follows
    fused_bias = None if torch.compiler.is_compiling() else bias
    out = torch._scaled_mm(x8, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=fused_bias, out_dtype=x.dtype)
    if bias is not None and fused_bias is None:
        out = out + bias
    out = out.unflatten(0, x.shape[:-1])
    return F.gelu(out, approximate="tanh") if gelu else out


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored narrower (fp8) than the dtype it computes in.

    A stored fp8 weight is upcast to the input's dtype per call; `weight_scale` (a non-persistent buffer, set by
    the loader for "scaled fp8" files) multiplies the upcast weight. With `fp8_matmul` (see enable_fp8_matmul) a
    float8_e4m3fn weight instead feeds a GPU's fp8 matrix units as it is (`fp8_linear`), for bfloat16 inputs. With matching dtypes this is
    exactly F.linear. `rows` selects output features (a slice of the weight's rows), `gelu` applies GELU (tanh).
    A LoRA on a weight that must not be re-rounded (fp8, GGUF) is kept as `lora_down` (R, in) and `lora_up` (out, R)
    (non-persistent buffers in the compute dtype; see flux_core.lora), applied per call: added into the weight this
    call upcasts anyway, in the compute dtype (fp8 on a GPU with Triton: in the upcast's own kernel; see lora_mode),
    or as a side path adding x @ down^T @ up^T to the output before the GELU.
    """

    fp8_matmul = False
    merge_lora_per_call = True  # False: always the side path (bench/lora.py and the tests compare the two)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)
        self.register_buffer("lora_down", None, persistent=False)
        self.register_buffer("lora_up", None, persistent=False)

    def forward(self, x: Tensor, gelu: bool = False, rows: slice | None = None) -> Tensor:
        weight, bias = self.weight, self.bias
        if rows is not None:
            weight, bias = weight[rows], None if bias is None else bias[rows]
        up, down = self.lora_factors(x.dtype, rows)
        if self.fp8_matmul and x.is_cuda and x.dtype == torch.bfloat16 and not needs_grad(x, weight):
            side = up is not None  # a side path joins before the activation
            bias = None if bias is None else bias.to(x.dtype)
            out = fp8_linear(x, weight, self.weight_scale, bias, gelu and not side)
        else:
            mode = self.lora_mode(x, weight, gelu)
            weight, bias = self.call_weight(x, weight, bias, up, down, mode)
            side = mode == "side"
            out = linear(x, weight, bias, gelu=gelu and not side)
        if not side:
            return out
        hidden = linear(x, down)  # (..., R): two thin GEMMs, the second adding in place
        out.view(-1, out.shape[-1]).addmm_(hidden.reshape(-1, hidden.shape[-1]), up.t())
        return F.gelu(out, approximate="tanh") if gelu else out

    def lora_factors(self, dtype: torch.dtype, rows: slice | None = None) -> tuple[Tensor | None, Tensor | None]:
        """(up (out, R) or its rows, down (R, in)) at `dtype` (stored in the compute dtype: no copy), or Nones."""
        if self.lora_up is None:
            return None, None
        return (self.lora_up if rows is None else self.lora_up[rows]).to(dtype), self.lora_down.to(dtype)

    def call_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None, up: Tensor | None, down: Tensor | None,
                    mode: str | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
        """(weight, bias) as this call multiplies by: upcast, with the LoRA added if `mode` (see lora_mode) adds it
        per call. Never writes into the stored weight."""
        if mode == "fused":
            bias = None if bias is None else bias.to(x.dtype)
            return kernels.upcast(weight, self.weight_scale, x.dtype, up, down), bias
        weight, bias = self.upcast(weight, bias, x.dtype)
        if mode == "merge":  # into this call's own weight, never the stored one; one GEMM
            weight.addmm_(up, down)
        return weight, bias

    def lora_mode(self, x: Tensor, weight: Tensor, gelu: bool) -> str | None:
        """How this call applies its LoRA (stored `weight`, its rows): None without one; "fused": float8 weights on
        a GPU with Triton upcast with the LoRA added in the same pass (kernels.upcast: no bytes beyond the
        upcast, so every layer takes it); "merge": added into the weight this call upcasts anyway, where that
        moves fewer bytes than the side path (merges_lora); else "side". Training keeps the side path."""
        if self.lora_up is None:
            return None
        if not self.merge_lora_per_call or needs_grad(x, weight, self.lora_down, self.lora_up):
            return "side"
        if weight.dtype in FP8_DTYPES and kernels.upcast_fits(weight, x.dtype, self.lora_down.shape[0]):
            return "fused"
        return "merge" if self.merges_lora(x, weight, gelu) else "side"

    def merges_lora(self, x: Tensor, weight: Tensor, gelu: bool) -> bool:
        """Whether adding the LoRA into this call's upcast weight moves fewer bytes than the side path.

        Only where upcast makes a new tensor anyway (stored in another dtype: fp8, GGUF blocks). Adding up @ down
        into the (out, in) weight reads and writes it once, 2·out·in elements; the side path reads x and reads and
        writes the output (twice with the GELU it unfuses), tokens·(in + 2·out or 4·out). At 1024 px (4096 image
        tokens, 4608 in single blocks) the image stream's layers merge (all but the double blocks' img_mlp.2, at
        break-even); the text stream (512 tokens) and the modulations (1 token) keep the side path. A weight stored
        in the compute dtype keeps it always: merging would first copy the whole weight (4·out·in), a win only for
        the GELU layers, at a weight-sized allocation per call.
        """
        if weight.dtype == x.dtype:
            return False
        tokens, out_features = x.numel() // x.shape[-1], weight.shape[0]
        return 2 * out_features * self.in_features < tokens * (self.in_features + (4 if gelu else 2) * out_features)

    def forward_concat(self, parts: tuple[Tensor, ...]) -> Tensor:
        """self(torch.cat(parts, -1)). On CUDA without the concatenated copy: one GEMM per part, each taking its
        columns of the weight and accumulating into one output (oneDNN on the CPU wants a dense weight)."""
        if not parts[0].is_cuda or self.fp8_matmul or needs_grad(*parts):
            return self(torch.cat(parts, dim=-1))
        first, *rest = parts
        mode = self.lora_mode(first, self.weight, False)
        if mode == "side":
            return self(torch.cat(parts, dim=-1))
        weight, bias = self.call_weight(first, self.weight, self.bias, *self.lora_factors(first.dtype), mode)
        out = linear(first, weight[:, : first.shape[-1]], bias)  # (..., out_features)
        start = first.shape[-1]
        for part in rest:
            columns = weight[:, start : start + part.shape[-1]]
            out.view(-1, out.shape[-1]).addmm_(part.reshape(-1, part.shape[-1]), columns.t())
            start += part.shape[-1]
        return out

    def upcast(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) as used at `dtype`: upcast (and scaled) if stored narrower, else as they are."""
        if weight.dtype in FP8_DTYPES and kernels.upcast_fits(weight, dtype):
            weight = kernels.upcast(weight, self.weight_scale, dtype)  # one pass (GPUs with Triton)
        elif weight.dtype != dtype:
            weight = weight.to(dtype)
            if self.weight_scale is not None:  # a 0-dim float32 scale: applied in float32, rounded once
                weight = weight * self.weight_scale
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return weight, bias

    def set_weight_scale(self, scale: Tensor) -> None:
        """One float32 scale for the whole weight (per-tensor scaled fp8)."""
        self.weight_scale = scale.float().reshape(())


def enable_fp8_matmul(model: nn.Module) -> int:
    """Switch every Linear of `model` whose weight is stored float8_e4m3fn (and whose sizes the fp8 GEMM takes:
    multiples of 16) to fp8 matmuls for bfloat16 inputs on CUDA (elsewhere they upcast as before). ComfyUI's
    "fp8_e4m3fn_fast". Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear) and module.weight.dtype == torch.float8_e4m3fn:
            if module.in_features % 16 == 0 and module.out_features % 16 == 0:
                module.fp8_matmul, count = True, count + 1
    return count
