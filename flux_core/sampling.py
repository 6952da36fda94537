"""Rectified-flow time convention, schedules and the Euler sampler, shared by image generation and seq2seq training.

Convention (BFL, ComfyUI, diffusers alike): t = 1 is pure noise, t = 0 is data,
x_t = (1 - t) * x0 + t * noise, and the model predicts the velocity v = noise - x0.
"""
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

LATENT_CHANNELS = 16
MAX_RESOLUTION = 16384  # largest width/height, ComfyUI's (nodes.MAX_RESOLUTION)
MAX_BATCH = 4096  # largest batch, ComfyUI's (EmptySD3LatentImage)


# ComfyUI's sigma tables: ModelSamplingFlux (shifted, dev-type) has 10000 entries, schnell's discrete flow 1000.
COMFY_GRID = {True: 10_000, False: 1_000}


class SamplingInterrupted(RuntimeError):
    """Raised from a step callback to stop sampling between two steps."""


def check_finite(**values: float) -> None:
    """Refuses NaN and infinities: they pass range checks (every comparison with NaN is False) and sample black."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def check_count(name: str, value: int, minimum: int = 1, maximum: int | None = None) -> None:
    """A whole number in range (steps, batch, pixels): 0 steps, 2.5 images or True are refused, not rounded."""
    whole = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not whole or value < minimum or (maximum is not None and value > maximum):
        allowed = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be a whole number {allowed}, got {value!r}")


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """Moves time towards noise for longer sequences: e^mu / (e^mu + (1/t - 1)^sigma)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu on the line through (256 tokens, base_shift) and (4096 tokens, max_shift)."""
    slope = (max_shift - base_shift) / (4096 - 256)
    return slope * seq_len + base_shift - slope * 256


@dataclass
class FlowMatch:
    """Owns the time convention for training (noising, targets, t sampling) and for sampling (schedule, Euler)."""

    shift: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    grid: int = 0  # 0: exact times (BFL); n: times picked from an n-point table, as ComfyUI (COMFY_GRID)

    def __post_init__(self):
        check_finite(base_shift=self.base_shift, max_shift=self.max_shift)

    # -- the convention -----------------------------------------------------------------------------
    @staticmethod
    def noised(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t for t of shape (B,)."""
        t = t.to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        return noise - x0

    @staticmethod
    def denoised(x_t: Tensor, velocity: Tensor, t: float) -> Tensor:
        """The model's estimate of x0 at time t."""
        return x_t - t * velocity

    # -- sampling -----------------------------------------------------------------------------------
    def schedule(self, num_steps: int, seq_len: int) -> list[float]:
        """num_steps + 1 times from 1 to 0, shifted by sequence length when `shift`."""
        check_count("num_steps", num_steps)
        if self.grid:
            return self._grid_schedule(num_steps, seq_len)
        ts = torch.linspace(1, 0, num_steps + 1)
        if self.shift:
            ts = time_shift(shift_mu(seq_len, self.base_shift, self.max_shift), 1.0, ts)
        return ts.tolist()

    def _grid_schedule(self, num_steps: int, seq_len: int) -> list[float]:
        """ComfyUI's "simple" scheduler on its model_sampling table: float32 times i / grid (i = 1..grid), shifted
        as ModelSamplingFlux (mu from the image size as its node computes it), then every grid/num_steps-th entry
        from the top, and 0 (comfy/samplers.py simple_scheduler)."""
        table = torch.arange(1, self.grid + 1) / self.grid
        if self.shift:
            table = time_shift(shift_mu(seq_len, self.base_shift, self.max_shift), 1.0, table)
        stride = self.grid / num_steps
        return [float(table[-(1 + int(i * stride))]) for i in range(num_steps)] + [0.0]

    def partial_schedule(self, num_steps: int, seq_len: int, denoise: float) -> list[float]:
        """The last num_steps + 1 times of a schedule stretched to num_steps / denoise steps (as ComfyUI)."""
        if not 0 < denoise <= 1:  # also refuses NaN
            raise ValueError(f"denoise must be in (0, 1], got {denoise}")
        if denoise == 1:
            return self.schedule(num_steps, seq_len)
        return self.schedule(int(num_steps / denoise), seq_len)[-(num_steps + 1) :]

    @staticmethod
    def euler(
        velocity: Callable[[Tensor, float], Tensor],
        x: Tensor,
        timesteps: list[float],
        callback: Callable[[int, int, Tensor], None] | None = None,
    ) -> Tensor:
        """Integrates dx/dt = velocity(x, t) from timesteps[0] down to timesteps[-1]: one evaluation per step."""
        return _integrate(lambda x, t_curr, t_prev: x + (t_prev - t_curr) * velocity(x, t_curr), x, timesteps, callback)

    @staticmethod
    def heun(
        velocity: Callable[[Tensor, float], Tensor],
        x: Tensor,
        timesteps: list[float],
        callback: Callable[[int, int, Tensor], None] | None = None,
    ) -> Tensor:
        """Second-order integration (Euler predictor, trapezoidal corrector): two evaluations per step, except the
        step onto t = 0, which is Euler (as Karras et al.), so n steps cost 2n - 1 evaluations."""

        def step(x: Tensor, t_curr: float, t_prev: float) -> Tensor:
            v = velocity(x, t_curr)
            x_pred = x + (t_prev - t_curr) * v
            if t_prev == 0:
                return x_pred
            return x + (t_prev - t_curr) * 0.5 * (v + velocity(x_pred, t_prev))

        return _integrate(step, x, timesteps, callback)

    # -- training -----------------------------------------------------------------------------------
    def sample_t(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        distribution: str = "logit_normal",
        a: float = 0.0,
        b: float = 1.0,
        seq_len: int | None = None,
    ) -> Tensor:
        """Training times (B,) in (0, 1). logit_normal: sigmoid(N(a, b)); beta: Beta(a, b); uniform.

        With `shift` and a seq_len, the draw goes through the same time shift as the sampling schedule.
        """
        check_finite(a=a, b=b)
        if distribution == "uniform":
            t = torch.rand(batch, generator=generator)
        elif distribution == "logit_normal":
            t = torch.sigmoid(a + b * torch.randn(batch, generator=generator))
        elif distribution == "beta":
            t = _beta(a, b, batch, generator)
        else:
            raise ValueError(f"unknown time distribution {distribution!r}; use uniform, logit_normal or beta")
        t = t.clamp(1e-5, 1 - 1e-5)
        if self.shift and seq_len is not None:
            t = time_shift(shift_mu(seq_len, self.base_shift, self.max_shift), 1.0, t)
        return t

    def loss(self, predict: Callable[[Tensor, Tensor], Tensor], x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Mean squared error between predict(x_t, t) and the velocity target."""
        return torch.nn.functional.mse_loss(predict(self.noised(x0, noise, t), t), self.velocity_target(x0, noise))


def _integrate(
    step: Callable[[Tensor, float, float], Tensor],
    x: Tensor,
    timesteps: list[float],
    callback: Callable[[int, int, Tensor], None] | None,
) -> Tensor:
    total = len(timesteps) - 1
    for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        x = step(x, t_curr, t_prev)
        if callback is not None:
            callback(i + 1, total, x)
    return x


def _beta(a: float, b: float, batch: int, generator: torch.Generator | None) -> Tensor:
    """Beta(a, b) by inverting a tabulated CDF with the generator's uniforms (torch's Beta takes no generator)."""
    grid = torch.linspace(0, 1, 8193, dtype=torch.float64)[1:-1]
    cdf = torch.cumsum(grid ** (a - 1) * (1 - grid) ** (b - 1), 0)
    cdf = cdf / cdf[-1]
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return grid[torch.searchsorted(cdf, u).clamp(max=len(grid) - 1)].float()


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """The reference's schedule: shifted for dev-like models, linear for schnell."""
    return FlowMatch(shift=shift, base_shift=base_shift, max_shift=max_shift).schedule(num_steps, image_seq_len)


