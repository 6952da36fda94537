"""LoRAs: every format on a tiny Flux in official layout, against diffusers' own loading (kohya, XLabs, PEFT) or the
closed forms (BFL names, LoHa, LoKr, diff); stacking, strength 0, the base left alone, fp8 side paths and per-call
merges, wrong models."""
import importlib
import json
import re
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from tiny_flux import bfl_to_diffusers, diffusers_config, tiny_inputs, tiny_params, write_flux_bfl, write_flux_fp8
from tiny_text import tiny_clip_config, write_clip_l, write_t5
from test_nodes import models, pack  # noqa: F401  (fixtures: the pack as ComfyUI loads it, tiny models folder)
from test_streaming import block_budget

from conftest import REPO

from flux_core import kernels, streaming
from flux_core.checkpoint import CheckpointError
from flux_core.conditioning import load_text_encoders
from flux_core.loading import load_flux
from flux_core.lora import apply_loras, parse_lora, read_lora
from flux_core.model import Flux
from flux_core.ops import Linear, enable_fp8_matmul

PARAMS = tiny_params()
WIDTH, MLP = PARAMS.hidden_size, int(PARAMS.hidden_size * PARAMS.mlp_ratio)


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "flux.safetensors"
    write_flux_bfl(path, PARAMS, dtype=torch.float64)
    return path


@pytest.fixture(scope="module")
def base(flux_path):
    return load_flux(flux_path, dtype=torch.float64)


def linears(model) -> dict[str, Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear)}


def random_pair(gen, out_features: int, in_features: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (rank, in), up (out, rank)): a change about a third the size of the tiny model's weights."""
    down = torch.randn(rank, in_features, generator=gen) / in_features**0.5
    return down, 0.3 * torch.randn(out_features, rank, generator=gen) / rank**0.5


def run(model, dtype=torch.float64, grid=(3, 4)):
    with torch.inference_mode():
        return model(**tiny_inputs(model.params, rows=grid[0], cols=grid[1], dtype=dtype))


MANY = (24, 24)  # 576 image tokens: the image stream's fp8 / GGUF layers merge LoRAs per call, the rest keep side paths


# --- against diffusers ------------------------------------------------------------------------------------------------


def reference_output(flux_path, lora_path, strength: float) -> torch.Tensor:
    """diffusers' FluxTransformer2DModel on the same weights, the LoRA loaded by FluxPipeline.load_lora_weights (which
    converts kohya and XLabs files itself) at `strength`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    config = {k: v for k, v in diffusers_config(PARAMS).items() if k != "_class_name"}
    transformer = FluxTransformer2DModel(**config).to(torch.float64)
    transformer.load_state_dict(bfl_to_diffusers(load_file(flux_path)), strict=True)
    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, None, None, None, None, transformer)
    pipe.load_lora_weights(str(lora_path), adapter_name="test")
    pipe.set_adapters("test", strength)
    x = tiny_inputs(PARAMS, dtype=torch.float64)
    with torch.inference_mode():
        return transformer(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
            timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
            return_dict=False,
        )[0]  # fmt: skip


def with_tiny_width(code: types.CodeType) -> types.CodeType:
    """diffusers' kohya converter hard-codes FLUX.1's 3072 / 12288 (single-block linear1 split): the same code with
    the tiny sizes, nested functions included, so every rule applied is diffusers' own."""

    def swap(c):
        if isinstance(c, types.CodeType):
            return with_tiny_width(c)
        if isinstance(c, tuple):
            return tuple(swap(x) for x in c)
        return {3072: WIDTH, 12288: MLP}.get(c, c) if type(c) is int else c

    return code.replace(co_consts=tuple(swap(c) for c in code.co_consts))


def constants(code: types.CodeType) -> list:
    """Every constant of a code object and the code objects (nested functions) and tuples inside it."""
    found = []
    for c in code.co_consts:
        found += constants(c) if isinstance(c, types.CodeType) else list(c) if isinstance(c, tuple) else [c]
    return found


