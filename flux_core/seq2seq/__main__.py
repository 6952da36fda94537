"""python -m flux_core.seq2seq demo|train|sample|eval (run from the repository root); --help on each."""
import argparse
import json
import math
import os
import sys
import time
import traceback
import typing
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import load_safetensors
from ..model import PRESETS, FluxParams, preset
from ..sampling import FlowMatch
from . import Seq2Seq, ShapeTask, TensorTask, Trainer, TrainConfig, init_model, load_run, make_task, read_params, sample
from .demo import DEMO_PRESET, DEMO_THREADS, DEMO_TRAIN, EVAL_STEPS, compare, plot, run_demo
from .train import LOSS_WINDOW, TRAIN_STATE_FILE, join_process_group

DATA_WIDTHS = ("in_channels", "out_channels", "context_in_dim", "vec_in_dim")  # FluxParams set from the data
RESUMABLE = {"command", "run", "resume", "steps", "device", "threads", "traceback"}  # all else is the run's own


def _positive(text: str) -> int:
    if not text.lstrip("-").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """One line, not the whole usage."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, except None: the help says what happens without the option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m flux_core.seq2seq", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add = partial(commands.add_parser, formatter_class=_Help)

    demo = add("demo", help="train the built-in shapes -> points demo with its defaults, then evaluate")
    demo.add_argument("--run", default="runs/seq2seq-demo", help="new run directory (checkpoints, eval.json, PNG)")
    demo.add_argument("--steps", type=_positive, default=DEMO_TRAIN.steps, help="training steps")
    demo.add_argument("--seed", type=int, default=0, help="evaluation seed")

    train = add("train", help="train (or --resume) a run")
    train.add_argument("--run", required=True, help="run directory for checkpoints")
    train.add_argument("--data", help="safetensors with cond (N, Lc, Cc), data (N, Ld, Cd), optional y (N, V); "
                       "none: the built-in shapes task")  # fmt: skip
    train.add_argument("--data-ids", default="sequence", help="data token layout: sequence | set | grid:HxW")
    train.add_argument("--cond-ids", default="sequence", help="condition token layout: sequence | set | grid:HxW")
    train.add_argument("--holdout", type=float, default=0.1, help="fraction of --data items kept for eval")
    train.add_argument("--preset", default=DEMO_PRESET, choices=list(PRESETS), metavar="NAME",
                       help=f"FluxParams preset: {', '.join(PRESETS)}; token widths come from the data")  # fmt: skip
    train.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                       help="FluxParams override, e.g. hidden_size=128 or axes_dim=[4,6,6]; repeatable")  # fmt: skip
    train.add_argument("--shift", action="store_true", help="shift the time schedule by sequence length")
    train.add_argument("--resume", action="store_true", help="continue the run in --run with its own settings; only "
                       "--steps (to extend it), --device and --threads may be given")  # fmt: skip
    train.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    for f in fields(TrainConfig):  # not given: the config's default (SUPPRESS keeps it out of args)
        shapes_default = getattr(DEMO_TRAIN, f.name)
        default = f.default if shapes_default == f.default else f"{f.default}; shapes task: {shapes_default}"
        option = dict(default=argparse.SUPPRESS, help=f"{f.metadata['help']} (default: {default})")
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            train.add_argument(flag, action="store_true", **option)
        else:
            train.add_argument(flag, type=f.type, **option)

    draw = add("sample", help="generate data tokens for condition tokens")
    draw.add_argument("--run", required=True, help="run directory")
    source = draw.add_mutually_exclusive_group(required=True)
    source.add_argument("--cond", help="safetensors with cond (B, Lc, Cc) and, if the model takes one, y (B, V)")
    source.add_argument("--shapes", type=_positive, help="shapes runs: this many held-out demo conditions")
    draw.add_argument("--out", required=True, help="new safetensors file for cond and data; shapes runs: a .png too")
    draw.add_argument("--seed", type=int, default=0, help="noise seed; item i uses seed + i")
    draw.add_argument("--steps", type=_positive, default=32, help="sampling steps")
    draw.add_argument("--method", default="euler", choices=["euler", "heun"], help="ODE solver")
    draw.add_argument("--data-len", type=_positive, help="data tokens per item (none: the run's)")

    score = add("eval", help="score a run on its task's held-out data")
    score.add_argument("--run", required=True, help="run directory")
    score.add_argument("--seed", type=int, default=0, help="evaluation seed")
    score.add_argument("--steps", type=_positive, default=EVAL_STEPS, help="sampling steps (shapes runs)")
    score.add_argument("--method", default="euler", choices=["euler", "heun"], help="ODE solver (shapes runs)")
    score.add_argument("--baselines", action="store_true", help="shapes runs: the untrained model and baselines too")

    # The demo's small matrices run fastest on one thread, and far slower on two when the other core is busy.
    for command, threads in ((demo, DEMO_THREADS), (train, torch.get_num_threads()), (draw, DEMO_THREADS),
                             (score, DEMO_THREADS)):  # fmt: skip
        about = "torch CPU threads" + (", torch's choice by default" if command is train else "")
        command.add_argument("--threads", type=_positive, default=threads, help=about)
        command.add_argument("--traceback", action="store_true", help="print the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    commands = {"demo": demo_command, "train": train_command, "sample": sample_command, "eval": eval_command}
    try:
        commands[args.command](args)
    except (ValueError, OSError) as e:  # bad data, option values or files (CheckpointError is a ValueError)
        if args.traceback:
            traceback.print_exception(e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _new_run_dir(run: Path, fix: str = "pass another --run") -> None:
    """Refuse a run directory that holds a run (nothing is overwritten) or cannot be written, before any training."""
    if (run / TRAIN_STATE_FILE).is_file():
        raise ValueError(f"{run} already holds a run: {fix}")
    run.mkdir(parents=True, exist_ok=True)
    if not os.access(run, os.W_OK):
        raise ValueError(f"{run} is not writable: pass another --run")


def demo_command(args) -> None:
    _new_run_dir(Path(args.run))
    start = time.time()
    results = run_demo(args.run, steps=args.steps, seed=args.seed)
    print(json.dumps(results, indent=1))
    print(f"demo took {time.time() - start:.0f} s (train {results['train_seconds']:.0f} s, evaluate "
          f"{results['eval_seconds']:.0f} s); run in {args.run}")  # fmt: skip


def train_command(args) -> None:
    args.device = join_process_group(args.device)  # under torchrun: data-parallel, this rank's device
    run = Path(args.run)
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name in args}
    defaults = vars(_parser().parse_args(["train", "--run", args.run]))
    given = [k for k, v in vars(args).items() if v != defaults.get(k)]
    if args.resume:
        if not (run / TRAIN_STATE_FILE).is_file():
            raise ValueError(f"{run} has no {TRAIN_STATE_FILE} to resume from; train without --resume first")
        if fixed := [k for k in given if k not in RESUMABLE]:
            raise ValueError(f"--resume continues {run} with the settings it was trained with: drop {_flags(fixed)}")
        task = make_task(read_params(run)["task"])  # the task it was trained on, data file included
        trainer = Trainer.resume(run, task, overrides.get("steps"), args.device)
        if trainer.step >= trainer.config.steps:
            raise ValueError(f"{run} is already at step {trainer.step}: pass --steps above it to train further")
    else:
        if args.data is None and (stray := [k for k in given if k in ("data_ids", "cond_ids", "holdout")]):
            raise ValueError(f"{_flags(stray)}: only for a --data file; the built-in shapes task takes none")
        config = replace(DEMO_TRAIN if args.data is None else TrainConfig(), **overrides)  # checked before any work
        flux_overrides = dict(_flux_override(item) for item in args.set)
        _new_run_dir(run, "pass --resume to continue it, or another --run")
        task = TensorTask(args.data, args.data_ids, args.cond_ids, args.holdout) if args.data else ShapeTask()
        probe = task.batch(1, torch.Generator().manual_seed(0))
        data_dim, cond_dim = probe.data.shape[-1], probe.cond.shape[-1]
        widths = dict(in_channels=data_dim, out_channels=data_dim, context_in_dim=cond_dim,
                      vec_in_dim=0 if probe.y is None else probe.y.shape[-1])  # fmt: skip
        params = preset(args.preset, **widths, **flux_overrides)
        trainer = Trainer(params, task, config, FlowMatch(shift=args.shift), args.device)
    trainer.train(run)
    if trainer.rank == 0:
        print(f"trained to step {trainer.step}, loss {trainer.recent_loss():.4f} (mean of last {LOSS_WINDOW} steps); "
              f"run in {run}")  # fmt: skip


def _flags(dests: list[str]) -> str:
    return ", ".join("--" + dest.replace("_", "-") for dest in dests)


def _flux_override(item: str) -> tuple[str, object]:
    """--set FIELD=JSON as a FluxParams override, its value checked against the field's type."""
    name, _, text = item.partition("=")
    kinds = {f.name: f.type for f in fields(FluxParams) if f.name not in DATA_WIDTHS}
    if name not in kinds:
        why = "is set from the data's token widths" if name in DATA_WIDTHS else "is not a FluxParams field"
        raise ValueError(f"--set {item}: {name!r} {why}; --set takes {', '.join(kinds)}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None  # fits no field
    if not _fits(value, kinds[name]):
        kind = kinds[name].__name__ if isinstance(kinds[name], type) else str(kinds[name])
        example = json.dumps(getattr(PRESETS[DEMO_PRESET], name))
        raise ValueError(f"--set {item}: {name} takes a finite {kind} written as JSON, e.g. {name}={example}")
    return name, value


def _fits(value, kind) -> bool:
    """Whether a JSON value is of a dataclass field's type (int is not bool; float takes ints, not NaN or inf)."""
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(_fits(v, typing.get_args(kind)[0]) for v in value)
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value)
    return type(value) is kind


