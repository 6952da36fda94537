"""FLUX.1-dev on the cards people have: 8, 12, 16 and 24 GiB, emulated on a big GPU, against ComfyUI's own Flux.

A card with CAP GiB is emulated by holding all but CAP GiB of the GPU's free memory in one tensor. Random weights at
full size (no download) are written once to --workdir in the files users have: flux-dev transformer (BFL layout,
bf16; fp8 cells load it with weight_dtype fp8 as the loader does), T5-XXL fp16, CLIP-L, the AE; GGUF weights (Q8_0,
Q4_K, ...) are flux-<type>.gguf files as city96's (bench/gguf.py's write_flux), kept quantised. Cells:
  transformer: load_flux to the CPU (memory-mapped), placed by flux_core.streaming.transformer_on (automatic budget:
    free memory minus the activation estimate), 1024x1024, 512 T5 tokens: ms per step = median of --steps timed
    forwards on the 28-step schedule's times after --warmup.
  pipeline: flux_core.pipeline.generate end to end (T5 + CLIP encode, 28 steps, VAE decode), all models loaded to the
    CPU first: end-to-end seconds and ms per step.
  comfyui (--comfyui PATH): ComfyUI's native Flux on the same file, loaded as its loader nodes do
    (comfy.sd.load_diffusion_model with weight_dtype, comfy.model_management.load_models_gpu with the sampler's
    memory estimate), BaseModel.apply_model timed the same way; GGUF files through city96's pack (--comfyui-gguf
    PATH: its UnetLoaderGGUF node).
Each cell prints OK / OOM, ms/step, peak VRAM (max allocated minus the blocker), resident and streamed GiB, and the
link floor: bytes streamed per step over the pinned host-to-GPU bandwidth measured first.

    python bench/vram.py                                    # all cells, JSON to bench/results/vram.json
    python bench/vram.py --comfyui .bench_deps/comfyui --only comfyui
    python bench/vram.py --measure-activations               # the activation factor of flux_core.streaming
    python bench/vram.py --tiny --device cpu                 # proves the script on a CPU (no caps, small files)
    python bench/vram.py --weights Q4_K Q8_0 --only transformer pipeline    # GGUF files on the emulated cards
"""
import argparse
import gc
import json
import statistics
import struct
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:1] = [str(REPO), str(REPO / "tests")]  # not bench/ itself: bench/gguf.py would shadow the gguf package

from bench.gguf import QUANTISED, comfyui_gguf_unet, write_flux  # noqa: E402
from bench.gpu_flux_dev import random_fill_  # noqa: E402
from tiny_text import tiny_clip_config, tiny_t5_config  # noqa: E402
from transformers import CLIPTextModel, T5EncoderModel  # noqa: E402

from flux_core import streaming  # noqa: E402
from flux_core.autoencoder import AutoEncoder, AutoEncoderParams, load_autoencoder  # noqa: E402
from flux_core.conditioning import load_text_encoders  # noqa: E402
from flux_core.loading import load_flux  # noqa: E402
from flux_core.model import Flux, preset  # noqa: E402
from flux_core.pipeline import generate  # noqa: E402
from flux_core.sampling import FlowMatch, image_ids, text_ids  # noqa: E402

