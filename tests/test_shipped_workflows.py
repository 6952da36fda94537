"""The shipped workflows: each UI file converts to exactly its API twin and runs headless on tiny models."""
import importlib
import json
import runpy
import shutil

import pytest
from PIL import Image

from conftest import REPO
from test_nodes import models  # noqa: F401  (fixture: tiny models in a ComfyUI models folder)

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
SMALL = ["--set", "6.steps=2"]


@pytest.fixture(scope="module")
def pack():
    return runpy.run_path(str(REPO / "__main__.py"))["load_pack"]()


@pytest.fixture(scope="module")
def defs(pack):
    workflow = importlib.import_module(f"{pack.__name__}.nodes.workflow")
    standins = importlib.import_module(f"{pack.__name__}.nodes.standins")
    return workflow, workflow.NodeDefs({**standins.NODE_CLASS_MAPPINGS, **pack.NODE_CLASS_MAPPINGS}, pack.NODE_DISPLAY_NAME_MAPPINGS)


def test_workflows_are_shipped():
    shipped = {p.name for p in WORKFLOWS}
    assert {"flux_dev_txt2img.json", "flux_schnell_txt2img.json", "flux_dev_img2img.json", "seq2seq_shapes_demo.json"} <= shipped


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_ui_converts_to_its_api_twin(path, defs):
    workflow, node_defs = defs
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and "nodes" in ui
    if any(node_defs.get(n["type"]) is None for n in ui["nodes"]):
        pytest.skip("uses core ComfyUI nodes the headless runner lacks: test_comfyui_lab.py converts it with a server's")
    assert workflow.to_api(ui, node_defs) == json.loads((REPO / "workflows" / "api" / path.name).read_text())


@pytest.mark.parametrize("name", ["flux_dev_txt2img", "flux_schnell_txt2img", "flux_dev_img2img"])
def test_runs_headless_and_saves_a_png_that_drags_back(name, pack, models, tmp_path):  # noqa: F811
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 48), (200, 80, 40)).save(tmp_path / "input" / "example.png")
    size = [] if "img2img" in name else ["--set", "5.width=64", "--set", "5.height=48"]
    argv = ["run", str(REPO / "workflows" / f"{name}.json"), "--models", str(models), "--output", str(tmp_path / "out"),
            "--input", str(tmp_path / "input"), *SMALL, *size]  # fmt: skip
    assert runner.main(argv) == 0
    assert runner.main(argv) == 0  # a second run adds files, never overwrites
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 2 and pngs[0].name.endswith("_00001_.png") and pngs[1].name.endswith("_00002_.png")
    image = Image.open(pngs[0])
    assert image.size == (64, 48)
    prompt, ui = json.loads(image.text["prompt"]), json.loads(image.text["workflow"])
    assert prompt["6"]["inputs"]["steps"] == 2 and prompt["6"]["class_type"] == "FluxKitSampler"
    assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in prompt.values()}


def test_missing_model_files_are_listed(pack, tmp_path, capsys):
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    shutil.copytree(REPO / "workflows", tmp_path / "wf")
    code = runner.main(["run", str(tmp_path / "wf" / "flux_dev_txt2img.json"), "--models", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code != 0
    for missing in ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"):
        assert missing in err


def test_seq2seq_workflow_runs_headless(pack, models, tmp_path):  # noqa: F811
    runner = importlib.import_module(f"{pack.__name__}.nodes.runner")
    argv = ["run", str(REPO / "workflows" / "seq2seq_shapes_demo.json"), "--models", str(models),
            "--output", str(tmp_path), "--set", "1.run_name=shapes-tiny", "--set", "3.steps=2"]  # fmt: skip
    assert runner.main(argv) == 0
    (png,) = tmp_path.rglob("*.png")
    assert Image.open(png).size == (4 * 256, 256)
