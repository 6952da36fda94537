"""CUDA graphs for the sampler's forwards: the first call of each input shape runs eagerly and records the forward
as a graph; later calls copy their inputs in and replay it, so the GPU runs a whole step without waiting for
Python to launch its ~2,600 kernels. It pays most under sequence parallelism (flux_core.parallel): the ranks meet
at two collectives per block, each waiting for the slower host, and a graph records the collectives too.

A graph reads weights and buffers at the addresses it was recorded with: keep one GraphedForward for one sampling
run (weights, LoRAs and streaming stay put within it), every weight on the GPU.

    forward = GraphedForward(model)
    for t in schedule:
        v = forward(img, img_ids, txt, txt_ids, t_vec, y=y, guidance=g)   # step 1 records, the others replay
"""
import torch
from torch import Tensor, nn

from . import parallel


def recordable(model: nn.Module) -> bool:
    """Every weight and buffer on one CUDA device: what a graph of the forward needs."""
    devices = {t.device for t in (*model.parameters(), *model.buffers())}
    return len(devices) == 1 and next(iter(devices)).type == "cuda"


class GraphedForward:
    """model(...) for inference, recorded once per input signature (shapes, dtypes, the sequence-parallel group)."""

    def __init__(self, model: nn.Module):
        if not recordable(model):
            raise ValueError("CUDA graphs need every weight of the model on one GPU (no CPU offload or streaming); "
                             "sample without cuda_graphs, or load the model onto the GPU whole")  # fmt: skip
        self.model = model
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool: the graphs replay one after another
        self.graphs: dict[tuple, tuple[list[Tensor | None], torch.cuda.CUDAGraph, Tensor]] = {}

    def __call__(self, *args: Tensor | None, **kwargs: Tensor | None) -> Tensor:
        names = tuple(sorted(kwargs))
        inputs = [*args, *(kwargs[name] for name in names)]
        signature = tuple(t if t is None else (t.shape, t.dtype, t.device) for t in inputs)
        key = (len(args), names, parallel.current_group(), signature)
        if key not in self.graphs:
            out = self.model(*args, **kwargs)  # eager first: lazy set-up (NCCL links, kernel choices) stays out
            self.graphs[key] = self._record(len(args), names, inputs)
            return out
        static, graph, out = self.graphs[key]
        for buffer, t in zip(static, inputs):
            if buffer is not None:
                buffer.copy_(t)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _record(self, positional: int, names: tuple[str, ...], inputs: list[Tensor | None]):
        static = [t if t is None else t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(*static[:positional], **dict(zip(names, static[positional:])))
        return static, graph, out