# -- images as token sequences --------------------------------------------------------------------------
def check_image_size(width: int, height: int, batch: int = 1) -> None:
    """The one size check of the library and the nodes: 16 to MAX_RESOLUTION pixels a side, multiples of 16."""
    check_count("image width", width, 16, MAX_RESOLUTION)
    check_count("image height", height, 16, MAX_RESOLUTION)
    check_count("batch size", batch, 1, MAX_BATCH)
    if width % 16 or height % 16:
        raise ValueError(
            f"image size {width}x{height} is not a multiple of 16: Flux latents are 1/8 of the pixels and "
            f"are packed in 2x2 patches. Use e.g. {max(16, round(width / 16) * 16)}x{max(16, round(height / 16) * 16)}."
        )


def check_latent(latent: Tensor, channels: int = LATENT_CHANNELS) -> None:
    if latent.ndim != 4 or latent.shape[1] != channels:
        found = f"{latent.shape[1]}-channel" if latent.ndim == 4 else f"{tuple(latent.shape)}-shaped"
        raise ValueError(
            f"got a {found} latent; Flux works on {channels}-channel latents (B, {channels}, H/8, W/8). "
            "A 4-channel latent comes from an SD1.5/SDXL node (e.g. EmptyLatentImage): use an SD3/Flux empty "
            "latent (EmptySD3LatentImage) or encode with the Flux VAE."
        )
    if latent.shape[2] % 2 or latent.shape[3] % 2:
        raise ValueError(
            f"latent size {latent.shape[3]}x{latent.shape[2]} is odd; Flux packs 2x2 patches, so the image "
            "width and height must be multiples of 16"
        )


