"""The Flux autoencoder (BFL `ae.safetensors`): a 16-channel KL-VAE, its loader and tiled encode/decode.

Latent conventions. `scaled=True` (the default, as BFL's `AutoEncoder.encode/decode`) gives and takes the
model-space latent `scale_factor * (mean - shift_factor)` that the transformer denoises. `scaled=False` gives
and takes the raw posterior mean, which is what ComfyUI's LATENT holds (its model wrapper applies the
scale and shift). Images are (B, 3, H, W) in [-1, 1]; H and W are multiples of 8.
"""
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, identify, load_safetensors, load_weights, strip_prefix, wrong_file_error

NORM_GROUPS = 32


@dataclass
class AutoEncoderParams:
    resolution: int
    in_channels: int
    ch: int
    out_ch: int
    ch_mult: list[int]
    num_res_blocks: int
    z_channels: int
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        self.ch_mult = list(self.ch_mult)
        widths = [self.ch * m for m in self.ch_mult]
        if not widths or any(w < 1 or w % NORM_GROUPS for w in widths):
            raise ValueError(
                f"channel widths ch * ch_mult = {widths} must be positive multiples of {NORM_GROUPS} (GroupNorm groups)"
            )
        if self.num_res_blocks < 1 or self.z_channels < 1:
            raise ValueError(f"num_res_blocks and z_channels must be >= 1, got {self.num_res_blocks}, {self.z_channels}")

    @classmethod
    def flux(cls, **overrides) -> "AutoEncoderParams":
        """The AE every FLUX.1 model uses (`ae.safetensors`, 83.8 M parameters)."""
        base = dict(resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4], num_res_blocks=2,
                    z_channels=16, scale_factor=0.3611, shift_factor=0.1159)  # fmt: skip
        return cls(**{**base, **overrides})

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each axis (8 for Flux)."""
        return 2 ** (len(self.ch_mult) - 1)

    def scale_latent(self, raw: Tensor) -> Tensor:
        """Raw AE latent (ComfyUI LATENT) -> model-space latent."""
        return self.scale_factor * (raw - self.shift_factor)

    def unscale_latent(self, latent: Tensor) -> Tensor:
        """Model-space latent -> raw AE latent."""
        return latent / self.scale_factor + self.shift_factor


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that on CUDA takes its statistics from PyTorch's general reductions: the GroupNorm kernel
    gives each (sample, group) one thread block, which leaves most of a GPU idle on the decoder's 32 large groups.
    Measured on an H200, 1024 px decode: 47 ms in bf16 (72 ms fp32) vs 86 ms (117 ms) for diffusers' AutoencoderKL,
    whose GroupNorm kernels take 46 ms; both equally close to a float64 reference."""

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_cuda:
            return super().forward(x)
        return group_norm_by_reductions(x, self.num_groups, self.weight, self.bias, self.eps)


