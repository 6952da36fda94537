"""The image sampler against diffusers' scheduler and FluxPipeline, seeds, batching and input errors."""
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from flux_core.pipeline import Conditioning, empty_latent, generate, latent_from_raw, latent_to_raw, sample, seeded_noise
from flux_core.sampling import FlowMatch, check_latent, get_noise, get_schedule, pack, shift_mu
from tiny_flux import diffusers_pair, tiny_params


def dynamic_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True
    )


@pytest.mark.parametrize("steps, seq_len", [(4, 4096), (28, 4096), (50, 1024), (20, 4080)])
def test_dev_schedule_equals_diffusers_dynamic_shift(steps, seq_len):
    scheduler = dynamic_scheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(seq_len))
    ours = torch.tensor(get_schedule(steps, seq_len))
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schnell_schedule_is_unshifted_linear(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))
    ours = torch.tensor(get_schedule(steps, 4096, shift=False))
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-7, rtol=0)
    assert get_schedule(4, 4096, shift=False) == [1.0, 0.75, 0.5, 0.25, 0.0]


def tiny_pair(guidance: bool):
    params = tiny_params(guidance=guidance)
    return params, *diffusers_pair(params, seed=3)


@pytest.mark.parametrize("guidance", [True, False], ids=["dev", "schnell"])
def test_four_steps_match_diffusers_flux_pipeline(guidance):
    params, ours, ref = tiny_pair(guidance)
    width, height, steps = 96, 64, 4
    gen = torch.Generator().manual_seed(0)
    txt = torch.randn(1, 12, params.context_in_dim, generator=gen)
    y = torch.randn(1, params.vec_in_dim, generator=gen)
    noise = torch.randn(1, 16, height // 8, width // 8, generator=gen)

    scheduler = dynamic_scheduler() if guidance else FlowMatchEulerDiscreteScheduler(shift=1.0)
    pipe = FluxPipeline(scheduler, None, None, None, None, None, ref)
    expected = pipe(
        prompt_embeds=txt, pooled_prompt_embeds=y, height=height, width=width, num_inference_steps=steps,
        guidance_scale=3.5, latents=pack(noise), output_type="latent",
    ).images  # fmt: skip
    got = pack(sample(ours, Conditioning(txt, y), empty_latent(width, height), seed=0, steps=steps, noise=noise))

    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= 5e-5, f"relative error {rel:.2e}"
    assert (got - pack(noise)).abs().max() > 0.1  # the sampler really moved the latent


@pytest.fixture(scope="module")
def dev_model():
    params, ours, _ = tiny_pair(True)
    return ours, Conditioning(torch.randn(1, 6, params.context_in_dim), torch.randn(1, params.vec_in_dim))


def test_same_seed_same_latent_other_seed_differs(dev_model):
    model, cond = dev_model
    run = lambda seed: sample(model, cond, empty_latent(64, 32), seed=seed, steps=2)  # noqa: E731
    assert torch.equal(run(7), run(7))
    assert (run(7) - run(8)).abs().max() > 1e-2


def test_batch_of_two_equals_two_batches_of_one(dev_model):
    model, cond = dev_model
    both = sample(model, cond, empty_latent(64, 32, batch=2), seed=5, steps=2)
    first = sample(model, cond, empty_latent(64, 32), seed=5, steps=2)
    second = sample(model, cond, empty_latent(64, 32), seed=6, steps=2)
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


def test_noise_is_cpu_float32_and_seeded():
    noise = seeded_noise((2, 16, 4, 6), 11)
    assert noise.dtype == torch.float32 and noise.device.type == "cpu"
    assert torch.equal(noise[0], torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(11)))
    assert get_noise(1, 48, 32, seed=1).shape == (1, 16, 4, 6)


def test_cfg_uses_negative_and_denoise_keeps_the_input(dev_model):
    model, cond = dev_model
    negative = Conditioning(torch.zeros_like(cond.txt), torch.zeros_like(cond.y))
    base = sample(model, cond, empty_latent(64, 32), seed=1, steps=2)
    with_cfg = sample(model, cond, empty_latent(64, 32), seed=1, steps=2, cfg=3.0, negative=negative)
    assert (with_cfg - base).abs().max() > 1e-3
    init = torch.randn(1, 16, 4, 8)
    light = sample(model, cond, init, seed=1, steps=4, denoise=0.2)
    full = sample(model, cond, init, seed=1, steps=4, denoise=1.0)
    assert (light - init).abs().mean() < (full - init).abs().mean()


