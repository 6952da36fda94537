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
                       HAS_LORA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        in_m, in_n = m < rows, n < cols
        offsets = m[:, None].to(tl.int64) * cols + n[None, :]
        mask = in_m[:, None] & in_n[None, :]
        out = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        if HAS_SCALE:
            out = out * tl.load(scale_ptr)
        if HAS_LORA:
            r = tl.arange(0, BLOCK_R)
            in_r = r < rank
            up = tl.load(up_ptr + m[:, None] * rank + r[None, :], mask=in_m[:, None] & in_r[None, :], other=0.0)
            down = tl.load(down_ptr + r[:, None] * cols + n[None, :], mask=in_r[:, None] & in_n[None, :], other=0.0)
            out = out + tl.dot(up, down)  # float32
        tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)  # rounded once


@functools.cache
def _fp8_convertible(device: torch.device) -> bool:
    """Triton converts float8 in registers from compute capability 8.9 (Ada, Hopper) on."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def upcast_fits(weight: Tensor, dtype: torch.dtype) -> bool:
    """Whether `upcast` takes this stored float8 weight for a call computing in `dtype`."""
    return (
        TRITON
        and weight.is_cuda
        and dtype in (torch.bfloat16, torch.float16)
        and weight.is_contiguous()
        and not weight.requires_grad
        and not torch.compiler.is_compiling()
        and _fp8_convertible(weight.device)
    )


def upcast(weight: Tensor, scale: Tensor | None, dtype: torch.dtype, up: Tensor | None = None,
           down: Tensor | None = None) -> Tensor:  # fmt: skip
    """weight (out, in) float8 · scale (+ up (out, R) @ down (R, in)) as `dtype`, in one pass: each element read
    once as one byte and written once, the rank-R product added in float32 on the way, rounded once (without a LoRA
    exactly what weight.to(dtype) * scale gives). Measured on an H200 faster than PyTorch's float8 conversion, and a
    LoRA then costs the GEMM nothing (adding it into an upcast weight afterwards reads and writes it again)."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=dtype, device=weight.device)
    lora = up is not None
    if lora:
        up, down = up.to(dtype).contiguous(), down.to(dtype).contiguous()
    rank = up.shape[1] if lora else 0
    block_m, block_n = 128, 256
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _upcast_kernel[grid](weight, weight if scale is None else scale, up if lora else out, down if lora else out, out,
                         rows, cols, rank, HAS_SCALE=scale is not None, HAS_LORA=lora, BLOCK_M=block_m,
                         BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)), num_warps=8)  # fmt: skip
    return out
