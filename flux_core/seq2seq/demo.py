"""The built-in demo task: 2 condition tokens (4-D) describing a shape -> a set of 2-D points on its outline.

Condition tokens (a space apart from the data: a class code and a box):
  token 0: one-hot shape kind (ring, square, triangle, plus);
  token 1: (cx, cy, sx, sy): centre and half-width / half-height of the box the shape is stretched to fill
  (ring -> ellipse, square -> rectangle, triangle apex up, plus with arms to the box's edges).
Data: `num_points` points drawn uniformly along the outline (segments equally likely), plus Gaussian jitter.
Layout: condition tokens are a sequence (their position is their role); points are a set (all ids equal), so
the model is permutation-equivariant over points. Points are i.i.d. given the shape, so the model learns sets of
`train_points` (attention cost grows with the square of the set) and a set of `num_points` is drawn as
independent groups of `train_points` (Layout.iid_tokens).
Metric: Chamfer distance (mean nearest-neighbour distance, both ways, in data units) between a generated set and
a fresh true set, over held-out conditions drawn from a seed no training stream uses.
(Rotated shapes, tried first, need about 4x the training to get corners and arms right: too slow for the demo.)
"""
import json
import math
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ..model import preset
from ..pipeline import seeded_noise
from .core import Batch, Layout, Seq2Seq, load_run, sample
from .train import Trainer, TrainConfig, init_model

SHAPES = ("ring", "square", "triangle", "plus")
EVAL_STREAM = 0x5EED_E7A1  # eval conditions come from Generator(EVAL_STREAM + seed), never from a training seed
DEMO_PRESET = "seq2seq-demo"
# Sets of 32 points, 128 per batch: 2500 steps train in about 4 minutes on one CPU thread.
DEMO_TRAIN = TrainConfig(steps=2500, batch_size=128, lr=3e-3, warmup=50, ema_decay=0.995)
# Its matrices are small: a second thread is ~1.6x faster on an idle machine but 3-4x slower when the other core
# is busy (threads spin-wait for each other), so the demo takes one unless told otherwise.
DEMO_THREADS = 1
EVAL_STEPS, EVAL_COUNT = 16, 64  # Euler steps, held-out conditions


def draw_conditions(size: int, generator: torch.Generator) -> Tensor:
    """(B, 2, 4) random shape descriptions: centres in [-0.5, 0.5]^2, half-sizes in [0.2, 0.6]."""
    kind = torch.randint(len(SHAPES), (size,), generator=generator)
    centre = torch.rand(size, 2, generator=generator) - 0.5
    half_size = 0.2 + 0.4 * torch.rand(size, 2, generator=generator)
    return torch.stack([torch.nn.functional.one_hot(kind, len(SHAPES)).float(), torch.cat([centre, half_size], -1)], 1)


def shape_condition(
    kind: str, centre: tuple[float, float] = (0.0, 0.0), half_size: tuple[float, float] = (0.4, 0.4)
) -> Tensor:
    """(1, 2, 4) condition tokens for one shape, e.g. shape_condition("triangle", (0.2, 0), (0.5, 0.3))."""
    if kind not in SHAPES:
        raise ValueError(f"unknown shape {kind!r}; the demo knows {', '.join(SHAPES)}")
    kind_token = torch.nn.functional.one_hot(torch.tensor(SHAPES.index(kind)), len(SHAPES)).float()
    return torch.stack([kind_token, torch.tensor([*centre, *half_size], dtype=torch.float32)])[None]


def _polygon(*corners: tuple[float, float]) -> Tensor:
    """(S, 2, 2) start and end of each side of a closed polygon."""
    points = torch.tensor(corners + corners[:1])
    return torch.stack([points[:-1], points[1:]], 1)


OUTLINES = [  # (S, 2, 2) segments in the box [-1, 1]^2; the ring is drawn apart
    _polygon((1, 1), (-1, 1), (-1, -1), (1, -1)),
    _polygon((0, 1), (-1, -1), (1, -1)),
    torch.tensor([[[0.0, 0], [1, 0]], [[0, 0], [0, 1]], [[0, 0], [-1, 0]], [[0, 0], [0, -1]]]),  # plus: 4 arms
]


def _along(u: Tensor, segments: Tensor) -> Tensor:
    """Points at fractions u (B, N) of a path through equally likely segments (S, 2, 2)."""
    count = len(segments)
    index = (u * count).long().clamp(max=count - 1)
    frac = (u * count - index)[..., None]
    return segments[index, 0] * (1 - frac) + segments[index, 1] * frac


