"""The pack inside a real ComfyUI 0.8.0, built by ../shared/tools/comfy-lab from ../shared/comfyui (CPU, random
official-layout files, the pack linked as "Flux Kit.v2", the server started from the folder above ComfyUI as the
portable build starts it): ComfyUI's own loader imports the pack, /object_info lists its nodes, the templates are
served, every shipped API workflow runs through POST /prompt and saves a PNG, Stop ends a run within a step, latent
previews stream, graphs mixing core and FluxKit nodes reproduce core's image, and our loaders' core outputs share
our tensors. Skipped where ../shared is absent.

The lab lives in $FLUXKIT_LAB (default ~/.cache/fluxkit-comfy-lab): the first build takes minutes, later ones reuse it.
"""
import contextlib
import importlib
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

SHARED = REPO.parent / "shared"
LAB_TOOL = SHARED / "tools" / "comfy-lab"
PACK_NAME = "Flux Kit.v2"  # comfy-lab's folder name: a space and a dot
pytestmark = pytest.mark.skipif(
    not (SHARED / "comfyui" / "main.py").is_file() or not LAB_TOOL.is_file(),
    reason="needs a ComfyUI 0.8.0 source at ../shared/comfyui and ../shared/tools/comfy-lab beside the checkout",
)
websocket = pytest.importorskip("websocket", reason="websocket-client (requirements-test.txt) talks to the server")

# Tiny files the shipped workflows name beyond what comfy-lab writes (written with the pack's own tests/tiny_*.py).
EXTRA_MODELS = r"""
import sys
from pathlib import Path
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_flux import tiny_params, write_flux_bfl
from tiny_tools import write_redux, write_siglip

root = Path(sys.argv[1])
models, tiny = root / "models", dict(vec_in_dim=64, context_in_dim=32)
jobs = {
    "diffusion_models/flux1-kontext-dev.safetensors": lambda p: write_flux_bfl(p, tiny_params(**tiny), seed=1),
    "diffusion_models/flux1-fill-dev.safetensors": lambda p: write_flux_bfl(p, tiny_params(in_channels=384, **tiny), seed=2),
    "diffusion_models/flux1-canny-dev.safetensors": lambda p: write_flux_bfl(p, tiny_params(in_channels=128, **tiny), seed=3),
    "diffusion_models/flux1-depth-dev.safetensors": lambda p: write_flux_bfl(p, tiny_params(in_channels=128, **tiny), seed=4),
    "style_models/flux1-redux-dev.safetensors": lambda p: write_redux(p, txt_dim=32),
    "clip_vision/sigclip_vision_patch14_384.safetensors": write_siglip,
}
for name, write in jobs.items():
    if not (models / name).exists():
        (models / name).parent.mkdir(parents=True, exist_ok=True)
        write(models / name)
lora = models / "loras" / "flux_lora.safetensors"  # rank 2 on one layer of the tiny flux1-dev
if not lora.exists():
    with safe_open(str(models / "diffusion_models" / "flux1-dev.safetensors"), "pt") as f:
        out_f, in_f = f.get_slice("double_blocks.0.img_attn.proj.weight").get_shape()
    g = torch.Generator().manual_seed(5)
    save_file({"diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(2, in_f, generator=g) * 0.1,
               "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(out_f, 2, generator=g) * 0.1}, str(lora))
rgba = Image.new("RGBA", (64, 48), (200, 80, 40, 255))
rgba.paste((0, 0, 0, 0), (16, 8, 48, 32))  # transparent: the area Fill repaints
rgba.save(root / "input" / "example.png")
Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(root / "input" / "depth_map.png")
"""


