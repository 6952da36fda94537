"""torch.distributed on the CPU: 2 gloo processes (spawned here, file rendezvous) against one process.
Sequence-parallel forward, the distributed runner's files, DDP seq2seq training."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_flux import random_weights, tiny_inputs, tiny_params

from flux_core import parallel
from flux_core.model import Flux

WORLD = 2


def spawn(worker, tmp_path, *args) -> None:
    """worker(rank, *args) on WORLD gloo processes; a failure in any re-raises here."""
    mp.spawn(_init_and_run, (worker, str(tmp_path / "rendezvous"), args), nprocs=WORLD)


def _init_and_run(rank: int, worker, store: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
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
                with parallel.sequence_parallel():
                    sharded = model(**inputs)
            torch.testing.assert_close(sharded, plain, rtol=1e-5, atol=1e-5)
            assert plain.abs().mean() > 0.1  # a real output, not zeros from a lost gather
    with parallel.sequence_parallel(), pytest.raises(ValueError, match="divisible"):
        _tiny_flux(num_heads=1, axes_dim=[32, 112, 112])(**tiny_inputs(model.params))  # 1 head on 2 ranks
    if rank == 0:  # the hook is gone after the context: a rank alone runs the plain forward
        assert parallel.shards(5, 12) is None and parallel.flux_math.sequence_attention is None


def test_sequence_parallel_forward_equals_plain(tmp_path):
    spawn(_sequence_parallel_worker, tmp_path)


def test_split_sizes_cover_the_sequence():
    assert parallel.split_sizes(15, 2) == [8, 7] and parallel.split_sizes(1, 2) == [1, 0]
    assert sum(parallel.split_sizes(4096, 3)) == 4096
