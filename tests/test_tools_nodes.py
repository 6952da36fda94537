"""FLUX.1 Tools nodes and workflows: the shipped workflows run headless on tiny official-layout files, the sampler
reads the conditioning the tool nodes (and ComfyUI's core nodes) write, and inputs that do not fit are refused."""
import importlib
import json

import pytest
import torch
from PIL import Image

from conftest import REPO
from test_nodes import models, node, pack  # noqa: F401  (fixtures: the pack and its tiny models folder)
from tiny_flux import tiny_params, write_flux_bfl
from tiny_tools import write_redux, write_siglip

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
    write_siglip(models / "clip_vision" / "sigclip_vision_patch14_384.safetensors")
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
