"""The headless runner: execution order and reuse, ComfyUI's node call conventions, the CLI (--set, --models,
--output, --input), PNG output (names, chunks, never overwriting), path safety, and the `python . run` entry."""
import importlib
import json
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_ae import tiny_ae_params, write_ae_bfl
from test_workflow import FAKE_NODES, REPO, SAMPLE_API, Loader, Sampler, api_prompt, defs, load, sample_ui

runner = load("runner")
standins = load("standins")
host = load("host")
WorkflowError = load("workflow").WorkflowError


def runnable_ui() -> dict:
    """sample_ui without its muted loader and the node left without a model by it."""
    ui = sample_ui()
    ui["nodes"] = [n for n in ui["nodes"] if n["id"] not in (13, 14)]
    ui["links"] = [link for link in ui["links"] if link[0] != 12]
    return ui


def cli(tmp_path, workflow, *args, classes=FAKE_NODES):
    path = tmp_path / "workflow.json"
    if not isinstance(workflow, str):
        path.write_text(json.dumps(workflow))
        workflow = str(path)
    return runner.main(["run", workflow, "--output", str(tmp_path / "out"), "--input", str(tmp_path / "in"), *args], classes)


def grey(path) -> int:
    with Image.open(path) as image:
        return int(np.asarray(image)[0, 0, 0])


def test_nodes_run_once_each_after_their_inputs(tmp_path):
    calls = []

    class CountingLoader(Loader):
        def load(self, name):
            calls.append(name)
            return super().load(name)

    host.configure(output_dir=tmp_path)
    run = runner.run_prompt(api_prompt(), defs({"Loader": CountingLoader}), progress=False)
    assert calls == ["b.bin"]  # feeds two nodes, loaded once
    order = list(run.outputs)
    for node_id, node in api_prompt().items():
        for value in node["inputs"].values():
            if isinstance(value, list):
                assert order.index(value[0]) < order.index(node_id)
    model, cond, steps, mode, cfg, shift = run.value("7")["args"]
    assert (model, cond, steps, mode, cfg, shift) == ({"name": "b.bin"}, ("b.bin", "a cat"), 12, "heun", 2.5, 3.0)
    assert run.ui["10"]["images"] == [{"filename": "test_00001_.png", "subfolder": "flux", "type": "output"}]


def test_list_semantics_hidden_inputs_and_ui_results(tmp_path):
    class Split:
        RETURN_TYPES, FUNCTION, OUTPUT_IS_LIST = ("INT",), "split", (True,)

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"n": ("INT", {"default": 3})}}

        def split(self, n):
            return (list(range(1, n + 1)),)

    class Double:
        RETURN_TYPES, FUNCTION = ("INT",), "double"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"forceInput": True})}}

        def double(self, x):
            return (2 * x,)

    class Total:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE, INPUT_IS_LIST = (), "total", True, True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"x": ("INT", {"forceInput": True})}, "hidden": {"me": "UNIQUE_ID", "prompt": "PROMPT"}}

        def total(self, x, me, prompt):
            return {"ui": {"total": [sum(x)], "me": me, "nodes": [sorted(prompt[0])]}}

    prompt = {"1": {"class_type": "Split", "inputs": {"n": 3}}, "2": {"class_type": "Double", "inputs": {"x": ["1", 0]}},
              "3": {"class_type": "Total", "inputs": {"x": ["2", 0]}}}  # fmt: skip
    run = runner.run_prompt(prompt, defs({"Split": Split, "Double": Double, "Total": Total}), progress=False)
    assert run.outputs["2"] == [[2, 4, 6]]
    assert run.ui["3"] == {"total": [12], "me": ["3"], "nodes": [["1", "2", "3"]]}


def test_node_failure_names_the_node(tmp_path):
    class Broken(Sampler):
        def sample(self, **kwargs):
            raise RuntimeError("out of cheese")

    with pytest.raises(WorkflowError, match=r"node 7 \(Sampler\) failed: RuntimeError: out of cheese"):
        runner.run_prompt(api_prompt(), defs({"Sampler": Broken}), progress=False)


