"""The pure math of Flux: sinusoidal time embedding, axial RoPE, attention."""
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from .ops import linear, needs_grad, onednn_inference

# cuDNN's attention backward failed on an H200 (torch 2.11, seq2seq bf16 training: "mha_graph.execute ... is_good()")
# for these (B, H, L, D) views of (B, L, H, D) tensors: training on CUDA takes flash / memory-efficient attention
_TRAINING_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    """(..., L) positions -> (..., L, dim/2, 2) rotations (cos, sin) of angle pos * w_j, w_j = theta^(-2j/dim).

    The reference's 2x2 matrices [[cos, -sin], [sin, cos]] acting on (x[2j], x[2j+1]) are exactly multiplication
    by cos + i sin of x[2j] + i x[2j+1]; stored as real pairs, so the same tensor serves complex and real
    arithmetic. Angles in float64; float32 unless the positions are float64.
    """
    omega = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)  # (dim/2,)
    angles = pos.to(torch.float64)[..., None] * omega
    rotations = torch.stack((angles.cos(), angles.sin()), dim=-1)
    return rotations if pos.dtype == torch.float64 else rotations.float()


def apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    """Rotate the adjacent pairs (x[2j], x[2j+1]) of x (..., D) by pe (broadcastable to (..., D/2, 2), cos | sin).

    Computed in float32 (float64 for a float64 x) and returned so: the caller casts once where it needs to.
    Eager runs one complex multiply (the fewest passes); compiled code takes the real form, which Inductor fuses
    with the QK norm before it and the cast after it (it generates no kernels for complex numbers).
    """
    pairs = x.to(island_dtype(x.dtype)).unflatten(-1, (-1, 2))  # (..., D/2, 2)
    if torch.compiler.is_compiling():
        (x0, x1), (cos, sin) = pairs.unbind(-1), pe.unbind(-1)
        return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    rotated = torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(pe)
    return torch.view_as_real(rotated).flatten(-2)


sequence_attention = None  # set while a sequence-parallel forward runs (flux_core.parallel): same contract


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """(B, L, H, D) q, k, v (any strides; q, k rotated, possibly wider than v) -> (B, L, H*D) in v's dtype."""
    if sequence_attention is not None:
        return sequence_attention(q, k, v)
    return local_attention(q, k, v)


def local_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """`attention` over the tokens of this process."""
    if onednn_inference(v, q, k):  # v carries the compute dtype; q, k are float32+
        return _cpu_attention(q, k, v)
    q, k, v = (t.to(v.dtype).transpose(1, 2) for t in (q, k, v))
    if v.is_cuda and needs_grad(q, k, v):
        with sdpa_kernel(_TRAINING_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def partial_attention_fits(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Inference on a GPU whose cuDNN attention returns log-sum-exps (sm80+, bf16/fp16, head dim <= 128)."""
    if not v.is_cuda or v.dtype not in (torch.bfloat16, torch.float16) or v.shape[-1] > 128 or needs_grad(q, k, v):
        return False
    return torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(v.device) >= (8, 0)


def partial_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """(B, H, Lq, D) q over a part of the keys, (B, H, Lk, D) k, v -> (B, H, Lq, D) output and (B, H, Lq, 1) float32
    log-sum-exp of its scores: parts over disjoint keys merge into attention over all of them (merge_attention)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)[:2]
    return out, lse.reshape(*out.shape[:3], 1)


def merge_attention(a: Tensor, lse_a: Tensor, b: Tensor, lse_b: Tensor) -> Tensor:
    """Attention over the keys of two parts, from each part's output and log-sum-exp: the softmax weights split
    exp(lse_a) : exp(lse_b), so the result is b + sigmoid(lse_a - lse_b) * (a - b), one fused lerp."""
    return torch.lerp(b, a, torch.sigmoid(lse_a - lse_b).to(a.dtype))


_MAX_SCORES = 2**26  # score elements per block (256 MB in float32)


def _cpu_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention head by head with oneDNN GEMMs: float32 scores from the float32 q, k, softmax in float32, then
    P @ V in v's dtype (as flash attention rounds P). Measured 1.4-2x faster than PyTorch's CPU flash attention
    (whose GEMMs use neither bfloat16 hardware nor AVX-512 on AMD). Memory: one (rows, Lk) score block at a time."""
    batch, length, heads, dim = q.shape
    q = q * dim**-0.5  # SDPA's scale
    k = k.transpose(1, 2).contiguous()  # (B, H, Lk, D): the GEMM's second operand must be dense
    v_t = v.permute(0, 2, 3, 1).contiguous()  # (B, H, D, Lk)
    rows = max(1, _MAX_SCORES // k.shape[2])
    out = torch.empty(batch, length, heads, dim, dtype=v.dtype, device=v.device)
    for b in range(batch):
        for h in range(heads):
            for start in range(0, length, rows):
                block = slice(start, start + rows)
                scores = linear(q[b, block, h], k[b, h])  # (rows, Lk) float32
                out[b, block, h] = linear(scores.softmax(-1).to(v.dtype), v_t[b, h])
    return out.flatten(2)
