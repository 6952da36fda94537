"""The Flux transformer: params, presets, input checks, its math pieces, and parity with diffusers."""
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_flux import bfl_to_diffusers, diffusers_config, tiny_inputs, tiny_params, write_flux_bfl

from flux_core import math as flux_math
from flux_core.layers import EmbedND
from flux_core.loading import load_flux
from flux_core.math import apply_rope, rope, timestep_embedding
from flux_core.model import PRESETS, Flux, FluxParams, preset


def test_seed_usage_example_runs_as_written():
    # The seq2seq example of the issue, verbatim: a plain call, gradients on (about 12 s on a 2-core CPU).
    params = FluxParams(
        in_channels=2, out_channels=2, vec_in_dim=4, context_in_dim=4, hidden_size=1024, mlp_ratio=4.0,
        num_heads=8, depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
        guidance_embed=False,
    )  # fmt: skip
    model = Flux(params)
    data = torch.randn(2, 1024, 2)
    cond = torch.randn(2, 1024, 4)
    ids = torch.randint(0, 32, (2, 1024, 3)).float()
    timesteps = torch.rand(2)
    y = torch.randn(2, 4)
    out = model(data, ids, cond, ids, timesteps, y)
    assert out.shape == (2, 1024, 2) and out.isfinite().all() and out.requires_grad
    assert params == PRESETS["seq2seq-points"]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_heads=7), "not divisible by num_heads"),
        (dict(axes_dim=[16, 56, 48]), "must be even sizes summing to the head dim"),
        (dict(axes_dim=[15, 57, 56]), "must be even sizes"),
        (dict(hidden_size=0), "hidden_size must be >= 1"),
        (dict(depth=-1), "depth must be >= 0"),
        (dict(mlp_ratio=0.0), "mlp_ratio must be > 0"),
    ],
)
def test_params_are_validated(change, message):
    with pytest.raises(ValueError, match=message):
        tiny_params(**change)


def test_presets_match_the_official_checkpoints():
    with torch.device("meta"):
        models = {name: Flux(p) for name, p in PRESETS.items() if name.startswith("flux")}
    shapes = {name: {k: tuple(v.shape) for k, v in m.state_dict().items()} for name, m in models.items()}
    assert len(shapes["flux-dev"]) == 780 and len(shapes["flux-schnell"]) == 776
    assert set(shapes["flux-dev"]) - set(shapes["flux-schnell"]) == {
        f"guidance_in.{layer}.{p}" for layer in ("in_layer", "out_layer") for p in ("weight", "bias")
    }
    n_params = sum(p.numel() for p in models["flux-dev"].parameters())
    assert 11.90e9 < n_params < 11.91e9
    dev = shapes["flux-dev"]
    for key, shape in {
        "img_in.weight": (3072, 64),
        "txt_in.weight": (3072, 4096),
        "vector_in.in_layer.weight": (3072, 768),
        "double_blocks.18.img_mod.lin.weight": (18432, 3072),
        "double_blocks.0.txt_attn.qkv.bias": (9216,),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.txt_mlp.2.weight": (3072, 12288),
        "single_blocks.37.linear1.weight": (21504, 3072),
        "single_blocks.0.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.lin.weight": (9216, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
        "final_layer.linear.weight": (64, 3072),
    }.items():
        assert dev[key] == shape, key
    assert shapes["flux-dev-fill"]["img_in.weight"] == (3072, 384)
    assert shapes["flux-dev-canny"]["img_in.weight"] == shapes["flux-dev-depth"]["img_in.weight"] == (3072, 128)
    assert PRESETS["flux-dev-krea"] == PRESETS["flux-dev-kontext"] == PRESETS["flux-dev"]
    assert preset("flux-dev", in_channels=128) == PRESETS["flux-dev-canny"]
    with pytest.raises(KeyError, match="unknown Flux preset 'flux-pro'; known: flux-dev"):
        preset("flux-pro")


def test_guidance_and_y_are_checked():
    model = Flux(tiny_params(guidance=True, depth=1, depth_single_blocks=1))
    inputs = tiny_inputs(model.params)
    with pytest.raises(ValueError, match="guidance-distilled .* pass guidance"):
        model(**{**inputs, "guidance": None})
    schnell = Flux(tiny_params(guidance=False, depth=1, depth_single_blocks=1))
    with pytest.raises(ValueError, match="no guidance embedding .* pass guidance=None"):
        schnell(**{**tiny_inputs(schnell.params), "guidance": torch.ones(1)})
    with pytest.raises(ValueError, match=r"y must be \(1, 32\)"):
        model(**{**inputs, "y": torch.ones(1, 31)})
    with pytest.raises(ValueError, match="pack latents into 2x2 patches"):
        model(**{**inputs, "img": torch.ones(1, 16, 8, 8)})
    with torch.inference_mode():
        without_y = model(**{**inputs, "y": None})  # y is optional: no pooled vector added
        assert not torch.allclose(without_y, model(**inputs))


# Parity with diffusers' FluxTransformer2DModel: the same BFL file, loaded by our loader and converted by diffusers'
# own converter (see tiny_flux.bfl_to_diffusers for its hard-coded width); diffusers takes 2-D ids, t in [0, 1]
# and guidance in BFL units (it multiplies both by 1000 itself).
PARITY_CASES = {
    "dev": (dict(guidance=True), dict()),
    "schnell": (dict(guidance=False), dict()),
    "non-square": (dict(guidance=True), dict(rows=2, cols=7)),
    "batch-2": (dict(guidance=True), dict(batch=2)),
    "in-128": (dict(guidance=True, in_channels=128), dict()),
}


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 5e-5), (torch.float64, 1e-6)])
@pytest.mark.parametrize("case", PARITY_CASES)
def test_matches_diffusers(tmp_path, case, dtype, tolerance):
    from diffusers import FluxTransformer2DModel

    param_args, input_args = PARITY_CASES[case]
    params = tiny_params(**param_args)
    path = tmp_path / "flux.safetensors"
    write_flux_bfl(path, params, dtype=dtype)
    ours = load_flux(path, dtype=dtype)
    config = {k: v for k, v in diffusers_config(params).items() if k != "_class_name"}
    reference = FluxTransformer2DModel(**config).to(dtype)
    reference.load_state_dict(bfl_to_diffusers(load_file(path)), strict=True)
    x = tiny_inputs(params, dtype=dtype, **input_args)
    with torch.inference_mode():
        out = ours(**x)
        expected = reference(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
            timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
            return_dict=False,
        )[0]  # fmt: skip
    assert out.shape == expected.shape == (x["img"].shape[0], x["img"].shape[1], 64)
    assert expected.abs().max() > 1  # the random weights make a non-trivial output
    relative = ((out - expected).abs().max() / expected.abs().max()).item()
    assert relative <= tolerance, f"{case} {dtype}: relative error {relative:.2e}"


