"""AE decode speed: flux_core vs diffusers' AutoencoderKL, same random weights at Flux's real widths, one process.

Runs alternate (ours, theirs, ...) after a warm-up so both see the same machine state; prints the median of each
and the ratio. Usage: python bench/autoencoder.py [--size 256] [--rounds 3] [--dtype float32] [--device cpu]
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from flux_core.autoencoder import AutoEncoderParams, load_autoencoder  # noqa: E402
from tiny_ae import bfl_to_diffusers_vae, diffusers_vae_config, write_ae_bfl  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latent side = size / 8)")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each, after one warm-up run each")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu", help="e.g. cuda")
    args = parser.parse_args()
    from diffusers import AutoencoderKL

    dtype = getattr(torch, args.dtype)
    params = AutoEncoderParams.flux()
    with tempfile.TemporaryDirectory() as tmp:
        weights = write_ae_bfl(Path(tmp) / "ae.safetensors", params)
        ours = load_autoencoder(Path(tmp) / "ae.safetensors", dtype=dtype, device=args.device)
        config = {k: v for k, v in diffusers_vae_config(params).items() if not k.startswith("_")}
        theirs = AutoencoderKL(**config)
        theirs.load_state_dict(bfl_to_diffusers_vae(weights, params), strict=True)
        theirs = theirs.to(args.device, dtype).eval()
        del weights

        latent = torch.randn(1, 16, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        latent = latent.to(args.device, dtype)
        sync = torch.cuda.synchronize if latent.is_cuda else lambda: None
        scale, shift = params.scale_factor, params.shift_factor
        runs = {"flux_core": lambda: ours.decode(latent), "diffusers": lambda: theirs.decode(latent / scale + shift).sample}
        times = {name: [] for name in runs}
        with torch.inference_mode():
            outputs = {name: run() for name, run in runs.items()}  # warm-up
            for _ in range(args.rounds):
                for name, run in runs.items():
                    sync()
                    start = time.perf_counter()
                    run()
                    sync()
                    times[name].append(time.perf_counter() - start)
    ref = outputs["diffusers"].float()
    rel = ((outputs["flux_core"].float() - ref).abs().max() / ref.abs().max()).item()
    medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
    where = f"{torch.get_num_threads()} CPU threads" if args.device == "cpu" else args.device
    print(f"AE decode {args.size}x{args.size} {args.dtype}, {where}, median of {args.rounds}:")
    for name, ms in medians.items():
        print(f"  {name:10s} {ms:9.1f} ms")
    print(f"  ratio flux_core / diffusers = {medians['flux_core'] / medians['diffusers']:.3f}  (outputs rel. diff {rel:.1e})")


if __name__ == "__main__":
    main()
