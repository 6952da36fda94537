"""Issue 12, point 3, in real ComfyUI 0.8.0 on a GPU: FluxKit and ComfyUI share the card's memory.

Real ComfyUI code: this process imports ComfyUI's main.py and calls its start_comfyui() (PromptServer, the built-in
and custom node loading, our pack loaded by ComfyUI's own loader from a symlink in <workdir>/custom_nodes, the
prompt_worker thread), then serves HTTP on 127.0.0.1 as `python main.py` does. Every step is an HTTP request as the
editor sends it: POST /prompt (then GET /history until it is done) and, for "Unload Models", POST /free with
{"unload_models": true, "free_memory": true}, which server.py's handler turns into flags that main.py's
prompt_worker acts on (unload_all_models, the executor's reset, gc, soft_empty_cache).
Driven directly or standing in:
  - the emulated card: all but --cap GiB of the free GPU memory held in one tensor (bench/vram.py's method),
    allocated from this process between prompts;
  - the readings, taken between prompts: torch.cuda.memory_allocated (less the blocker), every Flux transformer
    with weights on the GPU (ours and ComfyUI's, found with gc, twins sharing storage counted once) and ComfyUI's
    loaded-model list (comfy.model_management.current_loaded_models);
  - the prompt: a bench node written to custom_nodes gives random T5/CLIP conditioning (text encoders are not
    what is measured); models are random-weight BFL-layout files written to <workdir>/models/diffusion_models:
    flux-dev and flux-schnell at full width (3072, which ComfyUI's Flux detection requires) with --depth blocks;
  - PyAV, when absent (the GPU machine has none), is an empty module: ComfyUI's video types import it at start;
  - not as `python main.py` does: torch is imported first (main.py warns) and cuda_malloc's async allocator (main's
    __main__ only) is off, so PyTorch's caching allocator keeps the books, as with --disable-cuda-malloc; the front
    end is an empty folder (--front-end-root); the API nodes are off (--disable-api-nodes).
Steps, each asserted (exit status 1 when a check fails):
  a) core's UNETLoader + KSampler on the dev file, then our Load Flux Model + Flux Sampler on it, on a card of --cap
     GiB where both cannot fit: ComfyUI's Flux is unloaded when ours is placed, and nothing runs out of memory (core's
     loader stays in our prompt, unlinked, so its model stays cached and alive: the unload frees it, not gc);
  b) POST /free: none of our weights stay on the GPU, and ComfyUI lists none of our models;
  c) on the whole card (room for both), our dev then our schnell: one Flux transformer on the GPU, schnell; back on
     the --cap card, core's dev: ComfyUI's load unloads ours.
With --cpu ComfyUI runs with --cpu: the flow and ComfyUI's model list are checked, VRAM is not measurable.

    python bench/comfy_gpu.py                              # GPU: depth 4+8 (4.8 GiB a file), 8 GiB card
    python bench/comfy_gpu.py --cpu --small                # proves the flow on a CPU (1 GiB files)
"""
import argparse
import gc
import importlib.util
import json
import socket
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
CONDITIONING_NODE = '''"""Bench stand-in for the text encoders: random T5 tokens and CLIP pooled vector, with a guidance value."""
import torch


class BenchFluxConditioning:
    CATEGORY, RETURN_TYPES, FUNCTION = "bench", ("CONDITIONING",), "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tokens": ("INT", {"default": 256}), "seed": ("INT", {"default": 0})}}

    def make(self, tokens, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g), "guidance": 3.5}]],)


NODE_CLASS_MAPPINGS = {"BenchFluxConditioning": BenchFluxConditioning}
'''


def write_models(folder: Path, depth: tuple[int, int], device: str) -> None:
    """bench-flux1-dev / bench-flux1-schnell.safetensors: random bf16 weights, BFL keys, flux-dev width."""
    from flux_core.model import Flux, preset

    folder.mkdir(parents=True, exist_ok=True)
    for variant in ("dev", "schnell"):
        path = folder / f"bench-flux1-{variant}.safetensors"
        if path.exists():
            continue
        torch.manual_seed(len(variant))
        with torch.device(device):  # default init: outputs stay finite
            model = Flux(preset(f"flux-{variant}", depth=depth[0], depth_single_blocks=depth[1])).to(torch.bfloat16)
        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(path.with_suffix(".partial")))
        path.with_suffix(".partial").rename(path)
        print(f"wrote {path.name}: {path.stat().st_size / GiB:.2f} GiB", flush=True)
        del model


