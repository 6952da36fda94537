"""The pure math of Flux: sinusoidal time embedding, axial RoPE, attention."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def island_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the reference's float32 islands, without downcasting a float64 run."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_embedding(t: Tensor, dim: int = 256, max_period: int = 10_000, time_factor: float = 1000.0) -> Tensor:
    """(B,) flow time in [0, 1] -> (B, dim) [cos | sin]; t is scaled x1000 in its own dtype, as the reference."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """(..., L) positions -> (..., L, dim/2) rotations e^{i pos w_j}, w_j = theta^(-2j/dim), as complex numbers.

    The reference's 2x2 matrices [[cos, -sin], [sin, cos]] acting on (x[2j], x[2j+1]) are exactly multiplication
    by cos + i sin of x[2j] + i x[2j+1]. Angles in float64; complex64 unless the positions are float64.
    """
    omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    angles = pos.to(torch.float64)[..., None] * omega
    rotations = torch.polar(torch.ones_like(angles), angles)
    return rotations if pos.dtype == torch.float64 else rotations.to(torch.complex64)


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate the adjacent pairs (x[2j], x[2j+1]) of x (..., D) by pe (broadcastable to (..., D/2), complex).

    Computed in float32 (float64 for a float64 x) and returned so: the caller casts once where it needs to.
    """
    pairs = torch.view_as_complex(x.to(island_dtype(x.dtype)).unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * pe).flatten(-2)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, L, H, D) q, k, v (any strides, q and k already rotated) -> (B, L, H*D)."""
    x = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return x.transpose(1, 2).flatten(2)
