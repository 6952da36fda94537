"""Sequence-to-sequence flow matching with the Flux transformer: condition tokens of one space -> data tokens of
another. Train with `Trainer` (or `python -m flux_core.seq2seq train`), then:

    run = load_run("runs/seq2seq-demo")          # Flux with EMA weights + token layout + time convention
    data = sample(run, cond, seed=0, steps=32)   # (B, Lc, context_in_dim) -> (B, data_len, in_channels)
"""
from .core import Batch, Layout, Seq2Seq, Task, load_run, position_ids, read_params, sample, validation_loss
from .demo import ShapeTask
from .tensors import TensorTask
from .train import Trainer, TrainConfig, init_model

TASKS = {ShapeTask.name: ShapeTask, TensorTask.name: TensorTask}

__all__ = [
    "Batch", "Layout", "Seq2Seq", "ShapeTask", "TASKS", "Task", "TensorTask", "TrainConfig", "Trainer", "init_model",
    "load_run", "make_task", "position_ids", "read_params", "sample", "validation_loss",
]  # fmt: skip


def make_task(description: dict) -> Task:
    """The task a run was trained on, from the `task` entry of its params.json."""
    kwargs = dict(description)
    name = kwargs.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown seq2seq task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)
