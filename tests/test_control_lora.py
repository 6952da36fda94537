"""BFL's control LoRAs (flux1-canny-dev-lora, flux1-depth-dev-lora) on flux1-dev: a tiny one in BFL's layout
against diffusers' FluxControlPipeline with load_lora_weights of the same file; the base left alone, widths checked,
strength, side path, stacking with a plain LoRA."""
import types

import pytest
import torch
from safetensors.torch import save_file
from test_nodes import models, node, pack  # noqa: F401  (fixtures: the pack as ComfyUI loads it, tiny models folder)
from test_tools import ae_pair, posterior_mean  # noqa: F401  (fixtures)
from test_tools import HEIGHT, STEPS, WIDTH, assert_matches, prompt, scheduler, unit_image
from tiny_flux import bfl_to_diffusers, diffusers_config, tiny_inputs, tiny_params, write_flux_bfl

from flux_core.checkpoint import CheckpointError
from flux_core.layers import RMSNorm
from flux_core.loading import load_flux
from flux_core.lora import apply_loras, parse_lora, read_lora
from flux_core.model import Flux
from flux_core.ops import Linear
from flux_core.pipeline import Conditioning, empty_latent, sample
from flux_core.sampling import pack as pack_latent  # `pack` is test_nodes' fixture
from flux_core.tools import image_cond_from_images

PARAMS = tiny_params()
STRENGTH = 0.8