@pytest.fixture
def tiny_kohya_converter(monkeypatch):
    from diffusers.loaders import lora_pipeline

    convert = lora_pipeline._convert_kohya_flux_lora_to_diffusers
    assert 12288 in constants(convert.__code__), "diffusers' kohya converter changed: re-check its sizes"
    patched = types.FunctionType(with_tiny_width(convert.__code__), convert.__globals__, convert.__name__)
    monkeypatch.setattr(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", patched)


def kohya_lora(model, rank=4, alpha=2.0, split=False, seed=0, blocks_only=False) -> dict:
    """sd-scripts' layout on every Linear: lora_unet_<name>.lora_down / lora_up / alpha. `split`: q, k, v (and the
    single blocks' mlp) trained as separate LoRAs and saved fused, as sd-scripts' split_qkv does (block-diagonal up).
    `blocks_only`: diffusers 0.42 converts the other layers' names without its "transformer." prefix and then drops
    them, so its reference leaves them out (the closed-form test covers kohya names there)."""
    gen, state = torch.Generator().manual_seed(seed), {}
    for name, layer in linears(model).items():
        if blocks_only and "blocks." not in name:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        parts = [WIDTH] * 3 + ([MLP] if name.endswith("linear1") else []) if split and name.endswith(("qkv", "linear1")) else [layer.out_features]
        down = torch.zeros(rank * len(parts), layer.in_features)
        up = torch.zeros(layer.out_features, rank * len(parts))
        start = 0
        for i, size in enumerate(parts):
            block = slice(i * rank, (i + 1) * rank)
            down[block], up[start : start + size, block] = random_pair(gen, size, layer.in_features, rank)
            start += size
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down, up
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def xlabs_lora(rank: int = 4, seed: int = 1) -> dict:
    gen, state = torch.Generator().manual_seed(seed), {}
    modules = [(f"double_blocks.{i}.processor.{n}", out) for i in range(PARAMS.depth)
               for n, out in (("qkv_lora1", 3 * WIDTH), ("qkv_lora2", 3 * WIDTH), ("proj_lora1", WIDTH), ("proj_lora2", WIDTH))]
    modules += [(f"single_blocks.{i}.processor.qkv_lora", 3 * WIDTH) for i in range(PARAMS.depth_single_blocks)]
    for module, out in modules:
        state[f"{module}.down.weight"], state[f"{module}.up.weight"] = random_pair(gen, out, WIDTH, rank)
    return state


def peft_lora(rank: int = 4, alpha: float | None = None, peft_config: dict | None = None) -> dict:
    """diffusers/PEFT names written by peft itself: LoRA on every Linear of diffusers' transformer (separate q, k, v,
    proj_mlp, norm_out with its halves swapped), random B; with `alpha`, per-module .alpha keys as some trainers add;
    `peft_config` (LoraConfig's lora_alpha, alpha_pattern) gets PEFT's whole config filled in, as diffusers saves it."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(2)
    config = {k: v for k, v in diffusers_config(PARAMS).items() if k != "_class_name"}
    transformer = FluxTransformer2DModel(**config)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
               "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
               "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder", "linear_1", "linear_2"]  # fmt: skip
    settings = {"lora_alpha": rank, **(peft_config or {})}
    transformer.add_adapter(LoraConfig(r=rank, target_modules=targets, init_lora_weights=False, **settings))
    state = {f"transformer.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(transformer).items()}
    if peft_config is not None:
        peft_config.update(transformer.peft_config["default"].to_dict())
    if alpha is not None:
        state.update({k.replace(".lora_A.weight", ".alpha"): torch.tensor(alpha) for k in list(state) if ".lora_A." in k})
    return state


@pytest.mark.parametrize("fmt", ["kohya", "kohya-split-qkv", "xlabs", "peft", "peft-alpha"])
def test_matches_diffusers_load_lora_weights(fmt, base, flux_path, tmp_path, request):
    if fmt.startswith("kohya"):
        request.getfixturevalue("tiny_kohya_converter")
    state = {
        "kohya": lambda: kohya_lora(base, blocks_only=True),
        "kohya-split-qkv": lambda: kohya_lora(base, rank=2, alpha=1.0, split=True, blocks_only=True),
        "xlabs": xlabs_lora, "peft": peft_lora, "peft-alpha": lambda: peft_lora(alpha=2.0),
    }[fmt]()  # fmt: skip
    path = tmp_path / f"{fmt}.safetensors"
    save_file(state, str(path))
    strength = 0.7
    patched, _, (report,) = apply_loras(base, [(read_lora(path), strength, 1.0)])
    expected = reference_output(flux_path, path, strength)
    out, plain = run(patched), run(base)
    assert not report.skipped and report.layers > 0 and report.modes == {"merged": report.layers}
    assert (expected - plain).abs().max() > 0.05 * plain.abs().max()  # the LoRA moves the output
    # float64 models; diffusers scales kohya's float32 tensors by alpha / rank in float32 before using them
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6 * expected.abs().max().item())


def test_peft_config_saved_in_the_file_sets_the_scale(base, flux_path, tmp_path):
    """diffusers writes PEFT's config (lora_alpha, alpha_pattern) into the file's metadata and no .alpha keys."""
    config = {"lora_alpha": 10.0, "alpha_pattern": {"proj_mlp": 1.0}}
    state = peft_lora(peft_config=config)
    config = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    path = tmp_path / "peft-config.safetensors"
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)})
    strength = 0.7
    patched, _, (report,) = apply_loras(base, [(read_lora(path), strength, 1.0)])
    expected = reference_output(flux_path, path, strength)
    unscaled = run(apply_loras(base, [(parse_lora(state), strength, 1.0)])[0])  # the config ignored: alpha = rank
    assert not report.skipped and (unscaled - expected).abs().max() > 0.05 * expected.abs().max()
    torch.testing.assert_close(run(patched), expected, rtol=0, atol=1e-6 * expected.abs().max().item())


# --- closed forms -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "lora_unet_"])
@pytest.mark.parametrize("names", [("lora_A", "lora_B"), ("lora_down", "lora_up")])
def test_bfl_and_kohya_names_merge_to_the_closed_form(base, prefix, names):
    gen, state, expected = torch.Generator().manual_seed(3), {}, {k: v.clone() for k, v in base.state_dict().items()}
    strength, alpha, rank = -0.6, 3.0, 4
    layers = ("double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1", "img_in",
              "time_in.out_layer", "guidance_in.in_layer", "vector_in.out_layer", "txt_in", "final_layer.linear")  # fmt: skip
    for layer in layers:
        module = prefix + (layer.replace(".", "_") if prefix == "lora_unet_" else layer)
        out_features, in_features = expected[f"{layer}.weight"].shape
        down, up = random_pair(gen, out_features, in_features, rank)
        state.update({f"{module}.{names[0]}.weight": down, f"{module}.{names[1]}.weight": up, f"{module}.alpha": torch.tensor(alpha)})
        expected[f"{layer}.weight"] += strength * alpha / rank * up.double() @ down.double()
        if layer == "img_in":  # BFL's LinearLora: lora_B has a bias
            state[f"{module}.{names[1]}.bias"] = bias = torch.randn(WIDTH, generator=gen)
            expected["img_in.bias"] += strength * alpha / rank * bias.double()
    patched, _, (report,) = apply_loras(base, [(parse_lora(state), strength, 1.0)])
    assert report.layers == len(layers) and report.formats == ["kohya LoRA" if prefix == "lora_unet_" else "BFL/ComfyUI LoRA"]
    got = patched.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)


def test_lycoris_and_diff_merge_to_their_closed_forms(base):
    """LoHa on kohya names, LoKr on SimpleTuner's diffusers names (q rows of qkv, mlp rows of linear1), full diffs."""
    gen = torch.Generator().manual_seed(4)
    rand = lambda *shape: torch.randn(*shape, generator=gen) / 8  # noqa: E731
    expected = {k: v.clone() for k, v in base.state_dict().items()}
    s = 0.8
    loha = {f"hada_w{i}_{ab}": rand(*shape) for i in (1, 2) for ab, shape in (("a", (WIDTH, 2)), ("b", (2, WIDTH)))}
    state = {f"lora_unet_double_blocks_0_img_attn_proj.{k}": v for k, v in loha.items()}
    state["lora_unet_double_blocks_0_img_attn_proj.alpha"] = torch.tensor(1.0)
    w = {k: v.double() for k, v in loha.items()}
    expected["double_blocks.0.img_attn.proj.weight"] += s * 0.5 * (w["hada_w1_a"] @ w["hada_w1_b"]) * (w["hada_w2_a"] @ w["hada_w2_b"])
    for module, rows, out in (("transformer_blocks_1_attn_to_q", slice(0, WIDTH), WIDTH), ("single_transformer_blocks_1_proj_mlp", slice(3 * WIDTH, None), MLP)):
        w1, w2_a, w2_b = rand(4, 4), rand(out // 4, 3), rand(3, WIDTH // 4)
        state.update({f"lycoris_{module}.lokr_w1": w1, f"lycoris_{module}.lokr_w2_a": w2_a,
                      f"lycoris_{module}.lokr_w2_b": w2_b, f"lycoris_{module}.alpha": torch.tensor(6.0)})  # fmt: skip
        layer = "double_blocks.1.img_attn.qkv" if "to_q" in module else "single_blocks.1.linear1"
        expected[f"{layer}.weight"][rows] += s * 6.0 / 3 * torch.kron(w1.double(), w2_a.double() @ w2_b.double())
    diff, diff_b = rand(WIDTH, 32), rand(WIDTH)
    state.update({"diffusion_model.vector_in.in_layer.diff": diff, "diffusion_model.vector_in.in_layer.diff_b": diff_b})
    expected["vector_in.in_layer.weight"] += s * diff.double()
    expected["vector_in.in_layer.bias"] += s * diff_b.double()
    patched, _, (report,) = apply_loras(base, [(parse_lora(state), s, 1.0)])
    assert report.layers == 4 and set(report.formats) == {"kohya LoHa", "SimpleTuner LyCORIS LoKr", "BFL/ComfyUI diff"}
    got = patched.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-12, msg=key)


# --- stacking, strength 0, the base model ------------------------------------------------------------------------------


def test_strength_zero_is_the_base_model_exactly_and_the_base_is_never_changed(base):
    before = {k: (v.data_ptr(), v.clone()) for k, v in base.state_dict().items()}
    plain = run(base)
    lora = parse_lora(kohya_lora(base))
    zero, _, _ = apply_loras(base, [(lora, 0.0, 1.0)])
    assert torch.equal(run(zero), plain)
    patched, _, _ = apply_loras(base, [(lora, 1.0, 1.0)])
    assert not torch.equal(run(patched), plain)
    assert torch.equal(run(base), plain)
    for key, value in base.state_dict().items():
        assert value.data_ptr() == before[key][0] and torch.equal(value, before[key][1]), key
    # the patched model shares every tensor the LoRA does not touch
    shared = {k for k, v in patched.state_dict().items() if v.data_ptr() == before[k][0]}
    assert shared == {k for k in before if not k.endswith(".weight")}  # every Linear weight has a LoRA here


def test_loras_stack_in_order_chained_or_at_once(base):
    a, b = parse_lora(kohya_lora(base, seed=5)), parse_lora(xlabs_lora(seed=6))
    at_once, _, reports = apply_loras(base, [(a, 0.5, 1.0), (b, -1.2, 1.0)])
    first, _, _ = apply_loras(base, [(a, 0.5, 1.0)])
    chained, _, _ = apply_loras(first, [(b, -1.2, 1.0)])
    assert [r.name for r in reports] == [a.name, b.name]
    qkv = "double_blocks.0.img_attn.qkv.weight"
    da = at_once.state_dict()[qkv] - base.state_dict()[qkv]
    assert da.abs().max() > 0
    torch.testing.assert_close(chained.state_dict()[qkv], at_once.state_dict()[qkv], rtol=0, atol=1e-12)
    torch.testing.assert_close(run(chained), run(at_once), rtol=0, atol=1e-9)
    assert first.state_dict()[qkv].data_ptr() != chained.state_dict()[qkv].data_ptr()  # the first link is unchanged


# --- fp8: a side path, never re-rounded ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_models(tmp_path_factory):
    """(fp8 model, float32 model of the very weights the fp8 file dequantises to)."""
    folder = tmp_path_factory.mktemp("fp8")
    dequantised = write_flux_fp8(folder / "fp8.safetensors", PARAMS, scaled="weight_scale")
    save_file(dequantised, str(folder / "float.safetensors"))
    return load_flux(folder / "fp8.safetensors", dtype=torch.float32), load_flux(folder / "float.safetensors", dtype=torch.float32)


def test_fp8_keeps_loras_as_a_side_path_matching_the_float32_merge(fp8_models):
    fp8, full = fp8_models
    low_rank = kohya_lora(fp8, seed=7)
    loha = {f"single_blocks.1.linear2.hada_w{i}_{ab}": torch.randn(*shape, generator=torch.Generator().manual_seed(i)) / 8
            for i in (1, 2) for ab, shape in (("a", (WIDTH, 2)), ("b", (2, WIDTH + MLP)))}  # fmt: skip
    lora = parse_lora({**low_rank, **loha})
    patched, _, (report,) = apply_loras(fp8, [(lora, 0.9, 1.0)])
    merged, _, _ = apply_loras(full, [(lora, 0.9, 1.0)])
    assert report.modes == {"side path": report.layers - 1, "merged": 1}  # LoHa is full rank: merged in float32
    for name, layer in linears(patched).items():
        base_layer = fp8.get_submodule(name)
        if name == "single_blocks.1.linear2":
            assert layer.weight.dtype == torch.float32 and layer.weight_scale is None
        else:
            assert layer.weight is base_layer.weight and layer.weight.dtype == torch.float8_e4m3fn
            assert layer.lora_up is not None and base_layer.lora_up is None
    expected = run(merged, torch.float32)
    assert (expected - run(full, torch.float32)).abs().max() > 0.05 * expected.abs().max()
    torch.testing.assert_close(run(patched, torch.float32), expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    # a second LoRA on top keeps the first one's side path and adds its own ranks
    twice, _, _ = apply_loras(patched, [(parse_lora(xlabs_lora()), 1.0, 1.0)])
    qkv = twice.double_blocks[0].img_attn.qkv
    assert qkv.lora_down.shape[0] == patched.double_blocks[0].img_attn.qkv.lora_down.shape[0] + 4


@pytest.mark.parametrize("grid", [(3, 4), MANY], ids=["side paths", "merged per call"])
def test_fp8_loras_compile_without_graph_breaks(fp8_models, grid):
    patched, _, _ = apply_loras(fp8_models[0], [(parse_lora(kohya_lora(fp8_models[0], seed=8)), 1.0, 1.0)])
    torch._dynamo.reset()
    eager = run(patched, torch.float32, grid)
    compiled = run(patched.twin().compile_blocks(backend="aot_eager", fullgraph=True), torch.float32, grid)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    torch._dynamo.reset()


class LoraCalls(TorchDispatchMode):
    """Counts how the LoRAs of `model` are added: into a weight (addmm_(weight, up, down): a stored lora_down is the
    second factor) or beside it (addmm_(output, hidden, up^T): a stored lora_up, or its rows). Other addmm_ calls
    (linear2's accumulating GEMMs on CUDA) are not LoRAs."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        layers = [m for m in linears(model).values() if m.lora_down is not None]
        self.downs = {m.lora_down.untyped_storage().data_ptr() for m in layers}
        self.ups = {m.lora_up.untyped_storage().data_ptr() for m in layers}
        self.merged = self.side = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.addmm_.default:
            storage = args[2].untyped_storage().data_ptr()
            self.merged += storage in self.downs
            self.side += storage in self.ups
        return func(*args, **(kwargs or {}))


def stored_bytes(model) -> dict[str, torch.Tensor]:
    """A copy of every fp8 / GGUF-block tensor of `model`, as bytes."""
    narrow = (torch.float8_e4m3fn, torch.uint8)
    return {k: v.view(torch.uint8).clone() for k, v in model.state_dict().items() if v.dtype in narrow}


def assert_merged_per_call_where_cheaper(patched, merged, monkeypatch) -> torch.Tensor:
    """`patched` (fp8 / GGUF weights, LoRAs kept low rank) at MANY tokens merges some LoRAs per call and keeps the
    side path for others, matching the side path everywhere and `merged` (the same LoRAs merged into float32
    weights: the closed form); the stored weights are left bit for bit. Returns the output."""
    before = stored_bytes(patched)
    with LoraCalls(patched) as calls:
        out = run(patched, torch.float32, MANY)
    assert calls.merged > 0 and calls.side > 0
    expected = run(merged, torch.float32, MANY)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    with monkeypatch.context() as patch, LoraCalls(patched) as calls:
        patch.setattr(Linear, "merge_lora_per_call", False)
        side = run(patched, torch.float32, MANY)
    assert calls.merged == 0 and calls.side > 0
    torch.testing.assert_close(out, side, rtol=0, atol=1e-5 * expected.abs().max().item())
    after = stored_bytes(patched)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return out


def assert_closed_form_per_call(layer: Linear, base_layer: Linear, weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor):  # fmt: skip
    """A fused linear1 with a LoRA (`weight`: its stored weight dequantised, float32; `up` scaled) and the same layer
    without: every call Flux makes (all rows; the qkv rows; the mlp rows with GELU), merged per call (512 tokens) and
    by the side path (8 tokens), is x (weight + up down)^T + bias; the stored weight is left bit for bit; an all-zero
    LoRA merged per call gives the plain layer's output exactly."""
    x = torch.randn(512, layer.in_features, generator=torch.Generator().manual_seed(13))
    stored, calls = layer.weight.view(torch.uint8).clone(), [(None, False), (slice(0, 3 * WIDTH), False), (slice(3 * WIDTH, None), True)]  # fmt: skip
    for rows, gelu in calls:
        picked = slice(None) if rows is None else rows
        expected, plain = (F.linear(x, w[picked], layer.bias[picked]) for w in (weight + up @ down, weight))
        if gelu:
            expected, plain = F.gelu(expected, approximate="tanh"), F.gelu(plain, approximate="tanh")
        assert (expected - plain).abs().max() > 0.05 * expected.abs().max()  # the LoRA shows
        for tokens, way in ((512, (1, 0)), (8, (0, 1))):
            with torch.inference_mode(), LoraCalls(layer) as counted:
                got = layer(x[:tokens], gelu, rows)
            assert (counted.merged, counted.side) == way
            torch.testing.assert_close(got, expected[:tokens], rtol=0, atol=1e-5 * expected.abs().max().item())
    assert torch.equal(layer.weight.view(torch.uint8), stored)
    lora_up, layer.lora_up = layer.lora_up, torch.zeros_like(layer.lora_up)
    with torch.inference_mode():
        assert all(torch.equal(layer(x, gelu, rows), base_layer(x, gelu, rows)) for rows, gelu in calls)
    layer.lora_up = lora_up


def test_fp8_loras_merge_per_call_where_cheaper(fp8_models, monkeypatch):
    fp8, full = fp8_models
    lora = parse_lora(kohya_lora(fp8, seed=11))
    patched, _, (report,) = apply_loras(fp8, [(lora, 0.9, 1.0)])
    merged, _, _ = apply_loras(full, [(lora, 0.9, 1.0)])
    assert report.modes == {"side path": report.layers}  # kept low rank: how each call applies it is the layer's
    assert_merged_per_call_where_cheaper(patched, merged, monkeypatch)
    zero, _, _ = apply_loras(fp8, [(lora, 0.0, 1.0)])
    assert torch.equal(run(zero, torch.float32, MANY), run(fp8, torch.float32, MANY))


def test_fp8_per_call_merge_is_the_closed_form_on_every_rows_slice(fp8_models):
    fp8 = fp8_models[0]
    strength, alpha, rank = -0.7, 3.0, 4
    state = kohya_lora(fp8, rank=rank, alpha=alpha, seed=12)
    patched, _, _ = apply_loras(fp8, [(parse_lora(state), strength, 1.0)])
    layer, base_layer = patched.single_blocks[0].linear1, fp8.single_blocks[0].linear1
    assert layer.weight is base_layer.weight and abs(float(base_layer.weight_scale) - 1) > 0.5  # a lost scale shows
    key = "lora_unet_single_blocks_0_linear1"
    up = strength * alpha / rank * state[f"{key}.lora_up.weight"]
    weight = base_layer.weight.float() * base_layer.weight_scale
    assert_closed_form_per_call(layer, base_layer, weight, up, state[f"{key}.lora_down.weight"])


def test_fp8_loras_keep_the_side_path_under_autograd(fp8_models):
    patched, _, _ = apply_loras(fp8_models[0], [(parse_lora(kohya_lora(fp8_models[0], seed=14)), 1.0, 1.0)])
    layer = patched.double_blocks[0].img_attn.qkv
    x = torch.randn(512, WIDTH, requires_grad=True)
    with LoraCalls(layer) as calls:
        layer(x).square().sum().backward()
    assert (calls.merged, calls.side) == (0, 1)
    weight = layer.weight.float() * layer.weight_scale + layer.lora_up @ layer.lora_down
    expected = 2 * F.linear(x.detach(), weight, layer.bias) @ weight
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_loras_on_the_gpu_merged_per_call_side_paths_fp8_matmuls_compiled(tmp_path, monkeypatch):
    """bfloat16 on CUDA, against the float32 merge on the CPU: per-call merges (eager and Inductor), side paths only,
    fp8 matmuls (side paths: no upcast weight to add into). Run on a GPU: pytest tests/test_lora.py -k gpu."""
    weights = write_flux_fp8(tmp_path / "fp8.safetensors", PARAMS, scaled="weight_scale")
    save_file(weights, str(tmp_path / "float.safetensors"))
    model = load_flux(tmp_path / "fp8.safetensors", dtype=torch.bfloat16)
    lora = parse_lora(kohya_lora(model, seed=17))
    full = load_flux(tmp_path / "float.safetensors", dtype=torch.float32)
    expected = run(apply_loras(full, [(lora, 1.0, 1.0)])[0], torch.float32, MANY).double()
    patched = apply_loras(model, [(lora, 1.0, 1.0)])[0].to("cuda")
    x = tiny_inputs(PARAMS, rows=MANY[0], cols=MANY[1])  # float32: Flux embeds t before rounding (t rounded moves it)
    x = {k: None if v is None else v.cuda() for k, v in x.items()}
    error = lambda out: ((out.double().cpu() - expected).norm() / expected.norm()).item()  # noqa: E731
    qkv = patched.double_blocks[0].img_attn.qkv
    fused = kernels.upcast_fits(qkv.weight.cuda(), torch.bfloat16, qkv.lora_down.shape[0])
    with torch.inference_mode():
        with LoraCalls(patched) as calls:  # with Triton every call upcasts and adds its LoRA in one kernel
            merged = patched(**x)
        assert error(merged) < 0.03
        assert (calls.merged, calls.side) == (0, 0) if fused else calls.merged > 0 and calls.side > 0
        with monkeypatch.context() as patch, LoraCalls(patched) as calls:
            patch.setattr(kernels, "upcast_fits", lambda *args: False)  # PyTorch's ops: merged where cheaper
            assert error(patched(**x)) < 0.03 and calls.merged > 0 and calls.side > 0
        with monkeypatch.context() as patch, LoraCalls(patched) as calls:
            patch.setattr(Linear, "merge_lora_per_call", False)
            assert error(patched(**x)) < 0.03 and calls.merged == 0
        torch._dynamo.reset()
        assert error(patched.twin().compile_blocks(fullgraph=True)(**x)) < 0.03
        torch._dynamo.reset()
        assert enable_fp8_matmul(patched) > 0
        with LoraCalls(patched) as calls:
            assert error(patched(**x)) < 0.15 and calls.merged == 0 and calls.side > 0  # 8-bit inputs; no LoRA: 0.46


def test_float_side_paths_never_merge_into_the_stored_weight(base):
    """merge=False on float weights: no per-call temporary to add into (the stored weight is used as it is)."""
    lora = parse_lora(kohya_lora(base, seed=15))
    side, _, (report,) = apply_loras(base, [(lora, 0.8, 1.0)], merge=False)
    merged, _, _ = apply_loras(base, [(lora, 0.8, 1.0)])
    assert report.modes == {"side path": report.layers}
    before = {k: v.clone() for k, v in side.state_dict().items()}
    with LoraCalls(side) as calls:
        out = run(side, grid=MANY)
    assert calls.merged == 0 and calls.side == report.layers + PARAMS.depth_single_blocks  # linear1 runs twice
    assert all(torch.equal(v, before[k]) for k, v in side.state_dict().items())
    expected = run(merged, grid=MANY)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9 * expected.abs().max().item())


# --- wrong files, partial matches -----------------------------------------------------------------------------------------


def unet_lora(sdxl: bool) -> dict:
    state = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
             "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(3072, 4)}  # fmt: skip
    if sdxl:
        state.update({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
                      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)})  # fmt: skip
    return state


