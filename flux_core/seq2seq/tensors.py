"""Training pairs of your own: condition and data tokens stored in a safetensors file."""
import os
from pathlib import Path

import torch

from ..checkpoint import load_safetensors
from .core import Batch, Layout, Seq2Seq, position_ids, validation_loss


class TensorTask:
    """`cond` (N, Lc, Cc) and `data` (N, Ld, Cd) tensors, optional `y` (N, V), any widths. The last `holdout`
    fraction of the items is never trained on: `evaluate` scores the flow-matching loss there."""

    name = "tensors"

    def __init__(
        self, path: str | os.PathLike, data_ids: str = "sequence", cond_ids: str = "sequence", holdout: float = 0.1
    ):
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout}")
        self.path, self.holdout = Path(path), holdout
        tensors = load_safetensors(self.path)
        missing = {"cond", "data"} - set(tensors)
        if missing:
            raise ValueError(
                f"{self.path.name} lacks {', '.join(sorted(missing))}: it needs tensors 'cond' (N, Lc, Cc) and "
                f"'data' (N, Ld, Cd), optionally 'y' (N, V); it has {', '.join(sorted(tensors))}"
            )
        self.cond, self.data = tensors["cond"].float(), tensors["data"].float()
        self.y = tensors["y"].float() if "y" in tensors else None
        count = self.data.shape[0]
        if self.cond.ndim != 3 or self.data.ndim != 3 or self.cond.shape[0] != count:
            raise ValueError(f"{self.path.name}: cond must be (N, Lc, Cc) and data (N, Ld, Cd) with the same N, "
                             f"got {tuple(self.cond.shape)} and {tuple(self.data.shape)}")  # fmt: skip
        if self.y is not None and (self.y.ndim != 2 or self.y.shape[0] != count):
            raise ValueError(f"{self.path.name}: y must be (N, V) with N = {count}, got {tuple(self.y.shape)}")
        for name, tensor in (("cond", self.cond), ("data", self.data), ("y", self.y)):
            if tensor is not None and tensor.numel() == 0:
                raise ValueError(f"{self.path.name}: {name} {tuple(tensor.shape)} is empty; every size must be >= 1")
            if tensor is not None and not tensor.isfinite().all():
                item = (~tensor.isfinite()).flatten(1).any(1).nonzero()[0, 0].item()
                raise ValueError(f"{self.path.name}: {name} holds NaN or infinite values (first at item {item})")
        for role, kind, length in (("data", data_ids, self.data.shape[1]), ("cond", cond_ids, self.cond.shape[1])):
            try:  # a layout that does not fit fails here, not in the first training step
                position_ids(kind, length, n_axes=2)
            except ValueError as e:
                raise ValueError(f"{self.path.name}: {role} tokens: {e}") from None
        self.train_count = count - round(count * holdout)
        if not 0 < self.train_count:
            raise ValueError(f"holdout {holdout} leaves no training items out of {count}")
        train = self.data[: self.train_count].flatten(0, 1)  # (N * Ld, Cd)
        std = train.std(0).clamp(min=1e-6) if len(train) > 1 else torch.ones(train.shape[-1])
        self.layout = Layout(self.data.shape[1], train.mean(0).tolist(), std.tolist(), data_ids, cond_ids)

    def describe(self) -> dict:
        return {"name": self.name, "path": str(self.path.resolve()), "data_ids": self.layout.data_ids,
                "cond_ids": self.layout.cond_ids, "holdout": self.holdout}  # fmt: skip

    def batch(self, size: int, generator: torch.Generator) -> Batch:
        index = torch.randint(self.train_count, (size,), generator=generator)
        return Batch(self.cond[index], self.data[index], None if self.y is None else self.y[index])

    def held_out(self) -> Batch:
        rest = slice(self.train_count, None)
        return Batch(self.cond[rest], self.data[rest], None if self.y is None else self.y[rest])

    def evaluate(self, run: Seq2Seq, steps: int, seed: int, method: str = "euler") -> dict[str, float]:
        """The flow-matching loss on the held-out items (seeded, evenly spaced t); steps and method are unused:
        a loss needs no sampling."""
        held_out = self.held_out()
        if held_out.data.shape[0] == 0:
            raise ValueError("this task holds no items out (holdout=0): nothing to evaluate on")
        device = next(run.model.parameters()).device
        return {"val_loss": validation_loss(run, held_out.to(device), seed)}