def without_pyav() -> None:
    """An empty `av` (names resolve to empty classes) where PyAV is not installed."""
    if importlib.util.find_spec("av") is not None:
        return

    class Absent(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (), {})

    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
        sys.modules[name] = Absent(name)


def start_comfyui(work: Path, cpu: bool) -> str:
    """ComfyUI's main.start_comfyui() with our pack, its event loop serving HTTP in a thread; returns the URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (work / "web").mkdir(parents=True, exist_ok=True)
    sys.argv = ["main.py", "--base-directory", str(work), "--front-end-root", str(work / "web"), "--listen", "127.0.0.1",
                "--port", str(port), "--disable-api-nodes", *(["--cpu"] if cpu else [])]  # fmt: skip
    without_pyav()
    import comfy.options

    comfy.options.enable_args_parsing()
    import main  # ComfyUI's: logging, folders from --base-directory, prestartup scripts

    loop, _, start_all = main.start_comfyui()
    threading.Thread(target=lambda: loop.run_until_complete(start_all()), daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/system_stats", timeout=5).read()
            return url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"ComfyUI did not answer on {url}")


def until(done, what: str, seconds: float = 600) -> None:
    deadline = time.perf_counter() + seconds
    while not done():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def post(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def run_prompt(url: str, graph: dict) -> None:
    """POST /prompt, then wait for its history entry; raises with ComfyUI's error when it failed."""
    try:
        prompt_id = post(url + "/prompt", {"prompt": graph, "client_id": "bench"})["prompt_id"]
    except urllib.error.HTTPError as e:  # validation failed
        raise RuntimeError(f"prompt refused: {e.read().decode()[:3000]}") from None
    history = {}

    def finished() -> bool:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=60) as r:
            history.update(json.loads(r.read()))
        return prompt_id in history

    until(finished, f"prompt {prompt_id}")
    status = history[prompt_id]["status"]
    if status["status_str"] != "success":
        errors = [m for m in status["messages"] if m[0] == "execution_error"]
        raise RuntimeError(f"prompt failed: {json.dumps(errors)[:3000]}")


def graph(loader: dict, sampler: dict, args, seed: int) -> dict:
    """loader -> sampler on a small empty latent and the bench conditioning -> SaveLatent (an output node)."""
    side = args.size
    return {
        "1": loader,
        "2": {"class_type": "BenchFluxConditioning", "inputs": {"tokens": args.tokens, "seed": seed}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "4": {**sampler, "inputs": {**sampler["inputs"], "model": ["1", 0], "positive": ["2", 0], "latent_image": ["3", 0], "seed": seed, "steps": args.steps}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "bench/latent"}},
    }  # fmt: skip


