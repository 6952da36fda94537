"""Text conditioning: token ids, CLIP-L / T5 loading from every layout against transformers' own models, fp8, padding
without a mask, truncation, tokenizer discovery, wrong-file errors, offload."""
import json
import logging
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_text import (
    clip_weights,
    t5_weights,
    tiny_clip_config,
    tiny_t5_config,
    write_all_in_one,
    write_clip_l,
    write_component,
    write_diffusers,
    write_t5,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from flux_core.checkpoint import CheckpointError
from conftest import REPO
from flux_core.conditioning import (
    BUNDLED_TOKENIZERS,
    TextEncoders,
    clip_config,
    comfy_package_dir,
    find_tokenizer,
    load_clip,
    load_t5,
    load_text_encoders,
    load_tokenizer,
    t5_config,
    tokenize,
)
from flux_core.ops import FP8_DTYPES, Linear

CAT = "a photo of a cat"
PROMPTS = [CAT, "An astronaut riding a horse on the moon, oil painting, dramatic light"]
CAT_CLIP = [49406, 320, 1125, 539, 320, 2368, 49407]
CAT_T5 = [3, 9, 1202, 13, 3, 9, 1712, 1]


@pytest.fixture(scope="module")
def tokenizers():
    """The tokenizers flux_core finds with no folder given (its bundled copy): transformers' own classes."""
    return load_tokenizer("clip"), load_tokenizer("t5")


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory):
    """clip_l.safetensors (fp16, with text_projection and position_ids) and t5xxl_fp16.safetensors, tiny."""
    folder = tmp_path_factory.mktemp("text_encoders")
    clip = write_clip_l(folder / "clip_l.safetensors")
    t5 = write_t5(folder / "t5xxl_fp16.safetensors")
    return folder, clip, t5


def reference_ids(tokenizer, prompts, length):
    kwargs = dict(truncation=True, padding="max_length", return_length=False, return_overflowing_tokens=False)
    return tokenizer(prompts, max_length=length, return_tensors="pt", **kwargs)["input_ids"]


def reference(tmp_path, tokenizers, clip, t5, clip_cfg=None, t5_cfg=None, dtype=torch.float32):
    """(txt, y) from transformers' models loaded the normal way (from_pretrained of a folder with these weights)."""
    tower = {k: v for k, v in clip.items() if k.startswith("text_model.") and not k.endswith("position_ids")}
    write_component(tmp_path / "ref_clip", tower, clip_cfg or tiny_clip_config())
    write_component(tmp_path / "ref_t5", t5, t5_cfg or tiny_t5_config())
    ref_clip = CLIPTextModel.from_pretrained(tmp_path / "ref_clip", dtype=dtype)
    ref_t5 = T5EncoderModel.from_pretrained(tmp_path / "ref_t5", dtype=dtype)
    with torch.no_grad():
        y = ref_clip(input_ids=reference_ids(tokenizers[0], PROMPTS, 77)).pooler_output
        txt = ref_t5(input_ids=reference_ids(tokenizers[1], PROMPTS, 512)).last_hidden_state
    return txt, y


def encoders(clip_path, t5_path, tokenizers, dtype=torch.float32) -> TextEncoders:
    return TextEncoders(load_clip(clip_path, dtype), load_t5(t5_path, dtype), *tokenizers)


def test_token_ids_match_transformers_tokenizers(tokenizers):
    clip_tok, t5_tok = tokenizers
    assert isinstance(clip_tok, CLIPTokenizer) and isinstance(t5_tok, T5TokenizerFast)
    assert [find_tokenizer(w) for w in ("clip", "t5")] == [BUNDLED_TOKENIZERS / "clip_l", BUNDLED_TOKENIZERS / "t5_xxl"]
    clip_ids = tokenize(clip_tok, [CAT], 77)
    assert clip_ids.shape == (1, 77) and clip_ids[0].tolist() == CAT_CLIP + [49407] * 70
    for length in (512, 256):
        t5_ids = tokenize(t5_tok, [CAT], length)
        assert t5_ids.shape == (1, length) and t5_ids[0].tolist() == CAT_T5 + [0] * (length - 8)
        assert torch.equal(t5_ids, reference_ids(t5_tok, [CAT], length))
    assert torch.equal(tokenize(clip_tok, PROMPTS, 77), reference_ids(clip_tok, PROMPTS, 77))


