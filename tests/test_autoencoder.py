"""The Flux autoencoder: official names, parity with diffusers' AutoencoderKL, both file layouts, wrong files,
bad inputs, tiled encode/decode."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux_core.autoencoder import AutoEncoder, AutoEncoderParams, load_autoencoder, run_tiled
from flux_core.checkpoint import CheckpointError
from tiny_ae import (
    bfl_to_diffusers_vae, diffusers_vae_config, random_ae_weights, tiny_ae_params, write_ae_bfl, write_ae_diffusers_folder,
)
from tiny_flux import random_weights, tiny_params, write_flux_bfl
from tiny_text import write_clip_l, write_t5



@pytest.fixture(autouse=True)
def no_grad():
    """Gradients off for this module only (a module-level switch would leak into later test files)."""
    with torch.no_grad():
        yield


def smooth_image(height: int, width: int) -> torch.Tensor:  # (1, 3, H, W) in [-0.9, 0.9]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    return 0.9 * torch.stack([torch.sin(6 * xx + 1), torch.cos(5 * yy), torch.sin(4 * (xx + yy))])[None]


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    write_ae_bfl(path)
    return load_autoencoder(path)


def official_keys() -> set[str]:
    """ae.safetensors' key set, spelled out from the published layout (spec §10)."""
    resnet = lambda p: {f"{p}.{n}.{t}" for n in ("norm1", "conv1", "norm2", "conv2") for t in ("weight", "bias")}
    conv = lambda p: {f"{p}.weight", f"{p}.bias"}
    keys = set()
    for side in ("encoder", "decoder"):
        keys |= conv(f"{side}.conv_in") | conv(f"{side}.norm_out") | conv(f"{side}.conv_out")
        keys |= resnet(f"{side}.mid.block_1") | resnet(f"{side}.mid.block_2")
        keys |= {k for n in ("norm", "q", "k", "v", "proj_out") for k in conv(f"{side}.mid.attn_1.{n}")}
    for i in range(4):
        keys |= {k for j in range(2) for k in resnet(f"encoder.down.{i}.block.{j}")}
        keys |= {k for j in range(3) for k in resnet(f"decoder.up.{i}.block.{j}")}
    keys |= conv("encoder.down.1.block.0.nin_shortcut") | conv("encoder.down.2.block.0.nin_shortcut")
    keys |= conv("decoder.up.0.block.0.nin_shortcut") | conv("decoder.up.1.block.0.nin_shortcut")
    keys |= {k for i in (0, 1, 2) for k in conv(f"encoder.down.{i}.downsample.conv")}
    keys |= {k for i in (1, 2, 3) for k in conv(f"decoder.up.{i}.upsample.conv")}
    return keys


def test_flux_preset_has_the_official_names_and_shapes():
    with torch.device("meta"):
        state = AutoEncoder(AutoEncoderParams.flux()).state_dict()
    assert set(state) == official_keys() and len(state) == 244
    assert sum(t.numel() for t in state.values()) == 83_819_683
    shapes = {
        "encoder.conv_in.weight": (128, 3, 3, 3), "encoder.conv_out.weight": (32, 512, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1), "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.mid.attn_1.q.weight": (512, 512, 1, 1), "decoder.up.3.block.0.conv1.weight": (512, 512, 3, 3),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1), "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,), "decoder.conv_out.weight": (3, 128, 3, 3),
    }  # fmt: skip
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    p = AutoEncoderParams.flux()
    assert (p.scale_factor, p.shift_factor, p.downscale) == (0.3611, 0.1159, 8)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 2e-5), (torch.float64, 1e-10)])
