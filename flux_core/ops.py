"""Layers whose weights may be stored narrower (fp8) than the dtype they compute in, and a faster CPU linear."""
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
_ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ())


def onednn_inference(x: Tensor, *params: Tensor | None) -> bool:
    """Whether oneDNN's CPU kernels can take this call: x86, float32/bfloat16, and no gradient wanted (they have none)."""
    return (
        x.dtype in _ONEDNN_DTYPES
        and x.device.type == "cpu"
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params)))
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, gelu: bool = False) -> Tensor:
    """F.linear, then GELU (tanh approximation) if `gelu`; CPU inference in float32/bfloat16 on x86 calls oneDNN.

    PyTorch sends float32 CPU matmuls to MKL, which runs its AVX2 kernels on AMD CPUs (measured 2.4x slower than
    oneDNN on an EPYC), and re-packs bfloat16 weights on every call; oneDNN also applies the GELU to its float32
    accumulator, saving a pass.
    """
    if x.dim() >= 2 and weight.is_contiguous() and onednn_inference(x, weight, bias):  # strided weights: slow path
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *(("gelu", [], "tanh") if gelu else ("none", [], "")))
    out = F.linear(x, weight, bias)
    return F.gelu(out, approximate="tanh") if gelu else out


class Linear(nn.Linear):
    """nn.Linear that upcasts a narrower stored weight to the input's dtype per call.

    `weight_scale` (a non-persistent buffer, set by the loader for "scaled fp8" files) multiplies the
    upcast weight. With matching dtypes this is exactly F.linear.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, *self.weights_in(x.dtype))

    def weights_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """(weight, bias) as used at `dtype`: upcast (and scaled) if stored narrower, else as they are."""
        weight, bias = self.weight, self.bias
        if weight.dtype != dtype:
            weight = weight.to(dtype)
            if self.weight_scale is not None:  # a 0-dim float32 scale: applied in float32, rounded once
                weight = weight * self.weight_scale
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        return weight, bias

    def set_weight_scale(self, scale: Tensor) -> None:
        """One float32 scale for the whole weight (per-tensor scaled fp8)."""
        self.weight_scale = scale.float().reshape(())
