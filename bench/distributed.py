"""Benchmark: flux_core past one device with torch.distributed, N ranks against one, random weights.

    torchrun --nproc-per-node 2 bench/distributed.py          # GPUs: NCCL, bf16, flux-dev shape, 1024^2 and 2048^2
    torchrun --nproc-per-node 2 bench/distributed.py --small  # CPU: gloo, float32, tiny shapes (proves the script)

Rank 0 first measures one device alone (before the process group forms), then every rank measures together:
  train B    seq2seq training steps/s of one global batch of B, steps back to back: DDP over N ranks vs one process
             (loss curves compared)
  images     a 16-image job (pipeline.sample, image i from seed i) split over the ranks vs one device (latents compared)
  sp WxH     one sampling step (a forward) of one image, sequence-parallel vs one device (outputs compared), both as
             pipeline.sample runs them (CUDA graphs; --eager: none), with the bytes each rank sends per step in its
             attention exchanges and their time alone (--scheme: kv or ulysses; auto takes kv on 2 ranks)
Ratios are speedups (one device's time / N devices' time). PyTorch's context_parallel (ring attention over DTensor)
is not used: in torch 2.13 it dispatches only the CUDA SDPA kernels (flash, memory-efficient, cuDNN), so it cannot
run on the CPU with gloo where the tests run; its ring passes every rank's K, V through N - 1 hops, the bytes of the
kv scheme here, which makes one grouped exchange per block.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu_profile import kernel_split  # noqa: E402
from flux_core import parallel  # noqa: E402
from flux_core.graphs import GraphedForward  # noqa: E402
from flux_core.model import Flux, FluxParams, preset  # noqa: E402
from flux_core.pipeline import Conditioning, sample  # noqa: E402
from flux_core.sampling import grid_ids  # noqa: E402
from flux_core.seq2seq import Batch, Layout, Trainer, TrainConfig  # noqa: E402

TINY = dict(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=64, hidden_size=256, mlp_ratio=4.0,
            num_heads=4, depth=1, depth_single_blocks=2, axes_dim=[8, 28, 28], theta=10_000, qkv_bias=True,
            guidance_embed=True)  # fmt: skip
SHAPES = {  # flux: the image model; sizes: pixels of the one-image runs; train: the seq2seq model and its data
    "gpu": dict(flux=preset("flux-dev"), txt=512, sizes=(1024, 2048), job=(16, 1024), steps=4, repeats=5,
                train=dict(hidden_size=2048, num_heads=16, depth=4, depth_single_blocks=8), tokens=(256, 1024),
                width=64, batches=(16, 64), train_steps=10),
    "small": dict(flux=FluxParams(**TINY), txt=32, sizes=(128, 256), job=(4, 128), steps=2, repeats=3,
                  train=dict(hidden_size=128, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12]),
                  tokens=(16, 64), width=8, batches=(8,), train_steps=4),
}  # fmt: skip
TARGETS = {"train": 1.8, "images": 1.9, "sp 1024": 1 / 0.6, "sp 2048": 1 / 0.55}


def random_flux(params: FluxParams, device: torch.device, dtype: torch.dtype) -> Flux:
    """Seeded random weights made on the device (the same on every rank), scaled 1/sqrt(fan-in), norms 1."""
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    model = model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scale"):
                p.fill_(1)
            else:
                p.normal_(0, 0.02 if p.ndim == 1 else p.shape[-1] ** -0.5, generator=generator)
    return model.eval()


def timed(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of fn() after one warm-up call, and its last result."""
    result, times = fn(), []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


class RandomPairs:
    """A seq2seq task of random token pairs: the data loader costs nothing next to the model."""

    name = "random"

    def __init__(self, cond_len: int, data_len: int, width: int):
        self.cond_len, self.data_len, self.width = cond_len, data_len, width
        self.layout = Layout(data_len, [0.0] * width, [1.0] * width)

    def batch(self, size: int, generator: torch.Generator) -> Batch:
        cond = torch.randn(size, self.cond_len, self.width, generator=generator)
        return Batch(cond, torch.randn(size, self.data_len, self.width, generator=generator))

    def describe(self) -> dict:
        return dict(name=self.name, cond_len=self.cond_len, data_len=self.data_len, width=self.width)


def bench_train(shape: dict, batch: int, device: torch.device, profile: str | None, label: str) -> tuple[float, list]:
    """Seconds per optimizer step (the mean of back-to-back steps after one) and the loss curve; with `profile`, one
    more step profiled."""
    cond_len, data_len = shape["tokens"]
    width = shape["width"]
    params = preset("seq2seq-points", in_channels=width, out_channels=width, vec_in_dim=0, context_in_dim=width,
                    **shape["train"])  # fmt: skip
    config = TrainConfig(steps=shape["train_steps"] + 1, batch_size=batch, warmup=1, lr=1e-4,
                         bf16=device.type == "cuda")  # fmt: skip
    trainer = Trainer(params, RandomPairs(cond_len, data_len, width), config, device=device)
    trainer.train_step()  # warm-up: kernels chosen, DDP's buckets built
    sync(device)
    start = time.perf_counter()
    for _ in range(shape["train_steps"]):  # back to back, as training runs: the host prepares step i+1 during i
        trainer.train_step()
    losses = list(trainer.losses)  # waits for the last step
    sync(device)
    seconds = (time.perf_counter() - start) / shape["train_steps"]
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        kernel_split(trainer.train_step, device, Path(profile), label)
    return seconds, losses