def control_lora(model, rank: int = 4, in_channels: int = 128, seed: int = 0) -> dict:
    """BFL's layout: lora_A / lora_B (with bias: BFL's LinearLora has lora_bias) on every Linear, no alpha (scale 1),
    img_in's lora_A `in_channels` wide, and a new scale for every QK norm."""
    gen, state = torch.Generator().manual_seed(seed), {}
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            inp = in_channels if name == "img_in" else layer.in_features
            down = torch.randn(rank, inp, generator=gen) / inp**0.5
            if name == "final_layer.adaLN_modulation.1":  # diffusers swaps the halves of lora_A's rank rows too, as if
                down[rank // 2 :] = down[: rank // 2]  # they were (shift, scale) outputs: equal halves keep it exact
            state[f"{name}.lora_A.weight"] = down
            state[f"{name}.lora_B.weight"] = 0.3 * torch.randn(layer.out_features, rank, generator=gen) / rank**0.5
            state[f"{name}.lora_B.bias"] = 0.05 * torch.randn(layer.out_features, generator=gen)
        elif isinstance(layer, RMSNorm):
            state[f"{name}.scale"] = 1 + 0.5 * torch.randn(layer.scale.shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control_lora")
    weights = write_flux_bfl(folder / "flux1-dev.safetensors", PARAMS, seed=5)
    model = load_flux(folder / "flux1-dev.safetensors", dtype=torch.float32)
    save_file(control_lora(model), str(folder / "canny.safetensors"))
    return folder, weights


@pytest.fixture
def base(files):
    return load_flux(files[0] / "flux1-dev.safetensors", dtype=torch.float32)


@pytest.fixture
def tiny_control_converter(monkeypatch):
    """diffusers' BFL control-LoRA converter hard-codes FLUX.1's 19 / 38 blocks and 3072 width: the same code with the
    tiny sizes, so every rule applied is diffusers' own."""
    from diffusers.loaders import lora_pipeline

    convert = lora_pipeline._convert_bfl_flux_control_lora_to_diffusers
    sizes = {19: PARAMS.depth, 38: PARAMS.depth_single_blocks, 3072: PARAMS.hidden_size}
    assert all(convert.__code__.co_consts.count(n) == 1 for n in sizes), "diffusers' converter changed: re-check it"
    consts = tuple(sizes.get(c, c) if type(c) is int else c for c in convert.__code__.co_consts)
    patched = types.FunctionType(convert.__code__.replace(co_consts=consts), convert.__globals__, convert.__name__)
    monkeypatch.setattr(lora_pipeline, "_convert_bfl_flux_control_lora_to_diffusers", patched)


def test_matches_diffusers_control_pipeline_with_the_lora(files, base, ae_pair, posterior_mean, tiny_control_converter):
    from diffusers import FluxControlPipeline, FluxTransformer2DModel

    folder, weights = files
    before = {k: v.clone() for k, v in base.state_dict().items()}
    ref = FluxTransformer2DModel(**{k: v for k, v in diffusers_config(PARAMS).items() if not k.startswith("_")})
    ref.load_state_dict(bfl_to_diffusers(weights))
    ae, vae = ae_pair
    txt, y, noise = prompt(PARAMS)
    control = unit_image(HEIGHT, WIDTH, seed=4)
    pipe = FluxControlPipeline(scheduler(), vae, None, None, None, None, ref.eval())
    pipe.load_lora_weights(str(folder / "canny.safetensors"), adapter_name="canny")
    pipe.set_adapters("canny", STRENGTH)
    expected = pipe(
        control_image=control.permute(0, 3, 1, 2) * 2 - 1, prompt_embeds=txt, pooled_prompt_embeds=y, height=HEIGHT,
        width=WIDTH, num_inference_steps=STEPS, guidance_scale=10.0, latents=pack_latent(noise), output_type="latent",
    ).images  # fmt: skip

    twin, _, (report,) = apply_loras(base, [(read_lora(folder / "canny.safetensors"), STRENGTH, 1.0)])
    cond = image_cond_from_images(ae, WIDTH, HEIGHT, control_image=control)
    got = sample(twin, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, STEPS, 10.0, noise=noise, image_cond=cond)
    assert_matches(pack_latent(got), expected, pack_latent(noise))
    linear = sum(isinstance(m, Linear) for m in base.modules())
    norms = sum(isinstance(m, RMSNorm) for m in base.modules())
    assert not report.skipped and report.modes == {"merged": linear, "replaced": norms}
    assert "norm scale" in " ".join(report.formats)
    # the twin is a Canny/Depth model; the base is flux-dev as loaded, every tensor as it was
    assert (twin.params.in_channels, twin.img_in.weight.shape[1], base.params.in_channels) == (128, 128, 64)
    assert base.img_in.in_features == 64 and base.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="Canny/Depth model.*needs a control image"):
        sample(twin, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, 1, 10.0, noise=noise)


def run(model):
    with torch.inference_mode():
        return model(**tiny_inputs(model.params))


def test_strength_scales_the_lora_only_and_side_path_matches_merge(base):
    """The widened columns are the LoRA's alone (zero in the base weight), the norm scales are replaced at any
    strength but 0, the low-rank part scales; merge=False (side path on the widened img_in) gives the same output."""
    state = control_lora(base)
    lora = parse_lora(state, "canny")
    half, _, _ = apply_loras(base, [(lora, 0.5, 1.0)])
    side, _, (report,) = apply_loras(base, [(lora, 0.5, 1.0)], merge=False)
    down, up = state["img_in.lora_A.weight"], state["img_in.lora_B.weight"]
    torch.testing.assert_close(half.img_in.weight[:, 64:], 0.5 * up @ down[:, 64:])
    torch.testing.assert_close(half.img_in.weight[:, :64], base.img_in.weight + 0.5 * up @ down[:, :64])
    norm = "double_blocks.1.txt_attn.norm.key_norm"
    assert torch.equal(half.get_submodule(norm).scale, state[f"{norm}.scale"])
    assert report.modes["side path"] == sum(isinstance(m, Linear) for m in base.modules())
    torch.testing.assert_close(run(side), run(half), rtol=1e-5, atol=1e-5)
    off, _, _ = apply_loras(base, [(lora, 0.0, 1.0)])
    assert off.params.in_channels == 64 and torch.equal(run(off), run(base))


def test_plain_lora_stacks_on_the_control_lora_chained_or_at_once(base):
    """A LoRA for flux-dev (img_in 64 wide) after the control LoRA leaves the control channels' columns alone."""
    control = parse_lora(control_lora(base), "canny")
    lora = control_lora(base, in_channels=64, seed=1)
    plain = parse_lora({k: v for k, v in lora.items() if not k.endswith(".scale")}, "style")
    once, _, _ = apply_loras(base, [(control, 1.0, 1.0), (plain, 0.5, 1.0)])
    chained, _, _ = apply_loras(apply_loras(base, [(control, 1.0, 1.0)])[0], [(plain, 0.5, 1.0)])
    controlled, _, _ = apply_loras(base, [(control, 1.0, 1.0)])
    assert torch.equal(once.img_in.weight[:, 64:], controlled.img_in.weight[:, 64:])
    assert chained.params.in_channels == once.params.in_channels == 128
    torch.testing.assert_close(run(chained), run(once), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "in_channels, on, message",
    [
        (96, 64, "its img_in takes 96 channels, the model's 64"),  # a LoRA widening img_in to no known input
        (128, 384, "its img_in takes 128 channels, the model's 384"),  # a control LoRA on a Fill model
    ],
)
def test_img_in_of_a_wrong_width_is_refused(in_channels, on, message):
    model = Flux(tiny_params(in_channels=on))
    with pytest.raises(CheckpointError, match=message):
        apply_loras(model, [(parse_lora(control_lora(model, in_channels=in_channels), "odd"), 1.0, 1.0)])


def test_two_control_widths_at_once_are_refused(base):
    canny = parse_lora(control_lora(base), "canny")
    fill = parse_lora(control_lora(base, in_channels=384), "fill")
    with pytest.raises(CheckpointError, match=r"widen img_in to \[128, 384\] channels"):
        apply_loras(base, [(canny, 1.0, 1.0), (fill, 1.0, 1.0)])


def test_nodes_apply_the_control_lora_and_sample_with_a_control_image(pack, models):  # noqa: F811
    """Load Flux Model (flux1-dev) -> Load LoRA (flux1-canny-dev-lora) -> Flux Control Conditioning -> the sampler."""
    model = node(pack, "FluxKitModelLoader").load("flux1-dev.safetensors", "default")[0]
    (models / "loras").mkdir(exist_ok=True)
    save_file(control_lora(model), str(models / "loras" / "flux1-canny-dev-lora.safetensors"))
    encoders = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "default")[0]
    vae = node(pack, "FluxKitVAELoader").load("ae.safetensors")[0]
    (positive,) = node(pack, "FluxKitTextEncode").encode(encoders, "a cat", "a photo of a cat", 3.5, "512")
    canny, _ = node(pack, "FluxKitLoraLoader").apply(model, "flux1-canny-dev-lora.safetensors", 1.0)
    sampler = node(pack, "FluxKitSampler").sample
    results = []
    for seed in (0, 1):
        image = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(seed))
        controlled, latent = node(pack, "FluxKitControlConditioning").apply(positive, vae, image)
        results.append(sampler(canny, controlled, latent, 0, 2, 2.5, 1.0, 1.15, 0.5, 1.0)[0]["samples"])
    assert results[0].shape == (1, 16, 6, 8) and (results[0] - results[1]).abs().max() > 1e-3  # the image steers
    assert model.params.in_channels == 64
    with pytest.raises(ValueError, match="plain model.*got a control image"):
        sampler(model, controlled, latent, 0, 2, 2.5, 1.0, 1.15, 0.5, 1.0)
