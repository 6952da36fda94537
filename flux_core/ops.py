"""Layers whose weights may be stored narrower (fp8) than the dtype they compute in."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


class Linear(nn.Linear):
    """nn.Linear that upcasts a narrower stored weight to the input's dtype per call.

    `weight_scale` (a non-persistent buffer, set by the loader for "scaled fp8" files) multiplies the
    upcast weight. With matching dtypes this is exactly F.linear.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("weight_scale", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            if self.weight_scale is not None:  # a 0-dim float32 scale: applied in float32, rounded once
                weight = weight * self.weight_scale
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def set_weight_scale(self, scale: Tensor) -> None:
        """One float32 scale for the whole weight (per-tensor scaled fp8)."""
        self.weight_scale = scale.float().reshape(())