def test_bf16_tracks_float32(tmp_path):
    params = tiny_params()
    write_flux_bfl(tmp_path / "flux.safetensors", params, dtype=torch.bfloat16)
    x = tiny_inputs(params)
    with torch.inference_mode():
        full = load_flux(tmp_path / "flux.safetensors", dtype=torch.float32)(**x)
        half = load_flux(tmp_path / "flux.safetensors", dtype=torch.bfloat16)(**x)
    assert half.dtype == torch.bfloat16
    assert ((half.float() - full).abs().max() / full.abs().max()).item() < 0.05


def test_rope_rotates_adjacent_pairs_per_axis():
    dim, theta = 8, 10_000
    pos = torch.tensor([[0.0, 1.0, 7.0, 123.0]], dtype=torch.float64)  # (B, L)
    x = torch.randn(1, 4, 2, dim, dtype=torch.float64)  # (B, L, H, D)
    rotated = apply_rope(x, rope(pos, dim, theta)[:, :, None])
    omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (D/2,)
    angle = (pos[0, :, None] * omega)[None, :, None]  # (1, L, 1, D/2)
    cos, sin = angle.cos(), angle.sin()
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(rotated[..., 0::2], cos * even - sin * odd, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotated[..., 1::2], sin * even + cos * odd, rtol=0, atol=1e-12)
    assert apply_rope(x.to(torch.bfloat16), rope(pos.float(), dim, theta)[:, :, None]).dtype == torch.float32
    # Each axis has its own band of the head dim, with frequencies restarting at j = 0.
    ids = torch.tensor([[[3.0, 5.0, 11.0]]])
    bands = EmbedND(theta, [16, 56, 56])(ids)[0, 0, 0]  # (64, 2) cos | sin
    for start, size, axis in ((0, 8, 0), (8, 28, 1), (36, 28, 2)):
        expected = ids[0, 0, axis] * theta ** (-torch.arange(0, 2 * size, 2, dtype=torch.float64) / (2 * size))
        torch.testing.assert_close(bands[start : start + size, 1].double(), expected.sin(), rtol=0, atol=1e-6)
        torch.testing.assert_close(bands[start : start + size, 0].double(), expected.cos(), rtol=0, atol=1e-6)


def test_compiled_rope_takes_the_real_form_with_the_same_result(monkeypatch):
    pos = torch.rand(2, 6) * 50
    x = torch.randn(2, 6, 3, 16)
    pe = rope(pos, 16, 10_000)[:, :, None]
    eager = apply_rope(x, pe)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, pe), eager, rtol=0, atol=1e-6)


def test_compile_blocks_compiles_each_block_kind_once_without_graph_breaks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests' compilations in this process count otherwise
    params = tiny_params()
    model = Flux(params).eval()
    x = tiny_inputs(params)
    with torch.inference_mode():
        eager = model(**x)
        compiled = model.compile_blocks(backend="aot_eager", fullgraph=True)(**x)  # fullgraph: a break raises
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # one double, one single block graph
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5 * eager.abs().max().item())
    torch._dynamo.reset()


def test_timestep_embedding_is_cos_first_and_scaled_by_1000():
    t = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(t, 256)
    freqs = [math.exp(-math.log(10_000) * i / 128) for i in range(128)]
    args = torch.tensor([[1000 * v * f for f in freqs] for v in t.tolist()])
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=-1), rtol=0, atol=3e-4)
    assert emb[0, :128].eq(1).all() and emb[0, 128:].eq(0).all()
    odd = timestep_embedding(t, 7)
    assert odd.shape == (3, 7) and odd[:, -1].eq(0).all()
    assert timestep_embedding(t.to(torch.bfloat16), 256).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_matches_sdpa(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 37, 3, 128, generator=gen) for _ in range(3))  # (B, L, H, D)
    expected = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    expected = expected.transpose(1, 2).flatten(2)
    monkeypatch.setattr(flux_math, "_MAX_SCORES", 10 * 37)  # 10-row score blocks: the last one partial
    with torch.inference_mode():
        out = flux_math.attention(q, k, v.to(dtype))
    assert out.dtype == dtype and out.shape == (2, 37, 3 * 128)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert ((out.float() - expected).abs().max() / expected.abs().max()).item() < tolerance


def test_gradients_flow_outside_inference():
    model = Flux(tiny_params(depth=1, depth_single_blocks=1))
    model(**tiny_inputs(model.params)).square().mean().backward()
    for name in ("single_blocks.0.linear1.weight", "double_blocks.0.txt_attn.norm.key_norm.scale", "img_in.bias"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.isfinite().all() and grad.abs().max() > 0, name