LAYOUTS = [
    "comfy", "t5-with-embed_tokens", "clip-without-text_model", "all-in-one", "diffusers-root", "diffusers-components"
]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_reproduce_transformers(layout, tmp_path, tokenizers, comfy_files):
    folder, clip, t5 = comfy_files
    clip_path, t5_path = folder / "clip_l.safetensors", folder / "t5xxl_fp16.safetensors"
    tokenizer_dirs = []
    if layout == "t5-with-embed_tokens":
        t5_path = tmp_path / "t5.safetensors"
        t5 = write_t5(t5_path, seed=3, embed_tokens=True)
    elif layout == "clip-without-text_model":  # transformers 5's save_pretrained drops the prefix
        clip = clip_weights(seed=4)
        clip_path = tmp_path / "clip.safetensors"
        save_file({k.removeprefix("text_model."): v for k, v in clip.items()}, str(clip_path))
    elif layout == "all-in-one":
        clip, t5 = clip_weights(seed=5, extras=True), t5_weights(seed=6)
        clip_path = t5_path = tmp_path / "flux1-dev-all-in-one.safetensors"
        write_all_in_one(clip_path, clip, t5)
    elif layout.startswith("diffusers"):  # tokenizers must come from the pipeline folder itself
        clip, t5 = clip_weights(seed=7), t5_weights(seed=8)
        root = write_diffusers(tmp_path / "FLUX.1-dev", clip, tiny_clip_config(), t5, tiny_t5_config())
        clip_path, t5_path = root, root
        if layout == "diffusers-components":
            clip_path, t5_path = root / "text_encoder", root / "text_encoder_2"
        assert find_tokenizer("clip", [], clip_path) == root / "tokenizer"
        assert find_tokenizer("t5", [], t5_path) == root / "tokenizer_2"
    loaded = load_text_encoders(clip_path, t5_path, tokenizer_dirs, dtype=torch.float32)
    txt, y = loaded.encode(PROMPTS)
    ref_txt, ref_y = reference(tmp_path, tokenizers, clip, t5)
    assert txt.shape == (2, 512, 32) and y.shape == (2, 64)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-6)


def test_diffusers_config_json_gives_heads_and_activation(tmp_path, tokenizers):
    """CLIP's shapes cannot tell its heads, a diffusers config.json can (here head dim 32); T5's heads come from its
    relative position bias (here 4 heads of 16), its activation from config.json (gelu_new, as the FLUX.1 repo)."""
    clip_cfg, t5_cfg = tiny_clip_config(heads=2), tiny_t5_config(heads=4, d_kv=16, act="gelu_new")
    clip, t5 = clip_weights(clip_cfg, seed=1), t5_weights(t5_cfg, seed=2)
    root = write_diffusers(tmp_path / "pipe", clip, clip_cfg, t5, t5_cfg)
    txt, y = encoders(root, root, tokenizers).encode(PROMPTS)
    ref_txt, ref_y = reference(tmp_path, tokenizers, clip, t5, clip_cfg, t5_cfg)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-6)
    save_file(clip, str(tmp_path / "clip.safetensors"))  # without config.json CLIP-L's head dim 64 is assumed
    save_file(t5, str(tmp_path / "t5.safetensors"))
    alone = encoders(tmp_path / "clip.safetensors", tmp_path / "t5.safetensors", tokenizers)
    assert alone.clip.config.num_attention_heads == 1 and alone.t5.config.num_heads == 4
    assert not torch.allclose(alone.encode_clip(PROMPTS), y, atol=1e-3)


