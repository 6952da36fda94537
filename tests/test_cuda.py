"""The CUDA-only paths (GELU in the GEMM epilogue, split linear2, fp8 matmuls, compiled blocks, the channels-last
AE, CUDA graphs, training without host syncs) against the plain math they replace. Skipped without a GPU: run on one with `python -m pytest tests/test_cuda.py`."""
import pytest
import torch
import torch.nn.functional as F
from tiny_ae import random_ae_weights, tiny_ae_params
from tiny_flux import tiny_inputs, tiny_params

from flux_core.autoencoder import AutoEncoder
from flux_core.graphs import GraphedForward
from flux_core.math import merge_attention, partial_attention, partial_attention_fits
from flux_core.model import Flux, FluxParams
from flux_core.ops import Linear, enable_fp8_matmul, fp8_linear, linear
from flux_core.pipeline import Conditioning, sample
from flux_core.seq2seq import ShapeTask, Trainer, TrainConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = "cuda"


def relative_error(actual, expected) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def test_gelu_epilogue_is_the_tanh_gelu():
    # float32 (no TF32) tells the two GELUs apart (1.8e-4 here); bfloat16 checks the half-precision epilogue
    x, w, b = (torch.randn(*s, device=CUDA) for s in ((3, 77, 256), (512, 256), (512,)))
    w = w / 16
    pre = F.linear(x.double(), w.double(), b.double())
    tanh, erf = F.gelu(pre, approximate="tanh"), F.gelu(pre)
    with torch.inference_mode():
        assert relative_error(linear(x, w, b, gelu=True), tanh) < 2e-5 < relative_error(erf, tanh)
        assert relative_error(linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), gelu=True), tanh) < 8e-3


def test_forward_concat_accumulates_the_parts():
    layer = Linear(96 + 160, 64).to(CUDA, torch.bfloat16)
    parts = (torch.randn(2, 50, 96, device=CUDA).bfloat16(), torch.randn(2, 50, 160, device=CUDA).bfloat16())
    expected = F.linear(torch.cat(parts, -1).double(), layer.weight.double(), layer.bias.double())
    with torch.inference_mode():
        assert relative_error(layer.forward_concat(parts), expected) < 8e-3


def test_fp8_linear_matches_the_quantisation_formula():
    x = torch.randn(5, 33, 256, device=CUDA).bfloat16()
    w = (torch.randn(128, 256, device=CUDA) / 16).to(torch.float8_e4m3fn)
    b = torch.randn(128, device=CUDA).bfloat16()
    scale = torch.tensor(0.7, device=CUDA)
    inverse = (448 / x.float().abs().amax(-1, keepdim=True)).bfloat16()  # each row's largest entry -> 448
    x8 = (x * inverse).to(torch.float8_e4m3fn).double() / inverse.double()
    expected = F.gelu(F.linear(x8, w.double() * 0.7, b.double()), approximate="tanh")
    with torch.inference_mode():
        assert relative_error(fp8_linear(x, w, scale, b, gelu=True), expected) < 8e-3


@pytest.mark.parametrize("fp8", [False, True])
def test_model_on_gpu_eager_and_compiled_tracks_the_float32_cpu_model(fp8):
    torch._dynamo.reset()
    params = tiny_params()
    model = Flux(params).eval()
    x = tiny_inputs(params, batch=2)
    with torch.inference_mode():
        expected = model(**x).double()
        gpu = model.to(CUDA, torch.bfloat16)
        if fp8:
            for m in gpu.modules():
                if isinstance(m, Linear):
                    m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
            assert enable_fp8_matmul(gpu) > 0
        x_gpu = {k: v.to(CUDA) if v is not None else None for k, v in x.items()}
        eager = gpu(**x_gpu).cpu()
        compiled = gpu.compile_blocks(fullgraph=True)(**x_gpu).cpu()
    bound = 0.1 if fp8 else 0.02
    assert relative_error(eager, expected) < bound
    assert relative_error(compiled, expected) < bound
    assert relative_error(compiled, eager) < bound / 2
    torch._dynamo.reset()