def test_matches_diffusers_autoencoderkl(tmp_path, dtype, tolerance):
    from diffusers import AutoencoderKL

    params = tiny_ae_params()
    weights = write_ae_bfl(tmp_path / "ae.safetensors", params, dtype=dtype)
    ours = load_autoencoder(tmp_path / "ae.safetensors", dtype=dtype)
    config = {k: v for k, v in diffusers_vae_config(params).items() if not k.startswith("_")}
    ref = AutoencoderKL(**config).to(dtype)
    ref.load_state_dict(bfl_to_diffusers_vae(weights, params), strict=True)
    scale, shift = ref.config.scaling_factor, ref.config.shift_factor
    gen = torch.Generator().manual_seed(1)
    image = (torch.rand(2, 3, 64, 48, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)  # H != W
    latent = torch.randn(2, 16, 8, 6, generator=gen, dtype=torch.float64).to(dtype)

    def rel(ours_out, ref_out):
        assert ours_out.shape == ref_out.shape and ours_out.dtype == dtype
        return ((ours_out - ref_out).abs().max() / ref_out.abs().max()).item()

    mean = ref.encode(image).latent_dist.mean
    assert rel(ours.encode(image), (mean - shift) * scale) <= tolerance
    assert rel(ours.encode(image, scaled=False), mean) <= tolerance
    assert rel(ours.decode(latent), ref.decode(latent / scale + shift).sample) <= tolerance
    assert rel(ours.decode(latent, scaled=False), ref.decode(latent).sample) <= tolerance


def test_every_layout_loads_the_same_weights(tmp_path):
    weights = write_ae_bfl(tmp_path / "ae.safetensors")
    transformer = {f"model.diffusion_model.{k}": v for k, v in random_weights(tiny_params()).items()}
    save_file(transformer | {f"vae.{k}": v for k, v in weights.items()}, str(tmp_path / "all_in_one.safetensors"))
    write_ae_bfl(tmp_path / "ldm.safetensors", prefix="first_stage_model.")
    write_ae_diffusers_folder(tmp_path / "vae_only")
    write_ae_diffusers_folder(tmp_path / "pipeline", pipeline=True)
    for source in ("ae.safetensors", "all_in_one.safetensors", "ldm.safetensors", "vae_only", "pipeline", "pipeline/vae"):
        ae = load_autoencoder(tmp_path / source)
        assert ae.params == tiny_ae_params(), source
        state = ae.state_dict()
        assert state.keys() == weights.keys(), source
        assert all(torch.equal(state[k], weights[k]) for k in weights), source
        assert not any(p.requires_grad for p in ae.parameters()) and not ae.training


def test_diffusers_config_scale_and_shift_are_used(tmp_path):
    write_ae_diffusers_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scaling_factor": 1.5, "shift_factor": 0.25}))
    ae = load_autoencoder(tmp_path, dtype=torch.float64)
    raw = torch.randn(1, 16, 2, 2, dtype=torch.float64)
    assert torch.allclose(ae.params.scale_latent(raw), 1.5 * (raw - 0.25))
    assert torch.allclose(ae.params.unscale_latent(ae.params.scale_latent(raw)), raw)


def write_lora(path):
    down, up = torch.zeros(4, 256), torch.zeros(256, 4)
    save_file({"transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight": down,
               "transformer.single_transformer_blocks.0.attn.to_k.lora_B.weight": up}, str(path))  # fmt: skip


def write_sd_vae_ldm(path):
    """An SD1.x/SDXL VAE in the LDM layout: the same names, 4 latent channels and quant convs."""
    weights = random_ae_weights(tiny_ae_params(z_channels=4))
    weights |= {"quant_conv.weight": torch.zeros(8, 8, 1, 1), "quant_conv.bias": torch.zeros(8),
                "post_quant_conv.weight": torch.zeros(4, 4, 1, 1), "post_quant_conv.bias": torch.zeros(4)}  # fmt: skip
    save_file(weights, str(path))


def write_sd_vae_diffusers(folder):
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4).save_pretrained(folder)  # fmt: skip


@pytest.mark.parametrize(
    "writer, name, message",
    [
        (lambda p: write_flux_bfl(p, tiny_params()), "flux.safetensors", "is a Flux transformer (BFL layout), not a Flux VAE"),
        (write_clip_l, "clip_l.safetensors", "is a CLIP text encoder, not a Flux VAE"),
        (write_t5, "t5xxl.safetensors", "is a T5 text encoder, not a Flux VAE"),
        (write_lora, "lora.safetensors", "is a LoRA, not a Flux VAE"),
        (write_sd_vae_ldm, "sdxl_vae.safetensors", "4 latent channels: an SD1.x/SDXL VAE"),
        (write_sd_vae_diffusers, "sd_vae", "4 latent channels: an SD1.x/SDXL VAE"),
        (lambda p: save_file({"weight": torch.zeros(2)}, str(p)), "other.safetensors", "not a model this pack knows"),
        (lambda p: p.mkdir(), "empty_folder", "holds no diffusion_pytorch_model.safetensors"),
        (lambda p: torch.save({"a": torch.zeros(1)}, p), "ae.ckpt", "pickle"),
    ],
)  # fmt: skip
def test_wrong_files_are_named(tmp_path, writer, name, message):
    writer(tmp_path / name)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_autoencoder(tmp_path / name)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda ae: ae.decode(torch.zeros(1, 4, 8, 8)), "latent has 4 channels but this Flux VAE takes 16-channel"),
        (lambda ae: ae.decode_tiled(torch.zeros(1, 4, 8, 8)), "latent has 4 channels"),
        (lambda ae: ae.decode(torch.zeros(16, 8, 8)), r"latent must be \(batch, 16"),
        (lambda ae: ae.encode(torch.zeros(1, 64, 64, 3)), r"ComfyUI IMAGE \(B, H, W, C\)"),
        (lambda ae: ae.encode(torch.zeros(3, 64, 64)), r"image must be \(batch, 3, height, width\)"),
        (lambda ae: ae.encode(torch.zeros(1, 3, 60, 64)), "60x64 .* not a positive multiple of 8.*56x64"),
        (lambda ae: ae.encode_tiled(torch.zeros(1, 3, 64, 68)), "not a positive multiple of 8"),
        (lambda ae: ae.decode_tiled(torch.zeros(1, 16, 8, 8), tile_size=32), "tile_size must be >= 64 px"),
        (lambda ae: ae.encode_tiled(torch.zeros(1, 3, 64, 64), overlap=-8), "overlap >= 0"),
    ],
)
def test_bad_inputs_are_named(tiny_ae, call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny_ae)