@pytest.mark.parametrize("fp8", ["plain", "scaled"])
def test_fp8_t5_stays_fp8_and_matches_dequantised(fp8, tmp_path, tokenizers, comfy_files):
    folder, clip, _ = comfy_files
    path = tmp_path / f"t5xxl_fp8_e4m3fn{'_scaled' * (fp8 == 'scaled')}.safetensors"
    dequantised = write_t5(path, seed=4, fp8=fp8)
    model = load_t5(path, torch.float32)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 2 * 7 and all(m.weight.dtype in FP8_DTYPES for m in linears)
    assert all((m.weight_scale is not None) == (fp8 == "scaled") for m in linears)
    assert model.shared.weight.dtype == torch.float32 and model.encoder.embed_tokens.weight is model.shared.weight
    fp8_bytes = sum(m.weight.nbytes for m in linears)
    assert fp8_bytes == sum(m.weight.numel() for m in linears)  # one byte per weight: not upcast at load
    pair = TextEncoders(load_clip(folder / "clip_l.safetensors", torch.float32), model, *tokenizers)
    ref_txt, _ = reference(tmp_path, tokenizers, clip, dequantised)
    torch.testing.assert_close(pair.encode_t5(PROMPTS), ref_txt, rtol=0, atol=1e-6)
    bf16 = load_t5(path, torch.bfloat16)
    assert all(m.weight.dtype in FP8_DTYPES for m in bf16.modules() if isinstance(m, Linear))
    with torch.no_grad():
        out = bf16(input_ids=reference_ids(tokenizers[1], PROMPTS, 512)).last_hidden_state
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref_txt, rtol=0, atol=0.05 * ref_txt.abs().max().item())


def test_scale_beside_a_float_weight_is_folded_in(tmp_path, tokenizers, comfy_files):
    folder, clip, t5 = comfy_files
    stored = load_file(folder / "t5xxl_fp16.safetensors")
    layer = "encoder.block.1.layer.1.DenseReluDense.wo"
    stored[f"{layer}.weight"], stored[f"{layer}.scale_weight"] = stored[f"{layer}.weight"] * 4, torch.tensor(0.25)
    save_file(stored, str(tmp_path / "t5_scaled.safetensors"))
    pair = encoders(folder / "clip_l.safetensors", tmp_path / "t5_scaled.safetensors", tokenizers)
    torch.testing.assert_close(pair.encode_t5(PROMPTS), reference(tmp_path, tokenizers, clip, t5)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_match_transformers_from_pretrained(dtype, tmp_path, tokenizers, comfy_files):
    """fp16 keeps T5's wo in float32 as transformers does (its _keep_in_fp32_modules), without storing it so."""
    folder, clip, t5 = comfy_files
    pair = encoders(folder / "clip_l.safetensors", folder / "t5xxl_fp16.safetensors", tokenizers, dtype)
    txt, y = pair.encode(PROMPTS)
    ref_txt, ref_y = reference(tmp_path, tokenizers, clip, t5, dtype=dtype)
    assert txt.dtype == y.dtype == dtype
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=0)


def test_t5_pads_to_exact_length_without_mask(tokenizers, comfy_files):
    folder, _, _ = comfy_files
    pair = encoders(folder / "clip_l.safetensors", folder / "t5xxl_fp16.safetensors", tokenizers)
    long, short = pair.encode_t5(CAT, 512), pair.encode_t5(CAT, 256)
    assert long.shape == (1, 512, 32) and short.shape == (1, 256, 32)
    assert (long[0, 8:].abs().sum(-1) > 0).all()  # pad positions are encoded, not dropped or zeroed
    # pads are attended to: the padding length moves the prompt's own states, and a masked run differs
    assert (long[0, 0] - short[0, 0]).abs().max() > 0.01
    ids = reference_ids(tokenizers[1], [CAT], 512)
    with torch.no_grad():
        masked = pair.t5(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
    assert (masked[0, :8] - long[0, :8]).abs().max() > 0.01


def test_truncation_is_logged(tokenizers, caplog):
    clip_tok, t5_tok = tokenizers
    with caplog.at_level(logging.WARNING, logger="flux_core.conditioning"):
        ids = tokenize(t5_tok, ["short", "cat " * 600], 512)
    assert ids.shape == (2, 512) and ids[1, -1] == 1  # end token kept
    assert len(caplog.records) == 1 and "prompt 1 is 601 tokens, 89 over the 512" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flux_core.conditioning"):
        ids = tokenize(clip_tok, ["dog " * 80], 77)
    assert ids[0, -1] == 49407 and "prompt 0 is 82 tokens, 5 over the 77" in caplog.text and "dog" in caplog.text


def _no_comfy(monkeypatch):
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)


