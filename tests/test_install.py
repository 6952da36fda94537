"""Installed as users install it: `pip install .` and `pip install -e .` into a fresh virtual environment give
`flux_core` (with its tokenizers) importable from any folder and the `fluxkit` command; the pack loads under any
folder name with its own flux_core; the README's library snippet runs as written."""
import json
import os
import shutil
import site
import subprocess
import sys
import venv

import numpy as np
import pytest
from PIL import Image
from tiny_ae import tiny_ae_params, write_ae_bfl
from tiny_flux import tiny_params, write_flux_bfl
from tiny_text import tiny_clip_config, tiny_t5_config, write_clip_l, write_t5

from conftest import REPO

LEFT_OUT = (".git", ".venv", "models", "output", "runs", "build", "*.egg-info", "__pycache__", ".pytest_cache")
CAT_IDS = {"clip": [49406, 320, 1125, 539, 320, 2368, 49407], "t5": [3, 9, 1202, 13, 3, 9, 1712, 1]}

INSTALLED = """
import json, sys
import flux_core, fluxkit
from fluxkit.nodes.runner import _parser
from flux_core.conditioning import BUNDLED_TOKENIZERS, load_tokenizer
ids = {w: load_tokenizer(w)("a photo of a cat")["input_ids"] for w in ("clip", "t5")}
print(json.dumps({"flux_core": flux_core.__file__, "tokenizers": str(BUNDLED_TOKENIZERS), "ids": ids,
                  "nodes": len(fluxkit.NODE_CLASS_MAPPINGS), "copies": [m for m in sys.modules if ".flux_core" in m],
                  "prog": _parser().prog}))
"""


def run(args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The repo's files as a fresh clone has them (no environment, models, outputs or build leftovers)."""
    folder = tmp_path_factory.mktemp("clone") / "ComfyUI-FluxKit"
    shutil.copytree(REPO, folder, ignore=shutil.ignore_patterns(*LEFT_OUT))
    return folder


def fresh_venv(folder):
    """A new environment that sees this one's packages (torch, setuptools, pip) through a .pth file, so installing
    takes seconds and no network; the repo itself is not on its path."""
    try:
        venv.create(folder, with_pip=False, symlinks=os.name != "nt")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot create a virtual environment here: {e}")
    bin_dir = folder / ("Scripts" if os.name == "nt" else "bin")
    purelib = run([bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], folder)
    (folder / purelib.stdout.strip() / "outer.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return bin_dir


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_gives_flux_core_and_the_fluxkit_command(editable, source, tmp_path):
    bin_dir = fresh_venv(tmp_path / "venv")
    install = [bin_dir / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*install, *(["-e"] if editable else []), str(source)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    found = json.loads(run([bin_dir / "python", "-c", INSTALLED], elsewhere).stdout)
    home = source if editable else tmp_path / "venv"  # the clone's own folder, or a copy in site-packages
    assert found["flux_core"].startswith(str(home)) and not found["flux_core"].startswith(str(REPO))
    assert found["tokenizers"].startswith(str(home)) and found["ids"] == CAT_IDS
    assert found["nodes"] >= 10 and found["copies"] == []  # the nodes use the same flux_core modules as users
    assert found["prog"] == "fluxkit"  # its usage lines name the command

    if not editable:  # the console script on a shipped workflow, by name (an editable install's script is the same)
        converted = json.loads(run([bin_dir / "fluxkit", "convert", "flux_dev_txt2img"], elsewhere).stdout)
        twin = json.loads((REPO / "workflows" / "api" / "flux_dev_txt2img.json").read_text())
        assert {i: n["class_type"] for i, n in converted.items()} == {i: n["class_type"] for i, n in twin.items()}


def test_pack_loads_under_any_folder_name_with_its_own_flux_core(source, tmp_path):
    """As ComfyUI loads custom_nodes/<folder>/__init__.py (dots in the name made `_x_`), with no pack folder on
    sys.path: the nodes use the folder's own flux_core (even where another is installed), in one copy."""
    name = "Flux Kit_x_v2"
    load = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location({name!r}, {str(source / '__init__.py')!r},
                                              submodule_search_locations=[{str(source)!r}])
pack = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = pack
spec.loader.exec_module(pack)
copies = [m for m in sys.modules if ".flux_core" in m]
print(sys.modules["flux_core"].__file__, len(pack.NODE_CLASS_MAPPINGS), len(copies))
"""
    used, count, copies = run([sys.executable, "-c", load], tmp_path).stdout.split()
    assert used == str(source / "flux_core" / "__init__.py") and int(count) >= 10 and copies == "0"


def readme_library_snippet() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## flux_core as a library", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    """The snippet verbatim but for the device, on tiny official-layout files named as it names them."""
    code = readme_library_snippet()
    assert 'device = "cuda"' in code and code.startswith("import torch")
    clip, t5 = tiny_clip_config(width=64), tiny_t5_config(width=32)
    schnell = tiny_params(False, vec_in_dim=64, context_in_dim=32, depth=1, depth_single_blocks=1)
    write_flux_bfl(tmp_path / "flux1-schnell.safetensors", schnell)
    write_ae_bfl(tmp_path / "ae.safetensors", tiny_ae_params(num_res_blocks=1))
    write_clip_l(tmp_path / "clip_l.safetensors", clip)
    write_t5(tmp_path / "t5xxl_fp16.safetensors", t5)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('device = "cuda"', 'device = "cpu"'), "README.md", "exec"), {"__name__": "__main__"})
    image = Image.open(tmp_path / "fox.png")
    assert image.size == (1024, 768) and image.mode == "RGB"
    assert np.asarray(image, dtype=np.float32).std() > 1  # an image, not a constant
