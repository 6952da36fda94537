"""FLUX.1 Redux: an image as a prompt. SigLIP so400m sees the image; the Redux projector maps its 729 patch
features to T5-sized tokens that are appended to the prompt's T5 tokens (BFL `image_embedders.py`, `prepare_redux`).

Files as ComfyUI users have them: `sigclip_vision_patch14_384.safetensors` (models/clip_vision, transformers'
SiglipVisionModel names under `vision_model.`) and `flux1-redux-dev.safetensors` (models/style_models,
`redux_up` / `redux_down`).
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import CheckpointError, load_safetensors, load_weights
from .ops import Linear

SIGLIP_HEAD_DIM = 72  # so400m: 1152 wide, 16 heads; the head count is in no file
SIGLIP_MEAN = SIGLIP_STD = 0.5


class ReduxProjector(nn.Module):
    """redux_down(SiLU(redux_up(x))): vision features (B, N, vision_dim) -> (B, N, txt_dim)."""

    def __init__(self, vision_dim: int = 1152, txt_dim: int = 4096):
        super().__init__()
        self.redux_up = Linear(vision_dim, 3 * txt_dim)
        self.redux_down = Linear(3 * txt_dim, txt_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.redux_down(F.silu(self.redux_up(x)))


def load_redux_projector(path, dtype: torch.dtype = torch.float32, device="cpu") -> ReduxProjector:
    state_dict = load_safetensors(path)
    if "redux_up.weight" not in state_dict or "redux_down.weight" not in state_dict:
        raise CheckpointError(
            f"{getattr(path, 'name', path)} has no redux_up / redux_down weights: not a Redux projector. Flux Redux "
            "needs flux1-redux-dev.safetensors (in models/style_models)"
        )
    with torch.device("meta"):
        projector = ReduxProjector(state_dict["redux_up.weight"].shape[1], state_dict["redux_down.weight"].shape[0])
    load_weights(projector, state_dict, dtype, source=str(path))
    return projector.to(device).eval().requires_grad_(False)


def load_siglip(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """transformers' SiglipVisionModel from a single file with its names (`vision_model.` prefix optional); the
    sizes are read from the shapes, the head count from so400m's head dim 72."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    state_dict = {k.removeprefix("vision_model."): v for k, v in load_safetensors(path).items()}
    patch = state_dict.get("embeddings.patch_embedding.weight")
    if patch is None:
        raise CheckpointError(
            f"{getattr(path, 'name', path)} has no vision_model.embeddings.patch_embedding.weight: not a SigLIP vision "
            "model. Flux Redux needs sigclip_vision_patch14_384.safetensors (in models/clip_vision)"
        )
    hidden, channels, patch_size = patch.shape[:3]
    if hidden % SIGLIP_HEAD_DIM:
        raise CheckpointError(f"{path}: width {hidden} is not a multiple of SigLIP's head dim {SIGLIP_HEAD_DIM}")
    config = SiglipVisionConfig(
        hidden_size=hidden, num_channels=channels, patch_size=patch_size,
        image_size=math.isqrt(state_dict["embeddings.position_embedding.weight"].shape[0]) * patch_size,
        intermediate_size=state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers.")),
        num_attention_heads=hidden // SIGLIP_HEAD_DIM, vision_use_head="head.probe" in state_dict,
    )  # fmt: skip
    with torch.device("meta"):
        model = SiglipVisionModel(config)
    prefix = "vision_model." if next(iter(model.state_dict())).startswith("vision_model.") else ""
    missing, unexpected = model.load_state_dict({prefix + k: v.to(dtype) for k, v in state_dict.items()}, assign=True, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match SigLIP: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, buffer in list(model.named_buffers()):  # position_ids: computed, in no file
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False)
    return model.to(device).eval().requires_grad_(False)


def siglip_pixels(images: Tensor, size: int, crop: bool = True) -> Tensor:
    """(B, H, W, 3) in [0, 1] -> SigLIP's (B, 3, size, size) input, as ComfyUI's CLIP Vision Encode: the short side
    scaled to `size` and the centre cropped (crop) or the whole image squashed (no crop, as BFL and diffusers),
    antialiased bicubic, quantised to 8 bits, normalised with mean = std = 0.5."""
    x = images[..., :3].movedim(-1, 1).float()
    height, width = x.shape[-2:]
    if (height, width) != (size, size):
        scale = size / min(height, width)
        target = (round(height * scale), round(width * scale)) if crop else (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top : top + size, left : left + size]
    x = (x * 255).clamp(0, 255).round() / 255
    return (x - SIGLIP_MEAN) / SIGLIP_STD


class Redux:
    """The SigLIP vision model and the Redux projector together: images -> T5-sized prompt tokens."""

    def __init__(self, siglip, projector: ReduxProjector):
        self.siglip, self.projector = siglip, projector

    @property
    def image_size(self) -> int:
        return self.siglip.config.image_size

    @torch.inference_mode()
    def tokens(self, images: Tensor, strength: float = 1.0, downsampling: int = 1, crop: bool = True) -> Tensor:
        """(B, H, W, 3) in [0, 1] -> (1, B * N, txt_dim): every image's tokens in one sequence (as ComfyUI's
        StyleModelApply), times `strength`; `downsampling` > 1 area-averages the token grid (27x27 -> 27/f a side)
        so the image weighs less against the prompt."""
        if downsampling < 1:
            raise ValueError(f"downsampling must be >= 1, got {downsampling}")
        device, dtype = self.projector.redux_up.weight.device, self.projector.redux_up.bias.dtype
        pixels = siglip_pixels(images, self.image_size, crop).to(device, dtype)
        tokens = self.projector(self.siglip(pixel_values=pixels).last_hidden_state).float()  # (B, N, txt_dim)
        if downsampling > 1:
            side = math.isqrt(tokens.shape[1])
            grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
            grid = F.interpolate(grid, size=(max(1, side // downsampling),) * 2, mode="area")
            tokens = grid.flatten(2).transpose(1, 2)
        return (tokens * strength).reshape(1, -1, tokens.shape[-1]).cpu()

    def extend(self, txt: Tensor, images: Tensor, strength: float = 1.0, downsampling: int = 1, crop: bool = True) -> Tensor:
        """T5 tokens (B, Lt, D) -> (B, Lt + N, D) with the images' Redux tokens appended (BFL's prepare_redux)."""
        return append_tokens(txt, self.tokens(images, strength, downsampling, crop))


def append_tokens(txt: Tensor, tokens: Tensor) -> Tensor:
    """(B, Lt, D) prompt tokens and (1, N, D) Redux tokens -> (B, Lt + N, D)."""
    if tokens.shape[-1] != txt.shape[-1]:
        raise ValueError(
            f"the Redux tokens are {tokens.shape[-1]} wide but the prompt's T5 tokens {txt.shape[-1]}: the Redux "
            "file does not belong to these text encoders"
        )
    return torch.cat((txt, tokens.to(txt).expand(txt.shape[0], -1, -1)), dim=1)