def test_cli_writes_pngs_with_chunks_and_never_overwrites(tmp_path, capsys):
    assert cli(tmp_path, runnable_ui(), "--set", "7.seed=200", "--set", "My Sampler.steps=30") == 0
    first = tmp_path / "out" / "flux" / "test_00001_.png"
    assert capsys.readouterr().out.split() == [str(first)]
    assert grey(first) == 200
    with Image.open(first) as image:
        prompt, ui = json.loads(image.info["prompt"]), json.loads(image.info["workflow"])
    assert prompt["7"]["inputs"]["seed"] == 200 and prompt["7"]["inputs"]["steps"] == 30
    expected = {k: v for k, v in SAMPLE_API.items() if k != "14"}
    expected["7"] = {**expected["7"], "inputs": {**expected["7"]["inputs"], "seed": 200, "steps": 30}}
    assert prompt == expected
    assert next(n for n in ui["nodes"] if n["id"] == 7)["widgets_values"][0] == 200  # the editor gets the same seed
    before = first.read_bytes()
    assert cli(tmp_path, runnable_ui(), "--set", "7.seed=100") == 0
    assert first.read_bytes() == before
    assert grey(tmp_path / "out" / "flux" / "test_00002_.png") == 100
    # The PNG runs again as a workflow: its workflow chunk holds the first run (seed 200; steps came from a Primitive).
    assert cli(tmp_path, str(first)) == 0
    assert grey(tmp_path / "out" / "flux" / "test_00003_.png") == 200
    assert sorted(p.name for p in (tmp_path / "out" / "flux").iterdir()) == [f"test_0000{i}_.png" for i in (1, 2, 3)]


def test_invalid_workflow_exits_nonzero_with_one_line_per_problem(tmp_path, capsys):
    assert cli(tmp_path, runnable_ui(), "--set", "7.steps=0", "--set", "7.mode=dpm") == 1
    err = capsys.readouterr().err
    assert "node 7 (Sampler) input 'steps': Value 0 smaller than min of 1" in err
    assert "node 7 (Sampler) input 'mode': Value not in list" in err
    assert not (tmp_path / "out").exists()
    assert cli(tmp_path, runnable_ui(), "--set", "7.nope=1") == 1
    assert "error: --set '7.nope=1': node 7 (Sampler) has no input 'nope'" in capsys.readouterr().err
    assert cli(tmp_path, runnable_ui(), "--device", "tpu") == 1
    assert cli(tmp_path, str(tmp_path / "missing.json")) == 1
    assert "cannot read the workflow" in capsys.readouterr().err


def test_set_values_of_the_wrong_type_or_not_finite_stop_the_run(tmp_path, capsys):
    assert cli(tmp_path, runnable_ui(), "--set", "7.cfg=NaN") == 1
    assert "node 7 (Sampler) input 'cfg': Value nan is not a finite number" in capsys.readouterr().err
    assert cli(tmp_path, runnable_ui(), "--set", "7.steps=2.7") == 1
    assert "error: --set '7.steps=2.7': 'steps' is of type INT; expected a whole number, not '2.7'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("prefix, message", [("../escape", "leads outside"), ("/tmp/abs", "not an absolute path"),
                                             ("a/../../escape", "leads outside")])  # fmt: skip
def test_output_names_cannot_leave_the_output_folder(tmp_path, capsys, prefix, message):
    assert cli(tmp_path, runnable_ui(), "--set", f"10.filename_prefix={prefix}") == 1
    assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("escape*")) and not list(tmp_path.glob("**/*.png"))


