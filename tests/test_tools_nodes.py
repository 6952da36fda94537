"""FLUX.1 Tools nodes and workflows: the shipped workflows run headless on tiny official-layout files, the sampler
reads the conditioning the tool nodes (and ComfyUI's core nodes) write, and inputs that do not fit are refused."""
import importlib
import json
import shutil

import pytest
import torch
from PIL import Image

from conftest import REPO
from test_nodes import models, node, pack  # noqa: F401  (fixtures: the pack and its tiny models folder)
from tiny_flux import tiny_params, write_flux_bfl
from tiny_tools import write_redux, write_siglip

SIGLIP = "sigclip_vision_patch14_384.safetensors"
TINY = dict(vec_in_dim=64, context_in_dim=32)  # the text encoders of test_nodes' models folder


@pytest.fixture(scope="module")
def tool_models(models):  # noqa: F811
    """The tool models beside test_nodes' dev/schnell/AE/text encoders, under their official names."""
    unets = models / "diffusion_models"
    write_flux_bfl(unets / "flux1-kontext-dev.safetensors", tiny_params(**TINY), seed=1)
    write_flux_bfl(unets / "flux1-fill-dev.safetensors", tiny_params(in_channels=384, **TINY), seed=2)
    write_flux_bfl(unets / "flux1-canny-dev.safetensors", tiny_params(in_channels=128, **TINY), seed=3)
    write_flux_bfl(unets / "flux1-depth-dev.safetensors", tiny_params(in_channels=128, **TINY), seed=4)
    (models / "style_models").mkdir(exist_ok=True)
    (models / "clip_vision").mkdir(exist_ok=True)
    write_redux(models / "style_models" / "flux1-redux-dev.safetensors", txt_dim=TINY["context_in_dim"])
    write_siglip(models / "clip_vision" / SIGLIP)
    return models


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("input")
    rgba = Image.new("RGBA", (64, 48), (200, 80, 40, 255))
    rgba.paste((0, 0, 0, 0), (16, 8, 48, 32))  # transparent = the mask to inpaint
    rgba.save(folder / "example.png")
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(folder / "depth_map.png")
    return folder


SIZES = {
    "flux_kontext_edit": (["5.kontext_resize=false"], (64, 48)),
    "flux_fill_inpaint": ([], (64, 48)),
    "flux_fill_outpaint": (["10.right=16", "10.feathering=4"], (80, 48)),
    "flux_canny": ([], (64, 48)),
    "flux_depth": ([], (64, 48)),
    "flux_redux": (["11.width=64", "11.height=48"], (64, 48)),
}


@pytest.mark.parametrize("name", SIZES)
def test_tool_workflow_runs_headless(name, pack, tool_models, inputs, tmp_path):  # noqa: F811
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    overrides, size = SIZES[name]
    sets = [a for o in ["6.steps=2", *overrides] for a in ("--set", o)]
    argv = ["run", str(REPO / "workflows" / f"{name}.json"), "--models", str(tool_models), "--output", str(tmp_path),
            "--input", str(inputs), *sets]  # fmt: skip
    assert runner.main(argv) == 0
    (png,) = tmp_path.rglob("*.png")
    image = Image.open(png)
    assert image.size == size
    assert json.loads(image.text["prompt"])["6"]["class_type"] == "FluxKitSampler"


@pytest.fixture(scope="module")
def loaded(pack, tool_models):  # noqa: F811
    encoders = node(pack, "FluxKitTextEncoderLoader").load("clip_l.safetensors", "t5xxl_fp16.safetensors", "default")[0]
    vae = node(pack, "FluxKitVAELoader").load("ae.safetensors")[0]
    (positive,) = node(pack, "FluxKitTextEncode").encode(encoders, "a cat", "a photo of a cat", 3.5, "512")
    unets = {n: node(pack, "FluxKitModelLoader").load(f"flux1-{n}-dev.safetensors", "default")[0] for n in ("kontext", "fill", "canny")}
    return encoders, vae, positive, unets


def photo(height=48, width=64, seed=0):
    return torch.rand(1, height, width, 3, generator=torch.Generator().manual_seed(seed))


def run_sampler(pack, model, positive, latent):  # noqa: F811
    return node(pack, "FluxKitSampler").sample(model, positive, latent, 0, 2, 2.5, 1.0, 1.15, 0.5, 1.0)[0]["samples"]


def test_kontext_references_chain_and_change_the_result(pack, loaded):  # noqa: F811
    _, vae, positive, unets = loaded
    kontext = node(pack, "FluxKitKontextReference")
    one, latent = kontext.apply(positive, vae, photo(), False)
    two, _ = kontext.apply(one, vae, photo(32, 32, seed=1), False)
    assert [r.shape[-2:] for r in two[0][1]["reference_latents"]] == [(6, 8), (4, 4)]  # chained, as core's key
    assert "reference_latents" not in positive[0][1]  # the input conditioning is left as it was
    assert latent["samples"].shape == (1, 16, 6, 8)
    plain = run_sampler(pack, unets["kontext"], positive, latent)
    edited, again = (run_sampler(pack, unets["kontext"], c, latent) for c in (one, two))
    assert (edited - plain).abs().max() > 1e-3 and (again - edited).abs().max() > 1e-3
    _, resized = kontext.apply(positive, vae, photo(48, 96), True)  # 2:1 -> Kontext's 1456x720
    assert resized["samples"].shape[-2:] == (90, 182)


