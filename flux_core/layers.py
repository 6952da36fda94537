"""Flux building blocks. Module and parameter names follow the official checkpoints exactly."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .math import apply_rope, attention, island_dtype, rope
from .ops import Linear

LN_EPS = 1e-6


class EmbedND(nn.Module):
    """(B, L, n_axes) position ids -> (B, L, 1, head_dim/2, 2) RoPE rotations (cos, sin), one band per axis."""

    def __init__(self, theta: int, axes_dim: list[int]):
        super().__init__()
        self.theta, self.axes_dim = theta, list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        bands = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        return torch.cat(bands, dim=-2).unsqueeze(2)  # broadcast over heads


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden_dim)
        self.out_layer = Linear(hidden_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def rms_norm(x: Tensor, scale: Tensor) -> Tensor:
    """x / sqrt(mean(x^2) + 1e-6) * scale over the last dim, in float32 (float64 for float64 x)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=island_dtype(x.dtype))
    return (x * torch.rsqrt(norm.square() / x.shape[-1] + LN_EPS)).mul_(scale)


class RMSNorm(nn.Module):
    """The learnable scale of a QK RMSNorm; `rms_norm` applies it (to joint sequences, with per-stream scales)."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)


class SelfAttention(nn.Module):
    """Holds the weights of one stream's attention (qkv, QK-norm, proj); the joint attention is in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = Linear(dim, dim)


def attend(qkv: Tensor, num_heads: int, q_scale: Tensor, k_scale: Tensor, pe: Tensor) -> Tensor:
    """(B, L, 3*H*D) fused projections laid out (K, H, D) -> (B, L, H*D) attention output.

    QK RMSNorm and RoPE run in float32 (the reference's islands) in few passes; attention in qkv's dtype.
    """
    q, k, v = qkv.unflatten(-1, (3, num_heads, -1)).unbind(2)  # (B, L, H, D) views
    return attention(apply_rope(rms_norm(q, q_scale), pe), apply_rope(rms_norm(k, k_scale), pe), v)


def stream_scales(txt_norm: RMSNorm, img_norm: RMSNorm, txt_len: int, img_len: int) -> Tensor:
    """(Lt + Li, 1, D): each stream's norm scale on its own tokens, to normalise the joint sequence at once."""
    return torch.cat((txt_norm.scale.expand(txt_len, -1), img_norm.scale.expand(img_len, -1)))[:, None]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """(1 + scale) * LayerNorm(x) + shift, the LayerNorm affine-free."""
    if shift.shape[0] == 1:  # one modulation for the whole batch: LayerNorm's own affine does it in one pass
        return F.layer_norm(x, x.shape[-1:], (1 + scale).flatten(), shift.flatten(), eps=LN_EPS)
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=LN_EPS), 1 + scale)


class Modulation(nn.Module):
    """silu(vec) -> `2 or 1` triples of (shift, scale, gate), each (B, 1, D). Takes vec already activated."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = Linear(dim, self.multiplier * dim)

    def forward(self, silu_vec: Tensor) -> tuple[Tensor, ...]:
        return self.lin(silu_vec)[:, None, :].chunk(self.multiplier, dim=-1)


class GeluMLP(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear, keys .0 and .2 as in the checkpoints; the GELU rides on the first GEMM."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__(Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), Linear(mlp_hidden, hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        up, _, down = self
        return down(up(x, gelu=True))


class DoubleStreamBlock(nn.Module):
    """Separate weights for image and text tokens, one joint attention over [txt, img]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.img_mlp = GeluMLP(hidden_size, mlp_hidden)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias)
        self.txt_mlp = GeluMLP(hidden_size, mlp_hidden)

    def forward(self, img: Tensor, txt: Tensor, silu_vec: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(silu_vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(silu_vec)

        txt_len, img_len = txt.shape[1], img.shape[1]
        txt_qkv = self.txt_attn.qkv(modulate(txt, t_shift1, t_scale1))
        img_qkv = self.img_attn.qkv(modulate(img, i_shift1, i_scale1))
        qkv = torch.cat((txt_qkv, img_qkv), dim=1)  # (B, Lt + Li, 3 * hidden): text first, as the ids
        txt_norm, img_norm = self.txt_attn.norm, self.img_attn.norm
        q_scale = stream_scales(txt_norm.query_norm, img_norm.query_norm, txt_len, img_len)
        k_scale = stream_scales(txt_norm.key_norm, img_norm.key_norm, txt_len, img_len)
        attn = attend(qkv, self.num_heads, q_scale, k_scale, pe)  # (B, Lt + Li, hidden)
        txt_attn, img_attn = attn[:, :txt_len], attn[:, txt_len:]

        img = torch.addcmul(img, i_gate1, self.img_attn.proj(img_attn))
        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(img, i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate1, self.txt_attn.proj(txt_attn))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(txt, t_shift2, t_scale2)))
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel from one fused input projection (linear1 = [q | k | v | mlp])."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.qkv_rows, self.mlp_rows = slice(0, 3 * hidden_size), slice(3 * hidden_size, None)
        self.linear1 = Linear(hidden_size, hidden_size * 3 + self.mlp_hidden)
        self.linear2 = Linear(hidden_size + self.mlp_hidden, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, silu_vec: Tensor, pe: Tensor) -> Tensor:
        shift, scale, gate = self.modulation(silu_vec)
        x_mod = modulate(x, shift, scale)
        # linear1 as two GEMMs over its [qkv | mlp] row blocks: two contiguous outputs instead of one (L, 3H + M)
        # buffer (measured faster on CPU, where that buffer is large enough to be page-faulted in on every call)
        qkv = self.linear1(x_mod, rows=self.qkv_rows)
        mlp = self.linear1(x_mod, gelu=True, rows=self.mlp_rows)
        attn = attend(qkv, self.num_heads, self.norm.query_norm.scale, self.norm.key_norm.scale, pe)
        out = self.linear2.forward_concat((attn, mlp))
        return torch.addcmul(x, gate, out)


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.linear = Linear(hidden_size, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, silu_vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation[1](silu_vec)[:, None, :].chunk(2, dim=-1)  # shift FIRST
        return self.linear(modulate(x, shift, scale))
