"""The seq2seq demo's promise, checked: train the shapes -> points demo with its defaults, then print the Chamfer
distance of the trained model, the untrained model and the baselines on held-out conditions, the ratios, the wall
time, and whether the target (>= 5x better than the untrained model and the trivial baseline) is met.

    python bench/seq2seq_demo.py [--threads N] [--run DIR]      # from the repo root; exit status 1 if missed
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flux_core.seq2seq.demo import DEMO_THREADS, DEMO_TRAIN, run_demo  # noqa: E402

TARGET = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=DEMO_THREADS, help="torch threads (default: the demo's)")
    parser.add_argument("--run", help="run directory to keep (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=DEMO_TRAIN.steps)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        results = run_demo(args.run or scratch, steps=args.steps)  # progress on stderr
    wall = time.time() - start
    chamfer = results["chamfer"]
    print(f"seq2seq demo: {results['steps']} steps, {args.threads} thread(s); {results['eval']}")
    print(f"{'':24}{'Chamfer':>10}{'/ trained':>11}   (lower is better)")
    for name, value in chamfer.items():
        print(f"{name:24}{value:10.4f}{value / chamfer['trained']:11.2f}")
    print(f"train {results['train_seconds']:.0f} s + eval {results['eval_seconds']:.0f} s, wall {wall:.0f} s")
    ratios = {k: results[f"times_better_than_{k}"] for k in ("untrained", "global_gaussian")}
    met = all(r >= TARGET for r in ratios.values())
    print(f"target >= {TARGET:g}x better than untrained and global_gaussian: {'met' if met else 'MISSED'} ({ratios})")
    sys.exit(0 if met else 1)


if __name__ == "__main__":
    main()