def canonical_points(kind: Tensor, u: Tensor) -> Tensor:
    """(B, N, 2) points of each item's shape kind (B,) at outline fractions u (B, N), filling [-1, 1]^2."""
    ring = torch.stack([(2 * math.pi * u).cos(), (2 * math.pi * u).sin()], -1)
    shapes = torch.stack([ring, *(_along(u, segments) for segments in OUTLINES)])  # (4, B, N, 2)
    return shapes[kind, torch.arange(len(kind))]


def shape_points(cond: Tensor, num_points: int, generator: torch.Generator, jitter: float) -> Tensor:
    """(B, N, 2) points of the shapes that condition tokens (B, 2, 4) describe."""
    kind, box = cond[:, 0].argmax(-1), cond[:, 1]
    u = torch.rand(cond.shape[0], num_points, generator=generator)
    points = box[:, None, :2] + box[:, None, 2:] * canonical_points(kind, u)
    return points + jitter * torch.randn(points.shape, generator=generator)


def chamfer(a: Tensor, b: Tensor) -> Tensor:
    """(B,) symmetric Chamfer distance between point sets (B, N, 2) and (B, M, 2): mean nearest-neighbour
    distance from a to b and from b to a, averaged."""
    d = torch.cdist(a.double(), b.double())  # (B, N, M)
    return ((d.min(2).values.mean(1) + d.min(1).values.mean(1)) / 2).float()


class ShapeTask:
    name = "shapes"

    def __init__(self, num_points: int = 1024, train_points: int = 32, jitter: float = 0.02):
        self.num_points, self.train_points, self.jitter = num_points, train_points, jitter
        generator = torch.Generator().manual_seed(0)
        stats = shape_points(draw_conditions(256, generator), 256, generator, jitter)
        std = stats.flatten(0, 1).std(0).mean().item()  # one scale for both axes keeps the plane isotropic
        self.layout = Layout(train_points, [0.0, 0.0], [std, std], data_ids="set", cond_ids="sequence", iid_tokens=True)

    def describe(self) -> dict:
        return dict(name=self.name, num_points=self.num_points, train_points=self.train_points, jitter=self.jitter)

    def batch(self, size: int, generator: torch.Generator) -> Batch:
        cond = draw_conditions(size, generator)
        return Batch(cond, shape_points(cond, self.train_points, generator, self.jitter))

    def held_out(self, count: int, seed: int) -> tuple[Tensor, Tensor, torch.Generator]:
        """Evaluation conditions (K, 2, 4), a true point set (K, num_points, 2) for each, and the generator after."""
        generator = torch.Generator().manual_seed(EVAL_STREAM + seed)
        cond = draw_conditions(count, generator)
        return cond, shape_points(cond, self.num_points, generator, self.jitter), generator

    def evaluate(
        self, run: Seq2Seq, steps: int, seed: int, method: str = "euler", count: int = EVAL_COUNT, label: str = ""
    ) -> dict[str, float]:
        """Mean Chamfer distance over `count` held-out conditions; condition k is sampled from seed + k. With a
        label, a progress bar of that name shows the shapes sampled, the time taken and the result."""
        cond, truth, _ = self.held_out(count, seed)
        chunk, generated = 8, []
        with tqdm(total=count, desc=f"eval {label}", unit="shape", disable=not label) as bar:
            for i, c in enumerate(cond.split(chunk)):
                generated.append(sample(run, c, seed + i * chunk, steps, data_len=self.num_points, method=method))
                bar.update(len(c))
            bar.set_postfix_str("scoring")
            score = chamfer(torch.cat(generated), truth).mean().item()
            bar.set_postfix(chamfer=f"{score:.4f}")
        return {"chamfer": score}

    def baselines(self, seed: int, count: int = EVAL_COUNT) -> dict[str, float]:
        """Chamfer of reference predictors on the same held-out conditions as `evaluate`:
        floor: another true sample of the same shape (the best any model can do);
        global_gaussian: one Gaussian fitted to the points of 256 training shapes, ignoring the condition;
        oracle_gaussian: a Gaussian with each shape's true mean and covariance (knows where, not what)."""
        cond, truth, generator = self.held_out(count, seed)
        again = shape_points(cond, self.num_points, generator, self.jitter)
        train = self.batch(256, torch.Generator().manual_seed(seed)).data.flatten(0, 1)  # (256 * train_points, 2)
        noise = seeded_noise((count, self.num_points, 2), seed)
        global_fit = gaussian_like(train[None], noise)
        oracle_fit = gaussian_like(shape_points(cond, 8192, generator, self.jitter), noise)
        fits = {"floor": again, "global_gaussian": global_fit, "oracle_gaussian": oracle_fit}
        return {name: chamfer(points, truth).mean().item() for name, points in fits.items()}