def test_new_files_skip_taken_names_and_leave_no_temporaries(tmp_path, monkeypatch):
    (tmp_path / "x_00003_.png").write_bytes(b"old")
    (tmp_path / "x_extra_00009_.png").write_bytes(b"other prefix")
    path = standins.write_new(tmp_path, "x", lambda f: f.write(b"new"))
    assert path.name == "x_00004_.png"
    monkeypatch.setattr(standins, "next_counter", lambda folder, prefix: 3)  # another writer took 00003 meanwhile
    assert standins.write_new(tmp_path, "x", lambda f: f.write(b"newer")).name == "x_00005_.png"
    assert (tmp_path / "x_00003_.png").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_00003_.png", "x_00004_.png", "x_00005_.png", "x_extra_00009_.png"]


def test_load_image_and_preview_standins_with_api_workflow(tmp_path, monkeypatch, capsys):
    (tmp_path / "in").mkdir()
    rgba = np.zeros((16, 24, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 64
    Image.fromarray(rgba).save(tmp_path / "in" / "red.png")
    monkeypatch.setattr(standins, "preview_dir", lambda: tmp_path / "previews")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
              "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}}  # fmt: skip
    assert cli(tmp_path, prompt) == 0
    (saved,) = (tmp_path / "previews").iterdir()
    assert capsys.readouterr().out.split() == [str(saved)] and saved.name == "ComfyUI_temp__00001_.png"
    assert np.asarray(Image.open(saved))[0, 0].tolist() == [255, 0, 0]
    image, mask = standins.LoadImage().load_image("red.png")
    assert image.shape == (1, 16, 24, 3) and torch.allclose(mask, torch.full((1, 16, 24), 1 - 64 / 255))
    prompt["1"]["inputs"]["image"] = "../workflow.json"
    assert cli(tmp_path, prompt) == 1
    assert "node 1 (LoadImage) input 'image': image '../workflow.json' leads outside" in capsys.readouterr().err


def test_model_names_resolve_only_inside_model_folders(tmp_path, capsys):
    class VaeFile:
        RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "find", True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"name": ("STRING", {"default": ""})}}

        def find(self, name):
            return {"ui": {"path": [str(host.model_path("vae", name))]}}

    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "models" / "vae" / "ae.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    prompt = {"1": {"class_type": "VaeFile", "inputs": {"name": "ae.safetensors"}}}
    models = ["--models", str(tmp_path / "models")]
    assert cli(tmp_path, prompt, *models, classes={"VaeFile": VaeFile}) == 0
    for name in ("../secret.safetensors", str(tmp_path / "secret.safetensors")):
        assert cli(tmp_path, prompt, *models, "--set", f"1.name={name}", classes={"VaeFile": VaeFile}) == 1
        assert "node 1 (VaeFile) failed: ValueError: model name" in capsys.readouterr().err


def test_convert_prints_the_api_prompt(tmp_path, capsys):
    (tmp_path / "ui.json").write_text(json.dumps(sample_ui()))
    assert runner.main(["convert", str(tmp_path / "ui.json")], FAKE_NODES) == 0
    assert json.loads(capsys.readouterr().out) == SAMPLE_API


def test_python_dot_run_loads_the_pack_and_runs(tmp_path):
    """The real entry: `python <repo> run` loads the repo as a package (its nodes included) with the stand-ins."""
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(tmp_path / "in" / "grey.png")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "grey.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "copy"}}}  # fmt: skip
    (tmp_path / "api.json").write_text(json.dumps(prompt))
    args = [sys.executable, str(REPO), "run", str(tmp_path / "api.json"), "--output", str(tmp_path / "out"),
            "--input", str(tmp_path / "in"), "--device", "cpu"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(tmp_path / "out" / "copy_00001_.png")]
    assert grey(tmp_path / "out" / "copy_00001_.png") == 77


@pytest.fixture(scope="module")
def pack():
    """The pack loaded as `python . run` loads it, for the real loader nodes and their host."""
    return runpy.run_path(str(REPO / "__main__.py"))["load_pack"]()


def pack_module(pack, name: str):
    return importlib.import_module(f"{pack.__name__}.nodes.{name}")


