"""Training a seq2seq Flux: AdamW, warmup + cosine learning rate, gradient clipping and accumulation, EMA weights,
optional bf16 autocast, checkpoints that resume bit-identically (weights, EMA, optimizer, step, RNG states).

Data-parallel under torchrun (DistributedDataParallel): every rank draws the same global batch, time and noise from
the same seeded streams and trains on its equal share of it; DDP averages the gradients, so N processes follow the
one-process run (the same loss curve within float rounding), and the saved state (RNG streams included) is that of
the one-process run at the same step: a run resumes on any number of processes. Rank 0 writes the run."""
import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import load_safetensors, strip_prefix
from ..model import Flux, FluxParams
from ..sampling import FlowMatch
from .core import MODEL_FILE, Batch, Layout, Seq2Seq, Task, read_params, save_run, write_atomic

STATE_FILE, TRAIN_STATE_FILE = "state.safetensors", "train_state.json"
TIME_DISTRIBUTIONS = ("uniform", "logit_normal", "beta")  # FlowMatch.sample_t
LOSS_WINDOW = 20  # steps averaged in the reported loss


def option(default, doc: str):
    """A TrainConfig field with its help text (shown by the CLI, where every field is an option)."""
    return field(default=default, metadata={"help": doc})


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps to train to")
    batch_size: int = option(16, "items per micro-batch")
    grad_accum: int = option(1, "micro-batches of batch_size per optimizer step")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    warmup: int = option(50, "steps of linear warmup, then cosine decay to lr * min_lr")
    min_lr: float = option(0.1, "final learning rate as a fraction of lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.99, "AdamW beta2")
    grad_clip: float = option(1.0, "max global gradient norm; 0 disables")
    ema_decay: float = option(0.995, "decay of the EMA weights that are saved and sampled")
    bf16: bool = option(False, "bf16 autocast of the forward pass")
    time_dist: str = option("logit_normal", "training time distribution: " + " | ".join(TIME_DISTRIBUTIONS))
    time_a: float = option(0.0, "logit_normal: mean; beta: Beta(a, b)'s a")
    time_b: float = option(1.0, "logit_normal: std; beta: Beta(a, b)'s b")
    seed: int = option(0, "seed of the model init, data and noise streams")
    save_every: int = option(0, "checkpoint every N steps when training into a run dir; 0: at the end only")

    def __post_init__(self):
        """Refuse settings that would train nothing or train to NaN (NaN fails every comparison)."""
        beta = self.time_dist == "beta"
        rules = [
            ("steps", self.steps >= 1, ">= 1"), ("batch_size", self.batch_size >= 1, ">= 1"),
            ("grad_accum", self.grad_accum >= 1, ">= 1"), ("warmup", self.warmup >= 0, ">= 0"),
            ("save_every", self.save_every >= 0, ">= 0"), ("lr", 0 < self.lr < math.inf, "> 0"),
            ("min_lr", 0 <= self.min_lr <= 1, "in [0, 1]"), ("weight_decay", 0 <= self.weight_decay < math.inf, ">= 0"),
            ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
            ("grad_clip", 0 <= self.grad_clip < math.inf, ">= 0"), ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("time_dist", self.time_dist in TIME_DISTRIBUTIONS, "one of " + ", ".join(TIME_DISTRIBUTIONS)),
            ("time_a", 0 < self.time_a < math.inf if beta else math.isfinite(self.time_a), "> 0" if beta else "finite"),
            ("time_b", 0 < self.time_b < math.inf if beta else math.isfinite(self.time_b), "> 0" if beta else "finite"),
        ]  # fmt: skip
        problems = [f"{name} must be {rule}, got {getattr(self, name)!r}" for name, ok, rule in rules if not ok]
        if problems:
            raise ValueError("bad training settings: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.steps - self.warmup))
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_model(params: FluxParams, seed: int) -> Flux:
    """A seeded Flux with the output layer and every modulation zeroed (adaLN-zero, as DiT): each block starts as the
    identity and the first prediction is 0, which trains faster and more stably from scratch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Flux(params)
    zeroed = [model.final_layer.linear, model.final_layer.adaLN_modulation[1]]
    zeroed += [mod.lin for block in model.double_blocks for mod in (block.img_mod, block.txt_mod)]
    zeroed += [block.modulation.lin for block in model.single_blocks]
    with torch.no_grad():
        for linear in zeroed:
            linear.weight.zero_()
            linear.bias.zero_()
    return model


def join_process_group(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1): joins the process group, NCCL for CUDA (each rank on cuda:LOCAL_RANK) or
    gloo for the CPU, and returns this rank's device; else `device` as given."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if torch.device(device).type == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.device(device).type == "cuda" else "gloo")
    return device


class _DataParallel(DistributedDataParallel):
    @property
    def params(self) -> FluxParams:  # Seq2Seq.predict reads the model's params
        return self.module.params


class Trainer:
    def __init__(
        self,
        params: FluxParams,
        task: Task,
        config: TrainConfig,
        flow: FlowMatch | None = None,
        device: str | torch.device = "cpu",
    ):
        check_task(params, task)
        self.task, self.config, self.device = task, config, torch.device(device)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} does not split over {self.world} processes, which take "
                             f"equal shares of every batch: pick a multiple of {self.world}")  # fmt: skip
        model = init_model(params, config.seed).to(self.device)
        self.run = Seq2Seq(model, task.layout, flow or FlowMatch(shift=False))
        device_ids = [self.device] if self.device.type == "cuda" else None
        self.ddp = _DataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True) if self.world > 1 else None
        self.ema = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.optimizer = torch.optim.AdamW(  # fused on GPUs: one kernel for every tensor's update
            model.parameters(), lr=config.lr, betas=(config.beta1, config.beta2), weight_decay=config.weight_decay,
            fused=self.device.type == "cuda" or None,
        )
        self.data_rng = torch.Generator().manual_seed(config.seed)
        self.noise_rng = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self._losses: list[float] = []  # per optimizer step, read back from the device
        self._queued: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []  # losses of steps it may still run

    @property
    def losses(self) -> list[float]:
        """The loss of every optimizer step so far (reading it waits for the steps the device still runs)."""
        return self._settle()

    def _settle(self, keep: int = 0) -> list[float]:
        """Read the queued losses but the newest `keep`, each waiting only for its own step's work."""
        while len(self._queued) > keep:
            loss, done = self._queued.pop(0)
            if done is not None:
                done.synchronize()
            self._losses.append(loss.item())
        return self._losses

    def train_step(self) -> None:
        """One optimizer step, queued without waiting for the device: the host draws the next batch while a GPU
        runs this one (its loss lands in `losses`)."""
        cfg, model = self.config, self.run.model
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        run = Seq2Seq(self.ddp, self.run.layout, self.run.flow) if self.ddp else self.run
        share = cfg.batch_size // self.world
        mine = slice(self.rank * share, (self.rank + 1) * share)  # this rank's rows of each global batch
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # read once the step is queued: no stall
        for i in range(cfg.grad_accum):
            batch = self.task.batch(cfg.batch_size, self.data_rng)  # the same on every rank (same seeded streams)
            t = self.run.flow.sample_t(
                cfg.batch_size, self.noise_rng, cfg.time_dist, cfg.time_a, cfg.time_b, seq_len=batch.data.shape[1]
            )
            noise = torch.randn(batch.data.shape, generator=self.noise_rng)
            batch = Batch(batch.cond[mine], batch.data[mine], None if batch.y is None else batch.y[mine])
            last = i == cfg.grad_accum - 1  # DDP averages the accumulated gradients once, after the last
            with self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext():
                with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.bf16):
                    loss = run.loss(batch.to(self.device), t[mine], self.noise_rng, noise[mine]) / cfg.grad_accum
                loss.backward()
            total += loss.detach()
        if self.world > 1:  # the global batch's loss: the mean of the equal shares'
            dist.all_reduce(total)
            total /= self.world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self._update_ema()
        done = torch.cuda.Event() if total.is_cuda else None  # marks this step's end for _settle
        self._queued.append((total.to("cpu", non_blocking=True), done))
        if done is not None:
            done.record()

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.config.ema_decay, (1 + self.step) / (10 + self.step))  # short memory early on
        names, params = zip(*self.run.model.named_parameters())
        torch._foreach_lerp_([self.ema[name] for name in names], params, 1 - decay)  # few kernels for all tensors

    def train(self, run_dir: str | os.PathLike | None = None, until: int | None = None, progress: bool = True) -> None:
        """Train up to step `until` (default config.steps), checkpointing into `run_dir` when given."""
        end, every = until or self.config.steps, self.config.save_every
        show = progress and self.rank == 0
        with tqdm(total=end, initial=self.step, desc="train", unit="step", disable=not show) as bar:
            while self.step < end:
                self.train_step()
                bar.set_postfix_str(f"loss {self.recent_loss(wait=False):.4f} (mean of last {LOSS_WINDOW} steps), "
                                    f"lr {self.config.lr_at(self.step):.1e}")  # fmt: skip
                bar.update()
                if run_dir is not None and every and self.step % every == 0 and self.step < end:
                    self.save(run_dir)
        if run_dir is not None:
            self.save(run_dir)

    def recent_loss(self, wait: bool = True) -> float:
        """The training loss averaged over the last LOSS_WINDOW steps (one step's loss is noisy); wait=False leaves
        out the newest step, which the device may still run."""
        recent = self._settle(keep=0 if wait else 1)[-LOSS_WINDOW:]
        return sum(recent) / len(recent) if recent else math.nan

    def ema_run(self) -> Seq2Seq:
        """A copy of the model holding the EMA weights, for sampling."""
        model = Flux(self.run.model.params).to(self.device)
        model.load_state_dict(self.ema)
        return Seq2Seq(model.eval(), self.run.layout, self.run.flow)

    def save(self, run_dir: str | os.PathLike) -> None:
        """Rank 0 writes the run (every rank holds the same state); the others wait until it is written."""
        if self.rank == 0:
            self._write(Path(run_dir))
        if self.world > 1:
            dist.barrier()

    def _write(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run(run_dir, self.run, self.ema, self.task.describe())
        state = {f"model.{k}": v for k, v in self.run.model.state_dict().items()}
        for index, entries in self.optimizer.state_dict()["state"].items():
            state.update({f"optim.{index}.{k}": v for k, v in entries.items()})
        state["rng.data"], state["rng.noise"] = self.data_rng.get_state(), self.noise_rng.get_state()
        state.update({f"ema.{k}": v for k, v in self.ema.items()})  # resuming reads this one file: one atomic write
        progress = {"progress": json.dumps({"step": self.step, "losses": self.losses})}
        write_atomic(run_dir / STATE_FILE, lambda path: save_file(state, path, metadata=progress))
        train_state = {"step": self.step, "config": asdict(self.config), "losses": self.losses}
        write_atomic(run_dir / TRAIN_STATE_FILE, lambda path: path.write_text(json.dumps(train_state)))

    @classmethod
    def resume(
        cls, run_dir: str | os.PathLike, task: Task, steps: int | None = None, device: str | torch.device = "cpu"
    ) -> "Trainer":
        """The trainer as saved in `run_dir`, to continue exactly where it stopped (optionally to a new step count,
        which stretches the cosine schedule)."""
        run_dir = Path(run_dir)
        meta = read_params(run_dir)
        saved = json.loads((run_dir / TRAIN_STATE_FILE).read_text())
        known = {f.name for f in fields(TrainConfig)}
        config = TrainConfig(**{k: v for k, v in saved["config"].items() if k in known})
        if steps is not None:
            config = replace(config, steps=steps)
        trainer = cls(FluxParams(**meta["flux"]), task, config, FlowMatch(**meta["flow"]), device)
        trainer.run.layout = Layout(**meta["layout"])  # the normalisation trained with, not a recomputed one
        state = load_safetensors(run_dir / STATE_FILE)
        with safe_open(run_dir / STATE_FILE, "pt") as f:  # step and losses of the state (a save cut short between
            progress = json.loads((f.metadata() or {}).get("progress", "null")) or saved  # files leaves the JSON older)
        trainer.run.model.load_state_dict(strip_prefix(state, "model."))
        with torch.no_grad():  # runs saved before the EMA joined the state: the exported EMA weights
            for name, tensor in (strip_prefix(state, "ema.") or load_safetensors(run_dir / MODEL_FILE)).items():
                trainer.ema[name].copy_(tensor)
        optim_state = {}
        for key, tensor in strip_prefix(state, "optim.").items():
            index, name = key.split(".", 1)
            optim_state.setdefault(int(index), {})[name] = tensor.clone()
        groups = trainer.optimizer.state_dict()["param_groups"]
        trainer.optimizer.load_state_dict({"state": optim_state, "param_groups": groups})
        trainer.data_rng.set_state(state["rng.data"].clone())
        trainer.noise_rng.set_state(state["rng.noise"].clone())
        trainer.step, trainer._losses = progress["step"], progress["losses"]
        return trainer


def check_task(params: FluxParams, task: Task) -> None:
    """The task's token widths against the model's, with the field to change."""
    probe = task.batch(1, torch.Generator().manual_seed(0))
    problems = []
    if probe.data.shape[-1] != params.in_channels or params.out_channels != params.in_channels:
        width = probe.data.shape[-1]
        problems.append(f"data tokens are {width} wide: set in_channels = out_channels = {width}")
    if probe.cond.shape[-1] != params.context_in_dim:
        width = probe.cond.shape[-1]
        problems.append(f"condition tokens are {width} wide: set context_in_dim = {width}")
    y_dim = 0 if probe.y is None else probe.y.shape[-1]
    if y_dim != params.vec_in_dim:
        problems.append(f"the task's pooled vector y is {y_dim} wide: set vec_in_dim = {y_dim}")
    if params.guidance_embed:
        problems.append("guidance_embed is for guidance-distilled models: set guidance_embed = False")
    if problems:
        raise ValueError("FluxParams do not fit the task: " + "; ".join(problems))

