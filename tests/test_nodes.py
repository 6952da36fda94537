"""The pack as ComfyUI loads it: mappings, node definitions, and every node run on tiny models in official layouts."""
import importlib.util
import shutil
import sys

import pytest
import torch

from tiny_ae import tiny_ae_params, write_ae_bfl
from tiny_flux import tiny_params, write_flux_bfl
from test_seq2seq import tiny_trainer
from tiny_text import tiny_clip_config, tiny_t5_config, write_clip_l, write_t5

from conftest import REPO

CAT = "a photo of a cat"


def load_pack_as(name: str):
    """importlib from the folder under an arbitrary package name, as ComfyUI's custom node loader does."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    return load_pack_as("ComfyUI-FluxKit-any_name")


@pytest.fixture(scope="module")
def models(tmp_path_factory, pack):
    """A models folder without tokenizers/: the pack's bundled tokenizers serve, as for a user without ComfyUI."""
    root = tmp_path_factory.mktemp("models")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir()
    clip, t5 = tiny_clip_config(width=64), tiny_t5_config(width=32)
    write_flux_bfl(root / "diffusion_models" / "flux1-dev.safetensors", tiny_params(vec_in_dim=64, context_in_dim=32))
    write_flux_bfl(root / "diffusion_models" / "flux1-schnell.safetensors", tiny_params(False, vec_in_dim=64, context_in_dim=32))
    write_clip_l(root / "text_encoders" / "clip_l.safetensors", clip)
    write_t5(root / "text_encoders" / "t5xxl_fp16.safetensors", t5)
    write_ae_bfl(root / "vae" / "ae.safetensors", tiny_ae_params())
    tiny_trainer(steps=2).train(root / "fluxkit_seq2seq" / "shapes-tiny", progress=False)
    host = sys.modules[pack.__name__ + ".nodes.host"]
    host.configure(models_dir=root, output_dir=root.parent / "output")
    return root


def node(pack, name):
    return pack.NODE_CLASS_MAPPINGS[name]()


def test_mappings_are_prefixed_and_named(pack):
    assert pack.NODE_CLASS_MAPPINGS and set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert name.startswith("FluxKit"), name
        assert cls.CATEGORY.startswith("FluxKit") and cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)


def test_every_input_has_a_tooltip_valid_default_and_choices(pack, models):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for input_name, (kind, *rest) in spec.get(section, {}).items():
                opts = rest[0] if rest else {}
                where = f"{name}.{input_name}"
                assert opts.get("tooltip"), f"{where} has no tooltip"
                if isinstance(kind, list):
                    assert kind, f"{where} has no choices"
                    assert opts.get("default", kind[0]) in kind, where
                if "default" in opts and "min" in opts:
                    assert opts["min"] <= opts["default"] <= opts["max"], where


def test_model_lists_come_from_the_folders(pack, models):
    spec = pack.NODE_CLASS_MAPPINGS
    assert spec["FluxKitModelLoader"].INPUT_TYPES()["required"]["unet_name"][0] == ["flux1-dev.safetensors", "flux1-schnell.safetensors"]
    assert "t5xxl_fp16.safetensors" in spec["FluxKitTextEncoderLoader"].INPUT_TYPES()["required"]["clip_name2"][0]
    assert spec["FluxKitVAELoader"].INPUT_TYPES()["required"]["vae_name"][0] == ["ae.safetensors"]