def test_run_tiled_blends_to_exactly_the_untiled_result_for_a_pointwise_function():
    """A pointwise function is unaffected by tiling, so any error is the blending's: weights must sum to 1
    everywhere, including where three tiles overlap (length 21, tile 8, overlap 2 spreads tiles 0, 6/7, 13)."""
    gen = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 5, 1, 1, generator=gen, dtype=torch.float64)
    latent = torch.randn(2, 5, 21, 13, generator=gen, dtype=torch.float64)
    decode_like = lambda t: F.interpolate(F.conv2d(t, mix), scale_factor=8, mode="nearest")
    assert torch.allclose(run_tiled(decode_like, latent, 8, 2, 1, 8, 3), decode_like(latent), rtol=0, atol=1e-12)
    image = torch.randn(1, 5, 21 * 8, 13 * 8, generator=gen, dtype=torch.float64)
    encode_like = lambda t: F.avg_pool2d(F.conv2d(t, mix), 8)
    assert torch.allclose(run_tiled(encode_like, image, 4, 1, 8, 1, 3), encode_like(image), rtol=0, atol=1e-12)


def test_one_tile_is_exactly_untiled(tiny_ae):
    latent = torch.randn(1, 16, 10, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_ae.decode_tiled(latent, tile_size=128), tiny_ae.decode(latent))
    image = smooth_image(80, 56)
    assert torch.equal(tiny_ae.encode_tiled(image, tile_size=128), tiny_ae.encode(image))


def test_tile_sizes_are_taken_as_comfyui_takes_them(tiny_ae):
    """Floored to whole latent cells; the overlap cut to a quarter tile."""
    latent = torch.randn(1, 16, 20, 14, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_ae.decode_tiled(latent, 64, 64), tiny_ae.decode_tiled(latent, 64, 16))
    assert torch.equal(tiny_ae.decode_tiled(latent, 71, 23), tiny_ae.decode_tiled(latent, 64, 16))


def test_tiled_is_close_to_untiled(tiny_ae):
    """128 px tiles overlapping 32 px over 200x152 px (latent 25x19, not a multiple of the 16-cell tile): 2x2 tiles.
    Per-tile GroupNorm statistics make tiling approximate; measured max / mean |diff|: decode 0.35 / 0.048
    (output std 0.67), encode 0.098 / 0.014 (latent std 0.22). A misplaced tile gives mean |diff| ~ std."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 25, 19, generator=gen)
    image = torch.rand(1, 3, 200, 152, generator=gen) * 2 - 1
    for tiled, full, max_bound, mean_bound in [
        (tiny_ae.decode_tiled(latent, 128, 32), tiny_ae.decode(latent), 0.6, 0.08),
        (tiny_ae.encode_tiled(image, 128, 32), tiny_ae.encode(image), 0.2, 0.025),
    ]:
        assert tiled.shape == full.shape
        diff = (tiled - full).abs()
        assert diff.max() < max_bound and diff.mean() < mean_bound, (diff.max(), diff.mean())


def test_attention_in_query_chunks_is_exact(tiny_ae, monkeypatch):
    """Large images run the mid-block attention in query chunks (bounded score memory): same result."""
    latent = torch.randn(1, 16, 10, 7, generator=torch.Generator().manual_seed(0))
    whole = tiny_ae.decode(latent)
    monkeypatch.setattr("flux_core.autoencoder.MAX_ATTENTION_SCORES", 70 * 9)  # 70 positions: chunks of 9 queries
    assert torch.allclose(tiny_ae.decode(latent), whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 4e-3)])
def test_group_norm_by_reductions_matches_pytorch(dtype, tolerance):
    """The CUDA path of GroupNorm (whole-tensor reductions) against F.group_norm, exercised here on the CPU;
    in bfloat16 both compute in float32, so they differ by rounding only."""
    from flux_core.autoencoder import group_norm_by_reductions

    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=gen, dtype=torch.float64) for shape in ((2, 64, 9, 7), 64, 64))
    x, weight, bias = (3 * x + 2).to(dtype), weight.to(dtype), bias.to(dtype)  # a mean well off zero
    ref = F.group_norm(x, 32, weight, bias, 1e-6)
    for layout in (torch.contiguous_format, torch.channels_last):  # the GPU decoder runs channels-last
        ours = group_norm_by_reductions(x.contiguous(memory_format=layout), 32, weight, bias, 1e-6)
        assert ours.dtype == dtype and ours.is_contiguous(memory_format=layout)
        assert (ours.double() - ref.double()).abs().max() <= tolerance * ref.double().abs().max()
