"""Weight streaming (flux_core.streaming) on the CPU: the same logic as CUDA streaming with plain copies into the
device slots (`device="cpu"`), so the plan, the prefetch ring, the swaps and the training path are checked here;
tests/test_cuda.py runs the CUDA streams and pinned memory on a GPU."""
import gc
import sys
import types

import pytest
import torch
from torch import nn
from tiny_flux import tiny_inputs, tiny_params, write_flux_bfl

from flux_core import streaming
from flux_core.loading import load_flux
from flux_core.model import Flux
from flux_core.ops import Linear
from flux_core.streaming import place, placement_of, plan_streamed, simulate_step, unload

CPU = torch.device("cpu")


def tiny_model(seed: int = 0, **overrides) -> Flux:
    torch.manual_seed(seed)
    return Flux(tiny_params(**{"depth": 3, "depth_single_blocks": 4, **overrides})).eval()


def block_budget(model: nn.Module, streamed: int, slots: int = 2, blocks: list | None = None) -> int:
    """The budget that streams the `streamed` smallest blocks: the rest, the non-block layers and the slots."""
    p = streaming.Placement(model, model.blocks() if blocks is None else blocks)
    sizes = sorted(b.nbytes for b in p.blocks)
    return p.fixed.nbytes + sum(sizes[streamed:]) + slots * sizes[streamed - 1]


def test_plan_fits_the_budget_and_spreads_copies_where_they_hide():
    sizes = [10] * 4 + [4] * 8  # Flux's layout: big double blocks first, then single blocks
    assert plan_streamed(sizes, 5, 5 + sum(sizes), ahead=1) == []
    # a fast link: stream the fewest bytes (small blocks, small slots)
    streamed = plan_streamed(sizes, 5, 5 + sum(sizes) - 12 + 8, ahead=1, link_ratio=0.5)
    assert [sizes[i] for i in streamed] == [4, 4, 4] and streamed[-1] - streamed[0] >= 5  # spread over the small ones
    # Flux's blocks (MiB, bf16) on a 16 GiB card, the link as slow as on an H200: copies of both sizes spread over
    # the whole pass hide behind compute; streaming only single blocks leaves the link idle during the double ones
    flux = [648] * 19 + [270] * 38
    budget = 15 * 1024 + 200
    slow = plan_streamed(flux, 120, budget, ahead=1, link_ratio=3.0)
    assert {flux[i] for i in slow} == {648, 270} and 120 + sum(flux) - sum(flux[i] for i in slow) + 2 * 648 <= budget
    singles = plan_streamed(flux, 120, budget, ahead=1, link_ratio=0.5)
    assert {flux[i] for i in singles} == {270}
    assert simulate_step(flux, slow, 1, 3.0) < 0.85 * simulate_step(flux, singles, 1, 3.0)
    every = plan_streamed(sizes, 5, 5 + 2 * 10, ahead=1)
    assert every == list(range(12))
    with pytest.raises(ValueError, match="below what streaming needs.*2 block buffers"):
        plan_streamed(sizes, 5, 5 + 2 * 10 - 1, ahead=1)


def test_simulated_step_is_compute_or_link_bound():
    sizes = [4] * 10
    assert simulate_step(sizes, [2, 7], ahead=1, link_ratio=0.1) == sum(sizes)  # copies hidden
    assert simulate_step(sizes, list(range(10)), ahead=1, link_ratio=10.0) == pytest.approx(10 * 4 * 10, rel=0.05)


