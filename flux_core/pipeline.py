"""Text in, image out: conditioning -> Euler sampling of packed latents -> decode. No ComfyUI here.

Latents here are the autoencoder's *scaled* latents (BFL convention); ComfyUI's LATENT holds raw ones, convert with
`latent_from_raw` / `latent_to_raw`.
"""
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import parallel
from .autoencoder import AutoEncoderParams
from .graphs import GraphedForward, recordable
from .model import Flux
from .streaming import decode_on, encoders_on, transformer_on
from .redux import Redux
from .sampling import (
    FlowMatch,
    check_count,
    check_finite,
    check_image_size,
    check_latent,
    image_ids,
    pack,
    text_ids,
    unpack,
)
from .tools import ImageCond, image_cond_from_images, output_size

_FLUX_AE = AutoEncoderParams.flux()
latent_from_raw = _FLUX_AE.scale_latent  # ComfyUI's raw AE latent -> the scaled latent the transformer works on
latent_to_raw = _FLUX_AE.unscale_latent


@dataclass
class Conditioning:
    """What the transformer is conditioned on: T5 tokens and the CLIP pooled vector."""

    txt: Tensor  # (B, Lt, context_in_dim)
    y: Tensor | None = None  # (B, vec_in_dim)
    guidance: float | None = None  # this prompt's distilled guidance; None: sample()'s guidance
    strength: float = 1.0  # weight among combined prompts (ComfyUI's conditioning "strength")

    def repeat_to(self, batch: int) -> "Conditioning":
        """Broadcast a single prompt over a batch of latents."""
        if self.txt.shape[0] == batch:
            return self
        if self.txt.shape[0] != 1:
            raise ValueError(f"conditioning has batch {self.txt.shape[0]} but the latent has batch {batch}")
        y = None if self.y is None else self.y.expand(batch, -1)
        return Conditioning(self.txt.expand(batch, -1, -1), y, self.guidance, self.strength)


def seeded_noise(shape: tuple[int, ...], seed: int, per_item: bool = True) -> Tensor:
    """float32 CPU noise. per_item: item i drawn from seed + i, so a batch equals its items generated one by one;
    else the whole batch from one generator, as ComfyUI's prepare_noise (item 0 is the same either way)."""
    if not per_item:
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator("cpu").manual_seed((seed + i) % 2**64)) for i in range(shape[0])])


def check_sampling(steps: int, seed: int, guidance: float, cfg: float, denoise: float) -> None:
    """The sampling settings, checked before any long work: whole steps and seed, finite in-range numbers."""
    check_count("steps", steps)
    check_count("seed", seed, 0, 2**64 - 1)
    check_finite(guidance=guidance, cfg=cfg, denoise=denoise)
    if not 0 < denoise <= 1:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")