GiB = 1024**3
WEIGHTS = {"bf16": None, "fp8": torch.float8_e4m3fn, **dict.fromkeys(QUANTISED)}  # GGUF blocks stay quantised
_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file written tensor by tensor (no whole-file buffer in RAM, unlike save_file)."""
    header, offset = {}, 0
    for key, t in tensors.items():
        header[key] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            t.detach().contiguous().view(torch.uint8).cpu().numpy().tofile(f)
    tmp.rename(path)


def random_module(build, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        module = build().to(dtype)
    module.to_empty(device=device)
    random_fill_(module, seed)
    return module


def write_files(workdir: Path, device: str, tiny: bool, needed: set[str]) -> dict[str, Path]:
    """The `needed` files (flux, t5, clip, ae: safetensors; a GGUF type: flux-<type>.gguf, bench/gguf.py's
    write_flux: the package's quantiser where it has one), written once into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = {k: workdir / f"{k}.safetensors" for k in ("flux", "t5", "clip", "ae")}
    flux_params = preset("flux-dev", hidden_size=256, num_heads=2, depth=2, depth_single_blocks=4, context_in_dim=64, vec_in_dim=64) if tiny else preset("flux-dev")
    t5_config = tiny_t5_config(64, 2, 2, 128) if tiny else tiny_t5_config(4096, 64, 24, 10240)
    clip_config = tiny_clip_config(64, 2, 128) if tiny else tiny_clip_config(768, 12, 3072, 12)
    builders = {
        "flux": (lambda: Flux(flux_params), torch.bfloat16),
        "t5": (lambda: T5EncoderModel(t5_config), torch.float16),
        "clip": (lambda: CLIPTextModel(clip_config), torch.float16),
        "ae": (lambda: AutoEncoder(AutoEncoderParams.flux(**({"ch": 32} if tiny else {}))), torch.float32),
    }
    for name, (build, dtype) in builders.items():
        if files[name].exists() or name not in needed:
            continue
        start = time.perf_counter()
        module = random_module(build, device, dtype, seed=len(name))
        state = {k: v for k, v in module.state_dict().items() if k != "encoder.embed_tokens.weight"}  # tied to shared
        if name == "t5":  # T5 has no 1/sqrt(d) in attention: its own init scales q down, else fp16 overflows
            state = {k: v / 8 if ".SelfAttention.q." in k else v for k, v in state.items()}
        write_safetensors(files[name], state)
        del module, state
        print(f"wrote {files[name].name}: {files[name].stat().st_size / GiB:.2f} GiB in {time.perf_counter() - start:.0f} s", flush=True)
    for kind in sorted(needed & set(QUANTISED)):
        files[kind] = write_flux(workdir / f"flux-{kind}.gguf", flux_params, kind, device)
    return files


def pinned_bandwidth(device: str) -> dict:
    """Host-to-GPU copy rate, GiB/s, from pinned and from pageable memory (1 GiB, median of 5)."""
    if device != "cuda":
        return {"pinned_gib_s": None, "pageable_gib_s": None}
    dst = torch.empty(GiB, dtype=torch.uint8, device=device)
    out = {}
    for name, src in (("pinned", torch.ones(GiB, dtype=torch.uint8).pin_memory()), ("pageable", torch.ones(GiB, dtype=torch.uint8))):
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        out[f"{name}_gib_s"] = 1 / statistics.median(times)
    return out


class Card:
    """Emulated card: all but `cap` bytes of the free GPU memory held in one tensor; peak = max allocated - it."""

    def __init__(self, cap: int | None, device: str):
        self.cap, self.cuda = cap, device == "cuda"

    def __enter__(self):
        gc.collect()
        self.blocker = None
        if self.cuda:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info()[0]
            if self.cap is not None:
                self.blocker = torch.empty(max(free - self.cap, 0), dtype=torch.uint8, device="cuda")
            torch.cuda.reset_peak_memory_stats()
        return self

    def peak_gib(self) -> float | None:
        if not self.cuda:
            return None
        held = 0 if self.blocker is None else self.blocker.nbytes
        return (torch.cuda.max_memory_allocated() - held) / GiB

    def __exit__(self, *exc):
        self.blocker = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def transformer_inputs(params, device: str, size: int, tokens: int, steps: int):
    h = w = size // 16
    gen = torch.Generator().manual_seed(0)
    x = dict(
        img=torch.randn(1, h * w, params.in_channels, generator=gen), img_ids=image_ids(2 * h, 2 * w),
        txt=torch.randn(1, tokens, params.context_in_dim, generator=gen), txt_ids=text_ids(tokens),
        y=torch.randn(1, params.vec_in_dim, generator=gen), guidance=torch.full((1,), 3.5),
    )  # fmt: skip
    times = FlowMatch(shift=True).partial_schedule(steps, h * w, 1.0)
    return {k: v.to(device) for k, v in x.items()}, times


def time_forwards(forward, times, device: str, warmup: int, steps: int) -> list[float]:
    """ms of each of `steps` forwards (t from the schedule), after `warmup` untimed ones."""
    ms = []
    for k in range(warmup + steps):
        t = torch.full((1,), times[k % (len(times) - 1)], device=device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(t)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            begin = time.perf_counter()
            forward(t)
            elapsed = 1000 * (time.perf_counter() - begin)
        if k >= warmup:
            ms.append(elapsed)
    return ms


def run_cell(fn, card: Card) -> dict:
    try:
        with card, torch.inference_mode():
            out = fn()
            out["peak_gib"] = card.peak_gib()
        return {"status": "OK", **out}
    except torch.OutOfMemoryError as e:
        return {"status": "OOM", "error": str(e).splitlines()[0][:200]}
    except (RuntimeError, ValueError) as e:  # recorded, and the other cells still run
        traceback.print_exc()
        return {"status": "ERROR", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}


def load_transformer(files, weights: str):
    """The transformer on the CPU as the loader node reads it: the bf16 file (cast to fp8 for fp8), or the GGUF file."""
    return load_flux(files.get(weights, files["flux"]), dtype=torch.bfloat16, weight_dtype=WEIGHTS[weights], device="cpu")


def ours_transformer(files, weights: str, args) -> dict:
    model = load_transformer(files, weights)
    x, times = transformer_inputs(model.params, args.device, args.size, args.tokens, 28)
    img_tokens = (args.size // 16) ** 2
    if args.device == "cuda":
        placement = streaming.transformer_on(model, args.device, 1, img_tokens, args.tokens, ahead=args.ahead)
    else:  # CPU smoke run: stream half the blocks CPU -> CPU to exercise the path
        p = streaming.Placement(model, model.blocks())
        budget = p.fixed.nbytes + sum(b.nbytes for b in p.blocks) // 2 + 2 * min(b.nbytes for b in p.blocks)
        placement = streaming.place(model, args.device, model.blocks(), budget_bytes=budget, ahead=args.ahead)
    ms = time_forwards(lambda t: model(timesteps=t, **x), times, args.device, args.warmup, args.steps)
    out = {"ms_per_step": statistics.median(ms), "ms_all": ms, **placement_summary(placement)}
    streaming.unload(model)
    return out


def placement_summary(placement) -> dict:
    return {
        "resident_gib": placement.resident_bytes / GiB, "streamed_gib": placement.streamed_bytes / GiB,
        "placement": placement.describe(),
    }  # fmt: skip


def ours_pipeline(files, weights: str, args) -> dict:
    model = load_transformer(files, weights)
    encoders = load_text_encoders(files["clip"], files["t5"], dtype=torch.bfloat16, device="cpu")
    ae = load_autoencoder(files["ae"], dtype=torch.bfloat16, device="cpu")
    marks, placed = [], {}

    def mark(*_):
        if not marks and (placement := streaming.placement_of(model)) is not None:
            placed.update(placement_summary(placement))  # while sampling; the decode may unload it
        if args.device == "cuda":
            marks.append(torch.cuda.Event(enable_timing=True))
            marks[-1].record()
        else:
            marks.append(time.perf_counter())

    start = time.perf_counter()
    images = generate(model, ae, encoders, "a photo of a cat", args.size, args.size, steps=args.pipeline_steps, callback=mark, device=args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        step_ms = [a.elapsed_time(b) for a, b in zip(marks, marks[1:])]
    else:
        step_ms = [1000 * (b - a) for a, b in zip(marks, marks[1:])]
    out = {"e2e_s": time.perf_counter() - start, "ms_per_step": statistics.median(step_ms), "image": list(images.shape), **placed}
    streaming.unload(model)
    return out


def import_comfyui(path: Path, device: str) -> None:
    """ComfyUI's source first on the path; on a CPU run its --cpu flag set before model management looks for a GPU."""
    if str(path.resolve()) not in sys.path:
        sys.path.insert(0, str(path.resolve()))
    if device == "cpu":
        from comfy.cli_args import args

        args.cpu = True


def comfy_step_ms(patcher, device: str, size: int, tokens: int, warmup: int, steps: int) -> list[float]:
    """ms of `steps` of ComfyUI's model (BaseModel.apply_model at batch 1 on the 28-step schedule's times), placed
    as its sampler places it: load_models_gpu with the model's memory estimate."""
    import comfy.model_management as mm

    config = patcher.model.model_config.unet_config
    h = size // 8
    shape = [1, config["in_channels"], h, h]
    mm.load_models_gpu(
        [patcher], memory_required=patcher.model.memory_required([2, *shape[1:]]),
        minimum_memory_required=patcher.model.memory_required(shape),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    context = torch.randn(1, tokens, config["context_in_dim"], generator=gen).to(device)
    pooled = torch.randn(1, config["vec_in_dim"], generator=gen).to(device)
    guidance = torch.full((1,), 3.5, device=device)
    _, times = transformer_inputs(preset("flux-dev"), "cpu", size, tokens, 28)

    def forward(t):
        return patcher.model.apply_model(x, t, c_crossattn=context, y=pooled, guidance=guidance)

    return time_forwards(forward, times, device, warmup, steps)


def comfy_transformer(files, weights: str, args) -> dict:
    import comfy.model_management as mm
    import comfy.sd

    if weights in QUANTISED:  # ComfyUI reads GGUF through city96's pack only
        patcher = comfyui_gguf_unet(args.comfyui_gguf, files[weights])
    else:
        options = {} if WEIGHTS[weights] is None else {"dtype": WEIGHTS[weights]}
        patcher = comfy.sd.load_diffusion_model(str(files["flux"]), model_options=options)
    ms = comfy_step_ms(patcher, args.device, args.size, args.tokens, args.warmup, args.steps)
    total, loaded = patcher.model_size(), patcher.loaded_size()
    out = {"ms_per_step": statistics.median(ms), "ms_all": ms, "resident_gib": loaded / GiB, "streamed_gib": (total - loaded) / GiB}
    mm.unload_all_models()
    del patcher
    return out


def measure_activations(files, args) -> dict:
    """Peak transient memory of a resident forward over tokens x hidden x bytes: the ACTIVATION_FACTOR."""
    out = {}
    for weights in args.weights:
        model = load_flux(files.get(weights, files["flux"]), dtype=torch.bfloat16, weight_dtype=WEIGHTS[weights], device=args.device)
        for size in (512, 1024):
            x, times = transformer_inputs(model.params, args.device, size, args.tokens, 28)
            with torch.inference_mode():
                model(timesteps=torch.full((1,), times[0], device=args.device), **x)  # warm
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                model(timesteps=torch.full((1,), times[0], device=args.device), **x)
                delta = torch.cuda.max_memory_allocated() - base
            tokens = (size // 16) ** 2 + args.tokens
            estimate = streaming.flux_activation_bytes(model, 1, (size // 16) ** 2, args.tokens)
            factor = delta / (tokens * model.params.hidden_size * 2)
            out[f"{weights}-{size}"] = {"peak_transient_gib": delta / GiB, "factor": factor, "estimate_gib": estimate / GiB}
            print(f"activations {weights} {size}px: {delta / GiB:.3f} GiB = {factor:.1f} x tokens x hidden x 2 B; estimate {estimate / GiB:.3f} GiB", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return out


def table(results: dict, link: float | None) -> str:
    lines = ["| cap | weights | what | status | ms/step | e2e s | peak GiB | resident GiB | streamed GiB/step | link floor ms | vs ComfyUI |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, r in results.items():
        cap, weights, what = key.split("/")
        floor = r.get("streamed_gib", 0) / link * 1000 if link and r.get("status") == "OK" else None
        peer = results.get(f"{cap}/{weights}/comfyui", {})
        ratio = r["ms_per_step"] / peer["ms_per_step"] if what == "transformer" and "ms_per_step" in r and "ms_per_step" in peer else None
        cells = [cap, weights, what, r.get("status", "-"), r.get("ms_per_step"), r.get("e2e_s"), r.get("peak_gib"),
                 r.get("resident_gib"), r.get("streamed_gib"), floor, ratio]  # fmt: skip
        lines.append("| " + " | ".join("-" if c is None else f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--caps", type=float, nargs="+", default=[8, 12, 16, 24], help="emulated free VRAM, GiB")
    parser.add_argument("--weights", nargs="+", choices=WEIGHTS, default=["bf16", "fp8"], help="GGUF: flux-<type>.gguf")
    parser.add_argument("--only", nargs="+", choices=("transformer", "pipeline", "comfyui"), default=["transformer", "pipeline", "comfyui"])
    parser.add_argument("--comfyui", type=Path, help="a ComfyUI source folder: also run its native Flux")
    parser.add_argument("--comfyui-gguf", type=Path, help="city96's ComfyUI-GGUF: ComfyUI's cells of GGUF weights")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed forwards per transformer cell")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--pipeline-steps", type=int, default=28)
    parser.add_argument("--ahead", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fluxkit_vram"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--measure-activations", action="store_true")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other runs' JSON to merge into the table")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vram.json")
    args = parser.parse_args()
    if args.tiny:
        args.size, args.tokens = 128, 32
    needed = {*args.weights} & set(QUANTISED) | ({"t5", "clip", "ae"} if "pipeline" in args.only else set())
    if {*args.weights} - set(QUANTISED) or args.measure_activations:
        needed.add("flux")
    files = write_files(args.workdir, args.device, args.tiny, needed)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, **pinned_bandwidth(args.device)}
    if report["pinned_gib_s"]:
        print(f"host-to-GPU: pinned {report['pinned_gib_s']:.1f} GiB/s, pageable {report['pageable_gib_s']:.1f} GiB/s", flush=True)
    if args.measure_activations:
        report["activations"] = measure_activations(files, args)
    if args.comfyui and "comfyui" in args.only:
        import_comfyui(args.comfyui, args.device)
    cells = {"transformer": ours_transformer, "pipeline": ours_pipeline, "comfyui": comfy_transformer}
    results = report.setdefault("results", {})
    order = [w for w in ("transformer", "pipeline", "comfyui") if w in args.only]  # ComfyUI's import sets backend flags
    for what in order:
        for cap in args.caps if args.device == "cuda" else [None]:
            for weights in args.weights:
                if what == "comfyui" and (not args.comfyui or weights in QUANTISED and not args.comfyui_gguf):
                    continue
                key = f"{cap}/{weights}/{what}"
                start = time.perf_counter()
                results[key] = run_cell(lambda: cells[what](files, weights, args), Card(None if cap is None else int(cap * GiB), args.device))
                r = results[key]
                print(f"{key}: {r['status']} {r.get('ms_per_step', 0):.1f} ms/step, peak {r.get('peak_gib') or 0:.2f} GiB, "
                      f"{r.get('placement', r.get('error', ''))} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=1))
    for other in args.compare:
        results.update(json.loads(other.read_text())["results"])
    print(table(dict(sorted(results.items(), key=lambda kv: float(kv[0].split("/")[0]) if kv[0][0] != "N" else 0)), report["pinned_gib_s"]))


if __name__ == "__main__":
    main()