@pytest.mark.parametrize("fp8", [False, True])
def test_streamed_forward_is_bit_exact_with_the_resident_model(fp8):
    model = tiny_model()
    if fp8:  # fp8 storage with a per-tensor scale, as scaled fp8 files load
        for m in model.modules():
            if isinstance(m, Linear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
                m.set_weight_scale(torch.tensor(0.9))
    x = tiny_inputs(model.params, batch=2)
    with torch.inference_mode():
        expected = model(**x)
        placement = place(model, CPU, model.blocks(), budget_bytes=block_budget(model, streamed=3))
        assert len(placement.streamed) == 3 and "streamed" in placement.describe()
        first, second = model(**x), model(**x)  # the second runs from the cyclic prefetch of the first
    assert torch.equal(first, expected) and torch.equal(second, expected)
    streamed = placement.blocks[placement.streamed[0]]
    assert all(t.data_ptr() == h.data_ptr() for t, h in zip(streamed.tensors, streamed.home))  # back home after use
    if fp8:
        assert any(t.dtype == torch.float8_e4m3fn for t in streamed.home) and any(t.ndim == 0 for t in streamed.home)
    unload(model)


def test_placement_is_pinned_once_kept_while_it_fits_and_shared_with_twins():
    model = tiny_model()
    budget = block_budget(model, streamed=2)
    placement = place(model, CPU, model.blocks(), budget_bytes=budget)
    flats = {i: placement.blocks[i].flat.data_ptr() for i in placement.streamed}
    assert place(model, CPU, model.blocks(), budget_bytes=budget) is placement
    twin = model.twin()
    assert placement_of(twin) is placement
    place(model, CPU, model.blocks(), budget_bytes=block_budget(model, streamed=6))  # fewer resident: re-planned
    assert all(placement.blocks[i].flat.data_ptr() == ptr for i, ptr in flats.items())  # no second copy
    x = tiny_inputs(model.params)
    with torch.inference_mode():
        assert torch.equal(twin(**x), model(**x))
    unload(model)
    assert not placement.slots and not placement.streamed


def test_training_through_streamed_blocks_gives_the_resident_gradients():
    resident, streamed = tiny_model(), tiny_model()
    x = tiny_inputs(resident.params, batch=2)
    x["img"].requires_grad_(True)
    place(streamed, CPU, streamed.blocks(), budget_bytes=block_budget(streamed, streamed=5))
    x2 = {k: v.detach().clone().requires_grad_(v.requires_grad) if v is not None else None for k, v in x.items()}
    for model, inputs in ((resident, x), (streamed, x2)):
        model.train()
        (model(**inputs).square().mean()).backward()
    for (name, a), b in zip(resident.named_parameters(), streamed.parameters()):
        assert b.grad is not None and b.grad.device == b.device, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(x2["img"].grad, x["img"].grad, rtol=1e-5, atol=1e-7)
    unload(streamed)


def test_compiled_blocks_do_not_recompile_per_streamed_call():
    torch._dynamo.reset()
    model = tiny_model().compile_blocks(backend="eager")
    place(model, CPU, model.blocks(), budget_bytes=block_budget(model, streamed=3))
    x = tiny_inputs(model.params)
    with torch.inference_mode():
        expected = model(**x)
        compiles = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for _ in range(2):
            assert torch.equal(model(**x), expected)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiles
    unload(model)
    torch._dynamo.reset()


def test_bad_settings_fail_with_the_fix(monkeypatch):
    model = tiny_model()
    with pytest.raises(ValueError, match="below what streaming needs"):
        place(model, CPU, model.blocks(), budget_bytes=1000)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="needs a CUDA GPU.*device='cpu'"):
        place(model, "cuda", model.blocks())
    with pytest.raises(ValueError, match="ahead must be >= 1"):
        place(model, CPU, model.blocks(), budget_bytes=10**12, ahead=0)
    with pytest.raises(ValueError, match="no automatic VRAM budget on cpu"):
        place(model, CPU, model.blocks())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_a_model_loaded_inside_inference_mode_streams_on_its_memory(tmp_path):
    # ComfyUI runs nodes under torch.inference_mode: the loaded tensors are inference tensors, which cannot be swapped
    write_flux_bfl(tmp_path / "flux.safetensors", tiny_params())
    x = tiny_inputs(tiny_params())
    with torch.inference_mode():
        model = load_flux(tmp_path / "flux.safetensors", dtype=torch.float32)
        expected, pointer = model(**x), model.img_in.weight.data_ptr()
        place(model, CPU, model.blocks(), budget_bytes=block_budget(model, 2))
        assert not model.img_in.weight.is_inference() and model.img_in.weight.data_ptr() == pointer  # no copy
        assert torch.equal(model(**x), expected)
    unload(model)


class FakeModelManagement(types.ModuleType):
    """comfy.model_management as our code uses it: a list of loaded models that free_memory and unload_all_models
    unload (ComfyUI 0.8.0's logic, reduced: each entry asked to unload unless kept)."""

    def __init__(self):
        super().__init__("comfy.model_management")
        self.current_loaded_models, self.freed = [], []

    def get_torch_device(self):
        return CPU

    def soft_empty_cache(self):
        pass

    def free_memory(self, memory_required, device, keep_loaded=()):
        self.freed.append(memory_required)
        for entry in [e for e in self.current_loaded_models if e.device == device and e not in keep_loaded]:
            if entry.model_unload(memory_required):
                self.current_loaded_models.remove(entry)

    def unload_all_models(self):
        self.free_memory(1e30, self.get_torch_device())


@pytest.fixture
def comfy(monkeypatch):
    import nodes.host  # noqa: F401 (imported outside "ComfyUI": its import-time registrations need the real one)

    mm = FakeModelManagement()
    monkeypatch.setitem(sys.modules, "folder_paths", types.ModuleType("folder_paths"))  # "inside ComfyUI"
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    return mm