@pytest.mark.parametrize("state, message", [
    (unet_lora(sdxl=False), "seems made for Stable Diffusion 1.x / 2.x"),
    (unet_lora(sdxl=True), "seems made for SDXL"),
    ({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, 3072),
      "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(9216, 2)}, "seems made for FLUX.1 (3072 wide)"),
    ({"transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight": torch.zeros(2, 3072),
      "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight": torch.zeros(12288, 2)}, "seems made for Qwen-Image"),
    ({"some.layer.lora_A.weight": torch.zeros(2, 8), "some.layer.lora_B.weight": torch.zeros(8, 2)}, "none of its layer names"),
    ({"double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(2, WIDTH)}, "holds no LoRA adapters"),
])  # fmt: skip
def test_loras_for_other_models_fail_naming_the_model(base, state, message):
    with pytest.raises(CheckpointError, match=re.escape(message)) as info:
        apply_loras(base, [(parse_lora(state, "other.safetensors"), 1.0, 1.0)])
    assert "other.safetensors" in str(info.value)


def test_partial_matches_are_reported_and_model_files_refused(base, flux_path, tmp_path):
    state = kohya_lora(base)
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(4, WIDTH)  # a deeper model's block
    state["lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight"] = torch.zeros(3 * WIDTH, 4)
    state["lora_unet_img_in.dora_scale"] = torch.ones(WIDTH, 1)  # DoRA: the whole module is skipped
    state["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(4, 32)
    state["lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(32, 4)
    _, encoders, (report,) = apply_loras(base, [(parse_lora(state, "partial"), 1.0, 1.0)])
    assert encoders is None and report.layers == len(linears(base)) - 1
    assert report.skipped == {
        "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight": "no such layer in this model",
        "lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight": "no such layer in this model",
        **dict.fromkeys([f"lora_unet_img_in.{p}" for p in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")], "DoRA is not supported"),
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": "T5 parts are not applied",
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": "T5 parts are not applied",
    }
    assert "8 keys skipped" in str(report)
    with pytest.raises(CheckpointError, match="is a Flux transformer .*, not a LoRA"):
        read_lora(flux_path)


# --- CLIP-L ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_encoders(tmp_path_factory):
    """(our TextEncoders from tiny clip_l / t5 files, the float32 CLIP-L weights written)."""
    folder = tmp_path_factory.mktemp("text")
    clip = write_clip_l(folder / "clip_l.safetensors", dtype=torch.float32, extras=False)
    write_t5(folder / "t5.safetensors", dtype=torch.float32)
    encoders = load_text_encoders(folder / "clip_l.safetensors", folder / "t5.safetensors", dtype=torch.float32)
    return encoders, clip


def clip_lora(encoders, kohya: bool, rank: int = 2, seed: int = 9) -> dict:
    """kohya's lora_te1_<name> + alpha, or diffusers' text_encoder.<name>.lora_A / lora_B, on every CLIP-L Linear."""
    gen, state = torch.Generator().manual_seed(seed), {}
    for name, layer in encoders.clip.named_modules():
        if isinstance(layer, Linear):
            dotted = "text_model." + name.removeprefix("text_model.")
            down, up = random_pair(gen, layer.out_features, layer.in_features, rank)
            if kohya:
                key = "lora_te1_" + dotted.replace(".", "_")
                state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)})
            else:
                state.update({f"text_encoder.{dotted}.lora_A.weight": down, f"text_encoder.{dotted}.lora_B.weight": up})
    return state


@pytest.mark.parametrize("kohya", [True, False], ids=["kohya", "diffusers"])
def test_clip_parts_match_diffusers_on_transformers_clip(kohya, base, text_encoders, tmp_path, request):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    if kohya:
        request.getfixturevalue("tiny_kohya_converter")
    encoders, weights = text_encoders
    state = {**kohya_lora(base, blocks_only=True), **clip_lora(encoders, kohya)} if kohya else clip_lora(encoders, kohya)
    save_file(state, str(tmp_path / "clip.safetensors"))
    model, patched, (report,) = apply_loras(base, [(read_lora(tmp_path / "clip.safetensors"), 0.6, 0.6)], encoders)
    assert report.clip_layers == 12 and not report.skipped
    assert patched.t5 is not encoders.t5 and patched.t5.shared.weight is encoders.t5.shared.weight
    reference = CLIPTextModel(tiny_clip_config()).eval()
    nest = "text_model." if hasattr(reference, "text_model") else ""  # transformers 5 keeps no text_model.
    reference.load_state_dict({nest + k.removeprefix("text_model."): v for k, v in weights.items()})
    config = {k: v for k, v in diffusers_config(PARAMS).items() if k != "_class_name"}
    pipe = FluxPipeline(FlowMatchEulerDiscreteScheduler(), None, reference, None, None, None, FluxTransformer2DModel(**config))
    pipe.load_lora_weights(str(tmp_path / "clip.safetensors"), adapter_name="test")
    pipe.set_adapters("test", 0.6)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected, plain = reference(input_ids=ids).pooler_output, encoders.clip(input_ids=ids).pooler_output
        got = patched.clip(input_ids=ids).pooler_output
    assert (expected - plain).abs().max() > 0.05 * plain.abs().max()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    without, same, (skipped,) = apply_loras(base, [(read_lora(tmp_path / "clip.safetensors"), 0.6, 0.6)])
    assert same is None and set(skipped.skipped.values()) == {"CLIP-L part, no text encoders given"}


# --- the node and the shipped workflow --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_models(models, pack):  # noqa: F811
    """test_nodes' tiny models folder, with flux_lora.safetensors (kohya: transformer and CLIP-L parts) in loras/."""
    from test_nodes import node

    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    encoders = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "cpu")[0]
    (models / "loras").mkdir(exist_ok=True)
    save_file({**kohya_lora(model), **clip_lora(encoders.encoders, kohya=True)}, str(models / "loras" / "flux_lora.safetensors"))
    return models, model, encoders


def test_node_applies_chains_and_reads_the_file_once(pack, lora_models, monkeypatch):
    _, model, encoders = lora_models
    module = sys.modules[pack.__name__ + ".nodes.lora"]
    reads = []
    monkeypatch.setattr(module, "read_lora", lambda path: reads.append(path) or read_lora(path))
    module.PARSED.entries.clear()
    loader = pack.NODE_CLASS_MAPPINGS["FluxKitLoraLoader"]
    assert loader.INPUT_TYPES()["required"]["lora_name"][0] == ["flux_lora.safetensors"]
    once, te = loader().apply(model, "flux_lora.safetensors", 0.5, encoders, 0.5)
    twice, te2 = loader().apply(once, "flux_lora.safetensors", 0.25, te, 1.0, "side path")
    at_once, _, _ = apply_loras(model, [(read_lora(lora_models[0] / "loras" / "flux_lora.safetensors"), 0.75, 1.0)])
    assert len(reads) == 1  # a new strength, the same parsed file
    qkv = "double_blocks.0.img_attn.qkv"
    assert twice.get_submodule(qkv).lora_up is not None and once.get_submodule(qkv).lora_up is None
    torch.testing.assert_close(run(twice, torch.float32), run(at_once, torch.float32), rtol=0, atol=1e-5)
    assert te2.device == encoders.device and te2.encoders.clip is not encoders.encoders.clip
    model_only, no_encoders = loader().apply(model, "flux_lora.safetensors", 1.0)
    assert no_encoders is None and loader.IS_CHANGED(lora_name="flux_lora.safetensors", strength_model=1.0)


def test_lora_workflow_runs_headless(pack, lora_models, tmp_path):
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    argv = ["run", str(REPO / "workflows" / "flux_dev_lora.json"), "--models", str(lora_models[0]), "--output", str(tmp_path),
            "--set", "6.steps=2", "--set", "5.width=64", "--set", "5.height=48", "--set", "9.strength_model=0.8"]  # fmt: skip
    assert runner.main(argv) == 0
    (png,) = tmp_path.rglob("*.png")
    prompt = json.loads(Image.open(png).text["prompt"])
    assert prompt["9"]["class_type"] == "FluxKitLoraLoader" and prompt["9"]["inputs"]["strength_model"] == 0.8


def test_a_lora_twin_gets_a_placement_of_its_own_when_streaming():
    """A placed (streamed) base and its LoRA twin: the twin's merged layers are not the base's, so it cannot use the
    base's placement; placing it sends the base home first, and the base placed again is the same as before."""
    torch.manual_seed(0)
    model = Flux(tiny_params(depth=3, depth_single_blocks=4)).eval()
    plain = run(model, torch.float32)
    placement = streaming.place(model, "cpu", model.blocks(), block_budget(model, streamed=3), kind="transformer")
    assert placement.streamed and streaming.placement_of(model.twin()) is placement  # same tensors: shared
    twin, _, _ = apply_loras(model, [(parse_lora(kohya_lora(model, seed=10)), 1.0, 1.0)])
    expected = run(twin, torch.float32)
    assert streaming.placement_of(twin) is None
    own = streaming.place(twin, "cpu", twin.blocks(), block_budget(twin, streamed=3), kind="transformer")
    assert own is not placement and own.streamed and not placement.resident  # the base went home first
    assert own.ids == {id(t) for t in (*twin.parameters(), *twin.buffers())}
    assert torch.equal(run(twin, torch.float32), expected) and not torch.equal(expected, plain)
    streaming.unload(model)  # the base's weights home: the twin's placement holds some of them, so it goes too
    assert not own.resident
    assert streaming.place(model, "cpu", model.blocks(), block_budget(model, streamed=3), kind="transformer") is placement
    assert torch.equal(run(model, torch.float32), plain)
    streaming.unload(model)