def test_missing_model_files_say_where_each_goes_before_anything_loads(pack, tmp_path, capsys):
    run = pack_module(pack, "runner").main
    models = tmp_path / "no-such-models"
    args = ["run", str(REPO / "workflows" / "flux_dev_txt2img.json"), "--models", str(models), "--output", str(tmp_path / "out")]
    assert run(args) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[1:] == [
        f"  node 1 (FluxKitModelLoader) input 'unet_name': diffusion_models 'flux1-dev.safetensors' not found in "
        f"{models}/diffusion_models or {models}/unet: put it in {models}/diffusion_models",
        f"  node 2 (FluxKitTextEncoderLoader) input 'clip_name1': text_encoders 'clip_l.safetensors' and "
        f"'t5xxl_fp16.safetensors' not found in {models}/text_encoders or {models}/clip: put them in {models}/text_encoders",
        f"  node 3 (FluxKitVAELoader) input 'vae_name': vae 'ae.safetensors' not found in {models}/vae: put it in {models}/vae",
        f"  the models folder {models} does not exist: give yours with --models or $FLUXKIT_MODELS",
    ]
    (models / "vae").mkdir(parents=True)  # the folder exists, one file is there: only the others are named
    (models / "vae" / "ae.safetensors").write_bytes(b"")
    assert run(args) == 1
    err = capsys.readouterr().err
    assert "'ae.safetensors'" not in err and "does not exist" not in err and err.count("not found in") == 2


def test_missing_tokenizers_are_found_with_the_files_before_any_loading(pack, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    for sub, name in [("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                      ("text_encoders", "t5xxl_fp16.safetensors"), ("vae", "ae.safetensors")]:  # fmt: skip
        (models / sub).mkdir(parents=True, exist_ok=True)
        (models / sub / name).write_bytes(b"")  # never read: validation fails before any load
    conditioning = sys.modules[pack_module(pack, "loaders").find_tokenizer.__module__]  # wherever flux_core lives
    monkeypatch.setattr(conditioning, "tokenizer_places", lambda which, *args: [tmp_path / "nowhere"])
    args = ["run", str(REPO / "workflows" / "flux_dev_txt2img.json"), "--models", str(models), "--output", str(tmp_path / "out")]
    assert pack_module(pack, "runner").main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the workflow is not valid:\n")
    assert "node 2 (FluxKitTextEncoderLoader) input 'clip_name1': No CLIP-L tokenizer found (a folder with " in err
    assert f"{tmp_path / 'nowhere'} (no such folder)" in err and len(err.splitlines()) == 2  # one line
    assert not (tmp_path / "out").exists()


def test_symlinked_model_files_are_listed_validated_and_loaded(pack, tmp_path):
    host = pack_module(pack, "host")
    (tmp_path / "models" / "vae").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    write_ae_bfl(tmp_path / "elsewhere" / "blob", tiny_ae_params())  # e.g. a Hugging Face cache blob: no suffix
    (tmp_path / "models" / "vae" / "ae.safetensors").symlink_to(tmp_path / "elsewhere" / "blob")
    (tmp_path / "models" / "vae" / "gone.safetensors").symlink_to(tmp_path / "elsewhere" / "deleted")
    host.configure(tmp_path / "models")
    assert host.model_list("vae") == ["ae.safetensors"]  # the dangling link is not offered
    loader = pack.NODE_CLASS_MAPPINGS["FluxKitVAELoader"]
    assert loader.VALIDATE_INPUTS("ae.safetensors") is True
    vae = loader().load("ae.safetensors")[0]
    assert sum(p.numel() for p in vae.parameters()) > 0
    assert "'gone.safetensors' not found" in loader.VALIDATE_INPUTS("gone.safetensors")
    with pytest.raises(ValueError, match="must be a plain name inside the vae folder"):
        host.model_path("vae", "../elsewhere/blob")
