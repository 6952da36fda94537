"""Benchmark: flux_core's Flux transformer vs diffusers' FluxTransformer2DModel, and peak RSS while loading.

    python bench/transformer.py              # forward time, fp32 and bf16, ratio = our throughput / diffusers'
    python bench/transformer.py --load-rss   # peak RSS (VmHWM) of load_flux on a ~1.3 GB BFL file vs the file size

Same weights and inputs for both, one process, runs alternate, median after warm-up, all cores, inference_mode.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny_flux import bfl_to_diffusers, diffusers_config, random_weights, tiny_inputs  # noqa: E402

from flux_core.loading import load_flux  # noqa: E402
from flux_core.model import Flux, FluxParams  # noqa: E402

BENCH = FluxParams(
    in_channels=64, out_channels=64, vec_in_dim=768, context_in_dim=4096, hidden_size=1024, mlp_ratio=4.0,
    num_heads=8, depth=2, depth_single_blocks=4, axes_dim=[16, 56, 56], theta=10_000, qkv_bias=True,
    guidance_embed=True,
)  # fmt: skip
# ~1.3 GB in bf16: real Flux width, one double and two single blocks.
RSS_PARAMS = FluxParams(**{**BENCH.__dict__, "hidden_size": 3072, "num_heads": 24, "depth": 1, "depth_single_blocks": 2})


def build_pair(dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel

    weights = random_weights(BENCH, dtype=dtype)
    ours = Flux(BENCH).to(dtype)
    ours.load_state_dict(weights)
    config = {k: v for k, v in diffusers_config(BENCH).items() if k != "_class_name"}
    theirs = FluxTransformer2DModel(**config).to(dtype)
    theirs.load_state_dict(bfl_to_diffusers(weights))
    return ours.eval(), theirs.eval()


def bench_forward(dtype: torch.dtype, repeats: int, warmup: int) -> tuple[float, float]:
    ours, theirs = build_pair(dtype)
    x = tiny_inputs(BENCH, rows=32, cols=32, text=256, dtype=dtype)  # 1024 image + 256 text tokens

    def run_ours():
        return ours(**x)

    def run_theirs():
        return theirs(
            hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
            timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0], guidance=x["guidance"],
            return_dict=False,
        )[0]  # fmt: skip

    times = {run_ours: [], run_theirs: []}
    with torch.inference_mode():
        for i in range(warmup + repeats):
            for fn in (run_ours, run_theirs) if i % 2 else (run_theirs, run_ours):
                start = time.perf_counter()
                fn()
                if i >= warmup:
                    times[fn].append(time.perf_counter() - start)
        relative = ((run_ours() - run_theirs()).abs().max() / run_theirs().abs().max()).item()
    print(f"  same output: relative difference {relative:.1e}")
    return statistics.median(times[run_ours]), statistics.median(times[run_theirs])


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM; ru_maxrss would also count the parent's peak, kept across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def load_rss_child(path: str) -> None:
    """Run in a fresh process: peak RSS after imports, after load_flux, and after a forward touched every weight."""
    peaks = {"imports": peak_rss()}
    model = load_flux(path, dtype=torch.bfloat16)
    peaks["load"] = peak_rss()
    with torch.inference_mode():
        model(**tiny_inputs(model.params, rows=8, cols=8, text=16, dtype=torch.bfloat16))
    peaks["forward"] = peak_rss()
    print(json.dumps(peaks))


def bench_load_rss() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        path = Path(tmp) / "flux_rss.safetensors"
        subprocess.run([sys.executable, __file__, "--write-rss-file", str(path)], check=True)
        size = path.stat().st_size
        child = subprocess.run(
            [sys.executable, __file__, "--load-rss-child", str(path)], capture_output=True, text=True, check=True
        )
    peaks = json.loads(child.stdout.strip().splitlines()[-1])
    mb = 2**20
    print(f"file {size / mb:.0f} MB (bf16, BFL layout, loaded as bf16); python + torch + flux_core alone "
          f"{peaks['imports'] / mb:.0f} MB")  # fmt: skip
    for stage in ("load", "forward"):
        print(f"peak RSS after {stage}: {peaks[stage] / mb:.0f} MB = file + {(peaks[stage] - size) / mb:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-rss", action="store_true", help="measure peak RSS while loading a ~1.2 GB file")
    parser.add_argument("--load-rss-child", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--write-rss-file", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="default: all cores")
    args = parser.parse_args()
    if args.write_rss_file:
        return save_file(random_weights(RSS_PARAMS, dtype=torch.bfloat16), args.write_rss_file)
    if args.load_rss_child:
        return load_rss_child(args.load_rss_child)
    if args.load_rss:
        return bench_load_rss()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {BENCH.hidden_size}, "
          f"{BENCH.num_heads} heads, {BENCH.depth}+{BENCH.depth_single_blocks} blocks, 1024 image + 256 text tokens")  # fmt: skip
    for name in args.dtypes.split(","):
        print(f"{name}:")
        ours, theirs = bench_forward(getattr(torch, name), args.repeats, args.warmup)
        print(f"  flux_core {ours * 1e3:.1f} ms, diffusers {theirs * 1e3:.1f} ms, "
              f"throughput ratio flux_core/diffusers {theirs / ours:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
