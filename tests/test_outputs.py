"""The headless output stand-ins: output targets checked at validation (before any model loads), ComfyUI's filename
variables, no temporary file left by a kill, and EmptySD3LatentImage sizes that Flux cannot take refused early."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_nodes import load_pack_as
from test_runner import cli, runnable_ui
from test_workflow import FAKE_NODES, Loader, load

standins = load("standins")
workflow = load("workflow")

TESTS = Path(__file__).resolve().parent
LOADS = []


class CountingLoader(Loader):
    def load(self, name):
        LOADS.append(name)
        return super().load(name)


def run_counting(tmp_path, *args) -> int:
    LOADS.clear()
    return cli(tmp_path, runnable_ui(), *args, classes={**FAKE_NODES, "Loader": CountingLoader})


@pytest.mark.parametrize(
    "prefix, message",
    [
        ("../escape", "leads outside"),
        ("/tmp/abs", "not an absolute path"),
        ("x" * 300, "file names hold at most 255: shorten it"),
        ("sub/" + "y" * 256 + "/img", "file names hold at most 255"),
        ("a\0b", "holds a NUL character"),
        ("", "names no file: end it with a name, e.g. ComfyUI"),
        ("flux/..", "names no file"),
    ],
)  # fmt: skip
def test_bad_prefixes_are_refused_before_any_model_loads(tmp_path, capsys, prefix, message):
    assert run_counting(tmp_path, "--set", f"10.filename_prefix={prefix}") == 1
    err = capsys.readouterr().err
    assert "node 10 (SaveImage) input 'filename_prefix': filename_prefix" in err and message in err
    assert LOADS == []  # found at validation, before the loader ran
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".png", ".part")]


def test_an_output_folder_that_is_a_file_is_refused_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "out").write_text("a file where the output folder should be")
    assert run_counting(tmp_path) == 1
    assert f"cannot save in {tmp_path / 'out' / 'flux'}: {tmp_path / 'out'} is a file, not a folder" in capsys.readouterr().err
    assert LOADS == []


@contextmanager
def without_root():
    """Permission bits do not bind root: act as `nobody` (effective ids only, given back after)."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_a_read_only_output_folder_is_refused_at_validation(monkeypatch):
    root = Path(tempfile.mkdtemp())  # not under pytest's tmp_path, whose parents only root may enter
    try:
        root.chmod(0o755)
        for folder, mode in (("read_only", 0o555), ("writable", 0o777)):
            (root / folder).mkdir()
            (root / folder).chmod(mode)
        with without_root():
            monkeypatch.setattr(standins.host, "output_dir", lambda: root / "writable")
            assert standins.SaveImage.VALIDATE_INPUTS("flux/test") is True
            monkeypatch.setattr(standins.host, "output_dir", lambda: root / "read_only")
            result = standins.SaveImage.VALIDATE_INPUTS("flux/test")
        assert result == f"cannot save in {root / 'read_only' / 'flux'}: {root / 'read_only'} is not writable (Permission denied); use another folder"
        assert os.listdir(root / "writable") == []  # the probe left nothing
    finally:
        shutil.rmtree(root)


SLOW_SAVE = """
import sys, time
sys.path.insert(0, {tests!r})
from PIL import Image
from test_workflow import load

def slow_save(image, f, *args, **kwargs):  # a PNG writer stuck half-way
    f.write(b"half a PNG")
    f.flush()
    print("writing", flush=True)
    time.sleep(120)

Image.Image.save = slow_save
sys.exit(load("runner").main(sys.argv[1:], {{}}))
"""


def test_sigterm_while_saving_leaves_no_part_file(tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((8, 8, 3), 77, np.uint8)).save(tmp_path / "in" / "grey.png")
    (tmp_path / "api.json").write_text(
        '{"1": {"class_type": "LoadImage", "inputs": {"image": "grey.png"}},'
        ' "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "slow"}}}'
    )
    args = ["run", str(tmp_path / "api.json"), "--output", str(tmp_path / "out"), "--input", str(tmp_path / "in")]
    script = SLOW_SAVE.format(tests=str(TESTS))
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "writing\n", child.stderr.read()
        assert [p.name.startswith(".fluxkit-") for p in (tmp_path / "out").iterdir()] == [True]  # mid-write
        child.send_signal(signal.SIGTERM)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130 and "interrupted" in err
    assert list((tmp_path / "out").iterdir()) == []


def test_stale_part_files_of_ours_are_swept_before_writing(tmp_path):
    hour_ago = time.time() - 3600
    stale, fresh = tmp_path / f".fluxkit-{'a' * 32}.part", tmp_path / f".fluxkit-{'b' * 32}.part"
    others = [tmp_path / ".fluxkit-notours.part", tmp_path / "mine.part", tmp_path / f"x.fluxkit-{'c' * 32}.part"]
    for path in (stale, fresh, *others):
        path.write_bytes(b"partial")
        if path != fresh:
            os.utime(path, (hour_ago, hour_ago))
    written = standins.write_new(tmp_path, "img", lambda f: f.write(b"png"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([written.name, fresh.name, *(p.name for p in others)])


def test_date_and_size_variables_expand_as_in_comfyui(tmp_path, monkeypatch):
    now = time.struct_time((2026, 3, 4, 5, 6, 7, 2, 63, 0))
    monkeypatch.setattr(standins.time, "localtime", lambda: now)
    expanded = standins._expand("%date:yyyy-MM-dd%/%date:yy M d h:m:s hh.mm.ss yyy%_%width%x%height%_%year%%month%", 64, 32)
    assert expanded == "2026-03-04/26 3 4 5:6:7 05.06.07 yyy_64x32_202603"
    monkeypatch.setattr(standins.host, "output_dir", lambda: tmp_path)
    result = standins.SaveImage().save_images(torch.zeros(1, 32, 64, 3), "%date:yyyy-MM-dd%/img_%width%")
    assert result["ui"]["images"] == [{"filename": "img_64_00001_.png", "subfolder": "2026-03-04", "type": "output"}]
    assert (tmp_path / "2026-03-04" / "img_64_00001_.png").is_file()


def test_empty_sd3_latent_sizes_flux_cannot_take_are_refused_at_validation():
    defs = workflow.NodeDefs(standins.NODE_CLASS_MAPPINGS)
    for width, height, message in [(20, 36, "width 20 is not a multiple of 16 from 16 to 16384: Flux latents are 1/8 of "
                                             "the pixels, packed in 2x2 patches. Use 16."),
                                   (48, 40, "height 40 is not a multiple of 16"), (8, 16, "width 8"), (16, 20000, "height 20000")]:  # fmt: skip
        prompt = {"1": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}}
        _, node_errors = workflow.validate(prompt, defs)
        assert message in node_errors["1"]["errors"][0]["details"]
    assert standins.EmptySD3LatentImage.VALIDATE_INPUTS(1024, 512) is True
    assert standins.EmptySD3LatentImage.VALIDATE_INPUTS(None, 512) is True  # a linked size is known at run time
    (latent,) = standins.EmptySD3LatentImage().generate(20, 36)
    assert latent["samples"].shape == (1, 16, 4, 2)  # what core's node makes of a size that reaches it


def test_empty_flux_latent_checks_its_size_at_validation():
    validate = load_pack_as("fluxkit_outputs_under_test").NODE_CLASS_MAPPINGS["FluxKitEmptyLatent"].VALIDATE_INPUTS
    assert validate(1024, 512) is True and validate(None, 512) is True
    assert "image width must be a whole number from 16 to 16384, got 100000" in validate(100000, 512)
    assert "not a multiple of 16" in validate(40, 40)
