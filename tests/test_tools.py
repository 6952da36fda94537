"""FLUX.1 Tools and Kontext: each mode against diffusers' pipeline with the same weights, noise and schedule, the id
layout and the mask folding in closed form, and the errors for inputs that do not fit the model."""
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

from flux_core.autoencoder import AutoEncoder
from flux_core.pipeline import Conditioning, empty_latent, sample
from flux_core.sampling import pack
from flux_core.tools import (
    ImageCond, fill_cond, fold_mask, image_cond_from_images, kontext_cond, kontext_size, outpaint_pad, output_size,
    reference_ids,
)  # fmt: skip
from tiny_ae import bfl_to_diffusers_vae, diffusers_vae_config, random_ae_weights, tiny_ae_params
from tiny_flux import diffusers_pair, tiny_params
from tiny_tools import tiny_siglip_config, write_redux, write_siglip

WIDTH, HEIGHT, STEPS = 64, 48, 3


def transformer_pair(in_channels: int):
    params = tiny_params(in_channels=in_channels)
    return params, *diffusers_pair(params, seed=5)


@pytest.fixture(scope="module")
def ae_pair():
    params = tiny_ae_params()
    weights = random_ae_weights(params, seed=2)
    ours = AutoEncoder(params).eval()
    ours.load_state_dict(weights)
    config = {k: v for k, v in diffusers_vae_config(params).items() if not k.startswith("_")}
    ref = AutoencoderKL(**config)
    ref.load_state_dict(bfl_to_diffusers_vae(weights, params))
    return ours, ref.eval()


def scheduler():
    return FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15, use_dynamic_shifting=True
    )


def prompt(params, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    txt, y = torch.randn(1, 7, params.context_in_dim, generator=gen), torch.randn(1, params.vec_in_dim, generator=gen)
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=gen)
    return txt, y, noise


def unit_image(height: int, width: int, seed: int) -> torch.Tensor:  # (1, H, W, 3) in [0, 1], 8-bit levels
    return torch.randint(0, 256, (1, height, width, 3), generator=torch.Generator().manual_seed(seed)) / 255


def assert_matches(got: torch.Tensor, expected: torch.Tensor, start: torch.Tensor, tol: float = 5e-5):
    rel = (got - expected).abs().max() / expected.abs().max()
    assert rel <= tol, f"relative error {rel:.2e}"
    assert (got - start).abs().max() > 0.1  # the sampler really moved the latent


# -- Kontext --------------------------------------------------------------------------------------------------
def test_kontext_matches_diffusers(ae_pair):
    from diffusers import FluxKontextPipeline

    params, ours, ref = transformer_pair(64)
    ae, vae = ae_pair
    txt, y, noise = prompt(params)
    reference = unit_image(32, 80, seed=1)  # another size than the output: its own id grid
    pipe = FluxKontextPipeline(scheduler(), vae, None, None, None, None, ref)
    expected = pipe(
        image=reference.permute(0, 3, 1, 2), prompt_embeds=txt, pooled_prompt_embeds=y, height=HEIGHT, width=WIDTH,
        num_inference_steps=STEPS, guidance_scale=2.5, latents=pack(noise), output_type="latent",
        max_area=WIDTH * HEIGHT, _auto_resize=False,
    ).images  # fmt: skip
    cond = image_cond_from_images(ae, WIDTH, HEIGHT, reference_images=[reference], kontext_resize=False)
    got = sample(ours, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, STEPS, 2.5, noise=noise, image_cond=cond)
    assert_matches(pack(got), expected, pack(noise))
    plain = sample(ours, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, STEPS, 2.5, noise=noise)
    assert (plain - got).abs().max() > 1e-2  # the reference changes the result


