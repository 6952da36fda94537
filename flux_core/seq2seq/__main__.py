"""python -m flux_core.seq2seq demo|train|sample|eval (run from the repository root); --help on each."""
import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_safetensors
from ..model import preset
from ..sampling import FlowMatch
from . import Seq2Seq, ShapeTask, TensorTask, Trainer, TrainConfig, init_model, load_run, make_task, read_params, sample
from .demo import DEMO_PRESET, DEMO_THREADS, DEMO_TRAIN, EVAL_STEPS, compare, plot, run_demo
from .train import TRAIN_STATE_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_core.seq2seq", description=__doc__)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; demo: 1)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train the built-in shapes -> points demo with its defaults, then evaluate")
    demo.add_argument("--run", default="runs/seq2seq-demo", help="run directory (checkpoints, eval.json, samples.png)")
    demo.add_argument("--steps", type=int, default=DEMO_TRAIN.steps)
    demo.add_argument("--seed", type=int, default=0, help="evaluation seed")

    train = commands.add_parser("train", help="train (or --resume) a run")
    train.add_argument("--run", required=True, help="run directory for checkpoints")
    train.add_argument("--data", help="safetensors with cond (N, Lc, Cc), data (N, Ld, Cd), optional y (N, V); "
                       "default: the built-in shapes task")  # fmt: skip
    train.add_argument("--data-ids", default="sequence", help="sequence | set | grid:HxW (with --data)")
    train.add_argument("--cond-ids", default="sequence", help="sequence | set | grid:HxW (with --data)")
    train.add_argument("--holdout", type=float, default=0.1, help="fraction of --data items kept for eval")
    train.add_argument("--preset", default=DEMO_PRESET, help="FluxParams preset; token widths come from the data")
    train.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                       help="FluxParams override, e.g. hidden_size=128")  # fmt: skip
    train.add_argument("--shift", action="store_true", help="shift the time schedule by sequence length")
    train.add_argument("--resume", action="store_true", help="continue the run in --run (--steps may extend it)")
    train.add_argument("--device", default="cpu")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            train.add_argument(flag, action="store_true", default=None)
        else:
            train.add_argument(flag, type={"int": int, "float": float, "str": str}.get(f.type, f.type), default=None)

    draw = commands.add_parser("sample", help="generate data tokens for condition tokens")
    draw.add_argument("--run", required=True)
    source = draw.add_mutually_exclusive_group(required=True)
    source.add_argument("--cond", help="safetensors with cond (B, Lc, Cc) and, if the model takes one, y (B, V)")
    source.add_argument("--shapes", type=int, help="shapes runs: this many held-out demo conditions")
    draw.add_argument("--out", required=True, help="safetensors to write (cond, data); a .png too for shapes runs")
    draw.add_argument("--seed", type=int, default=0)
    draw.add_argument("--steps", type=int, default=32)
    draw.add_argument("--method", default="euler", choices=["euler", "heun"])
    draw.add_argument("--data-len", type=int, help="data tokens per item (default: the run's)")

    score = commands.add_parser("eval", help="score a run on its task's held-out data")
    score.add_argument("--run", required=True)
    score.add_argument("--seed", type=int, default=0)
    score.add_argument("--steps", type=int, default=EVAL_STEPS)
    score.add_argument("--method", default="euler", choices=["euler", "heun"])
    score.add_argument("--baselines", action="store_true", help="shapes runs: the untrained model and baselines too")

    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    {"demo": demo_command, "train": train_command, "sample": sample_command, "eval": eval_command}[args.command](args)


def demo_command(args) -> None:
    torch.set_num_threads(args.threads or DEMO_THREADS)
    start = time.time()
    results = run_demo(args.run, steps=args.steps, seed=args.seed)
    print(json.dumps(results, indent=1))
    print(f"demo took {time.time() - start:.0f} s; run in {args.run}")


def train_command(args) -> None:
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None}
    if args.resume:
        if not (Path(args.run) / TRAIN_STATE_FILE).is_file():
            sys.exit(f"{args.run} has no {TRAIN_STATE_FILE} to resume from; train without --resume first")
        task = make_task(read_params(args.run)["task"])  # the task it was trained on, data file included
        trainer = Trainer.resume(args.run, task, overrides.get("steps"), args.device)
    else:
        if (Path(args.run) / TRAIN_STATE_FILE).is_file():
            sys.exit(f"{args.run} already holds a run: pass --resume to continue it, or another --run")
        task = TensorTask(args.data, args.data_ids, args.cond_ids, args.holdout) if args.data else ShapeTask()
        probe = task.batch(1, torch.Generator().manual_seed(0))
        data_dim, cond_dim = probe.data.shape[-1], probe.cond.shape[-1]
        widths = dict(in_channels=data_dim, out_channels=data_dim, context_in_dim=cond_dim,
                      vec_in_dim=0 if probe.y is None else probe.y.shape[-1])  # fmt: skip
        params = preset(args.preset, **widths, **dict(_field(item) for item in args.set))
        config = replace(DEMO_TRAIN if isinstance(task, ShapeTask) else TrainConfig(), **overrides)
        trainer = Trainer(params, task, config, FlowMatch(shift=args.shift), args.device)
    trainer.train(args.run)
    print(f"trained to step {trainer.step}, last loss {trainer.losses[-1]:.4f}; run in {args.run}")


def _field(item: str) -> tuple[str, object]:
    name, _, value = item.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        sys.exit(f"--set {item}: the value must be JSON, e.g. hidden_size=128 or axes_dim=[8,12,12]")


def sample_command(args) -> None:
    run, task_description = load_run(args.run), read_params(args.run)["task"]
    if args.shapes:
        if task_description["name"] != ShapeTask.name:
            sys.exit(f"--shapes needs a run of the shapes task; {args.run} was trained on "
                     f"{task_description['name']!r}: use --cond")  # fmt: skip
        task = make_task(task_description)
        cond, y = task.held_out(args.shapes, args.seed)[0], None
        data_len = args.data_len or task.num_points
    else:
        tensors = load_safetensors(args.cond)
        cond, y, data_len = tensors["cond"].float(), tensors.get("y"), args.data_len
    data = sample(run, cond, args.seed, args.steps, y=y, data_len=data_len, method=args.method)
    save_file({"cond": cond.contiguous(), "data": data.contiguous()}, args.out)
    if args.shapes:
        plot(data, str(Path(args.out).with_suffix(".png")))
    print(f"wrote {tuple(data.shape)} data tokens to {args.out}")


def eval_command(args) -> None:
    task, run = make_task(read_params(args.run)["task"]), load_run(args.run)
    if not args.baselines:
        results = task.evaluate(run, args.steps, args.seed, args.method)
    elif isinstance(task, ShapeTask):
        seed = json.loads((Path(args.run) / TRAIN_STATE_FILE).read_text())["config"]["seed"]
        untrained = Seq2Seq(init_model(run.model.params, seed), run.layout, run.flow)
        results = compare(task, run, untrained, args.seed, args.steps)
    else:
        sys.exit("--baselines is for shapes runs")
    print(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