@dataclass
class Lab:
    root: Path  # $LAB
    url: str

    @property
    def comfy(self) -> Path:
        return self.root / "ComfyUI"

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return r.read()

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def run(self, prompt: dict, extra_data: dict | None = None, on_progress=None, timeout: float = 600) -> dict:
        """Queues `prompt` and follows it on the websocket: {"status": success|error|interrupted, "messages",
        "previews" (binary preview frames), "history"}."""
        client = uuid.uuid4().hex
        ws = websocket.create_connection(f"{self.url.replace('http', 'ws')}/ws?clientId={client}", timeout=timeout)
        try:
            prompt_id = self.post("/prompt", {"prompt": prompt, "client_id": client, "extra_data": extra_data or {}})["prompt_id"]
            messages, previews, status = [], 0, None
            while status is None:
                frame = ws.recv()
                if isinstance(frame, bytes):
                    previews += 1
                    continue
                message = json.loads(frame)
                data = message.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(message)
                kind = message["type"]
                if kind == "progress" and on_progress is not None:
                    on_progress(data)
                if kind == "execution_success":
                    status = "success"
                elif kind in ("execution_error", "execution_interrupted"):
                    status = "error" if kind == "execution_error" else "interrupted"
        finally:
            ws.close()
        history = {}
        for _ in range(600):  # ComfyUI files the history just after it reports the end
            history = json.loads(self.get(f"/history/{prompt_id}"))
            if prompt_id in history:
                break
            time.sleep(0.05)
        history = history[prompt_id]
        return {"status": status, "messages": messages, "previews": previews, "history": history}

    def images(self, result: dict, node_id: str) -> list[np.ndarray]:
        """The PNGs a SaveImage node wrote, read back from the output folder through GET /view."""
        out = []
        for image in result["history"]["outputs"][node_id]["images"]:
            assert (self.comfy / "output" / image["subfolder"] / image["filename"]).is_file()
            query = f"/view?filename={quote(image['filename'])}&subfolder={quote(image['subfolder'])}&type={image['type']}"
            out.append(np.asarray(Image.open(BytesIO(self.get(query))).convert("RGB")).astype(int))
        return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lab():
    root = Path(os.environ.get("FLUXKIT_LAB", Path.home() / ".cache" / "fluxkit-comfy-lab"))
    port = _free_port()
    env = {**os.environ, "LAB": str(root), "PORT": str(port), "SERVER_CWD": str(root)}  # `python ComfyUI/main.py`
    env.pop("PYTHONPATH", None)
    build = subprocess.run([str(LAB_TOOL), str(REPO)], env=env, capture_output=True, text=True, timeout=1800)
    if build.returncode:
        pytest.fail(f"comfy-lab failed ({build.returncode}):\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}")
    pid = int((root / "server.pid").read_text())  # the server comfy-lab started for this session
    try:
        extra = {**env, "PYTHONPATH": f"{root / 'pack'}:{root / 'pack' / 'tests'}", "PYTHONDONTWRITEBYTECODE": "1"}
        subprocess.run([str(root / "venv" / "bin" / "python"), "-c", EXTRA_MODELS, str(root / "ComfyUI")], env=extra, check=True, timeout=600)
        yield Lab(root, f"http://127.0.0.1:{port}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # a server that died already
            os.kill(pid, 15)


@pytest.fixture(scope="session")
def our_nodes():
    from test_nodes import load_pack_as

    return sorted(load_pack_as("FluxKit-lab-names").NODE_CLASS_MAPPINGS)


def test_comfyuis_own_loader_imports_the_pack(lab, our_nodes):
    script = (
        "import asyncio, json, sys; sys.argv = ['main.py', '--cpu']; sys.path.insert(0, '.')\n"
        "import comfy.options; comfy.options.enable_args_parsing(); import nodes\n"
        f"ok = asyncio.run(nodes.load_custom_node({str(lab.comfy / 'custom_nodes' / PACK_NAME)!r}))\n"
        "print(json.dumps([ok, sorted(k for k in nodes.NODE_CLASS_MAPPINGS if k.startswith('FluxKit'))]))\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(lab.root / "venv" / "bin" / "python"), "-c", script], cwd=lab.comfy, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    ok, names = json.loads(done.stdout.strip().splitlines()[-1])
    assert ok, done.stderr[-3000:]
    assert names == our_nodes
    log = (lab.root / "server.log").read_text()
    assert f"custom_nodes/{PACK_NAME}" in log and "IMPORT FAILED" not in log


def test_object_info_lists_our_nodes_with_core_types(lab, our_nodes):
    info = json.loads(lab.get("/object_info"))
    assert set(our_nodes) <= set(info)
    assert info["FluxKitModelLoader"]["output"] == ["FLUXKIT_MODEL", "MODEL"]
    assert info["FluxKitTextEncoderLoader"]["output"] == ["FLUXKIT_TEXT_ENCODERS", "CLIP"]
    assert info["FluxKitVAELoader"]["output"] == ["FLUXKIT_VAE", "VAE"]
    assert info["FluxKitSampler"]["input"]["required"]["model"][0] == "FLUXKIT_MODEL,MODEL"
    assert "comfyui" in info["FluxKitSampler"]["input"]["optional"]["match"][0]
    # registered with folder_paths: found although the server runs from the folder above ComfyUI
    assert info["FluxKitSeq2SeqLoader"]["input"]["required"]["run_name"][0] == ["seq2seq-demo"]


def test_templates_are_listed_and_served_despite_the_space(lab):
    names = json.loads(lab.get("/workflow_templates"))[PACK_NAME]
    assert sorted(names) == sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
    for name in names:
        served = lab.get(f"/api/workflow_templates/{quote(PACK_NAME)}/{name}.json")
        assert json.loads(served) == json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert lab.get(f"/api/workflow_templates/{quote(PACK_NAME)}/{name}.jpg")[:2] == b"\xff\xd8"  # thumbnail


def test_ui_workflows_convert_to_their_api_twins_with_the_servers_definitions(lab):
    pack = __import__("test_nodes").load_pack_as("FluxKit-lab-convert")
    workflow = importlib.import_module(f"{pack.__name__}.nodes.workflow")
    defs = workflow.NodeDefs.from_object_info(json.loads(lab.get("/object_info")))
    inputs = lambda api: {i: (n["class_type"], n["inputs"]) for i, n in api.items()}  # noqa: E731 (titles are cosmetic)
    for path in sorted((REPO / "workflows").glob("*.json")):
        api = json.loads((REPO / "workflows" / "api" / path.name).read_text())
        assert inputs(workflow.to_api(json.loads(path.read_text()), defs)) == inputs(api), path.name


def _tiny(prompt: dict) -> dict:
    """A shipped workflow shrunk for a CPU: 64x48 images, few steps, the lab's LoRA and mid-size model for core's."""
    prompt = json.loads(json.dumps(prompt))
    core_model = any(n["class_type"] == "LoraLoaderModelOnly" for n in prompt.values())
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("EmptySD3LatentImage", "FluxKitEmptyLatent", "ModelSamplingFlux"):
            inputs.update(width=64, height=48)
        if kind in ("FluxKitSampler", "KSampler"):
            inputs["steps"] = 2 if kind == "FluxKitSampler" else 1  # KSampler runs the 3072-wide file here
        if kind == "FluxKitKontextReference":
            inputs["kontext_resize"] = False
        if kind == "LoraLoaderModelOnly":
            inputs["lora_name"] = "flux-mid-test-lora.safetensors"
        if kind == "FluxKitModelLoader" and core_model:  # core's LoRA keys fit the 3072-wide file
            inputs["unet_name"] = "flux1-dev-mid.safetensors"
        if kind == "FluxKitOutpaintPad":
            inputs.update(right=16, feathering=4)
    return prompt


@pytest.mark.parametrize("path", sorted((REPO / "workflows" / "api").glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_api_workflow_runs_and_saves_a_png(lab, path):
    prompt = _tiny(json.loads(path.read_text()))
    result = lab.run(prompt)
    errors = [m["data"].get("exception_message") for m in result["messages"] if m["type"] == "execution_error"]
    assert result["status"] == "success", errors
    (save,) = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    (image, *_) = lab.images(result, save)
    assert image.ndim == 3 and image.shape[2] == 3


def test_stop_ends_a_run_within_a_step(lab):
    prompt = _tiny(json.loads((REPO / "workflows" / "api" / "flux_dev_txt2img.json").read_text()))
    (sampler,) = [n for n in prompt.values() if n["class_type"] == "FluxKitSampler"]
    sampler["inputs"].update(steps=400, seed=12345)  # a fresh seed: nothing cached
    seen = []

    def stop(progress):
        if not seen:
            lab.post("/interrupt")
        seen.append(progress["value"])

    result = lab.run(prompt, on_progress=stop)
    assert result["status"] == "interrupted"
    assert seen and max(seen) <= seen[0] + 1 < 400  # the step running when Stop came was the last


def test_free_releases_our_cached_models(lab):
    """POST /free (ComfyUI's "Unload Models" / "Free model and node cache") on this `--cpu` server empties our cache."""
    prompt = _tiny(json.loads((REPO / "workflows" / "api" / "flux_dev_txt2img.json").read_text()))
    assert lab.run(prompt)["status"] == "success"

    def released() -> int:
        return (lab.root / "server.log").read_text().count("FluxKit: unloaded")

    before = released()
    lab.post("/free", {"unload_models": True, "free_memory": True})
    for _ in range(600):  # the prompt worker takes the flags between prompts
        if released() > before:
            break
        time.sleep(0.1)
    assert released() > before, (lab.root / "server.log").read_text()[-1500:]


def test_latent_previews_stream_while_our_sampler_runs(lab):
    prompt = _tiny(json.loads((REPO / "workflows" / "api" / "flux_dev_txt2img.json").read_text()))
    (sampler,) = [n for n in prompt.values() if n["class_type"] == "FluxKitSampler"]
    sampler["inputs"].update(steps=3, seed=777)
    result = lab.run(prompt, extra_data={"preview_method": "latent2rgb"})
    assert result["status"] == "success" and result["previews"] >= 3  # one JPEG per step


def _bridge_graph() -> dict:
    """One prompt, images of one seed: core's Flux (UNETLoader) under KSampler; our model's MODEL output under KSampler;
    FluxKit Sampler (match = comfyui) on core's MODEL and on our own; core's LoRA loader on each model; a reference
    latent (core's ReferenceLatent, as Kontext uses) on each."""
    nodes = {
        "te": ("FluxKitTextEncoderLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "device": "default"}),
        "cond": ("FluxKitTextEncode", {"text_encoders": ["te", 0], "clip_l": "a fox", "t5xxl": "a photo of a fox", "guidance": 3.5, "t5_tokens": "comfyui"}),
        "g": ("FluxGuidance", {"conditioning": ["cond", 0], "guidance": 4.0}),
        "zero": ("ConditioningZeroOut", {"conditioning": ["cond", 0]}),
        "latent": ("EmptySD3LatentImage", {"width": 64, "height": 48, "batch_size": 1}),
        "core": ("UNETLoader", {"unet_name": "flux1-dev-mid.safetensors", "weight_dtype": "default"}),
        "ours": ("FluxKitModelLoader", {"unet_name": "flux1-dev-mid.safetensors", "weight_dtype": "default", "preset": "auto"}),
        "vae": ("VAELoader", {"vae_name": "ae-full.safetensors"}),
    }
    shift = {"max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 48}
    sampling = {"seed": 9, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "positive": ["g", 0], "negative": ["zero", 0], "latent_image": ["latent", 0]}  # fmt: skip
    ours_sampler = {"positive": ["g", 0], "latent_image": ["latent", 0], "seed": 9, "steps": 2, "guidance": 3.5, "cfg": 1.0,
                    "max_shift": 1.15, "base_shift": 0.5, "denoise": 1.0, "match": "comfyui"}  # fmt: skip
    for name, model in (("core", ["core", 0]), ("ours", ["ours", 1]), ("core_lora", ["core_l", 0]), ("ours_lora", ["ours_l", 0])):
        nodes[f"{name}_ms"] = ("ModelSamplingFlux", {"model": model, **shift})
        nodes[f"{name}_ks"] = ("KSampler", {"model": [f"{name}_ms", 0], **sampling})
    nodes["core_l"] = ("LoraLoaderModelOnly", {"model": ["core", 0], "lora_name": "flux-mid-test-lora.safetensors", "strength_model": 1.0})
    nodes["ours_l"] = ("LoraLoaderModelOnly", {"model": ["ours", 1], "lora_name": "flux-mid-test-lora.safetensors", "strength_model": 1.0})
    nodes["fk_core"] = ("FluxKitSampler", {"model": ["core", 0], **ours_sampler})
    nodes["fk_ours"] = ("FluxKitSampler", {"model": ["ours", 0], **ours_sampler})
    # Kontext-style reference latents from core's ReferenceLatent: one step each on core's model, ours, our sampler
    nodes["pixels"] = ("LoadImage", {"image": "example.png"})
    nodes["ref_latent"] = ("VAEEncode", {"pixels": ["pixels", 0], "vae": ["vae", 0]})
    nodes["ref"] = ("ReferenceLatent", {"conditioning": ["g", 0], "latent": ["ref_latent", 0]})
    for name in ("core", "ours"):
        nodes[f"{name}_ref_ks"] = ("KSampler", {"model": [f"{name}_ms", 0], **sampling, "steps": 1, "positive": ["ref", 0]})
    nodes["fk_ref"] = ("FluxKitSampler", {"model": ["core", 0], **ours_sampler, "steps": 1, "positive": ["ref", 0]})
    prompt = {k: {"class_type": c, "inputs": i} for k, (c, i) in nodes.items()}
    for name, latent in (("core", "core_ks"), ("ours", "ours_ks"), ("core_lora", "core_lora_ks"), ("ours_lora", "ours_lora_ks"),
                         ("fk_core", "fk_core"), ("fk_ours", "fk_ours"), ("core_ref", "core_ref_ks"), ("ours_ref", "ours_ref_ks"),
                         ("fk_ref", "fk_ref")):  # fmt: skip
        decode = ("FluxKitVAEDecode", {"samples": [latent, 0], "vae": ["vae", 0], "tiled": False, "tile_size": 512, "overlap": 64}) \
            if name == "fk_ours" else ("VAEDecode", {"samples": [latent, 0], "vae": ["vae", 0]})  # core's VAE in ours too
        prompt[f"{name}_img"] = {"class_type": decode[0], "inputs": decode[1]}
        prompt[f"{name}_save"] = {"class_type": "SaveImage", "inputs": {"images": [f"{name}_img", 0], "filename_prefix": f"bridge_{name}"}}
    return prompt


def test_graphs_mixing_core_and_our_nodes_reproduce_cores_image(lab):
    result = lab.run(_bridge_graph())
    errors = [m["data"].get("exception_message") for m in result["messages"] if m["type"] == "execution_error"]
    assert result["status"] == "success", errors
    names = ("core", "ours", "core_lora", "ours_lora", "fk_core", "fk_ours", "core_ref", "ours_ref", "fk_ref")
    image = {name: lab.images(result, f"{name}_save")[0] for name in names}
    for name in ("ours", "fk_core", "fk_ours"):  # KSampler on our MODEL, our sampler on core's MODEL and on ours
        assert np.abs(image[name] - image["core"]).max() <= 1, name
    for name in ("ours_ref", "fk_ref"):  # reference latents placed as core places them
        assert np.abs(image[name] - image["core_ref"]).max() <= 1, name
    assert np.abs(image["ours_lora"] - image["core_lora"]).max() <= 1  # core's LoRA loader patches our model by key
    assert np.abs(image["core_lora"] - image["core"]).max() > 1  # and the LoRA changes the image


def test_core_ksampler_on_our_fill_and_canny_models_reads_our_image_conditioning(lab):
    """Fill and Canny files through our loader's MODEL output: core's model_base.Flux concatenates the Fill (masked
    image + mask) and control channels our conditioning nodes store, as our sampler does."""
    prompt = {
        "te": ("FluxKitTextEncoderLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "device": "default"}),
        "cond": ("FluxKitTextEncode", {"text_encoders": ["te", 0], "clip_l": "apples", "t5xxl": "a bowl of apples", "guidance": 30.0, "t5_tokens": "comfyui"}),
        "vae": ("FluxKitVAELoader", {"vae_name": "ae.safetensors"}),
        "pixels": ("LoadImage", {"image": "example.png"}),
        "fill_model": ("FluxKitModelLoader", {"unet_name": "flux1-fill-dev.safetensors", "weight_dtype": "default", "preset": "auto"}),
        "canny_model": ("FluxKitModelLoader", {"unet_name": "flux1-canny-dev.safetensors", "weight_dtype": "default", "preset": "auto"}),
        "fill": ("FluxKitFillConditioning", {"conditioning": ["cond", 0], "vae": ["vae", 0], "image": ["pixels", 0], "mask": ["pixels", 1]}),
        "canny": ("FluxKitControlConditioning", {"conditioning": ["cond", 0], "vae": ["vae", 0], "control_image": ["pixels", 0]}),
    }
    for tool in ("fill", "canny"):
        common = {"seed": 4, "steps": 2, "cfg": 1.0, "denoise": 1.0, "positive": [tool, 0], "latent_image": [tool, 1]}
        prompt[f"{tool}_core"] = ("KSampler", {**common, "model": [f"{tool}_model", 1], "sampler_name": "euler", "scheduler": "simple", "negative": [tool, 0]})
        prompt[f"{tool}_ours"] = ("FluxKitSampler", {**common, "model": [f"{tool}_model", 0], "guidance": 30.0, "max_shift": 1.15,
                                                       "base_shift": 1.15, "match": "comfyui"})  # core's fixed shift, no ModelSamplingFlux  # fmt: skip
    for latent in [k for k in prompt if k.endswith(("_core", "_ours"))]:
        prompt[f"{latent}_img"] = ("FluxKitVAEDecode", {"samples": [latent, 0], "vae": ["vae", 0], "tiled": False, "tile_size": 512, "overlap": 64})
        prompt[f"{latent}_save"] = ("SaveImage", {"images": [f"{latent}_img", 0], "filename_prefix": f"tools_{latent}"})
    result = lab.run({k: {"class_type": c, "inputs": i} for k, (c, i) in prompt.items()})
    errors = [m["data"].get("exception_message") for m in result["messages"] if m["type"] == "execution_error"]
    assert result["status"] == "success", errors
    for tool in ("fill", "canny"):
        core, ours = lab.images(result, f"{tool}_core_save")[0], lab.images(result, f"{tool}_ours_save")[0]
        assert np.abs(core - ours).max() <= 1, tool



def test_core_nodes_on_our_text_encoders_and_vae_reproduce_cores_image(lab):
    """Our text encoders' CLIP output under core's CLIPTextEncodeFlux, our VAE's VAE output under core's VAEDecode and
    VAEEncode: the images of our text encode (t5_tokens comfyui: core's encoding, as core's DualCLIPLoader cannot load
    the tiny encoders) and of core's VAELoader (ae-full: core's VAE has the real AE's shape)."""
    text = {"clip_l": "a fox", "t5xxl": "a photo of a fox", "guidance": 3.5}
    sampling = {"seed": 9, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0,
                "model": ["ms", 0], "negative": ["zero", 0], "latent_image": ["latent", 0]}  # fmt: skip
    nodes = {
        "te": ("FluxKitTextEncoderLoader", {"clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "device": "default"}),
        "ours_cond": ("FluxKitTextEncode", {"text_encoders": ["te", 0], **text, "t5_tokens": "comfyui"}),
        "core_cond": ("CLIPTextEncodeFlux", {"clip": ["te", 1], **text}),
        "zero": ("ConditioningZeroOut", {"conditioning": ["core_cond", 0]}),
        "latent": ("EmptySD3LatentImage", {"width": 64, "height": 48, "batch_size": 1}),
        "unet": ("UNETLoader", {"unet_name": "flux1-dev-mid.safetensors", "weight_dtype": "default"}),
        "ms": ("ModelSamplingFlux", {"model": ["unet", 0], "max_shift": 1.15, "base_shift": 0.5, "width": 64, "height": 48}),
        "ours_ks": ("KSampler", {**sampling, "positive": ["ours_cond", 0]}),
        "core_ks": ("KSampler", {**sampling, "positive": ["core_cond", 0]}),
        "vae": ("VAELoader", {"vae_name": "ae-full.safetensors"}),
        "our_vae": ("FluxKitVAELoader", {"vae_name": "ae-full.safetensors"}),
        "pixels": ("LoadImage", {"image": "example.png"}),
        "core_enc": ("VAEEncode", {"pixels": ["pixels", 0], "vae": ["vae", 0]}),
        "ours_enc": ("VAEEncode", {"pixels": ["pixels", 0], "vae": ["our_vae", 1]}),
    }
    images = {"text": ("ours_ks", "vae"), "clip": ("core_ks", "vae"), "clip_vae": ("core_ks", "our_vae"),
              "core_enc": ("core_enc", "vae"), "ours_enc": ("ours_enc", "vae")}  # fmt: skip
    for name, (latent, vae) in images.items():
        nodes[f"{name}_img"] = ("VAEDecode", {"samples": [latent, 0], "vae": [vae, 1 if vae == "our_vae" else 0]})
        nodes[f"{name}_save"] = ("SaveImage", {"images": [f"{name}_img", 0], "filename_prefix": f"te_vae_{name}"})
    result = lab.run({k: {"class_type": c, "inputs": i} for k, (c, i) in nodes.items()})
    errors = [m["data"].get("exception_message") for m in result["messages"] if m["type"] == "execution_error"]
    assert result["status"] == "success", errors
    image = {name: lab.images(result, f"{name}_save")[0] for name in images}
    assert np.abs(image["clip"] - image["text"]).max() <= 1  # core's text encode on our CLIP-L and T5
    assert np.abs(image["clip_vae"] - image["clip"]).max() <= 1  # core's decode on our AE
    assert np.abs(image["ours_enc"] - image["core_enc"]).max() <= 1  # core's encode on our AE


SHARED_WEIGHTS = r"""
import asyncio, json, sys
pack = sys.argv[1]; sys.argv = ['main.py', '--cpu']; sys.path.insert(0, '.')
import comfy.options; comfy.options.enable_args_parsing(); import nodes
assert asyncio.run(nodes.load_custom_node(pack))
ours = {n: nodes.NODE_CLASS_MAPPINGS[n]() for n in ("FluxKitTextEncoderLoader", "FluxKitVAELoader")}
text, clip = ours["FluxKitTextEncoderLoader"].load("clip_l.safetensors", "t5xxl_fp16.safetensors", "default")
ae, vae = ours["FluxKitVAELoader"].load("ae-full.safetensors")
tiny_ae, tiny_vae = ours["FluxKitVAELoader"].load("ae.safetensors")
params = lambda *modules: [p for m in modules for p in m.parameters()]
ptrs = lambda ps: {p.data_ptr() for p in ps}
ids = lambda ps: {id(p) for p in ps}
our_te, core_te = params(text.encoders.clip, text.encoders.t5), params(clip.cond_stage_model)
our_ae, core_ae = params(ae), params(vae.first_stage_model)
print(json.dumps({
    "types": [type(clip).__module__ + "." + type(clip).__name__, type(vae).__module__ + "." + type(vae).__name__],
    "te_shared": ptrs(our_te) <= ptrs(core_te), "te_extra": len(ptrs(core_te) - ptrs(our_te)),
    "te_own_params": not ids(our_te) & ids(core_te),
    "ae_shared": ptrs(our_ae) == ptrs(core_ae), "ae_own_params": not ids(our_ae) & ids(core_ae),
    "tiny_vae": [hasattr(tiny_vae, "decode"), str(getattr(tiny_vae, "_reason", ""))],
}))
"""


def test_our_clip_and_vae_outputs_share_our_tensors(lab):
    """Inside ComfyUI (the lab's, in-process): the CLIP and VAE outputs are core's classes over our very tensors (no
    copy), through their own Parameter objects (ComfyUI's moves and patches replace core's, never ours); an AE core's
    VAE cannot take gives an output that says so when used."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([str(lab.root / "venv" / "bin" / "python"), "-c", SHARED_WEIGHTS, str(lab.comfy / "custom_nodes" / PACK_NAME)],
                          cwd=lab.comfy, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["types"] == ["comfy.sd.CLIP", "comfy.sd.VAE"]
    assert got["te_shared"] and got["te_extra"] == 3  # core's own: two logit scales and CLIP-L's unused projection
    assert got["ae_shared"] and got["te_own_params"] and got["ae_own_params"]
    assert got["tiny_vae"] == [False, "core's VAE takes the full-size Flux AE only: decode this one with Flux VAE Decode (FluxKit)"]