def test_missing_tokenizer_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch):
    _no_comfy(monkeypatch)
    monkeypatch.setattr("flux_core.conditioning.BUNDLED_TOKENIZERS", tmp_path / "gone")  # a broken install
    with pytest.raises(FileNotFoundError) as err:
        load_text_encoders(tmp_path / "clip_l.safetensors", tmp_path / "t5.safetensors", [tmp_path / "mine"])
    message = str(err.value)  # raised before any weights are read (those files do not exist)
    assert "No CLIP-L tokenizer found" in message and str(tmp_path / "mine" / "clip_l") in message
    assert str(tmp_path / "tokenizer") in message and "no importable `comfy`" in message
    assert "tokenizer_dirs=" in message and "comfy_root=" in message and "comfy/sd1_tokenizer" in message
    assert f"own copy is missing from {tmp_path / 'gone'}: reinstall FluxKit" in message


def test_comfyui_bundled_tokenizers_found_without_importing_comfy(tmp_path, monkeypatch, tokenizers):
    comfy = tmp_path / "ComfyUI" / "comfy"
    shutil.copytree(BUNDLED_TOKENIZERS / "clip_l", comfy / "sd1_tokenizer")
    shutil.copytree(BUNDLED_TOKENIZERS / "t5_xxl", comfy / "text_encoders" / "t5_tokenizer")
    (comfy / "__init__.py").write_text("raise RuntimeError('comfy must not be imported')\n")
    assert find_tokenizer("clip", comfy_root=tmp_path / "ComfyUI") == comfy / "sd1_tokenizer"
    monkeypatch.delitem(sys.modules, "comfy", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "ComfyUI"))
    assert comfy_package_dir() == comfy
    found = find_tokenizer("t5", model_path=tmp_path / "models" / "t5xxl_fp16.safetensors")
    assert found == comfy / "text_encoders" / "t5_tokenizer" and "comfy" not in sys.modules
    assert tokenize(T5TokenizerFast.from_pretrained(found), [CAT], 256)[0, :8].tolist() == CAT_T5
    # a CLIP tokenizer folder is never taken for T5's, though both may hold tokenizer.json
    (comfy / "sd1_tokenizer" / "tokenizer.json").write_text("{}")
    assert find_tokenizer("t5", [comfy / "sd1_tokenizer", comfy / "text_encoders"]).name == "t5_tokenizer"


