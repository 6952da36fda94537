"""The pure math of Flux: sinusoidal time embedding, axial RoPE, attention."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor


def at_least_float32(x: Tensor) -> Tensor:
    """float32 islands of the reference, without downcasting a float64 run."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


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
    """(B, L) positions -> (B, L, dim/2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]]."""
    out_dtype = at_least_float32(pos).dtype
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta**scale  # (dim/2,)
    angles = pos.to(torch.float64)[..., None] * omega  # (B, L, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    return torch.stack([cos, -sin, sin, cos], dim=-1).unflatten(-1, (2, 2)).to(out_dtype)


def apply_rope(xq: Tensor, xk: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate adjacent pairs (x[2j], x[2j+1]) of q and k (B, H, L, D) by pe (B, 1, L, D/2, 2, 2)."""
    def rotate(x: Tensor) -> Tensor:
        pairs = at_least_float32(x).unflatten(-1, (-1, 1, 2))  # (B, H, L, D/2, 1, 2)
        out = pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]
        return out.flatten(-2).type_as(x)

    return rotate(xq), rotate(xk)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """(B, H, L, D) q, k, v -> (B, L, H*D) with RoPE on q and k."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)
