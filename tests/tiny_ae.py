"""Tiny random-weight Flux autoencoders written to disk in the layouts users have (BFL ae.safetensors, diffusers vae/).

Each writer returns the weights the file stands for, in BFL names, so a test can compare what the loader built
with what was written. Other test files import these helpers.
"""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from flux_core.autoencoder import AutoEncoder, AutoEncoderParams


def tiny_ae_params(**overrides) -> AutoEncoderParams:
    """Flux's AE at widths 32/64/64/64: four levels (8x downscale), two res blocks, 16 latent channels."""
    return AutoEncoderParams.flux(**{"ch": 32, "ch_mult": [1, 2, 2, 2], **overrides})


def random_ae_weights(params: AutoEncoderParams, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Every tensor random (drawn in float64, so float32 and float64 copies agree), GroupNorm affines included."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoEncoder(params).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if len(shape) == 4:  # conv weights, variance-preserving
            value = noise / (shape[1] * shape[2] * shape[3]) ** 0.5
        elif ".norm" in key and key.endswith(".weight"):
            value = 1 + 0.3 * noise
        else:  # biases
            value = 0.1 * noise
        weights[key] = value.to(dtype)
    return weights


def write_ae_bfl(
    path, params: AutoEncoderParams | None = None, dtype: torch.dtype = torch.float32, seed: int = 0, prefix: str = ""
) -> dict[str, Tensor]:
    """The official layout (ae.safetensors); `prefix` e.g. "vae." as in all-in-one checkpoints."""
    weights = random_ae_weights(params or tiny_ae_params(), seed, dtype)
    save_file({prefix + k: v for k, v in weights.items()}, str(path))
    return weights


def diffusers_vae_config(params: AutoEncoderParams) -> dict:
    """AutoencoderKL's config.json as in FLUX.1's vae/ folder, at these widths."""
    levels = len(params.ch_mult)
    return {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": params.in_channels,
        "out_channels": params.out_ch, "latent_channels": params.z_channels,
        "block_out_channels": [params.ch * m for m in params.ch_mult], "layers_per_block": params.num_res_blocks,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32, "sample_size": 1024, "mid_block_add_attention": True, "force_upcast": True,
        "use_quant_conv": False, "use_post_quant_conv": False,
        "scaling_factor": params.scale_factor, "shift_factor": params.shift_factor,
        "latents_mean": None, "latents_std": None,
    }  # fmt: skip


def bfl_to_diffusers_vae(weights: dict[str, Tensor], params: AutoEncoderParams) -> dict[str, Tensor]:
    """diffusers' own BFL (LDM) -> diffusers VAE converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = convert_ldm_vae_checkpoint(dict(weights), diffusers_vae_config(params))
    return {k: v.contiguous() for k, v in converted.items()}


def write_ae_diffusers_folder(
    folder, params: AutoEncoderParams | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
    pipeline: bool = False,
) -> dict[str, Tensor]:  # fmt: skip
    """A diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), converted by diffusers
    itself. With `pipeline`, `folder` is the pipeline root holding vae/."""
    params = params or tiny_ae_params()
    weights = random_ae_weights(params, seed, dtype)
    root = Path(folder)
    target = root / "vae" if pipeline else root
    target.mkdir(parents=True, exist_ok=True)
    if pipeline:
        (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (target / "config.json").write_text(json.dumps(diffusers_vae_config(params)))
    save_file(bfl_to_diffusers_vae(weights, params), str(target / "diffusion_pytorch_model.safetensors"))
    return weights