def _stub(path, **tensors):
    save_file({k.replace("__", "."): v.clone() for k, v in tensors.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "load, file, message",
    [
        (load_clip, "flux", "is a Flux transformer (BFL layout), not a CLIP-L text encoder. Load it with the diffusion model"),
        (load_t5, "vae", "is a Flux VAE / autoencoder, not a T5 text encoder. Load it with the VAE loader"),
        (load_t5, "lora", "is a LoRA, not a T5 text encoder. Load it with a LoRA loader"),
        (load_clip, "t5", "is a T5 text encoder, not CLIP-L: give it as the T5 file"),
        (load_t5, "clip", "is a CLIP text encoder, not T5: give it as the CLIP file"),
        (load_clip, "clip_g", "is a CLIP-G text encoder (SDXL / SD3), not the CLIP-L Flux uses: pick clip_l"),
        (load_t5, "stubs", "stubs.safetensors: the T5 weights lack shared.weight: the file is incomplete"),
        (load_clip, "stubs", "stubs.safetensors: the CLIP-L weights lack encoder.layers.0.mlp.fc1.weight"),
    ],
)  # fmt: skip
def test_wrong_files_say_what_they_are(load, file, message, tmp_path, comfy_files):
    folder, _, _ = comfy_files
    w = torch.zeros(2, 2)
    paths = {
        "flux": lambda: _stub(tmp_path / "flux1.safetensors", double_blocks__0__img_attn__norm__key_norm__scale=w[0]),
        "vae": lambda: _stub(tmp_path / "ae.safetensors", decoder__up__0__block__0__conv1__weight=w),
        "lora": lambda: _stub(tmp_path / "lora.safetensors", lora_te1_text_model_encoder_layers_0__lora_down__weight=w),
        "t5": lambda: folder / "t5xxl_fp16.safetensors",
        "clip": lambda: folder / "clip_l.safetensors",
        "clip_g": lambda: _stub(
            tmp_path / "clip_g.safetensors", text_model__embeddings__token_embedding__weight=w,
            text_model__encoder__layers__30__mlp__fc1__weight=w,
        ),
        "stubs": lambda: _stub(  # as the text-encoder stubs of tiny_flux's all-in-one checkpoint
            tmp_path / "stubs.safetensors",
            text_encoders__t5xxl__transformer__encoder__block__0__layer__0__SelfAttention__q__weight=w,
            text_encoders__clip_l__transformer__text_model__embeddings__token_embedding__weight=w,
        ),
    }  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load(paths[file]())
    assert message in str(err.value)


def test_real_size_configs_equal_comfyui_configs():
    """Configs inferred from the real CLIP-L / T5-XXL shapes (meta tensors) equal ComfyUI's config files (copies in
    tests/configs)."""
    skip = {"_name_or_path", "architectures", "torch_dtype", "transformers_version", "model_type", "output_past",
            "initializer_factor", "initializer_range", "dropout", "attention_dropout", "dropout_rate",
            "decoder_start_token_id", "is_encoder_decoder", "tie_word_embeddings", "num_decoder_layers"}  # fmt: skip
    for name, config_cls, model_cls, infer in (
        ("clip_l", CLIPTextConfig, CLIPTextModel, clip_config),
        ("t5_xxl", T5Config, T5EncoderModel, t5_config),
    ):
        expected = json.loads((REPO / "tests" / "configs" / f"{name}.json").read_text())
        with torch.device("meta"):
            state = model_cls(config_cls(**expected)).state_dict()
        inferred = infer({k.removeprefix("text_model."): v for k, v in state.items()})
        for key, value in expected.items():
            assert key in skip or getattr(inferred, key) == value, (name, key, getattr(inferred, key), value)


def test_original_relu_t5_loads_with_a_warning(tmp_path, tokenizers, caplog, comfy_files):
    folder, clip, _ = comfy_files
    cfg = tiny_t5_config(gated=False)
    t5 = write_t5(tmp_path / "t5_base.safetensors", cfg, seed=9, dtype=torch.float32)
    with caplog.at_level(logging.WARNING, logger="flux_core.conditioning"):
        pair = encoders(folder / "clip_l.safetensors", tmp_path / "t5_base.safetensors", tokenizers)
    assert "original (non-gated) T5" in caplog.text
    ref_txt, _ = reference(tmp_path, tokenizers, clip, t5, t5_cfg=cfg)
    torch.testing.assert_close(pair.encode_t5(PROMPTS), ref_txt, rtol=0, atol=1e-6)


def test_offload_returns_to_the_loaded_tensors(tokenizers, comfy_files):
    folder, _, _ = comfy_files
    pair = encoders(folder / "clip_l.safetensors", folder / "t5xxl_fp16.safetensors", tokenizers, torch.float16)
    before = pair.encode(CAT)
    def pointers():
        return [p.data_ptr() for p in (*pair.clip.parameters(), *pair.t5.parameters())]

    loaded = pointers()
    with pair.on("meta"):
        assert pair.device.type == "meta" and all(p.is_meta for p in pair.t5.parameters())
    assert pair.device.type == "cpu" and pointers() == loaded
    assert pair.t5.encoder.embed_tokens.weight is pair.t5.shared.weight
    for got, want in zip(pair.encode(CAT), before):
        assert torch.equal(got, want)


def test_bad_arguments(tokenizers, comfy_files, tmp_path):
    folder, _, _ = comfy_files
    with pytest.raises(ValueError, match="compute dtype"):
        load_t5(folder / "t5xxl_fp16.safetensors", torch.float8_e4m3fn)
    pair = encoders(folder / "clip_l.safetensors", folder / "t5xxl_fp16.safetensors", tokenizers)
    with pytest.raises(ValueError, match="2 CLIP prompts but 1 T5 prompts"):
        pair.encode(PROMPTS, [CAT])
    with pytest.raises(TypeError, match="prompts must be"):
        pair.encode([])
    small = {k: v for k, v in clip_weights(tiny_clip_config()).items()}
    small["text_model.embeddings.token_embedding.weight"] = small["text_model.embeddings.token_embedding.weight"][:1000]
    save_file(small, str(tmp_path / "small_vocab.safetensors"))
    with pytest.raises(ValueError, match="49408 tokens but the model's vocabulary only 1000"):
        TextEncoders(load_clip(tmp_path / "small_vocab.safetensors"), pair.t5, *tokenizers)
