"""Where one full-size FLUX.1-dev step (1024 px: 4096 image + 512 text tokens) spends its GPU time.

Prints the ceilings this card reaches on the step's own work (cuBLAS on each GEMM shape, each SDPA backend on the
joint attention), then the step eager and compiled (per block, `Flux.compile_blocks`) with its kernel time split
into GEMM / attention / the rest, and the AE decode's peak memory. Random bf16 weights, as bench/gpu_flux_dev.py.

    python bench/gpu_profile.py                        # cuda; kernel tables to --out
    python bench/gpu_profile.py --tiny --device cpu    # proves the script
"""
import argparse
import re
import statistics
import sys
from pathlib import Path
from time import perf_counter

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_flux_dev import build_random, fp8_copy_of  # noqa: E402

from flux_core.autoencoder import AutoEncoder, AutoEncoderParams  # noqa: E402
from flux_core.model import Flux, preset  # noqa: E402
from flux_core.ops import enable_fp8_matmul  # noqa: E402
from flux_core.sampling import image_ids, text_ids  # noqa: E402

KERNEL_KINDS = (("attention", r"flash|fmha|sdpa"), ("nccl", r"nccl"), ("gemm", r"gemm|nvjet|xmma|cutlass|sm90|Kernel2"))


def timed_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median ms of `fn()` after two warm-up calls (CUDA events on a GPU)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = perf_counter()
            fn()
            times.append(1000 * (perf_counter() - t0))
    return statistics.median(times)


def gemm_ceiling(params, txt_len: int, img_len: int, device, dtype) -> float:
    """ms per step if every Linear ran at cuBLAS's speed on its own shape (tokens, in, out), times its count."""
    d, m = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    shapes = []
    for tokens, count in ((img_len, params.depth), (txt_len, params.depth)):
        shapes += [(tokens, d, 3 * d, count), (tokens, d, d, count), (tokens, d, m, count), (tokens, m, d, count)]
    joint = txt_len + img_len
    shapes += [(joint, d, 3 * d, params.depth_single_blocks), (joint, d, m, params.depth_single_blocks)]
    shapes += [(joint, d + m, d, params.depth_single_blocks)]
    total = 0.0
    for tokens, n_in, n_out, count in shapes:
        x, w = torch.randn(tokens, n_in, device=device, dtype=dtype), torch.randn(n_out, n_in, device=device, dtype=dtype)
        ms = timed_ms(lambda: F.linear(x, w), device)
        print(f"  gemm {tokens:5d} x {n_in:5d} -> {n_out:5d}: {ms:7.3f} ms, {2 * tokens * n_in * n_out / ms / 1e9:6.1f} TFLOP/s, x{count}")
        total += ms * count
    return total


def attention_ceilings(params, length: int, device, dtype) -> dict[str, float]:
    q, k, v = (torch.randn(1, params.num_heads, length, params.head_dim, device=device, dtype=dtype) for _ in range(3))
    flop = 4 * length * length * params.hidden_size
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                ms = timed_ms(lambda: F.scaled_dot_product_attention(q, k, v), device)
        except RuntimeError as error:  # backend not built or not eligible here
            print(f"  sdpa {backend.name}: unavailable ({str(error).splitlines()[0][:80]})")
            continue
        results[backend.name] = ms
        print(f"  sdpa {backend.name:20s} {ms:7.3f} ms, {flop / ms / 1e9:6.1f} TFLOP/s")
    return results


