"""Triton kernels for CUDA GPUs, used where Triton is installed (PyTorch's CUDA wheels bring it); every caller keeps
a PyTorch path for the CPU, older GPUs, autograd and torch.compile."""
import functools
import importlib.util

import torch
from torch import Tensor

TRITON = importlib.util.find_spec("triton") is not None

if TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _upcast_kernel(w_ptr, scale_ptr, up_ptr, down_ptr, out_ptr, rows, cols, rank, HAS_SCALE: tl.constexpr,
                       HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr):  # fmt: skip
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = m < rows, n < cols
        offsets = m[:, None].to(tl.int64) * cols + n[None, :]
        mask = in_m[:, None] & in_n[None, :]
        out = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            out = out * tl.load(scale_ptr)
        if HAS_LORA:
            r = tl.arange(0, BLOCK_R)
            in_r = r < rank
            up = tl.load(up_ptr + m[:, None] * rank + r[None, :], mask=in_m[:, None] & in_r[None, :], other=0.0)
            down = tl.load(down_ptr + r[:, None] * cols + n[None, :], mask=in_r[:, None] & in_n[None, :], other=0.0)
            out = out + tl.dot(up, down)  # (BLOCK_M, BLOCK_N) float32: rounded once, on the store
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


TILES = {False: (64, 512, 8), True: (64, 128, 4)}  # with a LoRA? -> (BLOCK_M, BLOCK_N, warps): fastest on an H200


@functools.cache
def _fp8_convertible(device: torch.device) -> bool:
    """Triton converts float8 in registers from compute capability 8.9 (Ada, Hopper) on."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def upcast_fits(weight: Tensor, dtype: torch.dtype, rank: int = 0) -> bool:
    """Whether `upcast` takes this stored (float8) weight, with a rank-`rank` LoRA (0: none), for a call computing in
    `dtype` (ranks up to 128, run on an H200: larger ones' (BLOCK_M, R) and (R, BLOCK_N) tiles may not fit on chip)."""
    return (
        TRITON
        and rank <= 128
        and weight.is_cuda
        and dtype in (torch.bfloat16, torch.float16)
        and weight.is_contiguous()
        and not torch.compiler.is_compiling()
        and _fp8_convertible(weight.device)
    )


def upcast(weight: Tensor, scale: Tensor | None, dtype: torch.dtype, up: Tensor | None = None,
           down: Tensor | None = None) -> Tensor:  # fmt: skip
    """weight (out, in) fp8 · scale [+ up (out, R) @ down (R, in)], as `dtype`, in one pass: each element read once
    as one byte and written once, scaled and the rank-R product added in float32 on the way. PyTorch's upcast then
    scale makes two passes; with a LoRA, adding into an upcast weight afterwards reads and writes it again (4 more
    bytes per weight): here the LoRA costs the GEMM nothing and the step no bytes over the plain upcast."""
    rows, cols = weight.shape
    rank = 0 if up is None else up.shape[1]
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    if rank:
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    block_m, block_n, warps = TILES[rank > 0]
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _upcast_kernel[grid](weight, weight if scale is None else scale, weight if up is None else up,
                         weight if down is None else down, out, rows, cols, rank, HAS_SCALE=scale is not None,
                         HAS_LORA=rank > 0, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=warps)  # fmt: skip
    return out