def gaussian_like(points: Tensor, noise: Tensor) -> Tensor:
    """Noise (B, N, 2) mapped to Gaussians with the mean and covariance of points (B or 1, M, 2)."""
    mean = points.mean(1, keepdim=True)
    centred = points - mean
    cov = centred.transpose(1, 2) @ centred / (points.shape[1] - 1)  # (B, 2, 2)
    return mean + noise @ torch.linalg.cholesky(cov).transpose(1, 2)


def render(points: Tensor, size: int = 256, columns: int = 8) -> Tensor:
    """Point sets (K, N, 2) as a grid of black-on-white panels, (rows * size, columns * size) uint8; each panel
    spans [-1.2, 1.2]^2, y up."""
    columns = min(columns, len(points))
    rows = math.ceil(len(points) / columns)
    canvas = torch.full((rows * size, columns * size), 255, dtype=torch.uint8)
    pixels = ((points + 1.2) / 2.4 * (size - 1)).round().long().clamp(0, size - 1)
    for i, p in enumerate(pixels):
        top, left = (i // columns) * size, (i % columns) * size
        canvas[top + size - 1 - p[:, 1], left + p[:, 0]] = 0
    return canvas


def plot(points: Tensor, path: str) -> None:
    """render() saved as a PNG."""
    from PIL import Image

    Image.fromarray(render(points).numpy()).save(path)


def compare(
    task: ShapeTask, trained: Seq2Seq, untrained: Seq2Seq, seed: int = 0, steps: int = EVAL_STEPS, progress: bool = True
) -> dict:
    """Chamfer of the trained and untrained model and of the baselines on the same held-out conditions."""
    runs = {"trained": (trained, steps, "euler"), "trained_heun": (trained, steps // 2, "heun"),  # about as many calls
            "untrained": (untrained, steps, "euler")}  # fmt: skip
    chamfer_of = {name: task.evaluate(run, run_steps, seed, method, label=name if progress else "")["chamfer"]
                  for name, (run, run_steps, method) in runs.items()}  # fmt: skip
    with tqdm(total=1, desc="eval baselines", disable=not progress) as bar:
        chamfer_of.update(task.baselines(seed))
        bar.update()
    best = chamfer_of["trained"]
    return {
        "chamfer": {k: round(v, 5) for k, v in chamfer_of.items()},
        "times_better_than_untrained": round(chamfer_of["untrained"] / best, 2),
        "times_better_than_global_gaussian": round(chamfer_of["global_gaussian"] / best, 2),
        "times_better_than_oracle_gaussian": round(chamfer_of["oracle_gaussian"] / best, 2),
        "eval": f"{EVAL_COUNT} held-out conditions, seed {seed}, Euler {steps} steps (trained_heun: Heun {steps // 2})",
    }


def run_demo(run_dir: str | os.PathLike, steps: int = DEMO_TRAIN.steps, seed: int = 0, progress: bool = True) -> dict:
    """Train the demo into run_dir, then score it (loaded back from disk) against the untrained model and the
    baselines; writes eval.json and samples.png beside the checkpoint."""
    task = ShapeTask()
    trainer = Trainer(preset(DEMO_PRESET), task, replace(DEMO_TRAIN, steps=steps))
    untrained = Seq2Seq(init_model(preset(DEMO_PRESET), DEMO_TRAIN.seed), task.layout, trainer.run.flow)  # same init
    say = partial(print, file=sys.stderr, flush=True) if progress else lambda *_: None
    say(f"train: {steps} steps on the shapes task, {torch.get_num_threads()} CPU thread(s)")
    start = time.time()
    trainer.train(run_dir, progress=progress)
    train_seconds = time.time() - start
    say(f"evaluate: sample {EVAL_COUNT} held-out shapes with the trained model (Euler and Heun) and the untrained "
        "one, then score them and the baselines by Chamfer distance (about 1.5 min on one idle thread)")  # fmt: skip
    trained = load_run(run_dir)
    results = {"steps": trainer.step, "train_seconds": round(train_seconds, 1), "threads": torch.get_num_threads(),
               **compare(task, trained, untrained, seed, progress=progress)}  # fmt: skip
    results["eval_seconds"] = round(time.time() - start - train_seconds, 1)
    say(f"evaluate took {results['eval_seconds']:.0f} s; drawing samples.png")
    Path(run_dir, "eval.json").write_text(json.dumps(results, indent=1))
    cond = task.held_out(16, seed)[0]
    plot(sample(trained, cond, seed, EVAL_STEPS, data_len=task.num_points), str(Path(run_dir, "samples.png")))
    return results