def test_text_to_image_and_image_to_image_through_the_nodes(pack, models):
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    again = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    assert again is model  # unchanged inputs reuse the loaded model
    encoders = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "default")[0]
    vae = node(pack, "FluxKitVAELoader").load("ae.safetensors")[0]
    (positive,) = node(pack, "FluxKitTextEncode").encode(encoders, "a cat", "a photo of a cat", 3.5, "512")
    txt, extras = positive[0]
    assert txt.shape == (1, 512, 32) and extras["pooled_output"].shape == (1, 64) and extras["guidance"] == 3.5
    (negative,) = node(pack, "FluxKitTextEncode").encode(encoders, "", "blurry", 3.5, "512")

    (latent,) = node(pack, "FluxKitEmptyLatent").generate(64, 48, 1)
    assert latent["samples"].shape == (1, 16, 6, 8)
    sampler = node(pack, "FluxKitSampler")
    (out,) = sampler.sample(model, positive, latent, 1, 2, 3.5, 1.0, 1.15, 0.5, 1.0)
    (same,) = sampler.sample(model, positive, latent, 1, 2, 3.5, 1.0, 1.15, 0.5, 1.0)
    assert torch.equal(out["samples"], same["samples"]) and out["samples"].abs().max() > 0
    (cfg,) = sampler.sample(model, positive, latent, 1, 2, 3.5, 2.0, 1.15, 0.5, 1.0, negative=negative)
    assert (cfg["samples"] - out["samples"]).abs().max() > 1e-4

    (image,) = node(pack, "FluxKitVAEDecode").decode(out, vae, False, 512, 64)
    assert image.shape == (1, 48, 64, 3) and 0 <= image.min() and image.max() <= 1
    (tiled,) = node(pack, "FluxKitVAEDecode").decode(out, vae, True, 64, 32)
    assert tiled.shape == image.shape
    (encoded,) = node(pack, "FluxKitVAEEncode").encode(image, vae)
    assert encoded["samples"].shape == (1, 16, 6, 8)
    (img2img,) = sampler.sample(model, positive, encoded, 1, 2, 3.5, 1.0, 1.15, 0.5, 0.5)
    assert img2img["samples"].shape == (1, 16, 6, 8)


def test_text_encoders_load_without_comfyui_or_a_tokenizers_folder(pack, models):
    """Headless, with neither ComfyUI's tokenizers nor models/tokenizers, the pack's own copy serves."""
    assert "folder_paths" not in sys.modules and not (models / "tokenizers").exists()
    loaded = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "cpu")[0]
    clip, t5 = loaded.encoders.clip_tokenizer, loaded.encoders.t5_tokenizer
    assert clip.name_or_path == str(REPO / "flux_core" / "tokenizers" / "clip_l")
    assert clip(CAT)["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert t5(CAT)["input_ids"] == [3, 9, 1202, 13, 3, 9, 1712, 1]


def test_core_sd3_empty_latent_is_accepted(pack, models):
    model = node(pack, "FluxKitModelLoader").load("flux1-schnell.safetensors", "fp8_e4m3fn")[0]
    positive = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 64), "guidance": 3.5}]]
    sd3_latent = {"samples": torch.zeros(2, 16, 4, 4)}  # what core EmptySD3LatentImage returns
    (out,) = node(pack, "FluxKitSampler").sample(model, positive, sd3_latent, 0, 1, 3.5, 1.0, 1.15, 0.5, 1.0)
    assert out["samples"].shape == (2, 16, 4, 4)


def test_fp8_fast_weight_dtype_keeps_fp8_and_turns_on_fp8_matmuls(pack, models):
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "fp8_e4m3fn_fast")[0]
    qkv = model.double_blocks[0].img_attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.fp8_matmul and "fp8 matmuls" in model.description
    plain = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "fp8_e4m3fn")[0]
    assert plain is not model and not plain.double_blocks[0].img_attn.qkv.fp8_matmul


def test_compile_node_outputs_a_compiled_twin_sharing_the_weights(pack, models):
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    (compiled,) = node(pack, "FluxKitCompileModel").compile(model, "inductor")
    assert compiled is not model and compiled.img_in.weight is model.img_in.weight
    assert all(b._compiled_call_impl is not None for b in compiled.single_blocks)
    assert all(b._compiled_call_impl is None for b in model.single_blocks)  # the cached model is untouched
    positive = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 64)}]]
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    sampler = node(pack, "FluxKitSampler")
    (plain,) = sampler.sample(model, positive, latent, 0, 2, 3.5, 1.0, 1.15, 0.5, 1.0)
    (fast,) = sampler.sample(compiled, positive, latent, 0, 2, 3.5, 1.0, 1.15, 0.5, 1.0)  # compiles (C++ on CPU)
    tolerance = 1e-4 if model.compute_dtype == torch.float32 else 3e-2  # bf16 on GPUs: fused kernels round apart
    atol = tolerance * plain["samples"].abs().max().item()
    torch.testing.assert_close(fast["samples"], plain["samples"], rtol=0, atol=atol)


