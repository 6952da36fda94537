"""ComfyUI compatibility without ComfyUI: core's sigma table and batch noise (values printed by ComfyUI 0.8.0 itself),
conditioning read as core reads it (guidance per prompt, combined prompts averaged, area prompts refused) and the
comfyui settings of the sampler and text encode. The same things against a running ComfyUI: test_comfyui_lab.py."""
import pytest
import torch

from flux_core.pipeline import latent_from_raw, seeded_noise
from flux_core.sampling import COMFY_GRID, FlowMatch

from test_nodes import load_pack_as, models, node  # noqa: F401 (the models fixture)


@pytest.fixture(scope="module")
def pack():
    return load_pack_as("FluxKit-compat")


def test_comfy_grid_schedule_equals_comfyuis_simple_scheduler():
    # comfy.samplers.simple_scheduler on ModelSamplingFlux(shift=mu of a 64x48 image) and on schnell's discrete flow
    assert FlowMatch(grid=COMFY_GRID[True]).schedule(3, 12) == [0.9999999403953552, 0.7598751187324524, 0.4417286813259125, 0.0]
    assert FlowMatch(shift=False, grid=COMFY_GRID[False]).schedule(3, 12) == [1.0, 0.6669999957084656, 0.33399999141693115, 0.0]
    schnell7 = [1.0, 0.8579999804496765, 0.7149999737739563, 0.5720000267028809, 0.42899999022483826, 0.28600001335144043, 0.14300000667572021, 0.0]
    assert FlowMatch(shift=False, grid=1000).schedule(7, 12) == schnell7
    exact = FlowMatch().schedule(3, 12)
    assert exact != FlowMatch(grid=10_000).schedule(3, 12)  # BFL's times are not on the table
    assert max(abs(a - b) for a, b in zip(exact, FlowMatch(grid=10_000).schedule(3, 12))) < 1e-3
    # denoise < 1: core's last steps + 1 of int(steps / denoise), as ours
    assert FlowMatch(grid=10_000).partial_schedule(2, 12, 0.5) == FlowMatch(grid=10_000).schedule(4, 12)[-3:]


def test_batch_noise_from_one_generator_is_comfyuis_prepare_noise():
    core = [-0.4867807626724243, -0.6038215756416321, -0.5580962300300598, 0.6675242781639099,
            -0.19741509854793549, 1.9427834749221802, -1.4017020463943481, -0.7625571489334106]  # prepare_noise seed 5
    batch = seeded_noise((2, 1, 2, 2), 5, per_item=False)
    assert batch.flatten().tolist() == core
    per_item = seeded_noise((2, 1, 2, 2), 5)
    assert torch.equal(per_item[0], batch[0]) and not torch.equal(per_item[1], batch[1])


def _cond(txt, pooled, **extras):
    return [txt, {"pooled_output": pooled, **extras}]


@pytest.fixture(scope="module")
def dev(pack, models):
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    g = torch.Generator().manual_seed(3)
    prompts = [(torch.randn(1, 7, 32, generator=g), torch.randn(1, 64, generator=g)) for _ in range(2)]
    return model, prompts


def _run(pack, model, positive, latent, guidance=3.5, steps=1, match="bfl", seed=1):
    sampler = node(pack, "FluxKitSampler")
    return sampler.sample(model, positive, latent, seed, steps, guidance, 1.0, 1.15, 0.5, 1.0, match=match)[0]["samples"]


def test_sampler_reads_guidance_from_the_conditioning(pack, dev):
    model, [(txt, pooled), _] = dev
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    base = _run(pack, model, [_cond(txt, pooled, guidance=3.5)], latent)
    assert not torch.equal(base, _run(pack, model, [_cond(txt, pooled, guidance=10.0)], latent))  # FluxGuidance
    assert torch.equal(base, _run(pack, model, [_cond(txt, pooled, guidance=3.5)], latent, guidance=10.0))
    assert torch.equal(base, _run(pack, model, [_cond(txt, pooled)], latent, guidance=3.5))  # none stored: the widget


def test_combined_prompts_average_their_predictions_by_strength(pack, dev):
    model, [(a_txt, a_pooled), (b_txt, b_pooled)] = dev
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    a = _run(pack, model, [_cond(a_txt, a_pooled)], latent)
    b = _run(pack, model, [_cond(b_txt[:, :5], b_pooled)], latent)  # another token length: its own forward
    both = _run(pack, model, [_cond(a_txt, a_pooled, strength=3.0), _cond(b_txt[:, :5], b_pooled)], latent)
    torch.testing.assert_close(both, (3 * a + b) / 4, atol=1e-5, rtol=1e-5)  # one Euler step is linear in v


def test_area_mask_and_timestep_range_prompts_are_refused_clearly(pack, dev):
    model, [(txt, pooled), _] = dev
    latent = {"samples": torch.zeros(1, 16, 4, 4)}
    for extras, name in (({"area": (8, 8, 0, 0)}, "an area"), ({"timestep_start": 0.5, "timestep_end": 1.0}, "timestep range")):
        with pytest.raises(ValueError, match=f"{name}.*KSampler"):
            _run(pack, model, [_cond(txt, pooled), _cond(txt, pooled, **extras)], latent)


def test_match_comfyui_uses_the_table_and_one_generator(pack, dev):
    model, [(txt, pooled), _] = dev
    latent = {"samples": torch.zeros(2, 16, 4, 4)}
    ours = _run(pack, model, [_cond(txt, pooled)], latent, steps=2, match="comfyui", seed=7)
    sampling = pack.nodes.sampling  # the pack's own flux_core names
    expected = sampling.sample(model, sampling.Conditioning(txt, pooled), latent_from_raw(latent["samples"]), 7, 2,
                      flow=FlowMatch(grid=10_000), noise=seeded_noise((2, 16, 4, 4), 7, per_item=False))  # fmt: skip
    torch.testing.assert_close(ours, sampling.latent_to_raw(expected), atol=0, rtol=0)
    bfl = _run(pack, model, [_cond(txt, pooled)], latent, steps=2, seed=7)
    assert (ours[1] - bfl[1]).abs().max() > 0.1  # item 1: other noise
    with pytest.raises(ValueError, match="match must be one of bfl, comfyui"):
        _run(pack, model, [_cond(txt, pooled)], latent, match="core")


def test_text_encode_comfyui_pads_to_256_and_cuts_nothing(pack, models):
    encoders = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "cpu")[0]
    encode = node(pack, "FluxKitTextEncode").encode
    assert encode(encoders, "cat", "a cat", 3.5, "comfyui")[0][0][0].shape[1] == 256
    assert encode(encoders, "cat", "a cat", 3.5, "512")[0][0][0].shape[1] == 512
    long = " ".join(["cat"] * 300)
    (cond,) = encode(encoders, "cat", long, 2.0, "comfyui")
    assert cond[0][0].shape[1] == 301 and cond[0][1]["guidance"] == 2.0  # 300 words + end token, all kept
    assert encode(encoders, "cat", long, 2.0, "256")[0][0][0].shape[1] == 256


def test_our_objects_pass_the_bridge_untouched(pack, dev):
    bridge = pack.nodes.bridge
    model, _ = dev
    assert bridge.token_model(model) is model and not bridge.is_core(model)
