"""torch.distributed on the CPU: 2 gloo processes (spawned here, file rendezvous) against one process.
Sequence-parallel forward, the distributed runner's files, DDP seq2seq training."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from test_runner import grey, runnable_ui
from test_workflow import FAKE_NODES, Decode, Sampler, api_prompt, defs, load
from tiny_flux import random_weights, tiny_inputs, tiny_params

from flux_core import parallel
from flux_core.checkpoint import load_safetensors
from flux_core.graphs import GraphedForward
from flux_core.model import Flux, preset
from flux_core.pipeline import Conditioning, sample as image_sample
from flux_core.seq2seq import ShapeTask, Trainer, TrainConfig

WORLD = 2
runner, distributed, host = load("runner"), load("distributed"), load("host")
WorkflowError = load("workflow").WorkflowError


def spawn(worker, tmp_path, *args, backend: str = "gloo") -> None:
    """worker(rank, *args) on WORLD processes (gloo; nccl: one GPU each); a failure in any re-raises here."""
    mp.spawn(_init_and_run, (worker, str(tmp_path / "rendezvous"), backend, args), nprocs=WORLD)


def _init_and_run(rank: int, worker, store: str, backend: str, args: tuple) -> None:
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- sequence parallel


def _tiny_flux(**overrides) -> Flux:
    params = tiny_params(**overrides)
    model = Flux(params)
    model.load_state_dict(random_weights(params))
    return model.eval()


def _sequence_parallel_worker(rank: int) -> None:
    model = _tiny_flux(num_heads=4, axes_dim=[8, 28, 28])  # 4 heads: 2 per rank
    for batch, rows, cols, text in ((1, 4, 4, 6), (2, 3, 5, 5), (1, 1, 3, 1)):  # even, uneven, fewer than ranks
        inputs = tiny_inputs(model.params, batch=batch, rows=rows, cols=cols, text=text)
        for grad in (False, True):  # the oneDNN CPU attention (float32 q, k) and SDPA
            with torch.set_grad_enabled(grad):
                plain = model(**inputs)
                for scheme in ("kv", "ulysses"):
                    with parallel.sequence_parallel(scheme=scheme):
                        torch.testing.assert_close(model(**inputs), plain, rtol=1e-5, atol=1e-5)
            assert plain.abs().mean() > 0.1  # a real output, not zeros from a lost gather
    cond = Conditioning(inputs["txt"], inputs["y"])  # the sampler, as a library user runs it on several devices
    plain = image_sample(model, cond, torch.zeros(1, 16, 8, 6), seed=5, steps=2)
    with parallel.sequence_parallel():
        torch.testing.assert_close(image_sample(model, cond, torch.zeros(1, 16, 8, 6), seed=5, steps=2), plain)
    one_head, inputs = _tiny_flux(num_heads=1, axes_dim=[32, 112, 112]), tiny_inputs(model.params)
    with parallel.sequence_parallel(scheme="ulysses"), pytest.raises(ValueError, match="divisible"):
        one_head(**inputs)  # 1 head on 2 ranks: ulysses splits heads, kv does not
    plain = one_head(**inputs)
    with parallel.sequence_parallel(scheme="kv"):
        torch.testing.assert_close(one_head(**inputs), plain, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown sequence-parallel scheme"), parallel.sequence_parallel(scheme="ring"):
        pass
    if rank == 0:  # the hook is gone after the context: a rank alone runs the plain forward
        assert parallel.shards(5, 12) is None and parallel.flux_math.sequence_attention is None


def test_sequence_parallel_forward_equals_plain(tmp_path):
    spawn(_sequence_parallel_worker, tmp_path)


def _two_gpu_sampling_worker(rank: int) -> None:
    device = torch.device("cuda", rank)
    model = _tiny_flux(num_heads=4, axes_dim=[8, 28, 28]).to(device, torch.bfloat16)  # head dim 64
    x = tiny_inputs(model.params, text=7)
    cond = Conditioning(x["txt"].to(device, torch.bfloat16), x["y"].to(device, torch.bfloat16))
    latent = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(0))
    plain = image_sample(model, cond, latent, seed=5, steps=3, denoise=0.9)
    recorded, record = [], GraphedForward._record
    GraphedForward._record = lambda self, *args: recorded.append(args) or record(self, *args)
    for scheme in ("kv", "ulysses"):
        with parallel.sequence_parallel(scheme=scheme):
            sharded = image_sample(model, cond, latent, seed=5, steps=3, denoise=0.9)
        torch.testing.assert_close(sharded, plain, rtol=0.05, atol=0.05)  # bf16, 3 steps
        assert (sharded - plain).abs().mean() < 0.02 * plain.abs().mean()
    assert len(recorded) == 2  # each run recorded its step once and replayed it


@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (NCCL): run on a GPU machine")
def test_sequence_parallel_sampling_on_gpus_replays_cuda_graphs(tmp_path):
    spawn(_two_gpu_sampling_worker, tmp_path, backend="nccl")


def test_split_sizes_cover_the_sequence():
    assert parallel.split_sizes(15, 2) == [8, 7] and parallel.split_sizes(1, 2) == [1, 0]
    assert sum(parallel.split_sizes(4096, 3)) == 4096


# ---------------------------------------------------------------------------------------------- the runner's jobs


class SeedSensitiveSampler(Sampler):
    def sample(self, **kwargs):
        if kwargs["seed"] == 3:
            raise RuntimeError("out of cheese")
        return super().sample(**kwargs)


class ItemSampler(Sampler):
    def sample(self, **kwargs):  # batch item i from seed + i, as FluxKit's sampler
        batch = kwargs["latent"]["samples"].shape[0]
        return ({**super().sample(**kwargs)[0], "grey": [(kwargs["seed"] + i) % 256 for i in range(batch)]},)


class ItemDecode(Decode):
    def decode(self, samples):
        b, _, h, w = samples["samples"].shape
        return (torch.tensor(samples["grey"]).div(255).view(b, 1, 1, 1).expand(b, h * 8, w * 8, 3).contiguous(),)


ITEM_NODES = {**FAKE_NODES, "Sampler": ItemSampler, "Decode": ItemDecode}


def _run(tmp_path, out: str, *args, classes=FAKE_NODES) -> int:
    path = tmp_path / f"workflow-{os.getpid()}.json"  # each rank its own: a rank reading another's half-written file
    path.write_text(json.dumps(runnable_ui()))
    return runner.main(["run", str(path), "--output", str(tmp_path / out), "--input", str(tmp_path), *args], classes)


def _runner_worker(rank: int, tmp_path) -> None:
    assert _run(tmp_path, "ranks", "--sweep", "7.seed=1..5", "--sweep", "7.steps=10,30") == 0
    failing = {**FAKE_NODES, "Sampler": SeedSensitiveSampler}
    assert _run(tmp_path, "failed", "--sweep", "7.seed=1..5", classes=failing) == 1
    assert _run(tmp_path, "parallel", "--sequence-parallel", "--sweep", "7.seed=4,5") == 0
    assert _run(tmp_path, "split", "--set", "6.batch_size=3", "--batch-split", classes=ITEM_NODES) == 0


def _files(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_distributed_runner_writes_what_one_process_writes(tmp_path, capsys):
    for out in ("ranks", "one", "failed", "parallel"):  # a file there: the numbering starts after it
        (tmp_path / out / "flux").mkdir(parents=True)
        (tmp_path / out / "flux" / "test_00002_.png").write_bytes(b"not ours")
    spawn(_runner_worker, tmp_path, tmp_path)
    assert _run(tmp_path, "one", "--sweep", "7.seed=1..5", "--sweep", "7.steps=10,30") == 0
    one, ranks = _files(tmp_path / "one" / "flux"), _files(tmp_path / "ranks" / "flux")
    assert list(one) == [f"test_{n:05}_.png" for n in range(2, 13)]  # 10 jobs after the file there
    assert ranks == one  # byte for byte: pixels, prompt and workflow chunks, names
    with Image.open(tmp_path / "ranks" / "flux" / "test_00006_.png") as image:  # job 4: seed 2, steps 30
        assert json.loads(image.info["prompt"])["7"]["inputs"]["steps"] == 30 and grey(image.filename) == 2
    # seed 3 (job 3, rank 0) failed: rank 0 stopped, rank 1 finished its jobs 2 and 4
    assert list(_files(tmp_path / "failed" / "flux")) == [f"test_0000{n}_.png" for n in (2, 3, 4, 6)]
    assert [grey(tmp_path / "failed" / "flux" / f"test_0000{n}_.png") for n in (3, 4, 6)] == [1, 2, 4]
    assert list(_files(tmp_path / "parallel" / "flux")) == ["test_00002_.png", "test_00003_.png", "test_00004_.png"]
    assert _run(tmp_path, "batch", "--set", "6.batch_size=3", classes=ITEM_NODES) == 0  # one process, one batch
    assert _files(tmp_path / "split" / "flux") == _files(tmp_path / "batch" / "flux")  # names, pixels, metadata
    assert [grey(tmp_path / "split" / "flux" / f"test_0000{n}_.png") for n in (1, 2, 3)] == [42, 43, 44]


def test_sweep_values_and_refusals(tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat, sleeping\n\na dog\n")
    (tmp_path / "in").mkdir()
    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / "in" / name).write_bytes(b"")
    host.configure(input_dir=tmp_path)
    values = lambda text: distributed.sweep_values(text, tmp_path)[1]  # noqa: E731
    assert values("3.seed=1..3") == ["1", "2", "3"] and values("3.seed=5,7") == ["5", "7"]
    assert values('6.text=["a, b", 2]') == ["a, b", "2"]
    assert values(f"6.text=@{tmp_path / 'prompts.txt'}") == ["a cat, sleeping", "a dog"]
    assert values(f"9.image=@{tmp_path / 'in'}") == ["in/a.jpg", "in/b.png"]
    with pytest.raises(WorkflowError, match="NODE.INPUT=VALUES"):
        values("3.seed")
    with pytest.raises(WorkflowError, match="not inside the input folder"):
        values(f"9.image=@{tmp_path.parent}")
    both = distributed.jobs(api_prompt(), {}, ["7.seed,7.steps=5,6"], defs())  # several inputs, one value a job
    assert [(j.prompt["7"]["inputs"]["seed"], j.prompt["7"]["inputs"]["steps"]) for j in both] == [(5, 5), (6, 6)]
    with pytest.raises(WorkflowError, match=r"7\.steps=0 is not valid"):
        distributed.jobs(api_prompt(), {}, ["7.steps=1,0"], defs())
    assert _run(tmp_path, "out", "--sequence-parallel") == 1  # one process: nothing to split over
    no_batch = {k: v for k, v in api_prompt().items() if k != "6"}
    with pytest.raises(WorkflowError, match="no node has a batch_size"):
        distributed.batch_items(distributed.Job(no_batch, {}, ""))


# ---------------------------------------------------------------------------------------------- seq2seq DDP training

TRAIN = dict(steps=4, batch_size=4, grad_accum=2, warmup=1, lr=3e-3, seed=3)


def _trainer(**overrides) -> "Trainer":
    return Trainer(preset("seq2seq-demo"), ShapeTask(train_points=8), TrainConfig(**{**TRAIN, **overrides}))


def _training_worker(rank: int, tmp_path) -> None:
    trainer = _trainer()
    assert trainer.world == 2 and trainer.ddp is not None
    trainer.train(tmp_path / "two-at-2", until=2, progress=False)
    trainer.train(tmp_path / "two-at-4", progress=False)
    resumed = Trainer.resume(tmp_path / "one-at-2", ShapeTask(train_points=8))  # 1 process -> 2
    resumed.train(tmp_path / "one-then-two", progress=False)
    if rank == 0:
        (tmp_path / "losses.json").write_text(json.dumps([trainer.losses, resumed.losses]))
    with pytest.raises(ValueError, match="batch_size 3 does not split over 2 processes"):
        _trainer(batch_size=3)


def test_ddp_training_follows_one_process(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = _trainer()
        assert one.world == 1 and one.ddp is None
        one.train(tmp_path / "one-at-2", until=2, progress=False)
        one.train(None, progress=False)
        spawn(_training_worker, tmp_path, tmp_path)
        two, one_then_two = json.loads((tmp_path / "losses.json").read_text())
        back = Trainer.resume(tmp_path / "two-at-2", ShapeTask(train_points=8))  # 2 processes -> 1
        back.train(None, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert len(one.losses) == 4 and len(set(one.losses)) == 4  # a real curve
    for curve in (two, one_then_two, back.losses):
        torch.testing.assert_close(torch.tensor(curve), torch.tensor(one.losses), rtol=1e-5, atol=1e-7)
    saved = load_safetensors(tmp_path / "two-at-4" / "model.safetensors")  # rank 0's EMA weights
    assert json.loads((tmp_path / "two-at-4" / "train_state.json").read_text())["step"] == 4
    for name, tensor in one.ema.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-4, atol=1e-6)
    for name, tensor in one.run.model.state_dict().items():
        torch.testing.assert_close(back.run.model.state_dict()[name], tensor, rtol=1e-4, atol=1e-6)
    cut = tmp_path / "two-at-4"  # a save cut short after the state file: train_state.json still says step 2
    (cut / "train_state.json").write_text((tmp_path / "two-at-2" / "train_state.json").read_text())
    resumed = Trainer.resume(cut, ShapeTask(train_points=8))
    assert resumed.step == 4 and resumed.losses == two and resumed.ema.keys() == saved.keys()
    assert all(torch.equal(resumed.ema[name], tensor) for name, tensor in saved.items())