def test_comfyui_unload_models_releases_our_placed_model(comfy):
    from nodes import host

    model = tiny_model()
    placement = place(model, CPU, model.blocks(), budget_bytes=block_budget(model, 3))
    for _ in range(2):  # listed once
        host.share_with_comfyui(placement, lambda p: p.resident_bytes, streaming.unload_placement)
    (entry,) = comfy.current_loaded_models
    assert entry.model_memory() == placement.resident_bytes > 0 and entry.model.model is entry
    host.free_memory(10**9, keep=(placement,))  # room for us: ours is kept
    assert comfy.freed == [10**9] and placement.slots
    comfy.unload_all_models()  # "Unload Models" / POST /free
    assert not comfy.current_loaded_models and not placement.slots and not placement.resident
    assert all(t.data_ptr() == h.data_ptr() for b in placement.blocks for t, h in zip(b.tensors, b.home))
    del model, placement
    gc.collect()  # a placement and its model's parameters refer to each other
    assert entry.real_model() is None and entry.model_memory() == 0  # held weakly


def test_placing_ours_unloads_comfyuis_flux_models_whole(comfy, monkeypatch):
    """Asked only for bytes, ComfyUI offloads part of a loaded Flux and keeps the rest on the GPU: before our
    transformer is placed its Flux models (core's, other packs') go whole; its other models stay."""
    from nodes import host

    model_base = types.ModuleType("comfy.model_base")
    model_base.Flux = type("Flux", (), {})
    monkeypatch.setitem(sys.modules, "comfy.model_base", model_base)

    class Loaded:  # comfy.model_management.LoadedModel as free_memory uses it
        def __init__(self, model):
            self.device, self.model, self.asked = CPU, model, []
            self.real_model = lambda: model

        def model_unload(self, memory_to_free=None):
            self.asked.append(memory_to_free)
            return True

    flux, clip = Loaded(model_base.Flux()), Loaded(object())
    comfy.current_loaded_models[:] = [flux, clip]
    host.free_memory(0)
    assert comfy.current_loaded_models == [flux, clip]  # nothing asked for, nothing unloaded
    host.free_memory(0, transformers=True)
    assert comfy.current_loaded_models == [clip] and flux.asked == [1e30] and not clip.asked


def test_comfyui_unload_models_empties_our_cache_on_a_cpu_server(comfy):
    from nodes.common import ModelCache, tensor_bytes

    class Encoders:  # a loaded object holding modules, as TextEncoders
        clip = None

    cache, model, encoders = ModelCache(size=3), tiny_model(), Encoders()
    encoders.clip = nn.Linear(4, 4)
    assert cache.get("flux", lambda: model) is model and cache.get("text", lambda: encoders) is encoders
    assert [e.model_memory() for e in comfy.current_loaded_models] == [tensor_bytes(encoders), tensor_bytes(model)]
    assert tensor_bytes(model) == sum(t.nbytes for t in model.state_dict().values()) > 0
    comfy.unload_all_models()  # POST /free on a `--cpu` server
    assert not cache.entries and not comfy.current_loaded_models


def test_evicting_a_cached_model_unloads_its_placement():
    from nodes.common import ModelCache

    cache, first = ModelCache(size=1), tiny_model()
    placement = place(first, CPU, first.blocks(), budget_bytes=block_budget(first, 3))
    cache.get("first", lambda: first)
    cache.get("second", lambda: tiny_model(1))
    assert "first" not in cache.entries and not placement.resident and not placement.slots


def test_decode_that_runs_out_of_memory_is_redone_in_tiles(monkeypatch):
    class OutOfMemoryAE(nn.Module):
        params, dtype = types.SimpleNamespace(downscale=8), torch.float32

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(1, device="meta"))  # "on the GPU" already
            self.device = self.weight.device

        def decode(self, latent, scaled):
            raise torch.OutOfMemoryError("CUDA out of memory")

        def decode_tiled(self, latent, scaled):
            return ("tiled", latent.device.type, scaled)

    monkeypatch.setattr(streaming, "make_room", lambda device, nbytes: True)
    assert streaming.decode_on(OutOfMemoryAE(), torch.zeros(1, 16, 8, 8), "cuda", scaled=False) == ("tiled", "cpu", False)


def test_a_model_with_its_own_block_loop_streams_through_hooks():
    # T5 (transformers' loop calls the blocks): forward hooks bring each streamed block's weights in and out
    from tiny_text import tiny_t5_config
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(tiny_t5_config(width=32, layers=4)).eval()
    ids = torch.randint(0, 32128, (2, 7))
    with torch.inference_mode():
        expected = t5(input_ids=ids).last_hidden_state
        blocks = list(t5.encoder.block)
        placement = place(t5, CPU, blocks, budget_bytes=block_budget(t5, 3, blocks=blocks), hooks=True)
        assert len(placement.streamed) == 3
        assert torch.equal(t5(input_ids=ids).last_hidden_state, expected)
    unload(t5)
    assert not any(hook for b in blocks for hook in (*b._forward_pre_hooks.values(), *b._forward_hooks.values()))