def test_reference_ids_closed_form():
    one = reference_ids([(4, 6)])  # latent 4x6 -> 2x3 tokens at the origin, first axis 1
    assert one.tolist() == [[[1, r, c] for r in range(2) for c in range(3)]]
    # a second reference goes below the first when the layout is wider than tall, to the right otherwise
    two = reference_ids([(4, 6), (2, 2)])[0, 6:]
    assert two.tolist() == [[1, 2, 0]]
    tall = reference_ids([(6, 4), (2, 2)])[0, 6:]
    assert tall.tolist() == [[1, 0, 2]]
    three = reference_ids([(4, 4), (4, 4), (4, 4)])[0]  # 2x2 tokens each: at (0,0), below at (2,0), right at (0,2)
    assert {tuple(map(int, t[1:])) for t in three[4:8]} == {(2, 0), (2, 1), (3, 0), (3, 1)}
    assert {tuple(map(int, t[1:])) for t in three[8:]} == {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert len({tuple(t.tolist()) for t in three}) == 12  # no two tokens share a position


def test_kontext_cond_packs_every_reference():
    a, b = torch.randn(1, 16, 4, 6), torch.randn(1, 16, 2, 2)
    cond = kontext_cond([a, b])
    assert cond.tokens.shape == (1, 7, 64) and cond.token_ids.shape == (1, 7, 3)
    torch.testing.assert_close(cond.tokens[:, :6], pack(a))
    assert cond.channels is None


def test_kontext_sizes_follow_bfl():
    assert kontext_size(1000, 1000) == (1024, 1024)
    assert kontext_size(1920, 1080) == (1392, 752)  # 16:9 -> the closest trained aspect ratio
    assert kontext_size(600, 1400) == (672, 1568)
    ref = torch.zeros(1, 1080, 1920, 3)
    assert output_size(None, None, [ref]) == (1392, 752)  # the output defaults to the resized reference
    assert output_size(512, None, [ref]) == (512, 752) and output_size(None, None, None) == (1024, 1024)


# -- Fill -----------------------------------------------------------------------------------------------------
def test_mask_folding_closed_form():
    mask = torch.arange(16 * 24, dtype=torch.float32).reshape(1, 16, 24)  # 2x3 latent cells of 8x8 pixels
    folded = fold_mask(mask)
    assert folded.shape == (1, 64, 2, 3)
    for row, col, dy, dx in [(0, 0, 0, 0), (1, 2, 7, 7), (0, 1, 3, 5), (1, 0, 6, 1)]:
        assert folded[0, dy * 8 + dx, row, col] == mask[0, row * 8 + dy, col * 8 + dx]
    cond = fill_cond(torch.zeros(1, 16, 2, 4), torch.ones(1, 16, 32))
    assert cond.channels.shape == (1, 2, 64 + 256) and cond.channels[..., 64:].eq(1).all()


def binary_mask(height: int, width: int) -> torch.Tensor:  # (1, H, W): a rectangle to repaint, not cell-aligned
    mask = torch.zeros(1, height, width)
    mask[:, 5:30, 20:51] = 1
    return mask


@pytest.fixture
def posterior_mean(monkeypatch):
    """BFL encodes Fill and control images to the posterior mean (AutoEncoder(sample_z=False)); diffusers' Fill and
    control pipelines draw a sample: make the draw the mean, so both run the reference's conditioning."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def test_fill_matches_diffusers(ae_pair, posterior_mean):
    from diffusers import FluxFillPipeline

    params, ours, ref = transformer_pair(384)
    ae, vae = ae_pair
    txt, y, noise = prompt(params)
    image, mask = unit_image(HEIGHT, WIDTH, seed=3), binary_mask(HEIGHT, WIDTH)
    pipe = FluxFillPipeline(scheduler(), vae, None, None, None, None, ref)
    expected = pipe(
        image=image.permute(0, 3, 1, 2), mask_image=mask[:, None], prompt_embeds=txt, pooled_prompt_embeds=y,
        height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=30.0, latents=pack(noise),
        output_type="latent",
    ).images  # fmt: skip
    cond = image_cond_from_images(ae, WIDTH, HEIGHT, image=image, mask=mask)
    got = sample(ours, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, STEPS, 30.0, noise=noise, image_cond=cond)
    assert_matches(pack(got), expected, pack(noise))


def test_control_matches_diffusers(ae_pair, posterior_mean):
    from diffusers import FluxControlPipeline

    params, ours, ref = transformer_pair(128)
    ae, vae = ae_pair
    txt, y, noise = prompt(params)
    control = unit_image(HEIGHT, WIDTH, seed=4)
    pipe = FluxControlPipeline(scheduler(), vae, None, None, None, None, ref)
    expected = pipe(
        control_image=control.permute(0, 3, 1, 2) * 2 - 1, prompt_embeds=txt, pooled_prompt_embeds=y, height=HEIGHT,
        width=WIDTH, num_inference_steps=STEPS, guidance_scale=10.0, latents=pack(noise), output_type="latent",
    ).images  # fmt: skip
    cond = image_cond_from_images(ae, WIDTH, HEIGHT, control_image=control)
    got = sample(ours, Conditioning(txt, y), empty_latent(WIDTH, HEIGHT), 0, STEPS, 10.0, noise=noise, image_cond=cond)
    assert_matches(pack(got), expected, pack(noise))


def test_outpaint_pad_masks_the_new_border():
    image = torch.rand(1, 16, 32, 3)
    padded, mask = outpaint_pad(image, left=16, top=0, right=8, bottom=16)
    assert padded.shape == (1, 32, 56, 3) and mask.shape == (1, 32, 56)
    torch.testing.assert_close(padded[:, :16, 16:48], image)
    assert padded[:, 16:].eq(0.5).all() and padded[:, :, :16].eq(0.5).all()
    assert mask[:, :16, 16:48].eq(0).all() and mask[:, 16:].eq(1).all() and mask[:, :, 48:].eq(1).all()
    _, feathered = outpaint_pad(image, left=16, top=0, right=0, bottom=0, feathering=4)
    # distance d to the padded left side inside the image -> ((4 - d) / 4) ** 2; the unpadded sides stay 0
    assert feathered[0, 5, 16:21].tolist() == [1.0, 0.5625, 0.25, 0.0625, 0.0]
    assert feathered[0, :, 21:].eq(0).all()


# -- errors ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models():
    return {n: transformer_pair(n)[1] for n in (64, 128, 384)}


def run(model, cond, width=WIDTH, height=HEIGHT):
    params = model.params
    txt, y = torch.zeros(1, 3, params.context_in_dim), torch.zeros(1, params.vec_in_dim)
    return sample(model, Conditioning(txt, y), empty_latent(width, height), 0, 1, image_cond=cond)


@pytest.mark.parametrize(
    "in_channels, cond, message",
    [
        (384, None, "Fill model.*needs an image and a mask.*got no image conditioning"),
        (128, None, "Canny/Depth model.*needs a control image"),
        (384, ImageCond(channels=torch.zeros(1, 12, 64)), "Fill model.*got a control image"),
        (64, ImageCond(channels=torch.zeros(1, 12, 320)), "plain model.*flux1-fill-dev.*got a Fill image and mask"),
        (128, ImageCond(channels=torch.zeros(1, 6, 64)), "6 latent tokens but the latent to sample has 12.*resize"),
        (128, ImageCond(torch.zeros(1, 12, 64), torch.zeros(1, 2, 64), torch.zeros(1, 2, 3)), "Kontext reference"),
    ],
)
def test_conditioning_that_does_not_fit_the_model_is_refused(models, in_channels, cond, message):
    with pytest.raises(ValueError, match=message):
        run(models[in_channels], cond)


def test_bad_fill_inputs_are_refused(ae_pair):
    ae, _ = ae_pair
    image = unit_image(HEIGHT, WIDTH, seed=0)
    with pytest.raises(ValueError, match="mask is 64x32 but the image is 64x48"):
        image_cond_from_images(ae, WIDTH, HEIGHT, image=image, mask=torch.ones(1, 32, 64))
    with pytest.raises(ValueError, match="a mask needs the image"):
        image_cond_from_images(ae, WIDTH, HEIGHT, mask=torch.ones(1, HEIGHT, WIDTH))
    with pytest.raises(ValueError, match="multiple of 16"):
        image_cond_from_images(ae, WIDTH, HEIGHT, image=image[:, :40], mask=torch.ones(1, 40, WIDTH))


def test_kontext_reference_runs_on_any_plain_model(models, ae_pair):
    """BFL's denoise appends reference tokens for any model (dev's architecture is Kontext's): no refusal."""
    cond = image_cond_from_images(ae_pair[0], WIDTH, HEIGHT, reference_images=[unit_image(32, 32, 0)], kontext_resize=False)
    assert run(models[64], cond).shape == (1, 16, HEIGHT // 8, WIDTH // 8)


def test_control_image_of_another_size_is_resized(ae_pair):
    cond = image_cond_from_images(ae_pair[0], WIDTH, HEIGHT, control_image=unit_image(100, 70, 0))
    assert cond.channels.shape == (1, (HEIGHT // 16) * (WIDTH // 16), 64)


# -- Canny ----------------------------------------------------------------------------------------------------
def test_canny_traces_a_square_with_thin_edges():
    from flux_core.canny import canny

    image = torch.zeros(1, 32, 32, 3)
    image[:, 8:24, 8:24] = 1
    edges = canny(image)[0, ..., 0]
    assert canny(image).shape == (1, 32, 32, 3)
    rows, cols = edges.nonzero().unbind(1)
    near_border = torch.minimum((rows - 7.5).abs(), (rows - 23.5).abs()).le(1.5) | torch.minimum(
        (cols - 7.5).abs(), (cols - 23.5).abs()
    ).le(1.5)
    assert near_border.all() and len(rows) > 40  # the whole outline, nothing inside or far outside
    assert edges[16].sum() == 2 and edges[:, 16].sum() == 2  # one pixel wide after non-maximum suppression


def test_canny_hysteresis_keeps_weak_edges_only_when_connected():
    from flux_core.canny import canny

    image = torch.zeros(1, 32, 64, 3)
    image[:, 8:24, 4:12] = 1.0  # strong half of one shape
    image[:, 8:24, 12:20] = 0.3  # its weak half, connected to the strong one
    image[:, 8:24, 40:56] = 0.3  # a weak shape alone
    edges = canny(image, low=0.1, high=0.8)[0, ..., 0]
    assert edges[:, 14:19].sum() > 0  # the weak outline joined to the strong one survives
    assert edges[:, 32:].sum() == 0  # the isolated weak outline does not
    assert canny(image, low=0.1, high=0.1)[0, :, 32:, 0].sum() > 0  # unless it clears the high threshold
    with pytest.raises(ValueError, match="low <= high"):
        canny(image, low=0.5, high=0.2)


# -- Redux ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def redux_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("redux")
    siglip, redux = root / "sigclip_vision_patch14_384.safetensors", root / "flux1-redux-dev.safetensors"
    return siglip, write_siglip(siglip), redux, write_redux(redux)


@pytest.fixture(scope="module")
def redux(redux_files):
    from flux_core.redux import Redux, load_redux_projector, load_siglip

    return Redux(load_siglip(redux_files[0]), load_redux_projector(redux_files[2]))


def test_redux_matches_diffusers(redux_files, redux):
    from diffusers import FluxPriorReduxPipeline
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionModel

    _, siglip_weights, _, redux_weights = redux_files
    siglip = SiglipVisionModel(tiny_siglip_config()).eval()
    siglip.load_state_dict({k.removeprefix("vision_model."): v for k, v in siglip_weights.items()}, strict=False)
    embedder = ReduxImageEncoder(redux_dim=144, txt_in_features=48)
    embedder.load_state_dict(redux_weights)
    processor = SiglipImageProcessor(size={"height": 28, "width": 28}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipe = FluxPriorReduxPipeline(siglip, processor, embedder)
    image = unit_image(28, 28, seed=6)
    txt = torch.randn(1, 5, 48)
    pil = Image.fromarray((image[0] * 255).round().byte().numpy())
    # the pipeline's own image path (its __call__ appends to zeros of T5-XXL's width when no text encoder is loaded)
    expected = torch.cat((txt, pipe.image_embedder(pipe.encode_image(pil, torch.device("cpu"), 1)).image_embeds), 1)
    got = redux.extend(txt, image)
    assert got.shape == (1, 5 + 4, 48)  # a 2x2 patch grid -> 4 image tokens after the prompt's
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_redux_strength_and_downsampling(redux):
    image = unit_image(28, 28, seed=7)
    full = redux.tokens(image)
    torch.testing.assert_close(redux.tokens(image, strength=0.5), full * 0.5)
    pooled = redux.tokens(image, downsampling=2)  # the 2x2 grid area-averaged to one token
    torch.testing.assert_close(pooled, full.mean(1, keepdim=True), atol=1e-6, rtol=1e-5)
    two = redux.tokens(torch.cat([image, unit_image(28, 28, seed=8)]))
    assert two.shape == (1, 8, 48)  # several images: one sequence, as StyleModelApply


def test_redux_preprocess_crops_the_centre(redux):
    from flux_core.redux import siglip_pixels

    wide = torch.zeros(1, 28, 56, 3)
    wide[:, :, 14:42] = 1  # the centre square is white, the sides black
    assert siglip_pixels(wide, 28).min() > 0.9 and siglip_pixels(wide, 28, crop=False).min() < -0.9


def test_redux_files_are_checked(redux_files, tmp_path):
    from flux_core.checkpoint import CheckpointError
    from flux_core.redux import load_redux_projector, load_siglip

    siglip, _, projector, _ = redux_files
    with pytest.raises(CheckpointError, match="not a Redux projector.*flux1-redux-dev.safetensors"):
        load_redux_projector(siglip)
    with pytest.raises(CheckpointError, match="not a SigLIP vision model.*sigclip_vision_patch14_384"):
        load_siglip(projector)
