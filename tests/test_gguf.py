"""GGUF: our torch dequantisation against the gguf package's numpy reference for every type; a tiny Flux and a tiny T5
written as GGUF (every type, as city96 / llama.cpp lay them out) against the same weights dequantised ahead into
safetensors, kept quantised through compile_blocks, streaming and LoRAs (side paths, per-call merges) and through the
nodes; wrong files."""
import importlib
import json
import runpy
import sys

import gguf
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from conftest import REPO
from test_lora import MANY, assert_closed_form_per_call, assert_merged_per_call_where_cheaper, kohya_lora
from test_nodes import load_pack_as
from test_streaming import block_budget
from tiny_ae import tiny_ae_params, write_ae_bfl
from tiny_flux import random_weights, tiny_inputs, tiny_params
from tiny_text import t5_weights, tiny_clip_config, tiny_t5_config, write_clip_l

import flux_core.gguf
from flux_core import streaming
from flux_core.checkpoint import CheckpointError
from flux_core.conditioning import load_t5
from flux_core.gguf import _T5_BLOCK, _T5_TOP, NATIVE, SUPPORTED, GGUFLinear, Q, dequantize
from flux_core.loading import load_flux
from flux_core.lora import apply_loras, parse_lora
from flux_core.ops import Linear

PACKAGE_QUANTISES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_1, Q.Q5_0, Q.Q4_1, Q.Q4_0)  # gguf.quants.quantize has these
STORED = [q for q in SUPPORTED if q != Q.F32]  # the 2-D weight types the model files cycle through
# Byte offsets of each block's float16 scale fields (d, and dmin / m where the type has one).
SCALE_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q5_0: (0,), Q.Q4_1: (0, 2), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}  # fmt: skip
PARAMS = tiny_params()


def random_blocks(qtype: Q, rows: int, cols: int, gen: np.random.Generator, std: float = 1.0) -> np.ndarray:
    """(rows, bytes per row) random blocks: every quant bit random, the float16 scales finite and set so that the
    weights have about `std` (they are linear in the scales)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = gen.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    fields = [slice(o, o + 2) for o in SCALE_FIELDS[qtype]]
    for field in fields:
        raw[..., field] = gen.uniform(0.5, 1.5, (*raw.shape[:-1], 1)).astype(np.float16).view(np.uint8)
    spread = gguf.quants.dequantize(raw.reshape(rows, -1), qtype).std()
    for field in fields:
        raw[..., field] = (raw[..., field].view(np.float16) * (std / spread)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def encode(value: torch.Tensor, qtype: Q, gen: np.random.Generator) -> np.ndarray:
    """What a file stores for a float tensor as `qtype`: the package's quantisation where it has one, else random
    blocks of the tensor's spread."""
    array = value.float().numpy()
    if qtype in PACKAGE_QUANTISES:
        return gguf.quants.quantize(array, qtype)
    return random_blocks(qtype, *array.shape, gen, std=float(array.std()))


def write_gguf(path, tensors: dict[str, torch.Tensor], arch: str | None, qtypes=STORED, seed: int = 0) -> dict:
    """A GGUF file: 2-D tensors stored as `qtypes` in turn (where the row splits into that type's blocks; else F16, as
    city96's converter falls back), 1-D ones F32. Returns {name: the float32 tensor the file dequantises to}."""
    gen, writer, values, turn = np.random.default_rng(seed), gguf.GGUFWriter(str(path), arch or "flux"), {}, 0
    if arch is None:  # stable-diffusion.cpp's files carry no architecture
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)
    for name, value in tensors.items():
        qtype = Q.F32
        if value.ndim == 2:
            qtype = qtypes[turn % len(qtypes)]
            turn += 1
            if value.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = Q.F16
        data = encode(value, qtype, gen)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
        values[name] = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def run(model, dtype=torch.float32, params=PARAMS, grid=(3, 4)):
    with torch.inference_mode():
        return model(**tiny_inputs(params, rows=grid[0], cols=grid[1], dtype=dtype))


