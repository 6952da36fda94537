"""Tiny random-weight files of FLUX.1 Tools in the layouts ComfyUI users have: the SigLIP vision model
(sigclip_vision_patch14_384.safetensors, transformers names under `vision_model.`) and the Redux projector
(flux1-redux-dev.safetensors: redux_up / redux_down). Each writer returns the weights it wrote."""
import torch
from safetensors.torch import save_file
from torch import Tensor


def tiny_siglip_config(image_size: int = 28):
    """so400m's head dim 72 (2 heads), patch 14: a 2x2 grid of patches at 28 px."""
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(
        hidden_size=144, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=14,
    )  # fmt: skip


def write_siglip(path, config=None, seed: int = 0) -> dict[str, Tensor]:
    """SiglipVisionModel weights (with its attention-pooling head, as the published file) under `vision_model.`."""
    from transformers import SiglipVisionModel

    torch.manual_seed(seed)
    model = SiglipVisionModel(config or tiny_siglip_config())
    weights = {"vision_model." + k.removeprefix("vision_model."): v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(path))
    return weights


def write_redux(path, vision_dim: int = 144, txt_dim: int = 48, seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"redux_up": (3 * txt_dim, vision_dim), "redux_down": (txt_dim, 3 * txt_dim)}
    weights = {}
    for name, (out_dim, in_dim) in shapes.items():
        weights[f"{name}.weight"] = torch.randn(out_dim, in_dim, generator=gen) / in_dim**0.5
        weights[f"{name}.bias"] = 0.1 * torch.randn(out_dim, generator=gen)
    save_file(weights, str(path))
    return weights
