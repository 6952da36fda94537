"""GGUF weights against bf16 and fp8, one process, flux-dev shape: ms per step, memory and the error of one forward.

Random flux-dev-shaped weights (N(0, 1/fan_in), norm scales around 1) for one double and one single block, copied into
every block (quantising 12B weights with the gguf package's numpy code would take many minutes; each block still holds
its own copy, so memory is real). Variants, each built on the device alone, the others freed:
  bf16      the weights in bfloat16
  fp8       float8_e4m3fn, upcast per layer (load_flux(weight_dtype=torch.float8_e4m3fn))
  Q8_0 ...  GGUF blocks kept quantised, GGUFLinear dequantising per call (load_flux of a .gguf): Q8_0, Q4_0 (and
            Q5_0, Q5_1, Q4_1) quantised by the gguf package; Q5_K and Q4_K by the simple quantiser below (the package
            has no K-quant quantiser; llama.cpp's search for scales is finer, so its error is a little lower).
Weights whose rows do not split into a type's blocks stay bf16, as city96's files keep them F16.
With --comfyui and --comfyui-gguf (city96's pack), each GGUF kind is also written to a file as city96's (write_flux:
the same template, every block the same arrays) that ours (load_flux) and ComfyUI-GGUF (its UnetLoaderGGUF node) load
in turn: eager ms per step of each and ours / theirs.
One step = one forward at batch 1 (1024 px: 4096 image + 512 text tokens). Per variant: weight GB on the device,
median ms per step (eager, and with Flux.compile_blocks), peak GB during the steps (CUDA), and relative errors: of
the Linear weights as stored against the float32 ones, and of one forward, ||out - out_bf16|| / ||out_bf16||.

    python bench/gguf.py                                      # CUDA, flux-dev, 1024 px, eager and compiled
    python bench/gguf.py --device cpu --depth 1 --width 1536 --size 256 --txt 64 --modes eager --steps 2
    python bench/gguf.py --kinds bf16,Q8_0,Q4_K --modes eager --comfyui .bench_deps/comfyui \
        --comfyui-gguf .bench_deps/ComfyUI-GGUF                # ComfyUI: 3072 wide only (its Flux has 24 heads)
"""
import argparse
import functools
import gc
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python bench/gguf.py` puts bench/ first on the path, where this file would shadow the gguf package
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import gguf  # noqa: E402
import torch  # noqa: E402

from flux_core.checkpoint import load_weights  # noqa: E402
from flux_core.gguf import Q, dequantize, use_blocks  # noqa: E402
from flux_core.loading import load_flux  # noqa: E402
from flux_core.model import Flux, preset  # noqa: E402
from flux_core.ops import Linear  # noqa: E402
from flux_core.sampling import grid_ids  # noqa: E402

GB = 1e9
PACKAGE = {"Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_1"}
QUANTISED = ("Q8_0", "Q5_K", "Q4_K", "Q4_0", "Q5_0", "Q5_1", "Q4_1")  # the GGUF types encode() makes


# --- a simple K-quant quantiser (torch, vectorised): per 32-weight group an affine 4- or 5-bit grid, its scale and
# --- offset quantised to 6 bits against the super-block's float16 d and dmin, as ggml lays the blocks out -------------


def quantize_k(w: torch.Tensor, bits: int) -> torch.Tensor:  # (rows, cols) float -> (rows, bytes per row) uint8
    groups = w.float().reshape(w.shape[0], -1, 8, 32)  # (rows, super-blocks, 8 groups, 32)
    low = groups.amin(-1).clamp(max=0)  # the grid starts at min(w, 0): stored as a positive offset
    scale = (groups.amax(-1) - low) / (2**bits - 1)
    d = (scale.amax(-1, keepdim=True) / 63).half()  # (rows, sb, 1)
    dmin = ((-low).amax(-1, keepdim=True) / 63).half()
    sc = (scale / d.float().clamp_min(1e-30)).round().clamp(0, 63)
    mn = (-low / dmin.float().clamp_min(1e-30)).round().clamp(0, 63)
    step, offset = (d.float() * sc)[..., None], (dmin.float() * mn)[..., None]
    q = ((groups + offset) / step.clamp_min(1e-30)).round().clamp(0, 2**bits - 1).to(torch.uint8)  # (r, sb, 8, 32)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    high = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)  # scales and mins 4-7: low 4 bits here, top 2 bits above
    scales = torch.cat((sc[..., :4] | (sc[..., 4:] >> 4 << 6), mn[..., :4] | (mn[..., 4:] >> 4 << 6), high), dim=-1)
    nibbles = (q[..., 0::2, :] & 15) | ((q[..., 1::2, :] & 15) << 4)  # (rows, sb, 4, 32): groups 2c | 2c+1 << 4
    parts = [d.view(torch.uint8), dmin.view(torch.uint8), scales]
    if bits == 5:
        high = (q >> 4) << torch.arange(8, dtype=torch.uint8, device=w.device)[:, None]  # bit g of byte l: group g
        parts.append(high.sum(-2, dtype=torch.uint8))  # (rows, sb, 32): distinct bits, so the sum is an OR
    parts.append(nibbles.flatten(-2))
    return torch.cat(parts, dim=-1).flatten(1)


def encode(w: torch.Tensor, kind: str, device) -> tuple[torch.Tensor, Q | None]:
    """(what the variant stores for Linear weight `w` (float32, CPU), its GGUF type or None)."""
    if kind == "bf16":
        return w.to(device, torch.bfloat16), None
    if kind == "fp8":
        return w.to(device, torch.bfloat16).to(torch.float8_e4m3fn), None
    qtype = Q[kind]
    if w.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return w.to(device, torch.bfloat16), None  # as city96's files keep such rows in F16
    if kind in PACKAGE:
        return torch.from_numpy(gguf.quants.quantize(w.numpy(), qtype)).to(device), qtype
    if kind in ("Q4_K", "Q5_K"):
        return quantize_k(w.to(device), 4 if kind == "Q4_K" else 5), qtype
    raise SystemExit(f"no quantiser for {kind}: pick from {', '.join(QUANTISED)}, bf16, fp8")


# --- models ---------------------------------------------------------------------------------------------------------


def template(params, seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 CPU weights of a model with one double and one single block."""
    one = preset("flux-dev", **{**params.__dict__, "depth": 1, "depth_single_blocks": 1})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Flux(one).state_dict().items()}
    gen, out = torch.Generator().manual_seed(seed), {}
    for key, shape in shapes.items():
        if len(shape) == 2:
            out[key] = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        elif "norm" in key:
            out[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            out[key] = 0.02 * torch.randn(shape, generator=gen)
    return out


def template_names(params, weights: dict[str, torch.Tensor]) -> tuple[dict[str, str], set[str]]:
    """({key of the full model: the template's key it copies}, the keys of Linear weights)."""
    with torch.device("meta"):
        model = Flux(params)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    source = {k.replace("blocks.0.", "blocks.{}.", 1): k for k in weights}  # a block's key with its index left open
    names = {}
    for key in model.state_dict():
        index = key.split(".")[1] if key.startswith(("double_blocks.", "single_blocks.")) else None
        names[key] = source[key.replace(f".{index}.", ".{}.", 1)] if index is not None else key
    return names, linears


def build(params, weights: dict[str, torch.Tensor], kind: str, device) -> tuple[Flux, float]:
    """(the variant's model on `device`: every block a copy of the template's, Linear weights encoded once; the
    relative error of the template's Linear weights as the variant stores them)."""
    with torch.device("meta"):
        model = Flux(params)
    names, linears = template_names(params, weights)
    encoded, state, qtypes, error, norm = {}, {}, {}, 0.0, 0.0
    for key, name in names.items():
        if key in linears:
            if name not in encoded:
                encoded[name] = encode(weights[name], kind, device)
                stored = encoded[name][0] if encoded[name][1] is None else dequantize(*encoded[name])
                error += (stored.float().cpu() - weights[name]).square().sum().item()
                norm += weights[name].square().sum().item()
            value, qtype = encoded[name]
            if qtype is not None:
                qtypes[key] = qtype
        else:
            value = weights[name].to(device, torch.bfloat16)
        state[key] = value.clone()  # each block its own memory
    encoded.clear()
    use_blocks(model, qtypes)
    fp8 = torch.float8_e4m3fn if kind == "fp8" else None
    load_weights(model, state, torch.bfloat16, f"bench {kind}", weight_dtype=fp8)
    return model.eval().requires_grad_(False), (error / norm) ** 0.5


def write_flux(path: Path, params, kind: str, device) -> Path:
    """A flux-shaped GGUF file laid out as city96's (BFL names, architecture "flux"): the template's Linear weights
    encoded once as `kind` and the same arrays written into every block (memory holds one block), rows that do not
    split into the type's blocks F16, other tensors F32. An existing file is kept (the weights are seeded)."""
    if path.exists():
        return path
    if kind not in QUANTISED:
        raise SystemExit(f"no GGUF file of {kind}: pick from {', '.join(QUANTISED)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    start, weights = time.perf_counter(), template(params)
    names, linears = template_names(params, weights)
    linear_names, arrays = {names[k] for k in linears}, {}
    for name in set(names.values()):
        stored, qtype = encode(weights[name], kind, device) if name in linear_names else (weights[name], None)
        if qtype is None:  # F16 where a Linear's rows do not split into blocks (as city96's files), else F32
            stored = stored.to(torch.float16 if name in linear_names else torch.float32)
        arrays[name] = (stored.cpu().numpy(), qtype)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "flux")
    for key, name in names.items():
        writer.add_tensor(key, arrays[name][0], raw_dtype=arrays[name][1])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(path)
    print(f"wrote {path.name}: {path.stat().st_size / GB:.2f} GB in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def inputs(params, size: int, txt: int, device) -> dict:
    gen = torch.Generator().manual_seed(1)
    side = size // 16
    return dict(
        img=torch.randn(1, side * side, params.in_channels, generator=gen), img_ids=grid_ids(side, side),
        txt=torch.randn(1, txt, params.context_in_dim, generator=gen), txt_ids=torch.zeros(1, txt, 3),
        timesteps=torch.tensor([0.7]), y=torch.randn(1, params.vec_in_dim, generator=gen), guidance=torch.tensor([3.5]),
    )  # fmt: skip


def measure(model: Flux, x: dict, steps: int, device) -> tuple[list[float], torch.Tensor, float | None]:
    """(ms of each timed step, the output, peak GB during the timed steps on CUDA)."""
    x = {k: v.to(device, torch.bfloat16) for k, v in x.items()}
    cuda = device.type == "cuda"
    with torch.inference_mode():
        out = model(**x)  # warm-up (and compilation)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            out = model(**x)
            if cuda:
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / GB if cuda else None
    return times, out.float().cpu(), peak


def release(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@functools.cache
def comfyui_gguf_loaders(pack: Path) -> dict:
    """city96's ComfyUI-GGUF imported as ComfyUI imports a custom node folder (a package: relative imports). Its
    nodes.py imports ComfyUI's nodes module, which needs packages a bench machine may lack (PyAV, scipy); a bare module
    stands in there (the pack reads it only for its CLIP loaders' inputs)."""
    try:
        import nodes  # noqa: F401  (ComfyUI's, first on the path)
    except ImportError as err:
        print(f"ComfyUI's nodes module does not import ({err}): a bare one stands in", flush=True)
        sys.modules["nodes"] = types.ModuleType("nodes")
    spec = importlib.util.spec_from_file_location("ComfyUI_GGUF", pack / "__init__.py", submodule_search_locations=[str(pack)])
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


def comfyui_gguf_unet(pack: Path, path: Path):
    """The ModelPatcher ComfyUI-GGUF's UnetLoaderGGUF node gives for this file (ComfyUI imported first)."""
    import folder_paths

    folder_paths.add_model_folder_path("diffusion_models", str(path.parent))
    return comfyui_gguf_loaders(pack)["UnetLoaderGGUF"]().load_unet(path.name)[0]


def compare_comfyui_gguf(kinds: list[str], params, x: dict, args, device) -> list[dict]:
    """Ours and ComfyUI-GGUF on the same files (write_flux), each model alone on the device, eager: ours loaded by
    load_flux as our loader node does; theirs by its UnetLoaderGGUF node, placed and timed as bench/vram.py times
    ComfyUI. Ours run first: importing ComfyUI sets backend flags (SDPA reductions)."""
    from bench.vram import comfy_step_ms, import_comfyui

    files, ours, rows = {}, {}, []
    for kind in kinds:
        shape = "" if (args.width, args.depth) == (3072, 19) else f"{args.width}-{args.depth}-"
        files[kind] = write_flux(args.workdir / f"flux-{shape}{kind}.gguf", params, kind, device)
        model = load_flux(files[kind], dtype=torch.bfloat16, device=device)
        ours[kind] = statistics.median(measure(model, x, args.steps, device)[0])
        del model
        release(device)
    import_comfyui(args.comfyui, device.type)
    import comfy.model_management

    for kind, path in files.items():
        with torch.inference_mode():  # as ComfyUI runs its nodes
            patcher = comfyui_gguf_unet(args.comfyui_gguf, path)
            theirs = statistics.median(comfy_step_ms(patcher, device.type, args.size, args.txt, 1, args.steps))
            dtype = patcher.model.get_dtype()
        comfy.model_management.unload_all_models()
        del patcher
        release(device)
        rows.append(dict(kind=kind, file=str(path), ms_per_step=round(ours[kind], 1), comfyui_dtype=str(dtype),
                         comfyui_gguf_ms_per_step=round(theirs, 1), x_comfyui_gguf=round(ours[kind] / theirs, 2)))  # fmt: skip
        print(f"{kind:>5} same file, eager: ours {ours[kind]:9.1f} ms/step, ComfyUI-GGUF {theirs:9.1f} ms/step (computing "
              f"in {dtype}): {rows[-1]['x_comfyui_gguf']:.2f}x ComfyUI-GGUF's time", flush=True)  # fmt: skip
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--kinds", default="bf16,fp8,Q8_0,Q5_K,Q4_K,Q4_0", help="bf16 first: the reference")
    parser.add_argument("--modes", default=None, help="eager,compiled (default: both on CUDA, eager on the CPU)")
    parser.add_argument("--depth", type=int, default=19, help="double blocks (single blocks: twice as many)")
    parser.add_argument("--width", type=int, default=3072, help="hidden size (head dim 128)")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--txt", type=int, default=512, help="text tokens")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and mode")
    parser.add_argument("--json", type=Path, default=None, help="default bench/results/gguf_<device>.json")
    parser.add_argument("--comfyui", type=Path, help="ComfyUI's source: with --comfyui-gguf, compare on the same file")
    parser.add_argument("--comfyui-gguf", type=Path, help="city96's ComfyUI-GGUF source (a custom node folder)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fluxkit_vram"), help="GGUF files (as bench/vram.py)")
    args = parser.parse_args()
    if (args.comfyui is None) != (args.comfyui_gguf is None):
        raise SystemExit("--comfyui and --comfyui-gguf go together: ComfyUI's source and the ComfyUI-GGUF pack")
    device = torch.device(args.device)
    kinds = args.kinds.split(",")
    modes = (args.modes or ("eager,compiled" if device.type == "cuda" else "eager")).split(",")
    if kinds[0] != "bf16":
        raise SystemExit("--kinds must start with bf16: the other variants are compared with it")
    params = preset("flux-dev", hidden_size=args.width, num_heads=args.width // 128, depth=args.depth,
                    depth_single_blocks=2 * args.depth)  # fmt: skip
    weights, x = template(params), inputs(params, args.size, args.txt, device)
    print(f"{device}, {args.width} wide, {args.depth} + {2 * args.depth} blocks, {args.size} px, {args.txt} text tokens")
    rows, reference = [], {}
    for kind in kinds:
        start = time.perf_counter()
        model, weight_error = build(params, weights, kind, device)
        weight_gb = sum(t.nbytes for t in (*model.parameters(), *model.buffers())) / GB
        built_s = time.perf_counter() - start
        for mode in modes:
            runner = model.twin().compile_blocks() if mode == "compiled" else model
            times, out, peak = measure(runner, x, args.steps, device)
            reference.setdefault(mode, out)
            error = ((out - reference[mode]).norm() / reference[mode].norm()).item()
            row = dict(kind=kind, mode=mode, weight_gb=round(weight_gb, 3), weight_error=weight_error,
                       ms_per_step=round(statistics.median(times), 1), peak_gb=None if peak is None else round(peak, 3),
                       rel_error=error, build_s=round(built_s, 1))  # fmt: skip
            base = next(r for r in rows + [row] if r["kind"] == "bf16" and r["mode"] == mode)
            row["x_bf16"] = round(row["ms_per_step"] / base["ms_per_step"], 2)
            rows.append(row)
            peak_text = "" if peak is None else f", peak {peak:6.2f} GB"
            print(f"{kind:>5} {mode:>8}: {row['ms_per_step']:9.1f} ms/step ({row['x_bf16']:.2f}x bf16), weights "
                  f"{weight_gb:6.2f} GB{peak_text}, rel. error: weights {weight_error:.4f}, output {error:.4f}")  # fmt: skip
            del runner
        del model
        release(device)
    compared = compare_comfyui_gguf([k for k in kinds if k in QUANTISED], params, x, args, device) if args.comfyui else []
    path = args.json or REPO / "bench" / "results" / f"gguf_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    meta = dict(vars(args), device=str(device), json=str(path), gpu=gpu)
    path.write_text(json.dumps({"config": meta, "rows": rows, "comfyui_gguf": compared}, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