def core_graph(variant: str, args, seed: int) -> dict:
    loader = {"class_type": "UNETLoader", "inputs": {"unet_name": f"bench-flux1-{variant}.safetensors", "weight_dtype": "default"}}
    sampler = {"class_type": "KSampler", "inputs": {"negative": ["2", 0], "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}
    return graph(loader, sampler, args, seed)


def our_graph(variant: str, args, seed: int) -> dict:
    loader = {"class_type": "FluxKitModelLoader", "inputs": {"unet_name": f"bench-flux1-{variant}.safetensors", "weight_dtype": "default"}}
    sampler = {"class_type": "FluxKitSampler", "inputs": {"guidance": 3.5, "cfg": 1.0, "max_shift": 1.15, "base_shift": 0.5, "denoise": 1.0}}
    return graph(loader, sampler, args, seed)


class Card:
    """The emulated card: all but `cap` bytes of the GPU's memory held in one tensor; what is allocated now counts
    as used on the card."""

    def __init__(self, cuda: bool):
        self.cuda, self.blocker = cuda, None

    def cap(self, gib: float | None) -> None:
        self.blocker = None
        if not self.cuda:
            return
        gc.collect()
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        if gib is not None:
            self.blocker = torch.empty(max(free - max(int(gib * GiB) - torch.cuda.memory_allocated(), 0), 0), dtype=torch.uint8, device="cuda")
        print(f"card: {'whole GPU' if gib is None else f'{gib:g} GiB'}", flush=True)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() - (0 if self.blocker is None else self.blocker.nbytes)


def flux_on_gpu(device: str = "cuda") -> dict[str, int]:
    """Every Flux transformer holding memory on the GPU, ours (flux_core) or ComfyUI's (comfy.ldm): label -> bytes.
    Modules sharing storage (our model and its ComfyUI twin) are one transformer; our stream buffers count."""
    from flux_core import streaming
    from flux_core.model import Flux

    core = sys.modules["comfy.ldm.flux.model"].Flux if "comfy.ldm.flux.model" in sys.modules else Flux
    gc.collect()
    found = []  # (label, {storage pointer: bytes})
    for m in gc.get_objects():
        if not issubclass(type(m), (Flux, core)):  # type(): a dead weakref proxy raises on __class__
            continue
        placement = streaming.placement_of(m) if isinstance(m, Flux) else None
        tensors = [*m.parameters(), *m.buffers(), *(placement.slots if placement is not None else [])]
        tensors = [t for t in tensors if t.device.type == device]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        if storages:
            who = "FluxKit" if type(m).__module__.startswith("flux_core") else "ComfyUI"
            found.append((f"{who} {'dev' if m.params.guidance_embed else 'schnell'}", storages))
    merged = []
    for label, storages in sorted(found, key=lambda f: not f[0].startswith("FluxKit")):  # ours names a shared one
        twin = next((m for m in merged if m[1].keys() & storages.keys()), None)
        if twin is None:
            merged.append((label, dict(storages)))
        else:
            twin[1].update(storages)
    return {label: sum(s.values()) for label, s in merged}


def comfy_loaded() -> list[str]:
    """ComfyUI's loaded-model list: what each entry holds and its bytes on its device."""
    mm = sys.modules["comfy.model_management"]
    out = []
    for entry in mm.current_loaded_models:
        if entry.model is None:  # its patcher is gone: ComfyUI drops the entry at its next load
            out.append("a dead entry")
            continue
        real = entry.real_model()
        owner = f"FluxKit {type(real).__name__}" if type(entry).__name__ == "ComfyEntry" else type(real).__name__
        out.append(f"{owner} {entry.model_loaded_memory() / GiB:.2f} GiB on {entry.device}")
    return out


class Checks:
    """Readings after each step (printed, and kept for --out) and the checks on them."""

    def __init__(self, card: Card, measured: bool):
        self.card, self.measured, self.steps, self.failed = card, measured, [], []

    def report(self, step: str, seconds: float) -> dict[str, int]:
        on_gpu = flux_on_gpu() if self.measured else {}
        allocated = self.card.allocated() / GiB if self.measured else None
        self.steps.append({"step": step, "seconds": seconds, "allocated_gib": allocated, "checks": {},
                           "flux_on_gpu_gib": {k: v / GiB for k, v in on_gpu.items()}, "comfyui_loaded": comfy_loaded()})  # fmt: skip
        flux = ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in on_gpu.items()) or "none"
        print(f"[{step}, {seconds:.1f} s] allocated less the blocker: "
              f"{'not measurable (--cpu)' if allocated is None else f'{allocated:.2f} GiB'}; Flux on the GPU: {flux}\n"
              f"    ComfyUI's loaded models: {comfy_loaded() or 'none'}", flush=True)  # fmt: skip
        return on_gpu

    def check(self, what: str, ok, vram: bool = True) -> None:
        """`ok` (a callable) decides; a VRAM check reads "not measurable" on the CPU."""
        result = ok() if self.measured or not vram else None
        self.steps[-1]["checks"][what] = result
        print(f"    {'PASS' if result else 'not measurable on the CPU' if result is None else 'FAIL'}: {what}", flush=True)
        if result is False:
            self.failed.append(what)


def ours(on_gpu: dict, variant: str | None = None) -> int:
    return sum(v for k, v in on_gpu.items() if k.startswith("FluxKit") and variant in (None, k.split()[1]))


def core(on_gpu: dict) -> int:
    return sum(v for k, v in on_gpu.items() if k.startswith("ComfyUI"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=REPO / ".bench_deps" / "comfyui", help="ComfyUI 0.8.0 source")
    parser.add_argument("--workdir", type=Path, help="models, custom_nodes, output (default /tmp/fluxkit_comfy_gpu[_small])")
    parser.add_argument("--cpu", action="store_true", help="ComfyUI with --cpu: the flow only, no VRAM readings")
    parser.add_argument("--small", action="store_true", help="1 double + 1 single block (1 GiB files), 64 px, 1 step")
    parser.add_argument("--depth", type=int, nargs=2, default=[4, 8], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--cap", type=float, default=8.0, help="emulated card, GiB: one model fits, two do not")
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--tokens", type=int, default=256, help="T5 tokens")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, help="the readings and checks as JSON")
    args = parser.parse_args()
    # ComfyUI's folder first (its `nodes` and `utils`, not ours), not bench/ (bench/gguf.py); flux_core from REPO
    sys.path[:1] = [str(args.comfyui.resolve())]
    sys.path.append(str(REPO))
    if args.small:
        args.depth, args.size, args.tokens, args.steps = [1, 1], 64, 16, 1
    work = (args.workdir or Path(f"/tmp/fluxkit_comfy_gpu{'_small' if args.small else ''}")).absolute()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --cpu --small to check the flow on the CPU")

    write_models(work / "models" / "diffusion_models", tuple(args.depth), "cpu" if args.cpu else "cuda")
    (work / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (work / "custom_nodes" / "bench_conditioning.py").write_text(CONDITIONING_NODE)
    link = work / "custom_nodes" / "FluxKit"
    if not link.is_symlink():
        link.symlink_to(REPO, target_is_directory=True)
    url = start_comfyui(work, args.cpu)
    registry = sys.modules["nodes"].NODE_CLASS_MAPPINGS  # ComfyUI's
    assert "FluxKitSampler" in registry and "BenchFluxConditioning" in registry, "ComfyUI did not load the pack"
    card = Card(not args.cpu)
    checks = Checks(card, measured=not args.cpu)

    def step(name: str, prompt: dict) -> dict:
        start = time.perf_counter()
        try:
            run_prompt(url, prompt)
        except RuntimeError as e:  # out of memory, say: recorded, and the later steps still run
            print(e, flush=True)
            checks.failed.append(f"{name}: the prompt failed")
        return checks.report(name, time.perf_counter() - start)

    card.cap(args.cap)
    on_gpu = step("a1: core UNETLoader + KSampler, dev", core_graph("dev", args, seed=1))
    checks.check("ComfyUI's Flux is on the GPU, ours is not", lambda: core(on_gpu) > 0 and not ours(on_gpu))
    prompt = {**our_graph("dev", args, seed=2), "6": core_graph("dev", args, seed=1)["1"]}  # core's loader, unlinked:
    on_gpu = step("a2: our Load Flux Model + Flux Sampler, dev", prompt)  # its model stays cached, alive
    checks.check("ours placed, ComfyUI's Flux unloaded first, no out-of-memory", lambda: ours(on_gpu) > 0 and not core(on_gpu))

    post(url + "/free", {"unload_models": True, "free_memory": True})
    queue = sys.modules["server"].PromptServer.instance.prompt_queue
    until(lambda: not queue.get_flags(reset=False), "the prompt worker to take the /free flags")
    empty = {"3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
             "5": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "bench/empty"}}}  # fmt: skip
    on_gpu = step("b: POST /free", empty)  # the worker acts on the flags before it takes the next prompt
    checks.check("ComfyUI lists none of our models", lambda: not any(e.startswith("FluxKit") for e in comfy_loaded()), vram=False)
    checks.check("none of our weights on the GPU", lambda: not ours(on_gpu) and card.allocated() < GiB / 4)

    card.cap(None)
    on_gpu = step("c1: ours, dev, on the whole GPU", our_graph("dev", args, seed=3))
    checks.check("our dev on the GPU", lambda: ours(on_gpu, "dev") > 0)
    on_gpu = step("c1: ours, schnell, on the whole GPU", our_graph("schnell", args, seed=4))
    checks.check("one Flux transformer on the GPU: our schnell", lambda: list(on_gpu) == ["FluxKit schnell"])
    card.cap(args.cap)
    on_gpu = step("c2: core dev after ours", core_graph("dev", args, seed=5))
    checks.check("ComfyUI's load unloaded ours", lambda: core(on_gpu) > 0 and not ours(on_gpu))

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "steps": checks.steps,
                                        "failed": checks.failed}, indent=1))  # fmt: skip
    print("FAILED: " + "; ".join(checks.failed) if checks.failed else "all checks passed", flush=True)
    sys.exit(1 if checks.failed else 0)


if __name__ == "__main__":
    main()