def test_autoencoder_on_gpu_runs_channels_last_and_computes_the_cpu_function(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 convolutions, to compare tightly
    params = tiny_ae_params()
    ae = AutoEncoder(params).eval()
    ae.load_state_dict(random_ae_weights(params))
    image = torch.rand(1, 3, 96, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        latent, decoded = ae.encode(image), ae.decode(ae.encode(image))
        gpu = ae.to(CUDA)
        gpu_latent, gpu_decoded = gpu.encode(image), gpu.decode(latent)
        half = gpu.to(torch.bfloat16).decode(latent)
    assert gpu_decoded.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(gpu_latent.cpu(), latent) < 1e-5
    assert relative_error(gpu_decoded.cpu(), decoded) < 1e-5
    assert relative_error(half.cpu(), decoded) < 0.05


def _tiny_bf16(fp8: str | None, seed: int = 0):
    """A bf16 tiny Flux on the CPU; fp8: Linear weights float8_e4m3fn with a scale, "matmul" with fp8 matmuls."""
    from test_streaming import tiny_model

    model = tiny_model(seed).to(torch.bfloat16)
    if fp8:
        for m in model.modules():
            if isinstance(m, Linear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
                m.set_weight_scale(torch.tensor(0.9))
        if fp8 == "matmul":
            assert enable_fp8_matmul(model) > 0
    return model


@pytest.mark.parametrize("fp8", [None, "upcast", "matmul"])
@pytest.mark.parametrize("ahead", [1, 2])
def test_streamed_on_cuda_is_bit_exact_with_the_resident_model_and_compiles_once(fp8, ahead):
    from test_streaming import block_budget

    from flux_core.streaming import place, unload

    torch._dynamo.reset()
    cpu_model = _tiny_bf16(fp8)
    gpu_model = _tiny_bf16(fp8).to(CUDA)
    x = {k: v.to(CUDA, torch.bfloat16) if v is not None else None for k, v in tiny_inputs(cpu_model.params, batch=2).items()}
    with torch.inference_mode():
        expected = gpu_model(**x)
        placement = place(cpu_model, CUDA, cpu_model.blocks(), budget_bytes=block_budget(cpu_model, 4, ahead + 1), ahead=ahead)
        assert len(placement.streamed) >= 3 and all(p.is_cuda for p in cpu_model.blocks()[0].parameters())
        assert all(placement.blocks[i].flat.is_pinned() for i in placement.streamed)
        outs = [cpu_model(**x) for _ in range(3)]
    assert all(torch.equal(o, expected) for o in outs)
    if ahead == 1 and fp8 != "upcast":  # compiled: the streamed blocks run the resident blocks' kernels
        torch._logging.set_logs(recompiles=True)  # a failure below shows why it recompiled
        with torch.inference_mode():
            compiled = cpu_model.twin().compile_blocks()
            graphs = [compiled(**x) for _ in range(4)]  # the slot ring's pattern repeats every 2 calls
            frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            graphs += [compiled(**x) for _ in range(4)]
            reference = gpu_model.twin().compile_blocks()(**x)
        torch._logging.set_logs(recompiles=False)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # no recompiles once warm
        assert all(relative_error(g, reference) < 1e-3 for g in graphs)
    unload(cpu_model)
    torch._dynamo.reset()


def test_streamed_training_on_cuda_matches_the_resident_gradients():
    from test_streaming import block_budget

    from flux_core.streaming import place, unload

    cpu_model = Flux(tiny_params(depth=3, depth_single_blocks=4))
    gpu_model = Flux(cpu_model.params).to(CUDA)
    gpu_model.load_state_dict(cpu_model.state_dict())
    place(cpu_model, CUDA, cpu_model.blocks(), budget_bytes=block_budget(cpu_model, 5))
    x = {k: v.to(CUDA) if v is not None else None for k, v in tiny_inputs(cpu_model.params, batch=2).items()}
    for model in (gpu_model, cpu_model):
        model(**x).square().mean().backward()
    for (name, a), b in zip(gpu_model.named_parameters(), cpu_model.parameters()):
        assert b.grad is not None and relative_error(b.grad.cpu(), a.grad.cpu()) < 1e-4, name
    unload(cpu_model)


def test_placing_a_second_transformer_unloads_the_first():
    from flux_core.streaming import placement_of, transformer_on, unload

    first, second = Flux(tiny_params()), Flux(tiny_params())
    transformer_on(first, CUDA, 1, 12, 5)
    on_gpu = torch.cuda.memory_allocated()
    assert next(first.parameters()).is_cuda
    transformer_on(second, CUDA, 1, 12, 5)
    assert not any(p.is_cuda for p in first.parameters()) and all(p.is_cuda for p in second.parameters())
    assert torch.cuda.memory_allocated() <= on_gpu and not placement_of(first).resident
    unload(second)


def test_graphed_forward_replays_the_eager_forward():
    params = tiny_params()
    model = Flux(params).to(CUDA, torch.bfloat16).eval()
    first = {k: v.to(CUDA, torch.bfloat16) for k, v in tiny_inputs(params, batch=2).items()}
    second = {**first, "img": first["img"].flip(1), "timesteps": first["timesteps"] / 2}
    forward = GraphedForward(model)
    with torch.inference_mode():
        expected = [model(**x) for x in (first, second)]
        outputs = [forward(**x) for x in (first, second, first)]  # the first records, the others replay
        wider = forward(**{**second, **{k: second[k].repeat(1, 2, 1) for k in ("img", "img_ids")}})
    assert len(forward.graphs) == 2  # a new shape records its own graph
    for actual, wanted in zip(outputs, (*expected, expected[0])):
        torch.testing.assert_close(actual, wanted, rtol=1e-2, atol=1e-2)
    assert not torch.equal(outputs[0], outputs[1])  # the replay saw the new inputs
    assert wider.shape[1] == 2 * second["img"].shape[1]
    with pytest.raises(ValueError, match="every weight of the model on one GPU"):
        GraphedForward(Flux(params))


def test_sampling_with_cuda_graphs_equals_eager_sampling():
    params = tiny_params()
    model = Flux(params).to(CUDA, torch.bfloat16).eval()
    x = tiny_inputs(params)
    cond = Conditioning(x["txt"], x["y"])
    cond = Conditioning(cond.txt.to(CUDA, torch.bfloat16), cond.y.to(CUDA, torch.bfloat16))
    eager, graphed = (sample(model, cond, torch.zeros(1, 16, 8, 6), seed=3, steps=4, cuda_graphs=graphs)
                      for graphs in (False, True))  # fmt: skip
    torch.testing.assert_close(graphed, eager, rtol=1e-2, atol=1e-2)


def test_a_training_step_queues_without_waiting_for_the_gpu():
    task = ShapeTask(num_points=16, train_points=8)
    params = FluxParams(in_channels=2, out_channels=2, context_in_dim=4, vec_in_dim=0, hidden_size=64, mlp_ratio=2.0,
                        num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10_000, qkv_bias=True,
                        guidance_embed=False)  # fmt: skip
    trainer = Trainer(params, task, TrainConfig(steps=4, batch_size=4, warmup=1, bf16=True), device=CUDA)
    trainer.train_step()  # the first step sets up (optimizer state, kernel choices)
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        trainer.train_step()
        trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(trainer.losses) == 3 and all(0 < loss < 10 for loss in trainer.losses)


def test_attention_over_two_parts_of_the_keys_merges_into_attention_over_all():
    q, k, v = (torch.randn(2, 3, n, 128, device=CUDA, dtype=torch.bfloat16) for n in (77, 154, 154))
    k[:, :, :50] *= 2  # the first part's scores run larger: the parts weigh unequally
    assert partial_attention_fits(q, k, v)
    with torch.inference_mode():
        parts = [partial_attention(q, k[:, :, cut], v[:, :, cut]) for cut in (slice(0, 50), slice(50, None))]
        merged = merge_attention(*parts[0], *parts[1])
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert relative_error(merged, expected) < 8e-3
    assert relative_error(parts[0][0], expected) > 0.1  # one part alone is not the answer
