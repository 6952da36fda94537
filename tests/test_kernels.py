"""flux_core.kernels (Triton) against the closed form. On a CUDA GPU with Triton, or on the CPU through Triton's
interpreter: TRITON_INTERPRET=1 (float16 there: the interpreter computes through numpy, which has no bfloat16)."""
import os

import pytest
import torch

from flux_core import kernels

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not kernels.TRITON or not (INTERPRETED or torch.cuda.is_available()),
    reason="needs Triton and a CUDA GPU, or Triton with TRITON_INTERPRET=1",
)


@pytest.mark.parametrize(
    "rows, cols, rank, scale, stored",
    [(256, 512, 32, None, torch.float8_e4m3fn), (200, 300, 20, 0.37, torch.float8_e4m3fn),  # edges, odd rank
     (130, 257, 4, 2.5, torch.float8_e5m2), (64, 96, 128, None, torch.float8_e4m3fn)],
)  # fmt: skip
def test_upcast_with_a_lora_is_the_closed_form_rounded_once(rows, cols, rank, scale, stored):
    dtype = torch.float16 if INTERPRETED else torch.bfloat16
    generator = torch.Generator().manual_seed(rows + rank)
    weight = (2 * torch.randn(rows, cols, generator=generator)).to(stored)
    up = (0.3 * torch.randn(rows, rank, generator=generator)).to(dtype)
    down = (0.3 * torch.randn(rank, cols, generator=generator)).to(dtype)
    scale_tensor = None if scale is None else torch.tensor(scale, device=DEVICE)
    on = lambda t: t.to(DEVICE)  # noqa: E731
    out = kernels.upcast(on(weight), scale_tensor, dtype, on(up), on(down)).cpu()
    expected = weight.double() * (1 if scale is None else scale) + up.double() @ down.double()
    assert out.dtype == dtype and out.shape == (rows, cols)
    ulp = torch.finfo(dtype).eps  # one rounding to the compute dtype, after a float32 accumulation
    torch.testing.assert_close(out.double(), expected, rtol=ulp, atol=1e-6 * expected.abs().max().item())
    lora = (up.double() @ down.double()).abs()
    assert (lora > 8 * ulp * expected.abs()).any()  # the LoRA is large enough that leaving it out would fail


@pytest.mark.parametrize("scale", [None, 0.37])
def test_plain_upcast_is_pytorchs_upcast_bit_for_bit(scale):
    dtype = torch.float16 if INTERPRETED else torch.bfloat16
    weight = (2 * torch.randn(200, 300, generator=torch.Generator().manual_seed(0))).to(torch.float8_e4m3fn)
    expected = weight.to(dtype) if scale is None else weight.to(dtype) * torch.tensor(scale)
    scale_tensor = None if scale is None else torch.tensor(scale, device=DEVICE)
    out = kernels.upcast(weight.to(DEVICE), scale_tensor, dtype).cpu()
    assert out.dtype == dtype and torch.equal(out, expected)


def test_upcast_fits_only_where_the_kernel_runs():
    assert not kernels.upcast_fits(torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.bfloat16, 4)  # CPU tensor
    if torch.cuda.is_available():
        weight = torch.zeros(64, 64, dtype=torch.float8_e4m3fn, device="cuda")
        assert not kernels.upcast_fits(weight, torch.float32, 32)  # float32 compute keeps PyTorch's exact path
        assert not kernels.upcast_fits(weight.t(), torch.bfloat16, 32)  # strided
        assert not kernels.upcast_fits(weight, torch.bfloat16, 256)  # past the tiles' rank
        assert kernels.upcast_fits(weight, torch.bfloat16, 128) == (torch.cuda.get_device_capability() >= (8, 9))