# --- dequantisation against the package ------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda q: q.name)
def test_dequantize_matches_the_gguf_package_bit_for_bit(qtype, monkeypatch):
    gen = np.random.default_rng(int(qtype))
    weights = gen.standard_normal((6, 512)).astype(np.float32)
    stored = [gguf.quants.quantize(weights, qtype)] if qtype in PACKAGE_QUANTISES else []
    if qtype not in NATIVE:
        stored.append(random_blocks(qtype, 6, 512, gen))  # every bit pattern, not only what a quantiser writes
    torch._dynamo.reset()
    compiled = torch.compile(dequantize, backend="aot_eager", fullgraph=True)  # the expression torch.compile fuses
    for data in stored:
        expected = torch.from_numpy(np.array(gguf.quants.dequantize(data, qtype), dtype=np.float32))
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.uint8))
        assert torch.equal(dequantize(raw, qtype), expected)
        assert torch.equal(dequantize(raw, qtype, torch.bfloat16), expected.bfloat16())  # rounded once
        assert torch.equal(compiled(raw, qtype, torch.bfloat16), expected.bfloat16())
        assert torch.equal(dequantize(raw[2:5], qtype), expected[2:5])  # rows stand alone (Linear's `rows`)
        assert torch.equal(dequantize(raw[3], qtype), expected[3])  # one row alone (a 1-D tensor)
        with monkeypatch.context() as patch:
            patch.setattr(flux_core.gguf, "EAGER_CHUNK", 1024)  # two rows at a time, as big layers go when eager
            assert torch.equal(dequantize(raw, qtype, torch.bfloat16), expected.bfloat16())


# --- a tiny Flux --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    """(GGUF with every type, safetensors of the weights it dequantises to)."""
    folder = tmp_path_factory.mktemp("gguf")
    values = write_gguf(folder / "flux-mixed.gguf", random_weights(PARAMS), "flux")
    save_file(values, str(folder / "flux-dequantised.safetensors"))
    return folder / "flux-mixed.gguf", folder / "flux-dequantised.safetensors"


@pytest.fixture(scope="module")
def flux_pair(flux_files):
    return load_flux(flux_files[0], dtype=torch.float32), load_flux(flux_files[1], dtype=torch.float32)


def test_flux_gguf_stays_quantised_and_matches_the_dequantised_weights(flux_files, flux_pair):
    model, reference = flux_pair
    quantised = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert {m.qtype for m in quantised} == set(STORED) - set(NATIVE)  # F16, BF16 load as float tensors
    assert all(m.weight.dtype == torch.uint8 and m.weight.shape[0] == m.out_features for m in quantised)
    assert "GGUF layout" in model.description and "Q4_K x" in model.description and "Q2_K x" in model.description
    expected = run(reference)
    assert torch.equal(run(model), expected)
    bf16 = [run(load_flux(path, dtype=torch.bfloat16), torch.bfloat16) for path in flux_files]
    assert torch.equal(*bf16)  # dequantised to float32, rounded once: as the float32 file cast to bfloat16
    ahead = load_flux(flux_files[0], dtype=torch.float32, weight_dtype=torch.float32)  # dequantised at load
    assert not any(isinstance(m, GGUFLinear) for m in ahead.modules()) and torch.equal(run(ahead), expected)