def test_raw_latent_round_trip():
    raw = torch.randn(1, 16, 2, 2)
    torch.testing.assert_close(latent_to_raw(latent_from_raw(raw)), raw)
    torch.testing.assert_close(latent_from_raw(torch.zeros(1)), torch.tensor([-0.1159 * 0.3611]))


@pytest.mark.parametrize("width, height", [(100, 64), (1000, 1000)])
def test_size_not_multiple_of_16_is_refused(width, height):
    with pytest.raises(ValueError, match="multiple of 16"):
        empty_latent(width, height)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: empty_latent(64, 8), "image height must be a whole number from 16 to 16384, got 8"),
        (lambda: empty_latent(100000, 16), "image width must be a whole number from 16 to 16384, got 100000"),
        (lambda: empty_latent(16, 16, batch=5000), "batch size must be a whole number from 1 to 4096, got 5000"),
        (lambda: empty_latent(16, 16, batch=0), "batch size must be a whole number from 1 to 4096, got 0"),
        (lambda: empty_latent(64.0, 64), "image width must be a whole number .* got 64.0"),
        (lambda: get_noise(1, 16, 100000, seed=0), "image height must be a whole number from 16 to 16384"),
        (lambda: get_noise(1, 16, 16, seed=-1), "seed must be a whole number from 0 to"),
    ],
)  # fmt: skip
def test_sizes_are_limited_as_in_the_nodes(make, message):
    """The library's one size check (the nodes' range): 100000 px a side would allocate gigabytes."""
    with pytest.raises(ValueError, match=message):
        make()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"guidance": NAN}, "guidance must be a finite number, got nan"),
        ({"cfg": INF}, "cfg must be a finite number, got inf"),
        ({"denoise": NAN}, "denoise must be a finite number, got nan"),
        ({"guidance": "3.5"}, "guidance must be a finite number, got '3.5'"),
        ({"steps": 0}, "steps must be a whole number >= 1, got 0"),
        ({"steps": 2.7}, "steps must be a whole number >= 1, got 2.7"),
        ({"steps": True}, "steps must be a whole number >= 1, got True"),
        ({"seed": 1.5}, "seed must be a whole number from 0 to"),
    ],
)  # fmt: skip
def test_sampling_settings_must_be_finite_whole_where_counted(dev_model, settings, message):
    model, cond = dev_model
    with pytest.raises(ValueError, match=message):
        sample(model, cond, empty_latent(32, 32), **{"seed": 0, "steps": 1, **settings})


@pytest.mark.parametrize("shift", [{"max_shift": NAN}, {"base_shift": -INF}])
def test_schedule_shifts_must_be_finite(shift):
    with pytest.raises(ValueError, match="_shift must be a finite number"):
        FlowMatch(**shift)
    with pytest.raises(ValueError, match="_shift must be a finite number"):
        get_schedule(4, 256, **shift)
    with pytest.raises(ValueError, match="a must be a finite number"):
        FlowMatch().sample_t(2, a=NAN)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"guidance": NAN}, "guidance must be a finite number, got nan"),
        ({"cfg": INF}, "cfg must be a finite number"),
        ({"redux_strength": NAN}, "redux_strength must be a finite number"),
        ({"steps": 0}, "steps must be a whole number >= 1, got 0"),  # was quietly 28
        ({"batch_size": 0}, "batch size must be a whole number from 1 to 4096, got 0"),
        ({"width": 100000}, "image width must be a whole number from 16 to 16384"),
        ({"prompt": None}, "prompt must be a string or a non-empty list of strings, got None"),
        ({"prompt": []}, "prompt must be a string or a non-empty list of strings"),
        ({"prompt": ["a cat", 3]}, "prompt must be a string or a non-empty list of strings"),
        ({"negative_prompt": 3, "cfg": 2.0}, "negative_prompt must be a string or None"),
    ],
)  # fmt: skip
def test_generate_refuses_bad_arguments_before_any_work(dev_model, arguments, message):
    """No autoencoder or text encoders are given: the error must come before they would be used."""
    model, _ = dev_model
    with pytest.raises(ValueError, match=message):
        generate(model, None, None, **{"prompt": "a cat", "width": 32, "height": 32, **arguments})


def test_wrong_latent_channels_and_missing_negative(dev_model):
    model, cond = dev_model
    with pytest.raises(ValueError, match="4-channel latent.*16-channel.*EmptySD3LatentImage"):
        check_latent(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="negative"):
        sample(model, cond, empty_latent(32, 32), seed=0, steps=1, cfg=2.0)
