"""load_flux: every file layout round-trips to the written weights and outputs; every bad input gets its error."""
import json
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_flux import (
    random_weights,
    tiny_inputs,
    tiny_params,
    write_flux_bfl,
    write_flux_comfy_checkpoint,
    write_flux_diffusers_file,
    write_flux_diffusers_folder,
    write_flux_fp8,
)

from flux_core.checkpoint import CheckpointError, read_header
from flux_core.loading import describe, infer_flux_params, load_flux, match_preset
from flux_core.model import PRESETS, Flux
from flux_core.ops import Linear, fp8_linear

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def small(**change):
    """tiny_params at width 128 (one 128-dim head): loading needs no more, and stays fast."""
    return tiny_params(**{"hidden_size": 128, "num_heads": 1, **change})


def reference_output(weights, params, dtype=torch.float32):
    """The output of a model holding exactly `weights` (cast to `dtype`), built without the loader."""
    model = Flux(params).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    with torch.inference_mode():
        return model(**tiny_inputs(params))


def assert_same_output(actual, expected):
    """Same weights, same math: equal up to summation order (BLAS kernels depend on memory alignment)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def output(model):
    with torch.inference_mode():
        return model(**tiny_inputs(model.params))


def dequantised(model) -> dict[str, torch.Tensor]:
    """The float32 weights a (possibly fp8-stored) model computes with."""
    weights = {k: v.float() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if getattr(module, "weight_scale", None) is not None:
            weights[f"{name}.weight"] = weights[f"{name}.weight"] * module.weight_scale
    return weights


@pytest.mark.parametrize(
    "layout",
    ["bfl", "comfy-checkpoint", "diffusers-pipeline", "diffusers-transformer-folder", "diffusers-file"],
)
def test_layouts_round_trip(tmp_path, layout):
    params = small(guidance=layout != "diffusers-file")
    target = tmp_path / ("weights" if layout.startswith("diffusers-") and "file" not in layout else "w.safetensors")
    written = {
        "bfl": lambda: write_flux_bfl(target, params),
        "comfy-checkpoint": lambda: write_flux_comfy_checkpoint(target, params),
        "diffusers-pipeline": lambda: write_flux_diffusers_folder(target, params, shards=3, pipeline=True),
        "diffusers-transformer-folder": lambda: write_flux_diffusers_folder(target, params, shards=2),
        "diffusers-file": lambda: write_flux_diffusers_file(target, params),
    }[layout]()
    model = load_flux(target, dtype=torch.float32)
    assert model.params == params
    loaded = model.state_dict()
    assert loaded.keys() == written.keys()
    assert all(torch.equal(loaded[k], v) for k, v in written.items())
    assert_same_output(output(model), reference_output(written, params))
    label = {"bfl": "BFL layout", "comfy-checkpoint": "ComfyUI checkpoint (model.diffusion_model.*)",
             "diffusers-pipeline": "diffusers folder, 3 shards", "diffusers-transformer-folder": "diffusers folder, 2",
             "diffusers-file": "diffusers file"}[layout]  # fmt: skip
    assert label in model.description and "128 wide, 1 heads" in model.description


def test_same_dtype_load_assigns_the_memory_map(tmp_path):
    path = tmp_path / "flux.safetensors"
    write_flux_bfl(path, small(), dtype=torch.bfloat16)
    model = load_flux(path, dtype=torch.bfloat16)
    size = path.stat().st_size
    # no copy: every parameter is a view of the one file-sized mapping
    assert all(p.untyped_storage().nbytes() == size for p in model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cast = load_flux(path, dtype=torch.float32)  # compute dtype chosen independently of storage
    assert all(p.dtype == torch.float32 for p in cast.parameters())


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("scaled", [None, "scale_weight", "weight_scale"])
def test_fp8_files_stay_fp8_and_dequantise_exactly(tmp_path, fp8, scaled):
    params = small()
    path = tmp_path / "flux_fp8.safetensors"
    expected = write_flux_fp8(path, params, fp8=fp8, scaled=scaled)
    model = load_flux(path, dtype=torch.float32)
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear_weights and all(w.dtype == fp8 for w in linear_weights)
    assert model.img_in.bias.dtype == torch.float32
    weights = dequantised(model)
    assert all(torch.equal(weights[k], v) for k, v in expected.items())
    assert_same_output(output(model), reference_output(expected, params))
    assert (" (scaled)" in model.description) == bool(scaled)
    in_bf16 = load_flux(path, dtype=torch.bfloat16)  # upcast per layer to bf16 instead
    relative = (output(in_bf16).float() - output(model)).abs().max() / output(model).abs().max()
    assert relative < 0.05


def test_weight_dtype_casts_to_fp8_on_load_or_dequantises(tmp_path):
    params = small()
    path = tmp_path / "flux_bf16.safetensors"
    written = write_flux_bfl(path, params, dtype=torch.bfloat16)
    model = load_flux(path, dtype=torch.float32, weight_dtype=torch.float8_e4m3fn)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.norm.query_norm.scale.dtype == torch.float32
    assert "bfloat16 weights kept as float8_e4m3fn" in model.description
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rounded = {k: v.to(torch.float8_e4m3fn).float() if k in linear else v.float() for k, v in written.items()}
    assert all(torch.equal(dequantised(model)[k], v) for k, v in rounded.items())
    assert_same_output(output(model), reference_output(rounded, params))

    scaled = tmp_path / "scaled.safetensors"
    expected = write_flux_fp8(scaled, params, scaled="scale_weight")
    full = load_flux(scaled, dtype=torch.float32, weight_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in full.parameters())
    assert all(torch.equal(full.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(ValueError, match="compute dtype .* for fp8 storage pass weight_dtype"):
        load_flux(path, dtype=torch.float8_e4m3fn)


def test_fp8_matmul_flags_the_fp8_layers_and_leaves_cpu_math_alone(tmp_path):
    params = small()
    path = tmp_path / "flux_fp8.safetensors"
    write_flux_fp8(path, params, scaled="scale_weight")
    upcast = load_flux(path, dtype=torch.bfloat16)
    fast = load_flux(path, dtype=torch.bfloat16, fp8_matmul=True)
    layers = [m for m in fast.modules() if isinstance(m, Linear)]
    assert all(m.fp8_matmul for m in layers) and "fp8 matmuls" in fast.description
    assert torch.equal(output(fast), output(upcast))  # fp8 matmuls are a GPU path: the CPU upcasts as before
    with pytest.raises(ValueError, match="fp8_matmul needs float8_e4m3fn weights"):
        load_flux(tmp_path / "flux_fp8.safetensors", dtype=torch.bfloat16, weight_dtype=torch.bfloat16, fp8_matmul=True)


def _cpu_takes_row_scales() -> bool:
    one = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(one, one.t(), torch.ones(16, 1), torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:  # torch 2.11's CPU _scaled_mm is per-tensor only
        return False
    return True


@pytest.mark.skipif(not _cpu_takes_row_scales(), reason="this torch's CPU _scaled_mm takes per-tensor scales only")
def test_fp8_linear_quantises_activations_per_token():
    # x rounded to fp8 after scaling each row to the format's max (448) by a bf16-rounded factor that also
    # dequantises it; the fp8 weight times its scale. The GPU runs the same function (tests/test_cuda.py).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 128, generator=gen).bfloat16()
    weight = (torch.randn(64, 128, generator=gen) / 8).to(torch.float8_e4m3fn)
    bias, scale = torch.randn(64, generator=gen).bfloat16(), torch.tensor(0.7)
    inverse = (448 / x.float().abs().amax(-1, keepdim=True)).bfloat16()
    x8 = (x * inverse).to(torch.float8_e4m3fn).float() / inverse.float()
    expected = torch.nn.functional.gelu(x8 @ (weight.float() * 0.7).T + bias.float(), approximate="tanh")
    actual = fp8_linear(x, weight, scale, bias, gelu=True)
    torch.testing.assert_close(actual.float(), expected, rtol=0.01, atol=0.01 * expected.abs().max().item())
    plain = torch.nn.functional.gelu(x.float() @ (weight.float() * 0.7).T + bias.float(), approximate="tanh")
    assert (actual.float() - plain).abs().max() > 0.01 * plain.abs().max()  # the 8-bit rounding is there


@pytest.mark.parametrize(
    "change",
    [dict(), dict(guidance=False), dict(in_channels=384), dict(qkv_bias=False), dict(mlp_ratio=2.5),
     dict(vec_in_dim=0), dict(depth=0), dict(out_channels=16, context_in_dim=20), dict(hidden_size=384, num_heads=3)],
)  # fmt: skip
def test_params_are_inferred_from_shapes(change):
    params = small(**change)
    assert infer_flux_params(random_weights(params)) == params


def test_head_dim_other_than_128_needs_axes(tmp_path):
    params = small(num_heads=2, axes_dim=[8, 28, 28])
    path = tmp_path / "flux64.safetensors"
    write_flux_bfl(path, params)
    with pytest.raises(CheckpointError, match=r"head dim 64, but Flux's rotary axes \[16, 56, 56\] need 128; pass axes_dim"):
        load_flux(path)
    assert load_flux(path, axes_dim=[8, 28, 28], theta=500).params == small(num_heads=2, axes_dim=[8, 28, 28], theta=500)
    write_flux_diffusers_folder(tmp_path / "diffusers", params)  # config.json carries axes_dims_rope
    assert load_flux(tmp_path / "diffusers").params == params


def test_presets_are_matched_and_checked(tmp_path):
    assert match_preset(PRESETS["flux-schnell"]) == "flux-schnell"
    assert match_preset(PRESETS["flux-dev-krea"]) == "flux-dev"  # the same architecture
    assert match_preset(PRESETS["flux-dev-fill"]) == "flux-dev-fill"
    assert match_preset(small()) is None
    assert "11.90B parameters, architecture of flux-dev" in describe(PRESETS["flux-dev"])
    path = tmp_path / "tiny.safetensors"
    write_flux_bfl(path, small())
    with pytest.raises(CheckpointError, match=r"tiny.safetensors is not a flux-dev model: .*hidden_size 128 \(preset 3072\)"):
        load_flux(path, preset="flux-dev")
    with pytest.raises(KeyError, match="unknown Flux preset"):
        load_flux(path, preset="flux-ultra")


def write_keys(path, keys, dtype=torch.float32):
    save_file({k: torch.zeros(2, 2, dtype=dtype) for k in keys}, str(path))


@pytest.mark.parametrize(
    "keys, message",
    [
        (["decoder.up.0.block.0.conv1.weight", "encoder.conv_in.weight"], "is a Flux VAE / autoencoder, not a Flux transformer. Load it with the VAE loader"),
        (["text_model.encoder.layers.0.mlp.fc1.weight"], "is a CLIP text encoder, not a Flux transformer. Load it with the text encoder loader"),
        (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], "is a T5 text encoder"),
        (["double_blocks.0.img_attn.qkv.lora_A.weight"], "is a LoRA, not a Flux transformer. Load it with a LoRA loader"),
        (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "is a LoRA"),
        (["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"], "is a LoRA"),
        (["double_blocks.0.processor.qkv_lora1.down.weight"], "is a LoRA"),
        (["controlnet_blocks.0.weight", "transformer_blocks.0.attn.norm_added_k.weight"], "is a ControlNet"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
          "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"],
         "is a Stable Diffusion 1.x checkpoint, not a Flux transformer. Load it with ComfyUI's core Load Checkpoint"),
        (["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
          "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], "is a Stable Diffusion 2.x checkpoint"),
        (["model.diffusion_model.label_emb.0.0.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
          "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"], "is a Stable Diffusion XL"),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "is a Stable Diffusion 3 model"),
        (["input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight"], "is a Stable Diffusion UNet, .* Load Diffusion"),
        (["model.some_other_net.0.weight"], "is not a model this pack knows"),
    ],
)  # fmt: skip
def test_other_model_files_are_named(tmp_path, keys, message):
    write_keys(tmp_path / "other.safetensors", keys)
    with pytest.raises(CheckpointError, match=f"other.safetensors {message}"):
        load_flux(tmp_path / "other.safetensors")


def test_diffusers_folders_of_other_components_are_named(tmp_path):
    (tmp_path / "vae").mkdir()
    write_keys(tmp_path / "vae" / "diffusion_pytorch_model.safetensors", ["decoder.up_blocks.0.resnets.0.conv1.weight"])
    with pytest.raises(CheckpointError, match=r"vae is a VAE \(diffusers layout\), not a Flux transformer"):
        load_flux(tmp_path / "vae")
    t5 = tmp_path / "text_encoder_2"
    t5.mkdir()
    write_keys(t5 / "model-00001-of-00002.safetensors", ["shared.weight"])
    write_keys(t5 / "model-00002-of-00002.safetensors", ["encoder.block.0.layer.0.SelfAttention.q.weight"])
    index = {"weight_map": {"shared.weight": "model-00001-of-00002.safetensors",
                            "encoder.block.0.layer.0.SelfAttention.q.weight": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (t5 / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="text_encoder_2 is a T5 text encoder"):
        load_flux(t5)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="is a diffusers pipeline folder without a transformer/ subfolder"):
        load_flux(tmp_path)
    (t5 / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shards listed in model.safetensors.index.json are missing: 1"):
        load_flux(t5)
    empty = tmp_path / "bins"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(CheckpointError, match=r"no .safetensors weights \(only pickle files 1 \(pytorch_model.bin\)"):
        load_flux(empty)
    with pytest.raises(CheckpointError, match="no such file or folder"):
        load_flux(tmp_path / "nowhere")


class RunsCode:
    """Unpickling this creates `marker`: a stand-in for a malicious checkpoint."""

    marker = Path(tempfile.gettempdir()) / "flux_core_pickle_was_run"

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"empty.bin is not a safetensors file \(only 0 bytes\)"),
        (b"hello, this is not a weights file at all", r"is not a safetensors file or is truncated \(header says"),
        (b"GGUF\x03\x00\x00\x00" + bytes(64), "is a GGUF quantised file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n", "is a Git LFS pointer"),
        (b"<!DOCTYPE html><html>Not found</html>" + bytes(64), r"is a web page \(HTML\)"),
        (pickle.dumps(RunsCode(), protocol=2), r"is a pickle \(.ckpt/.pt/.bin\) checkpoint; .* refused"),
    ],
)
def test_unreadable_files_are_explained(tmp_path, content, message):
    path = tmp_path / "empty.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_flux(path)


def test_pickles_are_refused_without_running_them(tmp_path):
    RunsCode.marker.unlink(missing_ok=True)
    torch.save({"model": RunsCode()}, tmp_path / "flux.ckpt")  # a zip pickle, as .ckpt/.pt files are
    with pytest.raises(CheckpointError, match=r"flux.ckpt is a pickle .* refused"):
        load_flux(tmp_path / "flux.ckpt")
    assert not RunsCode.marker.exists()  # unpickling it would have created the marker


def test_truncated_files_are_explained(tmp_path):
    path = tmp_path / "flux.safetensors"
    write_flux_bfl(path, small(depth=1, depth_single_blocks=1))
    data = path.read_bytes()
    path.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"flux.safetensors is truncated: its tensors need \d+ bytes but the file has \d+"):
        load_flux(path)
    header_len = int.from_bytes(data[:8], "little")
    path.write_bytes(data[: header_len // 2])
    with pytest.raises(CheckpointError, match="flux.safetensors is not a safetensors file or is truncated"):
        read_header(path)


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    params = small()
    weights = random_weights(params)
    path = tmp_path / "flux.safetensors"
    broken = {k: v for k, v in weights.items() if not k.startswith("double_blocks.1.img_mlp.")}
    save_file(broken, str(path))
    with pytest.raises(CheckpointError, match=r"flux.safetensors does not match the model: missing keys: 4 \(double_blocks.1.img_mlp.0.bias, "):
        load_flux(path)
    save_file({**weights, "double_blocks.0.img_attn.extra.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 1 \(double_blocks.0.img_attn.extra.weight\)"):
        load_flux(path)
    save_file({**weights, "double_blocks.1.img_attn.proj.weight": torch.zeros(128, 64)}, str(path))
    with pytest.raises(CheckpointError, match=r"double_blocks.1.img_attn.proj.weight has shape \(128, 64\) but the model expects \(128, 128\)"):
        load_flux(path)
    save_file({k: v for k, v in weights.items() if k != "img_in.weight"}, str(path))
    with pytest.raises(CheckpointError, match="flux.safetensors: no img_in.weight among the weights"):
        load_flux(path)


def test_unsupported_quantisations_are_named(tmp_path):
    path = tmp_path / "flux.safetensors"
    write_flux_fp8(path, small(), scaled="weight_scale")
    weights = load_file(path)
    nvfp4 = torch.tensor(list(json.dumps({"format": "nvfp4"}).encode()), dtype=torch.uint8)
    save_file({**weights, "img_in.comfy_quant": nvfp4}, str(path))
    with pytest.raises(CheckpointError, match="layer img_in is quantised as 'nvfp4'; only fp8"):
        load_flux(path)
    save_file({**weights, "img_in.weight_scale": torch.ones(128, 1)}, str(path))
    with pytest.raises(CheckpointError, match=r"img_in.weight_scale holds 128 scales \(per-row/block"):
        load_flux(path)
    save_file({**weights, "img_in.weight": torch.zeros(128, 64, dtype=torch.int8)}, str(path))
    with pytest.raises(CheckpointError, match="img_in.weight is stored as torch.int8: only float and fp8"):
        load_flux(path)


def test_incomplete_diffusers_weights_are_named(tmp_path):
    path = tmp_path / "diffusers.safetensors"
    write_flux_diffusers_file(path, small())
    weights = load_file(path)
    del weights["single_transformer_blocks.1.attn.to_k.weight"]
    save_file(weights, str(path))
    with pytest.raises(CheckpointError, match="diffusers weights lack single_transformer_blocks.1.attn.to_k.weight"):
        load_flux(path)