def prompt(shape: dict, device: torch.device, dtype: torch.dtype) -> Conditioning:
    p, generator = shape["flux"], torch.Generator().manual_seed(1)
    txt = torch.randn(1, shape["txt"], p.context_in_dim, generator=generator)
    return Conditioning(txt.to(device, dtype), torch.randn(1, p.vec_in_dim, generator=generator).to(device, dtype))


def bench_images(model: Flux, shape: dict, device: torch.device, rank: int, world: int) -> tuple[float, dict]:
    """Seconds for the whole job (every rank's share) and the latents of this rank's images."""
    count, size = shape["job"]
    cond, latent = prompt(shape, device, model.compute_dtype), torch.zeros(1, 16, size // 8, size // 8)

    def job():
        return {i: sample(model, cond, latent, seed=i, steps=shape["steps"]) for i in range(rank, count, world)}

    sync(device)
    start = time.perf_counter()
    latents = job()
    sync(device)
    return time.perf_counter() - start, latents


def forward_inputs(model: Flux, shape: dict, size: int, device: torch.device) -> dict:
    p, dtype, tokens = model.params, model.compute_dtype, (size // 16) ** 2
    generator = torch.Generator().manual_seed(2)
    cond = prompt(shape, device, dtype)
    return dict(img=torch.randn(1, tokens, p.in_channels, generator=generator).to(device, dtype),
                img_ids=grid_ids(size // 16, size // 16).to(device), txt=cond.txt,
                txt_ids=torch.zeros(1, shape["txt"], 3, device=device), timesteps=torch.full((1,), 0.5, device=device),
                y=cond.y, guidance=torch.full((1,), 3.5, device=device))  # fmt: skip


def bench_step(model: Flux, shape: dict, size: int, device: torch.device, repeats: int,
               graphs: bool) -> tuple[float, torch.Tensor]:  # fmt: skip
    inputs = forward_inputs(model, shape, size, device)
    forward = GraphedForward(model) if graphs else model  # the warm-up call records the graph
    with torch.inference_mode():
        return timed(lambda: forward(**inputs), device, repeats)


def profile_step(folder: str | None, model: Flux, shape: dict, size: int, device: torch.device, label: str,
                 graphs: bool) -> None:  # fmt: skip
    """Kernel time by kind of one forward (bench/gpu_profile.py's table) against its wall time: the gap is time
    the GPU waited (on the CPU launching kernels, or on the other ranks)."""
    if not folder:
        return
    inputs = forward_inputs(model, shape, size, device)
    forward = GraphedForward(model) if graphs else model
    with torch.inference_mode():
        forward(**inputs)  # records the graph
        sync(device)
        start = time.perf_counter()
        forward(**inputs)
        sync(device)
        print(f"[{label}] wall {(time.perf_counter() - start) * 1e3:.1f} ms (unprofiled)", flush=True)
        Path(folder).mkdir(parents=True, exist_ok=True)
        kernel_split(lambda: forward(**inputs), device, Path(folder), label)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            forward(**inputs)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        (Path(folder) / f"cpu_{label}.txt").write_text(table)


def exchange_cost(model: Flux, shape: dict, size: int, device: torch.device, repeats: int, scheme: str,
                  graphs: bool) -> tuple[float, float]:  # fmt: skip
    """(MiB each rank sends per step, seconds) of one sequence-parallel forward's attention exchanges, run alone
    (Shards' own methods, with the copies into their buffers) on tensors of the step's sizes."""
    p, world, rank = model.params, dist.get_world_size(), dist.get_rank()
    shards = parallel.Shards(dist.group.WORLD, scheme, shape["txt"], (size // 16) ** 2)
    length, total = shards.sizes[rank], sum(shards.sizes)
    new = lambda *shape, dtype=model.compute_dtype: torch.randn(*shape, dtype=dtype, device=device)  # noqa: E731
    q = k = new(1, length, p.num_heads, p.head_dim, dtype=torch.float32)  # q, k leave RoPE in float32
    v, width = new(1, length, p.num_heads, p.head_dim), p.hidden_size
    element = v.element_size()
    if shards.scheme == "kv":
        exchange = lambda: [request.wait() for request in shards.exchange_keys_values(q, k, v)[2]]  # noqa: E731
        sent = (world - 1) * 2 * length * width * element  # its keys and values to every other rank
    else:
        out = new(1, total, width // world)
        exchange = lambda: (shards.to_heads(q, k, v), shards.to_tokens(out))  # noqa: E731
        sent = (world - 1) * (3 * length + (total - length)) * width // world * element  # q, k, v there, out back
    calls = p.depth + p.depth_single_blocks

    def step():
        for _ in range(calls):
            exchange()

    if graphs:  # as the step runs them
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        step = graph.replay
    seconds, _ = timed(step, device, repeats)
    return calls * sent / 2**20, seconds


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU with gloo")
    parser.add_argument("--only", nargs="*", default=["train", "images", "sp"], help="train, images, sp")
    parser.add_argument("--sizes", nargs="*", type=int, help="one-image step sizes (default: the shape's)")
    parser.add_argument("--repeats", type=int, help="timed runs of each one-image step (default: the shape's)")
    parser.add_argument("--json", help="write the results here (rank 0)")
    parser.add_argument("--compile", action="store_true", help="compile_blocks() on both sides of the image runs")
    parser.add_argument("--eager", action="store_true", help="no CUDA graphs in the one-image steps (both sides)")
    parser.add_argument("--scheme", default="auto", choices=parallel.SCHEMES, help="sequence-parallel attention")
    parser.add_argument("--profile", help="also profile one step of each one-image run; kernel tables to this folder")
    args = parser.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cpu = args.small or not torch.cuda.is_available()
    shape = SHAPES["small" if args.small else "gpu"]
    shape = {**shape, "repeats": args.repeats or shape["repeats"]}
    device = torch.device("cpu" if cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    if cpu:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world, 1)))
    else:
        torch.cuda.set_device(device)
    dtype = torch.float32 if cpu else torch.bfloat16
    single = {}
    if rank == 0:  # one device alone, before the others join
        single = measure(args, shape, device, dtype, rank=0, world=1)
    dist.init_process_group("gloo" if cpu else "nccl", timeout=datetime.timedelta(hours=2))
    together = measure(args, shape, device, dtype, rank, world)
    rows = report(single, together, world) if rank == 0 else None
    if rank == 0:
        device_name = "CPU" if cpu else torch.cuda.get_device_name(device)
        print(f"\n{world} ranks vs 1, {device_name}, {'float32' if cpu else 'bf16'}"
              f"{' (--small shapes)' if args.small else ', flux-dev shape'}:")  # fmt: skip
        for row in rows:
            print("  " + row["line"])
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def measure(args, shape: dict, device: torch.device, dtype: torch.dtype, rank: int, world: int) -> dict:
    results, only = {}, args.only
    graphs = device.type == "cuda" and not args.eager  # as pipeline.sample runs sequence-parallel steps
    if "train" in only:
        for batch in shape["batches"]:  # the gradient all-reduce's bytes are per step: larger batches hide it
            label = f"train{batch}_{world}ranks_rank{rank}"
            results[f"train {batch}"] = bench_train(shape, batch, device, args.profile, label)
    if "images" in only or "sp" in only:
        model = random_flux(shape["flux"], device, dtype)
        if args.compile:
            model.compile_blocks()
        if "images" in only:
            seconds, latents = bench_images(model, shape, device, rank, world)
            if world > 1:
                everyone = [None] * world
                dist.all_gather_object(everyone, {i: x.cpu() for i, x in latents.items()})
                latents = {i: x for part in everyone for i, x in part.items()}
            results["images"] = (seconds, latents)
        for size in (args.sizes or shape["sizes"]) if "sp" in only else ():
            if world == 1:
                results[f"sp {size}"] = bench_step(model, shape, size, device, shape["repeats"], graphs)
                profile_step(args.profile, model, shape, size, device, f"sp{size}_1rank", graphs)
            else:
                with parallel.sequence_parallel(scheme=args.scheme):
                    seconds, out = bench_step(model, shape, size, device, shape["repeats"], graphs)
                    profile_step(args.profile, model, shape, size, device, f"sp{size}_{world}ranks_rank{rank}", graphs)
                cost = exchange_cost(model, shape, size, device, shape["repeats"], args.scheme, graphs)
                results[f"sp {size}"] = (seconds, out, cost)
    return results


def report(single: dict, together: dict, world: int) -> list[dict]:
    rows = []
    for name, (seconds, result, *extra) in together.items():
        base_seconds, base = single[name][0], single[name][1]
        if name.startswith("train"):
            check = f"loss curve max rel diff {max(abs(a - b) / abs(b) for a, b in zip(result, base)):.1e}"
            what = f"seq2seq step, batch {name[6:]}"
        elif name == "images":
            check = f"latents max rel diff {max(relative_error(result[i], base[i]) for i in base):.1e}"
            what = f"{len(base)}-image job"
        else:
            check = f"output max rel diff {relative_error(result, base):.1e}"
            mib, comm = extra[0]
            check += f"; exchange {mib:.1f} MiB/rank/step in {comm * 1e3:.1f} ms"
            what = f"one image {name[3:]}^2 step"
        speedup = base_seconds / seconds
        target = TARGETS.get(name.split()[0] if name.startswith("train") else name, math.nan)
        goal = f"target {target:.2f}x" if math.isfinite(target) else "no target"
        line = (f"{what:<24} 1: {base_seconds * 1e3:9.1f} ms  {world}: {seconds * 1e3:9.1f} ms  speedup {speedup:5.2f}x"
                f" ({goal})  {check}")  # fmt: skip
        rows.append(dict(name=name, single_s=base_seconds, parallel_s=seconds, speedup=speedup, target=target,
                         check=check, line=line))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