def test_compiled_blocks_capture_the_dequantisation_in_one_graph(flux_pair):
    model = flux_pair[0]
    torch._dynamo.reset()
    compiled = run(model.twin().compile_blocks(backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(compiled, run(model), rtol=0, atol=1e-5 * compiled.abs().max().item())
    torch._dynamo.reset()


def test_streamed_blocks_carry_the_raw_blocks(tmp_path):
    write_gguf(tmp_path / "flux-Q4_K.gguf", random_weights(PARAMS), "flux", [Q.Q4_K])
    model = load_flux(tmp_path / "flux-Q4_K.gguf", dtype=torch.float32)
    expected = run(model)
    placement = streaming.Placement(model, model.blocks())
    budget = placement.fixed.nbytes + 2 * max(b.nbytes for b in placement.blocks)  # two slots: every block streams
    placement = streaming.place(model, torch.device("cpu"), model.blocks(), budget_bytes=budget)
    assert len(placement.streamed) == len(model.blocks())
    assert any(t.dtype == torch.uint8 for t in placement.blocks[placement.streamed[0]].home)
    first, second = run(model), run(model)
    streaming.unload(model)
    assert torch.equal(first, expected) and torch.equal(second, expected)


def test_loras_ride_beside_the_quantised_weights(flux_pair):
    model, reference = flux_pair
    gen, state = torch.Generator().manual_seed(3), {}
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_blocks.1.txt_mlp.2"):
        layer = model.get_submodule(name)
        state[f"{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=gen) / layer.in_features**0.5
        state[f"{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=gen) / 2
    width = PARAMS.hidden_size  # LoHa on linear2: full rank, so merged (dequantised) instead
    for i in (1, 2):
        for ab, shape in (("a", (width, 2)), ("b", (2, width * 5))):
            state[f"single_blocks.1.linear2.hada_w{i}_{ab}"] = torch.randn(*shape, generator=gen) / 8
    lora = parse_lora(state)
    patched, _, (report,) = apply_loras(model, [(lora, 0.8, 1.0)])
    merged, _, _ = apply_loras(reference, [(lora, 0.8, 1.0)])
    assert report.modes == {"side path": 3, "merged": 1}
    qkv = patched.double_blocks[0].img_attn.qkv
    assert isinstance(qkv, GGUFLinear) and qkv.weight is model.double_blocks[0].img_attn.qkv.weight
    assert qkv.lora_up is not None and model.double_blocks[0].img_attn.qkv.lora_up is None
    linear2 = patched.single_blocks[1].linear2
    assert type(linear2) is Linear and linear2.weight.dtype == torch.float32
    assert isinstance(model.single_blocks[1].linear2, GGUFLinear)  # the base is left alone
    expected = run(merged)
    assert (expected - run(reference)).abs().max() > 0.02 * expected.abs().max()  # the LoRA shows
    torch.testing.assert_close(run(patched), expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_loras_merge_into_the_dequantised_weight_per_call_streamed_too(flux_pair, monkeypatch):
    model, reference = flux_pair
    strength, alpha, rank = 0.8, 2.0, 4
    state = kohya_lora(model, rank=rank, alpha=alpha, seed=16)
    patched, _, _ = apply_loras(model, [(parse_lora(state), strength, 1.0)])
    merged, _, _ = apply_loras(reference, [(parse_lora(state), strength, 1.0)])
    out = assert_merged_per_call_where_cheaper(patched, merged, monkeypatch)
    i = next(i for i, b in enumerate(model.single_blocks) if isinstance(b.linear1, GGUFLinear))
    layer, base_layer = patched.single_blocks[i].linear1, model.single_blocks[i].linear1
    key = f"lora_unet_single_blocks_{i}_linear1"
    up = strength * alpha / rank * state[f"{key}.lora_up.weight"]
    weight = dequantize(base_layer.weight, base_layer.qtype)
    assert_closed_form_per_call(layer, base_layer, weight, up, state[f"{key}.lora_down.weight"])
    blocks = patched.blocks()  # every block streamed: raw blocks and LoRA factors copied in per call
    placement = streaming.place(patched, torch.device("cpu"), blocks, budget_bytes=block_budget(patched, len(blocks)))
    assert len(placement.streamed) == len(blocks)
    streamed = run(patched, grid=MANY)
    streaming.unload(patched)
    assert torch.equal(streamed, out)


# --- a tiny T5 ----------------------------------------------------------------------------------------------------------


def llama_cpp_t5_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' T5 encoder names -> llama.cpp's (enc.blk.N.attn_q.weight, token_embd.weight, ...)."""
    top, block = {v: k for k, v in _T5_TOP.items()}, {v: k for k, v in _T5_BLOCK.items()}
    renamed = {}
    for key, value in weights.items():
        if key in top:
            renamed[top[key]] = value
        else:
            _, _, index, rest = key.split(".", 3)
            layer, suffix = rest.rsplit(".", 1)
            renamed[f"enc.blk.{index}.{block[layer]}.{suffix}"] = value
    return renamed


def test_t5_gguf_in_llama_cpp_names_matches_the_dequantised_weights(tmp_path):
    config = tiny_t5_config(width=256, ff=256)
    hf = t5_weights(config)
    values = write_gguf(tmp_path / "t5.gguf", llama_cpp_t5_names(hf), "t5encoder", qtypes=[Q.Q8_0, Q.Q6_K, Q.Q4_K, Q.Q5_0])
    names = dict(zip(llama_cpp_t5_names(hf), hf))
    save_file({names[k]: v for k, v in values.items()}, str(tmp_path / "t5.safetensors"))
    model, reference = load_t5(tmp_path / "t5.gguf", torch.float32), load_t5(tmp_path / "t5.safetensors", torch.float32)
    ff = model.encoder.block[1].layer[1].DenseReluDense
    assert isinstance(ff.wi_0, GGUFLinear) and ff.wi_0.weight.dtype == torch.uint8
    assert model.shared.weight.dtype == torch.float32  # looked up, not multiplied: dequantised at load
    assert "Q6_K" in model.description and "Q4_K" in model.description
    ids = torch.randint(0, 32128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)


# --- the nodes ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory):
    """A models folder with a GGUF Flux (Q4_K / Q5_K) and T5 (Q8_0), the safetensors they dequantise to, CLIP-L, AE."""
    root = tmp_path_factory.mktemp("gguf_models")
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (root / sub).mkdir()
    params = tiny_params(vec_in_dim=64, context_in_dim=32)
    flux = write_gguf(root / "diffusion_models" / "flux1-dev-Q4_K_S.gguf", random_weights(params), "flux", [Q.Q4_K, Q.Q5_K])
    save_file(flux, str(root / "diffusion_models" / "flux1-dev.safetensors"))
    hf = t5_weights(tiny_t5_config(width=32))
    t5 = write_gguf(root / "text_encoders" / "t5-Q8_0.gguf", llama_cpp_t5_names(hf), "t5", [Q.Q8_0])
    names = dict(zip(llama_cpp_t5_names(hf), hf))
    save_file({names[k]: v for k, v in t5.items()}, str(root / "text_encoders" / "t5.safetensors"))
    write_clip_l(root / "text_encoders" / "clip_l.safetensors", tiny_clip_config(width=64))
    write_ae_bfl(root / "vae" / "ae.safetensors", tiny_ae_params())
    return root


def test_nodes_list_and_run_gguf_flux_and_t5(gguf_models):
    pack = load_pack_as("ComfyUI-FluxKit-gguf")
    sys.modules[pack.__name__ + ".nodes.host"].configure(models_dir=gguf_models, output_dir=gguf_models / "output")
    nodes = pack.NODE_CLASS_MAPPINGS
    assert "flux1-dev-Q4_K_S.gguf" in nodes["FluxKitModelLoader"].INPUT_TYPES()["required"]["unet_name"][0]
    assert "t5-Q8_0.gguf" in nodes["FluxKitTextEncoderLoader"].INPUT_TYPES()["required"]["clip_name2"][0]
    latents, models = [], []
    for model_name, t5_name in (("flux1-dev-Q4_K_S.gguf", "t5-Q8_0.gguf"), ("flux1-dev.safetensors", "t5.safetensors")):
        model = nodes["FluxKitModelLoader"]().load(model_name, "default")[0]
        encoders = nodes["FluxKitTextEncoderLoader"]().load("clip_l.safetensors", t5_name, "default")[0]
        (positive,) = nodes["FluxKitTextEncode"]().encode(encoders, "a cat", "a photo of a cat", 3.5, "512")
        (latent,) = nodes["FluxKitEmptyLatent"]().generate(64, 48, 1)
        latents.append(nodes["FluxKitSampler"]().sample(model, positive, latent, 1, 2, 3.5, 1.0, 1.15, 0.5, 1.0)[0])
        models.append((model, encoders.encoders.t5))
    (flux, t5), _ = models
    assert isinstance(flux.double_blocks[0].img_attn.qkv, GGUFLinear) and "Q8_0" in t5.description
    assert latents[0]["samples"].abs().max() > 0
    torch.testing.assert_close(latents[0]["samples"], latents[1]["samples"], rtol=0, atol=1e-5)


def test_shipped_workflow_runs_headless_on_gguf_files(gguf_models, tmp_path):
    pack = runpy.run_path(str(REPO / "__main__.py"))["load_pack"]()
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    argv = ["run", str(REPO / "workflows" / "flux_dev_txt2img.json"), "--models", str(gguf_models), "--output",
            str(tmp_path), "--set", "1.unet_name=flux1-dev-Q4_K_S.gguf", "--set", "2.clip_name2=t5-Q8_0.gguf",
            "--set", "6.steps=2", "--set", "5.width=64", "--set", "5.height=48"]  # fmt: skip
    assert runner.main(argv) == 0
    (png,) = tmp_path.rglob("*.png")
    assert json.loads(Image.open(png).text["prompt"])["1"]["inputs"]["unet_name"] == "flux1-dev-Q4_K_S.gguf"


# --- wrong files --------------------------------------------------------------------------------------------------------


def stub(path, arch: str | None, names: list[str], qtype: Q = Q.F32) -> None:
    """A GGUF with `arch` and these tensors (32 x 256, or raw blocks of `qtype`)."""
    writer = gguf.GGUFWriter(str(path), arch or "flux")
    if arch is None:
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE)
    for name in names:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        data = np.zeros((32, 256), np.float32) if qtype == Q.F32 else np.zeros((32, 256 // block * size), np.uint8)
        writer.add_tensor(name, data, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


FLUX_KEYS = ["img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.proj.weight"]


@pytest.mark.parametrize(
    "arch, names, qtype, loader, message",
    [
        ("llama", ["token_embd.weight", "blk.0.attn_q.weight"], Q.F32, load_flux, r"GGUF quantised file of a 'llama' model"),
        ("llama", ["token_embd.weight", "blk.0.attn_q.weight"], Q.F32, load_t5, r"'llama' model .*not a T5 text encoder"),
        ("sdxl", ["input_blocks.0.0.weight"], Q.F32, load_flux, r"of an SDXL UNet, not a Flux transformer"),
        (None, ["input_blocks.0.0.weight"], Q.F32, load_flux, r"of a Stable Diffusion UNet"),
        ("flux", FLUX_KEYS, Q.F32, load_t5, r"of a Flux transformer. Load it with the diffusion model loader"),
        ("t5encoder", ["enc.blk.0.attn_q.weight"], Q.F32, load_flux, r"of a T5 text encoder. Load it with the text enc"),
        ("flux", ["transformer_blocks.0.attn.norm_added_k.weight"], Q.F32, load_flux, r"Flux GGUF with diffusers names"),
        ("flux", ["img_in.weight"], Q.F32, load_flux, r"says it is a Flux GGUF but has no Flux transformer keys"),
        ("t5", ["dec.blk.0.attn_q.weight"], Q.F32, load_t5, r"says it is a T5 GGUF but has no encoder"),
        ("flux", FLUX_KEYS, Q.IQ4_XS, load_flux, r"stores 3 tensors as IQ4_XS .*supported: F32, F16, BF16, Q8_0"),
    ],
)
def test_wrong_gguf_files_are_named(tmp_path, arch, names, qtype, loader, message):
    stub(tmp_path / "wrong.gguf", arch, names, qtype)
    with pytest.raises(CheckpointError, match=message):
        loader(tmp_path / "wrong.gguf")


def test_a_truncated_gguf_is_reported(flux_files, tmp_path):
    data = flux_files[0].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.gguf is a GGUF quantised file that cannot be read"):
        load_flux(tmp_path / "cut.gguf")
