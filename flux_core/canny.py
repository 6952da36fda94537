"""Canny edge detection in plain torch, the control image flux1-canny-dev was trained on (white edges on black).

Steps as Canny (1986) and ComfyUI's core Canny node (kornia): luminance, 5x5 Gaussian blur (sigma 1), Sobel
gradients, non-maximum suppression along the gradient direction, then hysteresis: edges above `high` are kept,
and edges above `low` that connect (8-neighbourhood) to kept ones.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)
# neighbour offsets (dy, dx) along the gradient direction quantised to 0, 45, 90, 135 degrees (y grows downwards)
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))


def _gaussian_blur(x: Tensor, size: int = 5, sigma: float = 1.0) -> Tensor:
    t = torch.arange(size, dtype=x.dtype) - size // 2
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.pad(x, (size // 2,) * 4, mode="reflect")
    return F.conv2d(F.conv2d(x, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))


def _sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=x.dtype)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(x, kx.view(1, 1, 3, 3)), F.conv2d(x, kx.t().reshape(1, 1, 3, 3))


def _shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """x[y + dy, x + dx], zero outside."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))
    return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def canny(images: Tensor, low: float = 0.4, high: float = 0.8) -> Tensor:
    """(B, H, W, C) in [0, 1] -> (B, H, W, 3) edge map in {0, 1}; thresholds on the gradient magnitude of the
    blurred luminance (in [0, 1] units, Sobel not normalised, as ComfyUI's Canny node)."""
    if not 0 <= low <= high:
        raise ValueError(f"Canny thresholds need 0 <= low <= high, got low {low}, high {high}")
    rgb = images[..., :3].float()
    gray = (rgb * torch.tensor(LUMA)).sum(-1, keepdim=True) if rgb.shape[-1] == 3 else rgb[..., :1]
    gx, gy = _sobel(_gaussian_blur(gray.movedim(-1, 1)))
    magnitude = torch.sqrt(gx**2 + gy**2 + 1e-6)
    sector = (torch.atan2(gy, gx) * (4 / math.pi)).round().remainder(4).long()  # 0..3 = 0, 45, 90, 135 degrees
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for i, (dy, dx) in enumerate(DIRECTIONS):
        peak = (magnitude >= _shifted(magnitude, dy, dx)) & (magnitude >= _shifted(magnitude, -dy, -dx))
        keep |= (sector == i) & peak
    magnitude = magnitude * keep
    strong, weak = magnitude > high, magnitude > low
    while True:  # grow the strong edges into connected weak ones
        grown = weak & (F.max_pool2d(strong.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, strong):
            break
        strong = grown
    return strong.float().movedim(1, -1).expand(-1, -1, -1, 3).contiguous()
