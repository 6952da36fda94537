"""Benchmark: a rank-32 LoRA on every Linear of a flux-dev-shaped transformer (random weights): seconds to apply,
memory the patched model holds beyond the base, and step time with the LoRA vs without, per way of applying it.

    python bench/lora.py                  # CPU: flux-dev width, 1 double + 1 single block, 256 + 64 tokens, float32
    python bench/lora.py --device cuda    # flux-dev's full shape (19 + 38 blocks), 4096 + 512 tokens (1024 px), bf16
    python bench/lora.py --heads 4 --image-tokens 1024 --repeats 2 --warmup 1   # CPU, 512 wide: per-call merges show
    python bench/lora.py --double 2 --single 4 --image-tokens 1024 --json out.json

Ways: float weights merged at apply (a new tensor per patched layer); float weights with a side path (merge=False);
fp8 weights upcast per call with the LoRA added into the upcast weight (ops.Linear.lora_mode: with Triton on a
GPU every layer, in the upcast's own pass; else where that moves fewer bytes, the image stream's layers at 1024 px)
and a side path elsewhere; the same with side paths only (the previous way, for comparison); on CUDA fp8 matmuls (fp8_e4m3fn_fast), which have no upcast weight: side paths. Each
row says in how many of one step's LoRA'd layer calls the LoRA was merged per call. Each "with" is timed against its
own base model, runs alternating, median after warm-up, inference_mode. On the CPU the time is the process's CPU time
(time.process_time), which other processes on a shared machine barely disturb; on CUDA it is wall time between
synchronisations.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[0:1] = [str(REPO), str(REPO / "tests")]  # not bench/ itself: bench/gguf.py would shadow the gguf package

from tiny_flux import tiny_inputs  # noqa: E402

from flux_core.lora import apply_loras, read_lora  # noqa: E402
from flux_core.model import Flux, preset  # noqa: E402
from flux_core.ops import Linear, enable_fp8_matmul  # noqa: E402

RANK = 32


def random_flux(params, device: torch.device, dtype: torch.dtype) -> Flux:
    """Built on the meta device in `dtype`, then filled in place: no float32 copy of a 12B model on the way."""
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    model = model.to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    for name, tensor in model.state_dict().items():
        if tensor.ndim == 2:
            tensor.normal_(0, tensor.shape[1] ** -0.5, generator=gen)
        else:
            tensor.fill_(1.0 if name.endswith(".scale") else 0.0)
    return model


def as_fp8(model: Flux) -> Flux:
    """A twin whose Linear weights are stored float8_e4m3fn (computing in the base's dtype)."""
    twin = model.twin()
    for layer in twin.modules():
        if isinstance(layer, Linear):
            layer.weight = nn.Parameter(layer.weight.to(torch.float8_e4m3fn), requires_grad=False)
    return twin


def write_lora(model: Flux, path: Path) -> int:
    """A kohya-named rank-32 bf16 LoRA on every Linear (alpha = rank); returns its size in bytes."""
    gen, state = torch.Generator().manual_seed(1), {}
    for name, layer in model.named_modules():
        if isinstance(layer, Linear):
            key = "lora_unet_" + name.replace(".", "_")
            down = torch.randn(RANK, layer.in_features, generator=gen) / layer.in_features**0.5
            state[f"{key}.lora_down.weight"] = down.bfloat16()
            state[f"{key}.lora_up.weight"] = (0.01 * torch.randn(layer.out_features, RANK, generator=gen)).bfloat16()
            state[f"{key}.alpha"] = torch.tensor(float(RANK))
    save_file(state, str(path))
    return sum(t.nbytes for t in state.values())


def extra_bytes(patched: nn.Module, base: nn.Module) -> int:
    """Bytes of the tensors the patched model holds that the base does not (its merged layers, its side paths)."""
    shared = {t.data_ptr() for t in (*base.parameters(), *base.buffers())}
    own = {t.data_ptr(): t.nbytes for t in (*patched.parameters(), *patched.buffers()) if t.data_ptr() not in shared}
    return sum(own.values())


def clock(device: torch.device) -> float:
    """Wall seconds after the GPU is done; CPU seconds of this process on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def step_times(models: list[nn.Module], x: dict, device, warmup: int, repeats: int) -> list[float]:
    """Median seconds per forward of each model, runs alternating (order flipped every round)."""
    times = [[] for _ in models]
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for j in range(len(models)) if i % 2 else reversed(range(len(models))):
                start = clock(device)
                models[j](**x)
                if i >= warmup:
                    times[j].append(clock(device) - start)
    return [statistics.median(t) for t in times]


def merged_calls(model: nn.Module, x: dict) -> tuple[int, int]:
    """(LoRA'd layer calls that added the LoRA into their weight, those that asked) in one forward (Linear.lora_mode;
    fp8 matmuls never ask)."""
    modes, decide = [], Linear.lora_mode

    def counting(self, *args, **kwargs):
        mode = decide(self, *args, **kwargs)
        modes.extend([mode] if mode is not None else [])
        return mode

    Linear.lora_mode = counting
    try:
        with torch.inference_mode():
            model(**x)
    finally:
        Linear.lora_mode = decide
    return sum(mode != "side" for mode in modes), len(modes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--double", type=int, help="double blocks (default: 1 on CPU, 19 on CUDA)")
    parser.add_argument("--single", type=int, help="single blocks (default: 1 on CPU, 38 on CUDA)")
    parser.add_argument("--heads", type=int, default=24, help="heads of 128 (default 24: flux-dev's 3072 width)")
    parser.add_argument("--image-tokens", type=int, help="a square grid's token count (default 256 CPU, 4096 CUDA)")
    parser.add_argument("--text-tokens", type=int, help="default 64 CPU, 512 CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--compile", action="store_true", help="compile_blocks() the base and the patched model")
    parser.add_argument("--ways", nargs="*", help="only these rows (names as printed)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    params = preset("flux-dev", depth=args.double or (19 if cuda else 1), depth_single_blocks=args.single or (38 if cuda else 1),
                    hidden_size=128 * args.heads, num_heads=args.heads)  # fmt: skip
    side = int((args.image_tokens or (4096 if cuda else 256)) ** 0.5)
    x = {k: None if v is None else v.to(device) for k, v in tiny_inputs(params, rows=side, cols=side, text=args.text_tokens or (512 if cuda else 64), dtype=dtype).items()}
    base = random_flux(params, device, dtype)
    bases = {"float": base, "fp8": as_fp8(base)}
    if cuda:
        bases["fp8 matmul"] = bases["fp8"].twin()
        enable_fp8_matmul(bases["fp8 matmul"])
    ways = [  # (name, base, merge at apply, merge per call)
        ("float merged", "float", True, True), ("float side path", "float", False, True),
        ("fp8 upcast, merged per call", "fp8", True, True), ("fp8 upcast, side path", "fp8", True, False),
    ] + ([("fp8 matmul, side path", "fp8 matmul", True, True)] if cuda else [])  # fmt: skip
    print(f"{params.depth} double + {params.depth_single_blocks} single blocks, {params.hidden_size} wide, {side * side} + "
          f"{x['txt'].shape[1]} tokens, {str(dtype)[6:]} compute on {device} ({'wall' if cuda else 'CPU'} time), "
          f"rank-{RANK} LoRA on every Linear")  # fmt: skip
    results = {"device": str(device), "torch": torch.__version__, "blocks": [params.depth, params.depth_single_blocks],
               "width": params.hidden_size, "tokens": [side * side, x["txt"].shape[1]], "compute": str(dtype)[6:],
               "rank": RANK, "ways": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lora.safetensors"
        results["lora_bytes"] = write_lora(base, path)
        for name, storage, merge, per_call in ways:
            if args.ways and name not in args.ways:
                continue
            model = bases[storage]
            start = clock(device)
            patched, _, (report,) = apply_loras(model, [(read_lora(path), 1.0, 1.0)], merge=merge)
            seconds = clock(device) - start
            Linear.merge_lora_per_call = per_call
            merged, asked = merged_calls(patched, x)
            if args.compile:  # each its own compiled twin; the bases stay eager for the next rows
                model, patched = model.twin().compile_blocks(), patched.compile_blocks()
            without, with_lora = step_times([model, patched], x, device, args.warmup, args.repeats)
            Linear.merge_lora_per_call = True
            extra = extra_bytes(patched, model)
            results["ways"][name] = {"apply_s": seconds, "extra_bytes": extra, "step_ms": without * 1e3,
                                     "step_lora_ms": with_lora * 1e3, "ratio": with_lora / without, "modes": report.modes,
                                     "merged_per_call": [merged, asked]}  # fmt: skip
            how = "merged at apply" if "merged" in report.modes else "side paths"  # fp8 matmuls: no upcast weight
            how = f"merged per call in {merged} of {asked} calls" if asked else how
            print(f"  {name:28s} apply {seconds:6.2f} s  extra {extra / 2**20:9.1f} MiB  step {without * 1e3:8.1f} ms -> "
                  f"{with_lora * 1e3:8.1f} ms with the LoRA: x{with_lora / without:.3f}  ({how})")  # fmt: skip
            del patched
    print(f"  LoRA file tensors: {results['lora_bytes'] / 2**20:.1f} MiB; base weights "
          f"{sum(p.nbytes for p in base.parameters()) / 2**20:.1f} MiB")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