def group_norm_by_reductions(x: Tensor, groups: int, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """F.group_norm from whole-tensor reductions, statistics and affine in at least float32 as PyTorch's."""
    b, c = x.shape[:2]
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        grouped, dims = x.permute(0, 2, 3, 1).unflatten(-1, (groups, -1)), (1, 2, 4)  # (B, H, W, G, C/G) view
    else:
        grouped, dims = x.reshape(b, groups, -1), (2,)  # (B, G, C/G * H * W)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(grouped, dim=dims, correction=0)
    else:  # half precision: reduce in float32 without a float32 copy of x
        mean = grouped.mean(dim=dims, dtype=torch.float32)
        count = x.numel() // (b * groups)  # elements per group
        mean_square = torch.linalg.vector_norm(grouped, dim=dims, dtype=torch.float32).square() / count
        var = (mean_square - mean.square()).clamp_min(0)
    scale = (torch.rsqrt(var + eps)[:, :, None] * weight.view(groups, -1)).reshape(b, c)  # (B, C)
    shift = bias - mean.repeat_interleave(c // groups, dim=1) * scale
    spatial = (1,) * (x.ndim - 2)
    # one pass over x, computed in float32 and written in x's dtype
    return torch.addcmul(shift.view(b, c, *spatial), x, scale.view(b, c, *spatial), out=torch.empty_like(x))


def _conv_layout(x: Tensor) -> Tensor:
    """Channels-last on CUDA, where cuDNN convolves NHWC: NCHW tensors are transposed into and out of every
    convolution, in buffers the size of its input and output. Measured at 1024 px in bf16 on an H200: the
    decode's peak above the weights 1.48 GB instead of 2.55 GB, 46 ms instead of 47 ms."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def _group_norm(channels: int) -> GroupNorm:
    return GroupNorm(NORM_GROUPS, channels, eps=1e-6, affine=True)


def _conv3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1 if stride == 1 else 0)


def _norm_swish(norm: GroupNorm, x: Tensor) -> Tensor:
    # in place: saves an activation-sized buffer, and autograd supports an in-place SiLU after GroupNorm
    return F.silu(norm(x), inplace=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(in_channels), _conv3(in_channels, out_channels)
        self.norm2, self.conv2 = _group_norm(out_channels), _conv3(out_channels, out_channels)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(_norm_swish(self.norm2, self.conv1(_norm_swish(self.norm1, x))))
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))  # conv outputs are free to overwrite


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions with the C channels as head dim; 1x1 conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, hw, C)
        # the 1x1 convs as matmuls on tokens: q, k, v come out contiguous, as the fused attention kernels need
        q, k, v = (_as_linear(proj, tokens).unsqueeze(1) for proj in (self.q, self.k, self.v))  # (B, 1, hw, C)
        out = _as_linear(self.proj_out, _chunked_attention(q, k, v).squeeze(1))  # (B, hw, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


def _as_linear(conv: nn.Conv2d, tokens: Tensor) -> Tensor:
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


MAX_ATTENTION_SCORES = 2**28


def _chunked_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """SDPA in query chunks of at most MAX_ATTENTION_SCORES scores each: the head dim (512) is beyond the flash
    kernels' limit, and a kernel that materialises the (hw x hw) scores needs 8 GiB at 2048 px in bf16."""
    length = q.shape[-2]
    chunk = max(1, MAX_ATTENTION_SCORES // k.shape[-2])
    if chunk >= length:
        return F.scaled_dot_product_attention(q, k, v)
    parts = [F.scaled_dot_product_attention(q[..., i : i + chunk, :], k, v) for i in range(0, length, chunk)]
    return torch.cat(parts, dim=-2)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right/bottom only, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution (`encoder.down.i` / `decoder.up.i`): ResnetBlocks, then an optional resampler."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, downsample=False, upsample=False):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(n_blocks)
        )
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        resample = self.downsample or self.upsample
        return resample(x) if resample is not None else x


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1, self.attn_1 = ResnetBlock(channels, channels), AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.z_channels = p.z_channels
        self.conv_in = _conv3(p.in_channels, p.ch)
        self.down = nn.ModuleList(
            Level(c_in, c_out, p.num_res_blocks, downsample=i < len(widths) - 1)
            for i, (c_in, c_out) in enumerate(zip([p.ch] + widths[:-1], widths))
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = _conv3(widths[-1], 2 * p.z_channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, z, H/8, W/8) posterior mean
        h = self.conv_in(_conv_layout(x))
        for level in self.down:
            h = level(h)
        h = _norm_swish(self.norm_out, self.mid(h))
        z = self.z_channels  # conv_out gives [mean | logvar]; only the mean is used, so skip the logvar half
        return F.conv2d(h, self.conv_out.weight[:z], self.conv_out.bias[:z], padding=1)


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        widths = [p.ch * m for m in p.ch_mult]
        self.conv_in = _conv3(p.z_channels, widths[-1])
        self.mid = MidBlock(widths[-1])
        # up.i takes the output of up.(i+1): the levels run from the last (lowest resolution) to up.0
        self.up = nn.ModuleList(
            Level(c_in, c_out, p.num_res_blocks + 1, upsample=i > 0)
            for i, (c_in, c_out) in enumerate(zip(widths[1:] + widths[-1:], widths))
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = _conv3(widths[0], p.out_ch)

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w) raw latent -> (B, 3, 8h, 8w)
        h = self.mid(self.conv_in(_conv_layout(z)))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(_norm_swish(self.norm_out, h))


class AutoEncoder(nn.Module):
    """The Flux AE with the official parameter names (`encoder.*`, `decoder.*`); see the module docstring for
    the latent conventions. Encoding returns the posterior mean (no sampling), as BFL's reference.

    Tiled variants process overlapping tiles one at a time and blend them with linear ramps across each overlap,
    assembling the result on the input's device (keep a large latent on the CPU to keep the image off the GPU).
    Unlike ComfyUI, which averages three tilings, one tiling is run. Tiles see only their own GroupNorm statistics
    and attention context, so tiling is approximate. Measured at the defaults (512 px tiles, 64 px overlap) on a
    1024x768 image with a tiny random AE (Flux's depth at widths 32-64), max / mean |tiled - untiled|: decode of a
    random latent 0.20 / 0.014 (output std 0.66), encode of a random image 0.032 / 0.0037 (latent std 0.22).
    Smooth content is the worst case, as a tile's statistics then differ most from the image's: decode of a
    smooth image's latent 5.6 / 0.39 (std 0.59), encode of the smooth image 4.3 / 0.32 (raw latent std 0.64).
    """

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.weight.device

    def encode(self, image: Tensor, scaled: bool = True) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8) latent, on the AE's device and dtype."""
        self._check_image(image)
        mean = self.encoder(image.to(self.device, self.dtype))
        return self.params.scale_latent(mean) if scaled else mean

    def decode(self, latent: Tensor, scaled: bool = True) -> Tensor:
        """(B, 16, h, w) latent -> (B, 3, 8h, 8w) image in about [-1, 1], on the AE's device and dtype."""
        self._check_latent(latent)
        raw = self.params.unscale_latent(latent) if scaled else latent
        return self.decoder(raw.to(self.device, self.dtype))

    def encode_tiled(self, image: Tensor, tile_size: int = 512, overlap: int = 64, scaled: bool = True) -> Tensor:
        """encode() in tiles of `tile_size` pixels overlapping by `overlap` pixels (ComfyUI's VAEEncodeTiled defaults)."""
        self._check_image(image)
        f = self.params.downscale
        mean = run_tiled(
            lambda tile: self.encoder(tile.to(self.device, self.dtype)), image, *self._tiles(tile_size, overlap),
            in_scale=f, out_scale=1, out_channels=self.params.z_channels,
        )  # fmt: skip
        return self.params.scale_latent(mean) if scaled else mean

    def decode_tiled(self, latent: Tensor, tile_size: int = 512, overlap: int = 64, scaled: bool = True) -> Tensor:
        """decode() in tiles of `tile_size` output pixels overlapping by `overlap` (ComfyUI's VAEDecodeTiled defaults)."""
        self._check_latent(latent)
        raw = self.params.unscale_latent(latent) if scaled else latent
        return run_tiled(
            lambda tile: self.decoder(tile.to(self.device, self.dtype)), raw, *self._tiles(tile_size, overlap),
            in_scale=1, out_scale=self.params.downscale, out_channels=self.params.out_ch,
        )  # fmt: skip

    def _tiles(self, tile_size: int, overlap: int) -> tuple[int, int]:
        """Tile size and overlap in latent cells, as ComfyUI's tiled nodes take them: floored to whole cells, the
        overlap cut to a quarter tile."""
        f = self.params.downscale
        if tile_size < 8 * f or overlap < 0:
            raise ValueError(
                f"tile_size must be >= {8 * f} px and overlap >= 0, got {tile_size} and {overlap} "
                "(ComfyUI's defaults: 512 and 64)"
            )
        return tile_size // f, min(overlap, tile_size // 4) // f

    def _check_image(self, image: Tensor) -> None:
        c, f = self.params.in_channels, self.params.downscale
        if image.ndim != 4 or image.shape[1] != c:
            hint = ""
            if image.ndim == 4 and image.shape[-1] == c:
                hint = " -- this looks like a ComfyUI IMAGE (B, H, W, C) in [0, 1]: use image.movedim(-1, 1) * 2 - 1"
            raise ValueError(f"image must be (batch, {c}, height, width) in [-1, 1], got {tuple(image.shape)}{hint}")
        height, width = image.shape[-2:]
        if height % f or width % f or not height or not width:
            raise ValueError(
                f"image size {height}x{width} (height x width) is not a positive multiple of {f}: crop or resize it, "
                f"e.g. to {max(height // f, 1) * f}x{max(width // f, 1) * f}"
            )

    def _check_latent(self, latent: Tensor) -> None:
        z = self.params.z_channels
        if latent.ndim != 4:
            raise ValueError(f"latent must be (batch, {z}, height/8, width/8), got {tuple(latent.shape)}")
        if latent.shape[1] != z:
            hint = ""
            if latent.shape[1] == 4:
                hint = (
                    " -- 4-channel latents come from SD1.x/SDXL (e.g. EmptyLatentImage); "
                    "use EmptySD3LatentImage or a Flux VAE encode"
                )
            raise ValueError(f"latent has {latent.shape[1]} channels but this Flux VAE takes {z}-channel latents{hint}")


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the fewest full tiles covering [0, length) with neighbours overlapping >= overlap, spread evenly."""
    if length <= tile:
        return [0]
    n = 1 + math.ceil((length - tile) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _blend_weights(starts: list[int], size: int, length: int) -> list[Tensor]:
    """Per tile along one axis: 1-D weights ramping linearly across each overlap with a neighbour, normalised so
    all tiles' weights sum to 1 at every position (the 2-D weights, their products, then also sum to 1)."""
    weights = []
    for i, start in enumerate(starts):
        w = torch.ones(size, dtype=torch.float64)
        if i > 0:
            n = starts[i - 1] + size - start
            w[:n] = torch.arange(1, n + 1, dtype=torch.float64) / (n + 1)
        if i < len(starts) - 1:
            n = start + size - starts[i + 1]
            w[size - n :] = torch.minimum(w[size - n :], torch.arange(n, 0, -1, dtype=torch.float64) / (n + 1))
        weights.append(w)
    total = torch.zeros(length, dtype=torch.float64)
    for start, w in zip(starts, weights):
        total[start : start + size] += w
    return [w / total[start : start + size] for start, w in zip(starts, weights)]


def run_tiled(
    fn: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, in_scale: int, out_scale: int, out_channels: int
) -> Tensor:
    """Apply a spatially local `fn` (B, C, in_scale*h, in_scale*w) -> (B, out_channels, out_scale*h, out_scale*w)
    tile by tile, tiles and overlap given in cells of the coarse (h, w) grid; seams blended by linear ramps.
    The result is assembled on x's device in at least float32."""
    b, _, height, width = x.shape
    cells = (height // in_scale, width // in_scale)
    starts = [_tile_starts(n, tile, overlap) for n in cells]
    sizes = [min(tile, n) for n in cells]
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = torch.zeros(b, out_channels, cells[0] * out_scale, cells[1] * out_scale, dtype=dtype, device=x.device)
    wy_all, wx_all = (
        [w.to(out.device, dtype) for w in _blend_weights([s * out_scale for s in st], size * out_scale, n * out_scale)]
        for st, size, n in zip(starts, sizes, cells)
    )
    (ty, tx), (i, o) = sizes, (in_scale, out_scale)
    for y0, wy in zip(starts[0], wy_all):
        for x0, wx in zip(starts[1], wx_all):
            result = fn(x[..., y0 * i : (y0 + ty) * i, x0 * i : (x0 + tx) * i])
            out[..., y0 * o : (y0 + ty) * o, x0 * o : (x0 + tx) * o] += result.to(out) * (wy[:, None] * wx)
    return out


# ---------------------------------------------------------------------------------------------- loading

_BFL_SIGNATURE = "decoder.up.0.block.0.conv1.weight"
_DIFFUSERS_SIGNATURE = "decoder.up_blocks.0.resnets.0.conv1.weight"
_DIFFUSERS_TO_BFL = [  # applied in order to each key; up_blocks are renumbered separately
    (r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block."),
    (r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn_1."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"attn_1\.group_norm\.", "attn_1.norm."),
    (r"attn_1\.(?:to_q|query)\.", "attn_1.q."),  # query/key/value/proj_attn: older diffusers files
    (r"attn_1\.(?:to_k|key)\.", "attn_1.k."),
    (r"attn_1\.(?:to_v|value)\.", "attn_1.v."),
    (r"attn_1\.(?:to_out\.0|proj_attn)\.", "attn_1.proj_out."),
]


def _from_diffusers(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Diffusers AutoencoderKL names -> BFL names: the inverse of diffusers' convert_ldm_vae_checkpoint.
    diffusers numbers the decoder levels in run order (up_blocks.0 = lowest resolution = BFL up.3), and stores
    the attention projections as Linear [C, C] where BFL has 1x1 convs [C, C, 1, 1]."""
    up_ids = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    last = max(up_ids, default=0)

    def rename_up(m: re.Match) -> str:
        part = "block" if m.group(2) == "resnets" else "upsample"
        return f".up.{last - int(m.group(1))}.{part}."

    converted = {}
    for key, tensor in state_dict.items():
        key = re.sub(r"\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.", rename_up, key)
        for pattern, replacement in _DIFFUSERS_TO_BFL:
            key = re.sub(pattern, replacement, key)
        if ".attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[key] = tensor
    return converted


def _resolve_files(path: Path) -> tuple[Path, dict]:
    """The weight file and the diffusers config (empty for a single file) for a file, a vae/ folder or its parent."""
    if not path.is_dir():
        return path, {}
    folder = path / "vae" if (path / "vae").is_dir() else path
    files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
    if not files:
        raise CheckpointError(
            f"{folder} holds no diffusion_pytorch_model.safetensors: give an ae.safetensors file, a diffusers vae/ "
            "folder (config.json + diffusion_pytorch_model.safetensors) or the pipeline folder that holds vae/"
        )
    preferred = folder / "diffusion_pytorch_model.safetensors"
    config = folder / "config.json"
    return (preferred if preferred in files else files[0]), (json.loads(config.read_text()) if config.is_file() else {})


def _ae_state_dict(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """The AE's tensors in BFL names, whatever the layout and prefix (`vae.`, `first_stage_model.` in all-in-ones)."""
    for signature, convert in ((_BFL_SIGNATURE, None), (_DIFFUSERS_SIGNATURE, _from_diffusers)):
        key = next((k for k in tensors if k == signature or k.endswith("." + signature)), None)
        if key is not None:
            state_dict = strip_prefix(tensors, key[: -len(signature)])
            return convert(state_dict) if convert else state_dict
    raise wrong_file_error(path, identify(tensors), "a Flux VAE")


def infer_params(
    state_dict: dict[str, Tensor], source: str = "state dict", config: dict | None = None
) -> AutoEncoderParams:
    """AutoEncoderParams from the shapes of a BFL-named state dict; scale and shift from a diffusers config if given."""
    def shape(key: str) -> torch.Size:
        if key not in state_dict:
            raise CheckpointError(f"{source} lacks {key}: it is not a complete Flux VAE")
        return state_dict[key].shape

    def count(template: str) -> int:
        return next(i for i in range(len(state_dict) + 1) if template.format(i) not in state_dict)

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = count("encoder.down.{}.block.0.conv1.weight")
    z_channels = shape("decoder.conv_in.weight")[1]
    if z_channels != 16:
        sd = " (4 latent channels: an SD1.x/SDXL VAE)" if z_channels == 4 else ""
        raise CheckpointError(
            f"{source} is a VAE with {z_channels} latent channels{sd}, not a Flux VAE (16 latent channels). "
            "Load the Flux ae.safetensors (FLUX.1 release) instead."
        )
    config = config or {}
    return AutoEncoderParams(
        resolution=256, in_channels=in_channels, ch=ch, out_ch=shape("decoder.conv_out.weight")[0],
        ch_mult=[shape(f"encoder.down.{i}.block.0.conv1.weight")[0] // ch for i in range(levels)],
        num_res_blocks=count("encoder.down.0.block.{}.conv1.weight"), z_channels=z_channels,
        scale_factor=config.get("scaling_factor") or 0.3611, shift_factor=config.get("shift_factor") or 0.1159,
    )  # fmt: skip


def load_autoencoder(path, dtype: torch.dtype = torch.float32, device="cpu") -> AutoEncoder:
    """Load a Flux AE from `ae.safetensors` (BFL names, optionally under `vae.` / `first_stage_model.`), a
    diffusers `vae/` folder or the diffusers pipeline folder holding it. Sizes are read from the shapes; the
    module is built on the meta device and given the memory-mapped tensors (cast to `dtype`), frozen, in eval."""
    file, config = _resolve_files(Path(path))
    state_dict = _ae_state_dict(load_safetensors(file), file)
    params = infer_params(state_dict, file.name, config)
    with torch.device("meta"):
        ae = AutoEncoder(params)
    load_weights(ae, state_dict, dtype, source=file.name)
    return ae.to(device).eval().requires_grad_(False)