def sample(
    model: Flux,
    positive: Conditioning | list[Conditioning],
    latent: Tensor,  # (B, 16, H/8, W/8) scaled start latent (zeros for text-to-image)
    seed: int,
    steps: int,
    guidance: float = 3.5,
    cfg: float = 1.0,
    negative: Conditioning | list[Conditioning] | None = None,
    denoise: float = 1.0,
    flow: FlowMatch | None = None,
    noise: Tensor | None = None,
    callback: Callable[[int, int, Tensor], None] | None = None,
    image_cond: ImageCond | None = None,
    cuda_graphs: bool | None = None,
) -> Tensor:
    """Euler sampling from `latent` noised to the schedule's first time; returns the scaled latent (B, 16, h, w).

    Guidance-distilled models (dev) get a prompt's own `guidance`, else `guidance`, as an input; `cfg` > 1 adds true
    classifier-free guidance with `negative`. Several prompts on a side (ComfyUI's ConditioningCombine) each predict
    a velocity and are averaged, weighted by their strength, as ComfyUI does for prompts without an area; prompts of
    one token length run in one batched forward. `flow` defaults to a shifted schedule for guidance-distilled
    models and the linear one otherwise (schnell), as the reference. `image_cond` carries the image inputs of
    Kontext, Fill and Canny/Depth models (flux_core.tools). `cuda_graphs` replays each step's forwards as CUDA graphs
    (flux_core.graphs); by default on under flux_core.parallel.sequence_parallel, where the model is on the GPU.
    """
    check_sampling(steps, seed, guidance, cfg, denoise)
    check_latent(latent, channels=model.out_channels // 4)
    if cfg > 1 and negative is None:
        raise ValueError(f"cfg {cfg} > 1 needs a negative prompt; connect one or set cfg to 1")
    batch, _, height, width = latent.shape
    device, dtype = next(model.parameters()).device, model.compute_dtype
    image_cond = (image_cond or ImageCond()).prepared(model.params.in_channels, height, width, device)
    flow = flow or FlowMatch(shift=model.params.guidance_embed)
    timesteps = flow.partial_schedule(steps, (height // 2) * (width // 2), denoise)

    noise = seeded_noise(tuple(latent.shape), seed) if noise is None else noise
    x = pack(flow.noised(latent.float(), noise, torch.full((batch,), timesteps[0]))).to(device)  # (B, L, 64)

    pos, neg = _entries(positive, "positive"), (_entries(negative, "negative") if cfg > 1 else [])
    conds = [c.repeat_to(batch) for c in pos + neg]
    by_length = {}  # token length -> indices of the prompts of that length: one forward each
    for i, c in enumerate(conds):
        by_length.setdefault(c.txt.shape[1], []).append(i)
    passes = []
    for idx in by_length.values():
        group = [conds[i] for i in idx]
        txt = torch.cat([c.txt for c in group]).to(device, dtype)
        y = None if group[0].y is None else torch.cat([c.y for c in group]).to(device, dtype)
        g = [guidance if c.guidance is None else c.guidance for c in group]
        g = torch.tensor(g, device=device).repeat_interleave(batch) if model.params.guidance_embed else None
        passes.append((idx, txt, y, g, text_ids(txt.shape[1]).to(device)))
    img_ids_ = image_ids(height, width).to(device)
    if cuda_graphs is None:
        cuda_graphs = parallel.current_group() is not None and recordable(model)
    forward = GraphedForward(model) if cuda_graphs else model

    def velocity(x: Tensor, t: float) -> Tensor:
        out = [None] * len(conds)
        for idx, txt, y, g, txt_ids_ in passes:
            copies = len(idx)
            t_vec = torch.full((batch * copies,), t, device=device)  # float32 time, as ComfyUI
            img, img_ids = image_cond.model_input(x if copies == 1 else x.repeat(copies, 1, 1), img_ids_)
            v = forward(img, img_ids, txt, txt_ids_, t_vec, y=y, guidance=g)[:, : x.shape[1]].float()  # generated tokens
            for i, v_i in zip(idx, v.chunk(copies)):
                out[i] = v_i
        v_pos = _weighted_mean(out[: len(pos)], pos)
        if not neg:
            return v_pos
        v_neg = _weighted_mean(out[len(pos) :], neg)
        return v_neg + cfg * (v_pos - v_neg)

    with torch.inference_mode():
        x = flow.euler(velocity, x, timesteps, callback)
    return unpack(x.cpu(), height, width)


def _entries(conditioning: Conditioning | list[Conditioning], what: str) -> list[Conditioning]:
    entries = [conditioning] if isinstance(conditioning, Conditioning) else list(conditioning)
    if not entries:
        raise ValueError(f"the {what} conditioning is empty")
    check_finite(**{f"{what} strength": sum(c.strength for c in entries)})
    if sum(c.strength for c in entries) <= 0:
        raise ValueError(f"the {what} prompts' strengths sum to {sum(c.strength for c in entries)}; give one a strength > 0")
    return entries


def _weighted_mean(velocities: list[Tensor], entries: list[Conditioning]) -> Tensor:
    if len(velocities) == 1:
        return velocities[0]
    return sum(v * c.strength for v, c in zip(velocities, entries)) / sum(c.strength for c in entries)


def empty_latent(width: int, height: int, batch: int = 1) -> Tensor:
    """Scaled zero-information start latent for text-to-image."""
    check_image_size(width, height, batch)
    return latent_from_raw(torch.zeros(batch, 16, height // 8, width // 8))


def to_unit_images(decoded: Tensor) -> Tensor:
    """AE output (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) in [0, 1] (ComfyUI's IMAGE)."""
    return ((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).contiguous()


def from_unit_images(images: Tensor) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
    return images[..., :3].permute(0, 3, 1, 2).float() * 2 - 1


def generate(
    model: Flux,
    ae,
    text_encoders,
    prompt: str | list[str],
    width: int | None = None,  # default 1024, or the Kontext reference's size
    height: int | None = None,
    steps: int | None = None,
    guidance: float = 3.5,
    seed: int = 0,
    batch_size: int = 1,
    negative_prompt: str | None = None,
    cfg: float = 1.0,
    init_image: Tensor | None = None,  # (B, H, W, 3) in [0, 1]
    denoise: float = 1.0,
    callback: Callable[[int, int, Tensor], None] | None = None,
    reference_images: list[Tensor] | None = None,  # Kontext: each (1, H, W, 3) in [0, 1]
    kontext_resize: bool = True,
    mask: Tensor | None = None,  # Fill: (B, H, W) in [0, 1] over init_image, 1 = repaint
    control_image: Tensor | None = None,  # Canny/Depth: (1, H, W, 3) in [0, 1]
    redux: Redux | None = None,
    redux_image: Tensor | None = None,  # (B, H, W, 3) in [0, 1]
    redux_strength: float = 1.0,
    device: torch.device | str | None = None,
    budget_bytes: int | None = None,
) -> Tensor:  # (B, H, W, 3) in [0, 1]
    """Prompt(s) in, images out. dev-type models default to 28 steps and 512 T5 tokens, schnell to 4 and 256.

    One prompt makes `batch_size` images (seeds seed, seed + 1, ...); a list makes one image per prompt.
    With `init_image` and denoise < 1 this is image-to-image (the image's size is used).
    Models kept on the CPU run on `device` (default: CUDA when there is one) stage by stage (flux_core.streaming):
    the text encoders only while encoding, the transformer within `budget_bytes` (default: the free memory) with the
    blocks that do not fit streamed, the AE for the decode, which unloads the transformer if it needs the room.
    FLUX.1 Tools: `reference_images` for Kontext (resized to its preferred resolutions unless not
    `kontext_resize`), `init_image` + `mask` for Fill, `control_image` for Canny/Depth (resized to the output),
    `redux_image` with `redux` (flux_core.redux.Redux) for Redux.
    """
    width, height = output_size(width, height, reference_images, kontext_resize)
    if redux_image is not None and redux is None:
        raise ValueError("redux_image needs the Redux models: pass redux=Redux(load_siglip(...), load_redux_projector(...))")
    distilled = model.params.guidance_embed
    steps = (28 if distilled else 4) if steps is None else steps
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else []
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r:.80}")
    if not isinstance(negative_prompt, str | None):
        raise ValueError(f"negative_prompt must be a string or None, got {negative_prompt!r:.80}")
    check_sampling(steps, seed, guidance, cfg, denoise)
    check_finite(redux_strength=redux_strength)
    if init_image is None:  # the size is checked before the prompts are encoded
        check_image_size(width, height, batch_size if len(prompts) == 1 else len(prompts))
    t5_tokens = 512 if distilled else 256
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def encode(texts: list[str]) -> Conditioning:
        with encoders_on(text_encoders, device, len(texts) * t5_tokens):
            return Conditioning(*text_encoders.encode(texts, texts, t5_max_length=t5_tokens))

    image_cond = image_cond_from_images(
        ae, width, height, init_image if mask is not None else None, mask, control_image, reference_images, kontext_resize
    )
    positive = encode(prompts)
    if redux_image is not None:
        positive = Conditioning(redux.extend(positive.txt, redux_image, redux_strength), positive.y)
    negative = encode([negative_prompt or ""] * len(prompts)) if cfg > 1 else None
    if init_image is not None:
        latent = ae.encode(from_unit_images(init_image).to(ae.device, ae.dtype)).float()
    else:
        latent = empty_latent(width, height, batch_size if len(prompts) == 1 else len(prompts))
    copies, tokens = 2 if cfg > 1 else 1, (latent.shape[-2] // 2) * (latent.shape[-1] // 2)
    transformer_on(model, device, latent.shape[0] * copies, tokens, t5_tokens, budget_bytes)
    latent = sample(model, positive, latent, seed, steps, guidance, cfg, negative, denoise, callback=callback, image_cond=image_cond)
    with torch.inference_mode():
        return to_unit_images(decode_on(ae, latent, device))
