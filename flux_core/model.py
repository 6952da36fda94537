"""The Flux rectified-flow transformer (FLUX.1), its parameters and the named presets."""
import contextlib
import copy
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import parallel
from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock
from .math import island_dtype, timestep_embedding
from .ops import Linear
from .streaming import block_runner


@dataclass
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int  # 0: no pooled vector input
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self):
        self.axes_dim = list(self.axes_dim)
        for name in ("in_channels", "out_channels", "context_in_dim", "hidden_size", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"FluxParams.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("vec_in_dim", "depth", "depth_single_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"FluxParams.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the width (Flux uses head dim 128)"
            )
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError(
                f"axes_dim {self.axes_dim} must be even sizes summing to the head dim "
                f"{self.hidden_size} / {self.num_heads} = {self.head_dim}"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_FLUX1 = dict(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0,
    num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
    guidance_embed=True,
)  # fmt: skip

PRESETS: dict[str, FluxParams] = {
    "flux-dev": FluxParams(**_FLUX1),
    "flux-dev-krea": FluxParams(**_FLUX1),
    "flux-dev-kontext": FluxParams(**_FLUX1),
    "flux-schnell": FluxParams(**{**_FLUX1, "guidance_embed": False}),
    "flux-dev-canny": FluxParams(**{**_FLUX1, "in_channels": 128}),
    "flux-dev-depth": FluxParams(**{**_FLUX1, "in_channels": 128}),
    "flux-dev-fill": FluxParams(**{**_FLUX1, "in_channels": 384}),
    # The seq2seq seed example: 2-D points conditioned on 4-D tokens.
    "seq2seq-points": FluxParams(
        in_channels=2, out_channels=2, vec_in_dim=4, context_in_dim=4, hidden_size=1024, mlp_ratio=4.0,
        num_heads=8, depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
        guidance_embed=False,
    ),
    # The built-in seq2seq demo (flux_core.seq2seq.demo): trains in minutes on 2 CPU cores. Two double blocks give
    # the condition and data tokens, which live in different spaces, their own weights; head dim 16.
    "seq2seq-demo": FluxParams(
        in_channels=2, out_channels=2, vec_in_dim=0, context_in_dim=4, hidden_size=64, mlp_ratio=4.0,
        num_heads=4, depth=2, depth_single_blocks=0, axes_dim=[4, 6, 6], theta=10_000, qkv_bias=True,
        guidance_embed=False,
    ),
}  # fmt: skip


def preset(name: str, **overrides) -> FluxParams:
    if name not in PRESETS:
        raise KeyError(f"unknown Flux preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


class Flux(nn.Module):
    """Transformer for flow matching on token sequences: `img` tokens are denoised, `txt` tokens condition."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        p = params
        self.in_channels, self.out_channels, self.num_heads = p.in_channels, p.out_channels, p.num_heads
        self.pe_embedder = EmbedND(theta=p.theta, axes_dim=p.axes_dim)
        self.img_in = Linear(p.in_channels, p.hidden_size)
        self.time_in = MLPEmbedder(256, p.hidden_size)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size) if p.vec_in_dim else None
        self.guidance_in = MLPEmbedder(256, p.hidden_size) if p.guidance_embed else nn.Identity()
        self.txt_in = Linear(p.context_in_dim, p.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio, p.qkv_bias) for _ in range(p.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p.hidden_size, p.num_heads, p.mlp_ratio) for _ in range(p.depth_single_blocks)
        )
        self.final_layer = LastLayer(p.hidden_size, p.out_channels)

    def twin(self) -> "Flux":
        """A second module tree holding the very same parameter and buffer tensors (no extra memory), to compile
        or re-flag without changing this one."""
        shared = {id(t): t for t in (*self.parameters(), *self.buffers())}
        return copy.deepcopy(self, memo=shared)

    def compile_blocks(self, **compile_kwargs) -> "Flux":
        """torch.compile each transformer block in place (regional compilation). The 19 double and 38 single
        blocks share two compiled graphs, so compiling takes seconds where the whole model takes minutes; the
        blocks hold all but a sliver of the work. Returns self."""
        for block in (*self.double_blocks, *self.single_blocks):
            block.compile(**compile_kwargs)
        return self

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in the order they run: what weight streaming (flux_core.streaming) streams."""
        return [*self.double_blocks, *self.single_blocks]

    @property
    def compute_dtype(self) -> torch.dtype:
        """Biases are never stored in fp8, so they carry the dtype the model computes in."""
        return self.img_in.bias.dtype

    def forward(
        self,
        img: Tensor,  # (B, Li, in_channels)
        img_ids: Tensor,  # (B, Li, n_axes)
        txt: Tensor,  # (B, Lt, context_in_dim)
        txt_ids: Tensor,  # (B, Lt, n_axes)
        timesteps: Tensor,  # (B,) flow time, 1 = noise
        y: Tensor | None = None,  # (B, vec_in_dim) pooled vector, e.g. CLIP
        guidance: Tensor | None = None,  # (B,) distilled guidance strength
    ) -> Tensor:  # (B, Li, out_channels) velocity
        self._check_inputs(img, img_ids, txt, txt_ids, timesteps, y, guidance)
        dtype = self.compute_dtype
        vec = self.time_in(timestep_embedding(timesteps, 256).to(dtype))
        if self.params.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(dtype))
        if y is not None and self.vector_in is not None:
            vec = vec + self.vector_in(y.to(dtype))
        silu_vec = F.silu(vec)  # every modulation starts with SiLU(vec): compute it once

        img = self.img_in(img.to(dtype))
        txt = self.txt_in(txt.to(dtype))
        if txt_ids.shape[0] != img_ids.shape[0]:
            txt_ids, img_ids = txt_ids.expand(img.shape[0], -1, -1), img_ids.expand(img.shape[0], -1, -1)
        ids = torch.cat((txt_ids, img_ids), dim=1)  # text first, as the tokens
        pe = self.pe_embedder(ids.to(island_dtype(dtype)))  # (B, Lt + Li, 1, head_dim/2, 2) cos | sin
        shards = parallel.shards(txt.shape[1], img.shape[1])  # None unless inside parallel.sequence_parallel
        if shards is not None:  # this rank's tokens; attention still sees all of them
            txt, img, pe = shards.split(txt, img, pe)
        run = block_runner(self)  # run(i, block, *args): block i's weights streamed in when not resident
        with shards.attending() if shards is not None else contextlib.nullcontext():
            for i, block in enumerate(self.double_blocks):
                img, txt = run(i, block, img, txt, silu_vec, pe)
            x = torch.cat((txt, img), dim=1)
            for i, block in enumerate(self.single_blocks, len(self.double_blocks)):
                x = run(i, block, x, silu_vec, pe)
        out = self.final_layer(x[:, txt.shape[1] :], silu_vec)
        return shards.gather(out) if shards is not None else out

    def _check_inputs(self, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
        p = self.params
        if img.ndim != 3 or img.shape[-1] != p.in_channels:
            raise ValueError(
                f"img must be (batch, tokens, {p.in_channels}) packed latent tokens, got {tuple(img.shape)}"
                + (" -- pack latents into 2x2 patches first" if img.ndim == 4 else "")
            )
        if txt.ndim != 3 or txt.shape[-1] != p.context_in_dim:
            raise ValueError(f"txt must be (batch, tokens, {p.context_in_dim}), got {tuple(txt.shape)}")
        n_axes = len(p.axes_dim)
        for name, ids, tokens in (("img_ids", img_ids, img), ("txt_ids", txt_ids, txt)):
            if ids.shape[-2:] != (tokens.shape[1], n_axes) or ids.shape[0] not in (1, tokens.shape[0]):
                raise ValueError(
                    f"{name} must be (batch, {tokens.shape[1]}, {n_axes}) to match its tokens, got {tuple(ids.shape)}"
                )
        if timesteps.shape != (img.shape[0],):
            raise ValueError(f"timesteps must be ({img.shape[0]},), one per batch item, got {tuple(timesteps.shape)}")
        if p.guidance_embed and guidance is None:
            raise ValueError("this model is guidance-distilled (flux-dev-like): pass guidance, e.g. 3.5 per batch item")
        if not p.guidance_embed and guidance is not None:
            raise ValueError("this model has no guidance embedding (flux-schnell-like): pass guidance=None")
        if y is not None and self.vector_in is None:
            raise ValueError("this model takes no pooled vector (vec_in_dim=0): pass y=None")
        if y is not None and y.shape != (img.shape[0], p.vec_in_dim):
            raise ValueError(f"y must be ({img.shape[0]}, {p.vec_in_dim}), got {tuple(y.shape)}")