def get_noise(batch: int, width: int, height: int, seed: int, channels: int = LATENT_CHANNELS) -> Tensor:
    """(B, C, H/8, W/8) float32 noise made on the CPU, so a seed gives the same image on every device."""
    check_image_size(width, height, batch)
    check_count("seed", seed, 0, 2**64 - 1)
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(batch, channels, height // 8, width // 8, generator=generator, dtype=torch.float32)


def pack(latent: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4) tokens, row-major, features channel-major (c, ph, pw)."""
    return rearrange(latent, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """Inverse of pack for a latent of the given (even) size."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=latent_height // 2, w=latent_width // 2, ph=2, pw=2)


def sequence_ids(length: int, batch: int = 1, n_axes: int = 3) -> Tensor:
    """(B, L, n_axes) ids of a 1-D sequence: the position on the last axis, the others 0."""
    ids = torch.zeros(1, length, n_axes)
    ids[..., -1] = torch.arange(length)
    return ids.expand(batch, -1, -1)


def grid_ids(height: int, width: int, batch: int = 1, n_axes: int = 3) -> Tensor:
    """(B, H * W, n_axes) ids of a row-major 2-D grid: row on the second-to-last axis, column on the last."""
    if n_axes < 2:
        raise ValueError(f"a 2-D grid needs at least 2 id axes, got n_axes={n_axes}")
    ids = torch.zeros(height, width, n_axes)
    ids[..., -2] = torch.arange(height)[:, None]
    ids[..., -1] = torch.arange(width)[None, :]
    return ids.reshape(1, height * width, n_axes).expand(batch, -1, -1)


def image_ids(latent_height: int, latent_width: int, batch: int = 1, axis0: float = 0.0) -> Tensor:
    """(B, h/2 * w/2, 3) ids (axis0, row, col) of packed image tokens."""
    ids = grid_ids(latent_height // 2, latent_width // 2)  # fresh, batch 1: safe to write
    ids[..., 0] = axis0
    return ids.expand(batch, -1, -1)


def text_ids(length: int, batch: int = 1) -> Tensor:
    """(B, L, 3) zeros: text tokens are not rotated."""
    return torch.zeros(batch, length, 3)