def _new_files(*paths: Path) -> None:
    """Refuse outputs that exist (nothing is overwritten) or whose folder does not, before any work."""
    for path in paths:
        if path.exists():
            raise ValueError(f"{path} exists: pass another --out (nothing is overwritten)")
        if not path.parent.is_dir():
            raise ValueError(f"{path.parent} is not a folder: create it or pass another --out")


def sample_command(args) -> None:
    out = Path(args.out)
    task_description = read_params(args.run)["task"]
    if args.shapes:
        if task_description["name"] != ShapeTask.name:
            raise ValueError(f"--shapes needs a run of the shapes task; {args.run} was trained on "
                             f"{task_description['name']!r}: use --cond")  # fmt: skip
        _new_files(out, out.with_suffix(".png"))
        task = make_task(task_description)
        cond, y = task.held_out(args.shapes, args.seed)[0], None
        data_len = args.data_len or task.num_points
    else:
        _new_files(out)
        tensors = load_safetensors(args.cond)
        if "cond" not in tensors:
            raise ValueError(f"{args.cond} has no tensor 'cond' (B, Lc, Cc); it has {', '.join(sorted(tensors))}")
        cond, y, data_len = tensors["cond"].float(), tensors.get("y"), args.data_len
    data = sample(load_run(args.run), cond, args.seed, args.steps, y=y, data_len=data_len, method=args.method)
    save_file({"cond": cond.contiguous(), "data": data.contiguous()}, out)
    if args.shapes:
        plot(data, str(out.with_suffix(".png")))
    print(f"wrote {tuple(data.shape)} data tokens to {out}")


def eval_command(args) -> None:
    task = make_task(read_params(args.run)["task"])
    if args.baselines and not isinstance(task, ShapeTask):
        raise ValueError("--baselines is for shapes runs")
    run, start = load_run(args.run), time.time()
    if args.baselines:
        seed = json.loads((Path(args.run) / TRAIN_STATE_FILE).read_text())["config"]["seed"]
        untrained = Seq2Seq(init_model(run.model.params, seed), run.layout, run.flow)
        results = compare(task, run, untrained, args.seed, args.steps)
    elif isinstance(task, ShapeTask):
        results = task.evaluate(run, args.steps, args.seed, args.method, label=Path(args.run).resolve().name or "run")
    else:
        results = task.evaluate(run, args.steps, args.seed, args.method)
    print(json.dumps(results, indent=1))
    print(f"eval took {time.time() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