def test_bad_inputs_through_the_nodes(pack, models, tmp_path):
    with pytest.raises(ValueError, match="VAE.*not a Flux transformer|VAE loader"):
        shutil.copy(models / "vae" / "ae.safetensors", models / "diffusion_models" / "ae_by_mistake.safetensors")
        node(pack, "FluxKitModelLoader").load("ae_by_mistake.safetensors", "default")
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    positive = [[torch.randn(1, 7, 32), {"pooled_output": torch.randn(1, 64)}]]
    with pytest.raises(ValueError, match="4-channel latent"):
        node(pack, "FluxKitSampler").sample(model, positive, {"samples": torch.zeros(1, 4, 8, 8)}, 0, 1, 3.5, 1.0, 1.15, 0.5, 1.0)
    with pytest.raises(ValueError, match="multiple of 16"):
        node(pack, "FluxKitEmptyLatent").generate(1000, 1024, 1)
    with pytest.raises(ValueError, match="negative"):
        node(pack, "FluxKitSampler").sample(model, positive, {"samples": torch.zeros(1, 16, 4, 4)}, 0, 1, 3.5, 2.0, 1.15, 0.5, 1.0)
    with pytest.raises(ValueError, match="no absolute path"):
        node(pack, "FluxKitVAELoader").load("/etc/passwd")


def test_seq2seq_nodes_sample_a_point_set_image(pack, models):
    (run,) = node(pack, "FluxKitSeq2SeqLoader").load("shapes-tiny")
    (condition,) = node(pack, "FluxKitShapeCondition").make("triangle", 0.1, 0.0, 0.4, 0.3)
    assert condition.shape == (1, 2, 4)
    (image,) = node(pack, "FluxKitSeq2SeqSample").sample(run, condition, 3, 4, 64, 2)
    (same,) = node(pack, "FluxKitSeq2SeqSample").sample(run, condition, 3, 4, 64, 2)
    assert image.shape == (1, 256, 512, 3) and torch.equal(image, same)
    assert image.min() == 0 and image.max() == 1  # black points on white


def test_generate_turns_a_prompt_into_images_without_comfyui(models):
    from flux_core.autoencoder import load_autoencoder
    from flux_core.conditioning import load_text_encoders
    from flux_core.loading import load_flux
    from flux_core.pipeline import generate

    model = load_flux(models / "diffusion_models" / "flux1-dev.safetensors", dtype=torch.float32)
    ae = load_autoencoder(models / "vae" / "ae.safetensors")
    text = load_text_encoders(
        models / "text_encoders" / "clip_l.safetensors", models / "text_encoders" / "t5xxl_fp16.safetensors",
        dtype=torch.float32,
    )  # fmt: skip
    images = generate(model, ae, text, "a cat", width=64, height=32, steps=2, seed=3, batch_size=2)
    assert images.shape == (2, 32, 64, 3) and 0 <= images.min() and images.max() <= 1
    again = generate(model, ae, text, ["a cat", "a dog"], width=64, height=32, steps=2, seed=3)
    torch.testing.assert_close(again[0], images[0], atol=1e-5, rtol=0)  # same prompt, same seed
    assert (again[1] - images[1]).abs().max() > 1e-4  # other prompt


@pytest.mark.parametrize("rank, shown", [(None, True), ("0", True), ("1", False)])
def test_step_bar_is_printed_by_one_rank_only(pack, monkeypatch, capsys, rank, shown):
    host = sys.modules[f"{pack.__name__}.nodes.host"]
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)  # torchrun's
    host.progress_bar(4).update_absolute(4)
    assert ("4/4" in capsys.readouterr().err) == shown