def kernel_split(step, device, out: Path, label: str) -> None:
    """One profiled call of `step`: CUDA kernel time by kind, top kernels to `out`."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kind, by_name = {}, {}
    for e in kernels:
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, e.name, re.I)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + e.device_time_total / 1000
        by_name[e.name] = by_name.get(e.name, 0) + e.device_time_total / 1000
    total = sum(by_kind.values())
    print(f"  {label}: kernels {total:.1f} ms, {len(kernels)} launches: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))  # fmt: skip
    lines = [f"{ms:9.3f} ms  {name[:160]}" for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:40]]
    (out / f"kernels_{label}.txt").write_text("\n".join(lines) + "\n")
    print("\n".join("    " + line for line in lines[:12]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch.bfloat16
    tiny = dict(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)
    params = preset("flux-dev", **(tiny if args.tiny else {}))
    size, txt_len = (64, 16) if args.tiny else (1024, 512)
    img_len = (size // 16) ** 2
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{img_len} + {txt_len} tokens")  # fmt: skip

    print("ceilings:")
    gemm_ms = gemm_ceiling(params, txt_len, img_len, device, dtype)
    attn = attention_ceilings(params, txt_len + img_len, device, dtype)
    blocks = params.depth + params.depth_single_blocks
    print(f"  per step: GEMMs {gemm_ms:.1f} ms + attention " + ", ".join(f"{k} {v * blocks:.1f}" for k, v in attn.items()))

    model = build_random(Flux, params, device, dtype, seed=0)
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        img=torch.randn(1, img_len, 64, generator=gen).to(device, dtype),
        img_ids=image_ids(size // 8, size // 8).to(device),
        txt=torch.randn(1, txt_len, params.context_in_dim, generator=gen).to(device, dtype),
        txt_ids=text_ids(txt_len).to(device),
        timesteps=torch.tensor([0.7], device=device),
        y=torch.randn(1, params.vec_in_dim, generator=gen).to(device, dtype),
        guidance=torch.tensor([3.5], device=device),
    )

    reference = profile_step(model, inputs, "bf16", device, out, args.skip_compile)
    fast_model = fp8_copy_of(model)
    del model
    enable_fp8_matmul(fast_model)
    profile_step(fast_model, inputs, "fp8_fast", device, out, args.skip_compile, reference)
    del fast_model
    ae_params = AutoEncoderParams.flux(**(dict(ch=32, ch_mult=[1, 2, 2, 2]) if args.tiny else {}))
    decode_memory(build_random(AutoEncoder, ae_params, device, dtype, seed=1), size, device)


def profile_step(flux: Flux, inputs: dict, label: str, device, out: Path, skip_compile: bool, reference=None):
    """Time, peak and kernel split of one forward of `flux`, eager then (unless skipped) compiled per block.
    Returns the eager output; with `reference`, prints the relative error against it."""

    def step():
        with torch.inference_mode():
            return flux(**inputs)

    result = step().float()
    error = "" if reference is None else f"; relative error vs bf16 {relative(result, reference):.4f}"
    print(f"step {label}: {timed_ms(step, device):.1f} ms, peak {step_peak_gb(step, device):.2f} GB above the weights{error}")
    kernel_split(step, device, out, label)
    if not skip_compile:
        compiled(flux, step, result, device, out, f"{label}_compiled")
    return result


def decode_memory(ae: AutoEncoder, size: int, device: torch.device) -> None:
    """Decode time and peak memory above what is resident, then (CUDA) the peak of each decoder stage."""
    latent = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=ae.dtype)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    with torch.inference_mode():
        ms = timed_ms(lambda: ae.decode(latent), device, repeats=3)
    peak = (torch.cuda.max_memory_allocated() - resident) / 1e9 if cuda else float("nan")
    print(f"decode {size} px: {ms:.1f} ms, peak above resident {peak:.2f} GB")
    if not cuda:
        return
    decoder, peaks = ae.decoder, []
    stages = [("conv_in", decoder.conv_in), ("mid", decoder.mid)]
    stages += [(f"up.{i}", decoder.up[i]) for i in reversed(range(len(decoder.up)))]
    stages += [("norm_out+conv_out", decoder.conv_out)]

    def record(name):
        def hook(*_):
            torch.cuda.synchronize()
            peaks.append(f"{name} {(torch.cuda.max_memory_allocated() - resident) / 1e9:.2f}")
            torch.cuda.reset_peak_memory_stats()

        return hook

    for name, module in stages:
        module.register_forward_hook(record(name))
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        ae.decode(latent)
    print("  decode peak GB by stage: " + ", ".join(peaks))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def step_peak_gb(step, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated()
    step()
    return (torch.cuda.max_memory_allocated() - resident) / 1e9


def compiled(model, step, eager_out, device, out: Path, label: str) -> None:
    torch._dynamo.reset()
    start = perf_counter()
    model.compile_blocks()
    result = step().float()
    print(f"{label}: first call {perf_counter() - start:.1f} s, graphs {dict(torch._dynamo.utils.counters['stats'])}, "
          f"relative difference to eager {relative(result, eager_out):.5f}")  # fmt: skip
    print(f"step {label}: {timed_ms(step, device):.1f} ms")
    kernel_split(step, device, out, label)


if __name__ == "__main__":
    main()