def test_fill_and_control_nodes_feed_their_models(pack, loaded):  # noqa: F811
    _, vae, positive, unets = loaded
    mask = torch.zeros(1, 48, 64)
    mask[:, 10:30, 20:40] = 1
    filled, latent = node(pack, "FluxKitFillConditioning").apply(positive, vae, photo(), mask)
    assert filled[0][1]["concat_mask"].shape == (1, 1, 48, 64) and latent["samples"].shape == (1, 16, 6, 8)
    assert run_sampler(pack, unets["fill"], filled, latent).shape == (1, 16, 6, 8)
    with pytest.raises(ValueError, match="Fill model.*needs an image and a mask"):
        run_sampler(pack, unets["fill"], positive, latent)
    with pytest.raises(ValueError, match="mask is 32x32 but the image is 64x48"):
        node(pack, "FluxKitFillConditioning").apply(positive, vae, photo(), torch.ones(1, 32, 32))
    with pytest.raises(ValueError, match="image without alpha: paint one in the mask editor"):
        node(pack, "FluxKitFillConditioning").apply(positive, vae, photo(), torch.zeros(1, 64, 64))
    (edges,) = node(pack, "FluxKitCanny").detect(photo(), 0.4, 0.8)
    controlled, control_latent = node(pack, "FluxKitControlConditioning").apply(positive, vae, edges)
    assert run_sampler(pack, unets["canny"], controlled, control_latent).shape == (1, 16, 6, 8)
    other_size = {"samples": torch.zeros(1, 16, 4, 4)}
    with pytest.raises(ValueError, match="12 latent tokens but the latent to sample has 4.*use the latent output"):
        run_sampler(pack, unets["canny"], controlled, other_size)
    with pytest.raises(ValueError, match="plain model.*got a control image"):
        run_sampler(pack, unets["kontext"], controlled, control_latent)


def test_outpaint_pad_node_gives_image_and_mask(pack):  # noqa: F811
    image, mask = node(pack, "FluxKitOutpaintPad").pad(photo(), 16, 0, 0, 16, 0)
    assert image.shape == (1, 64, 80, 3) and mask.shape == (1, 64, 80)
    assert mask[:, :48, 16:].eq(0).all() and mask[:, 48:].eq(1).all() and mask[:, :, :16].eq(1).all()


def test_redux_nodes_append_image_tokens(pack, loaded, tool_models):  # noqa: F811
    _, _, positive, _ = loaded
    (redux,) = node(pack, "FluxKitReduxLoader").load("flux1-redux-dev.safetensors", "sigclip_vision_patch14_384.safetensors")
    apply = node(pack, "FluxKitReduxApply").apply
    (out,) = apply(positive, redux, photo(), 1.0, 1, "center")
    txt = positive[0][0]
    assert out[0][0].shape == (1, txt.shape[1] + 4, txt.shape[2])  # the tiny SigLIP's 2x2 patch grid
    torch.testing.assert_close(out[0][0][:, : txt.shape[1]], txt)
    (weak,) = apply(positive, redux, photo(), 0.25, 1, "center")
    torch.testing.assert_close(weak[0][0][:, txt.shape[1] :], out[0][0][:, txt.shape[1] :] * 0.25)
    (pooled,) = apply(positive, redux, photo(), 1.0, 2, "none")
    assert pooled[0][0].shape[1] == txt.shape[1] + 1
    shutil.copy(tool_models / "clip_vision" / SIGLIP, tool_models / "style_models" / "siglip_by_mistake.safetensors")
    with pytest.raises(ValueError, match="not a Redux projector.*flux1-redux-dev.safetensors"):
        node(pack, "FluxKitReduxLoader").load("siglip_by_mistake.safetensors", SIGLIP)


def test_generate_with_every_tool(tool_models):
    from flux_core.autoencoder import load_autoencoder
    from flux_core.conditioning import load_text_encoders
    from flux_core.loading import load_flux
    from flux_core.pipeline import generate
    from flux_core.redux import Redux, load_redux_projector, load_siglip

    unet = lambda name: load_flux(tool_models / "diffusion_models" / f"flux1-{name}-dev.safetensors")  # noqa: E731
    ae = load_autoencoder(tool_models / "vae" / "ae.safetensors")
    text = load_text_encoders(*(tool_models / "text_encoders" / n for n in ("clip_l.safetensors", "t5xxl_fp16.safetensors")))
    run = lambda model, **kw: generate(model, ae, text, "a cat", steps=2, **kw)  # noqa: E731
    assert run(unet("kontext"), reference_images=[photo(32, 48)], kontext_resize=False).shape == (1, 32, 48, 3)
    mask = torch.zeros(1, 48, 64)
    mask[:, :, 32:] = 1
    assert run(unet("fill"), init_image=photo(), mask=mask).shape == (1, 48, 64, 3)
    assert run(unet("canny"), control_image=photo(100, 50), width=64, height=32).shape == (1, 32, 64, 3)
    redux = Redux(load_siglip(tool_models / "clip_vision" / "sigclip_vision_patch14_384.safetensors"),
                  load_redux_projector(tool_models / "style_models" / "flux1-redux-dev.safetensors"))  # fmt: skip
    dev = unet("kontext")
    with_image = run(dev, width=32, height=32, redux=redux, redux_image=photo())
    assert (with_image - run(dev, width=32, height=32)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="redux_image needs the Redux models"):
        run(dev, width=32, height=32, redux_image=photo())
    with pytest.raises(ValueError, match="Fill model.*needs an image and a mask"):
        run(unet("fill"), width=32, height=32)
