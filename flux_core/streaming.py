"""Weight streaming: run a model whose weights do not all fit on the GPU.

`place(model, device, blocks)` keeps the model's non-block tensors and as many blocks as a VRAM budget allows on
`device`; every other block lives in pinned CPU memory (one flat buffer per block, pinned once per model) and is
copied into one of `ahead + 1` preallocated device slots on a side CUDA stream, `ahead` blocks in advance of the
one computing (cyclically: the last block prefetches the first ones of the next call). Events order it: the compute
stream waits for a slot's copy, the copy stream waits until the block that last used the slot has run. Slots are
allocated once, so the caching allocator never sees a streamed copy being freed while a stream still uses it (no
record_stream needed). A block computes with its own Parameter objects, whose `.data` points into the slot for the
call and back to the pinned home copy after: compiled blocks see the same tensors (shape, dtype, device) each call.

Anything a block holds streams: parameters and buffers of any dtype (fp8 stays fp8, a scaled-fp8 `weight_scale` goes
along). Training works: a streamed block runs under a custom autograd function that fetches its weights again for
the backward pass (recomputing the block, as activation checkpointing does); gradients land on the home tensors.
On the CPU `device="cpu"` runs the same logic with plain copies, for tests.
"""
import weakref
from contextlib import contextmanager

import torch
from torch import Tensor, nn

GiB = 1024**3
_ALIGN = 256  # byte alignment of each tensor inside a block's flat buffer (cuBLAS and fp8 GEMMs want 16)
# Peak transient memory of a Flux forward at inference, in units of tokens x hidden x compute-dtype bytes: 17.1
# measured on an H200 at 512 and 1024 px with 512 text tokens (bench/vram.py --measure-activations), plus 5%.
ACTIVATION_FACTOR = 18.0
# Time to copy a byte of Flux weights over the time to compute on it, bf16 at 1024 px (4608 tokens) on an H200:
# 146 ms of compute over 22.2 GiB of blocks (6.6 ms/GiB) against 19.8 ms/GiB at the 50.4 GiB/s of pinned copies.
LINK_RATIO = 3.0
# Kept free besides: cuBLAS and attention workspaces (allocated once, outside the measured peak), allocator rounding.
WORKSPACE_BYTES = 384 * 1024**2


def _tensors(module: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """(owner, name, tensor) for every parameter and buffer below `module`, each distinct tensor once."""
    seen, out = set(), []
    for owner in module.modules():
        for name, tensor in (*owner._parameters.items(), *owner._buffers.items()):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append((owner, name, tensor))
    return out


@torch.inference_mode(False)
def _without_inference_tensors(model: nn.Module) -> None:
    """Replace inference tensors (a model loaded inside torch.inference_mode, as ComfyUI runs its nodes) by normal
    tensors on the same memory: their `.data` can then be swapped, which inference tensors do not allow."""
    normal = {}
    for owner in model.modules():
        for slots in (owner._parameters, owner._buffers):
            for name, t in slots.items():
                if t is None or not t.is_inference():
                    continue
                if id(t) not in normal:
                    data = torch.empty(0, dtype=t.dtype, device=t.device)
                    data.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
                    normal[id(t)] = nn.Parameter(data, t.requires_grad) if isinstance(t, nn.Parameter) else data
                slots[name] = normal[id(t)]


def _nbytes(tensors) -> int:
    return sum(-(-t.nbytes // _ALIGN) * _ALIGN for t in tensors)


def free_bytes(device: torch.device) -> int:
    """Memory a new allocation on `device` can get: the driver's free memory plus the allocator's cached blocks."""
    if device.type != "cuda":
        raise ValueError(f"no automatic VRAM budget on {device}: pass budget_bytes")
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def activation_bytes(tokens: int, width: int, dtype: torch.dtype, largest_upcast: int = 0) -> int:
    """Peak transient memory of a transformer block over `tokens` (batch x sequence) of `width` features computing in
    `dtype` (ACTIVATION_FACTOR measured on a GPU), plus `largest_upcast`, the biggest weight upcast per call (fp8
    storage), and WORKSPACE_BYTES."""
    return int(tokens * width * dtype.itemsize * ACTIVATION_FACTOR) + largest_upcast + WORKSPACE_BYTES


def flux_activation_bytes(model: nn.Module, batch: int, img_tokens: int, txt_tokens: int) -> int:
    """activation_bytes for a Flux transformer at this batch (x2 with cfg) and sequence."""
    dtype = model.compute_dtype
    upcast = max((m.in_features * m.out_features * dtype.itemsize for m in model.modules()  # GGUF: not the bytes
                  if isinstance(m, nn.Linear) and m.weight.dtype != dtype), default=0)  # fmt: skip
    return activation_bytes(batch * (img_tokens + txt_tokens), model.params.hidden_size, dtype, upcast)


def plan_streamed(block_bytes: list[int], fixed: int, budget: int, ahead: int, link_ratio: float = LINK_RATIO) -> list[int]:
    """Indices of the blocks to stream so that `fixed` + resident blocks + `ahead + 1` slots fit `budget` bytes.

    Two candidates, each streaming as few bytes as fit: the smallest blocks only (small slots: fewest bytes, best
    when the link is the bottleneck) and blocks of every size spread in proportion through the run order (bigger
    slots, but copies overlap compute everywhere, not only where the small blocks run). `simulate_step` picks the
    faster, with copying a byte taking `link_ratio` times as long as computing on one (3 for Flux at 1024 px in
    bf16 on an H200: LINK_RATIO)."""
    if fixed + sum(block_bytes) <= budget:
        return []
    if not block_bytes:
        raise ValueError(f"{fixed / GiB:.2f} GiB of weights do not fit a VRAM budget of {budget / GiB:.2f} GiB")
    smallest = sorted(range(len(block_bytes)), key=lambda i: block_bytes[i])
    candidates = [
        _fewest(lambda k: _spread_groups(smallest[:k], block_bytes), block_bytes, fixed, budget, ahead),
        _fewest(lambda k: _spread_bytes(k / len(block_bytes), block_bytes), block_bytes, fixed, budget, ahead),
    ]
    candidates = [c for c in candidates if c is not None]
    if not candidates:
        need = fixed + (ahead + 1) * max(block_bytes)
        raise ValueError(
            f"a VRAM budget of {budget / GiB:.2f} GiB is below what streaming needs: {need / GiB:.2f} GiB ({ahead + 1} "
            f"block buffers of {max(block_bytes) / GiB:.2f} GiB and {fixed / GiB:.2f} GiB of layers kept on the GPU); "
            "free GPU memory, lower the resolution or batch, or raise the budget"
        )
    return min(candidates, key=lambda c: simulate_step(block_bytes, c, ahead, link_ratio))


def _fewest(pick, block_bytes: list[int], fixed: int, budget: int, ahead: int) -> list[int] | None:
    """The first of pick(1), pick(2), ... (growing sets of blocks to stream) that fits the budget."""
    for k in range(1, len(block_bytes) + 1):
        streamed = pick(k)
        slot = max(block_bytes[i] for i in streamed)
        if fixed + sum(block_bytes) - sum(block_bytes[i] for i in streamed) + (ahead + 1) * slot <= budget:
            return sorted(streamed)
    return None


def _spread_groups(chosen: list[int], block_bytes: list[int]) -> set[int]:
    """`chosen` (the k smallest) with each size's share re-picked evenly among all blocks of that size."""
    out = set()
    for size in {block_bytes[i] for i in chosen}:
        group = [i for i, b in enumerate(block_bytes) if b == size]
        take = sum(block_bytes[i] == size for i in chosen)
        out.update(group[int((j + 0.5) * len(group) / take)] for j in range(take))
    return out


def _spread_bytes(fraction: float, block_bytes: list[int]) -> set[int]:
    """About `fraction` of the bytes of every stretch of the run order: a block streams once the credit of the
    blocks before it covers half of it."""
    out, credit = set(), 0.0
    for i, b in enumerate(block_bytes):
        credit += fraction * b
        if credit >= b / 2:
            out.add(i)
            credit -= b
    return out or {min(range(len(block_bytes)), key=lambda i: block_bytes[i])}


def simulate_step(block_bytes: list[int], streamed: list[int], ahead: int, link_ratio: float) -> float:
    """Duration of a steady-state forward pass (the second of two) through the slot ring, in units of the time to
    compute on one byte: block i computes for block_bytes[i] once the block before it is done and, if streamed, its
    copy (link_ratio x its bytes) is; copy j starts after copy j-1, into the slot that copy j-(ahead+1) filled, once
    that block has run."""
    n, streamed = len(block_bytes), set(streamed)
    fetched = [i for i in list(range(n)) * 2 if i in streamed]
    copy_end, used_end, t, first_pass = [], [], 0.0, 0.0
    for step, i in enumerate(list(range(n)) * 2):
        if i in streamed:
            k = len(used_end)
            while len(copy_end) < min(k + ahead + 1, len(fetched)):
                j = len(copy_end)
                slot_free = used_end[j - ahead - 1] if j > ahead else 0.0
                copy_end.append(max(copy_end[-1] if copy_end else 0.0, slot_free) + link_ratio * block_bytes[fetched[j]])
            t = max(t, copy_end[k]) + block_bytes[i]
            used_end.append(t)
        else:
            t += block_bytes[i]
        if step == n - 1:
            first_pass = t
    return t - first_pass


class _Block:
    """One block's tensors (the module's own objects), their home copies and, once streamed, a flat pinned buffer."""

    def __init__(self, tensors: list[Tensor]):
        self.tensors = tensors
        self.home = [t.data for t in self.tensors]
        self.nbytes = _nbytes(self.tensors)
        self.flat = None  # (nbytes,) uint8 pinned CPU memory holding every tensor, once streamed

    def views(self, flat: Tensor) -> list[Tensor]:
        out, start = [], 0
        for t in self.home:
            out.append(flat[start : start + t.nbytes].view(t.dtype).view(t.shape))
            start += -(-t.nbytes // _ALIGN) * _ALIGN
        return out

    def pin(self, pin: bool) -> None:
        """Copy the tensors into one flat buffer (page-locked when `pin`), which becomes their home."""
        if self.flat is not None:
            return
        flat = torch.empty(self.nbytes, dtype=torch.uint8)
        self.home = [v.copy_(h) for v, h in zip(self.views(flat), self.home)]
        if pin:
            _page_lock(flat)
        self.flat = flat
        self.set(self.home)

    def set(self, data: list[Tensor]) -> None:
        with torch.inference_mode(False):  # the Parameters stay normal tensors when swapped inside inference mode
            for t, d in zip(self.tensors, data):
                t.data = d


def _page_lock(flat: Tensor) -> None:
    """Pin `flat` in place (cudaHostRegister: exact size; the pinned allocator would round up to a power of 2)."""
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(flat.data_ptr(), flat.nbytes, 0)) != 0:
        raise RuntimeError(f"cudaHostRegister of {flat.nbytes / GiB:.2f} GiB failed: not enough lockable RAM?")
    weakref.finalize(flat, cudart.cudaHostUnregister, flat.data_ptr())


class Placement:
    """Where a model's weights are: the non-block tensors and resident blocks on `device`, the rest streamed.
    One per model (its pinned buffers are made once); `load` and `unload` move the weights."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        _without_inference_tensors(model)
        self.blocks = [_Block([t for _, _, t in _tensors(b)]) for b in blocks]
        in_blocks = {id(t) for b in self.blocks for t in b.tensors}
        self.fixed = _Block([t for _, _, t in _tensors(model) if id(t) not in in_blocks])
        if any(h.device.type != "cpu" for b in (self.fixed, *self.blocks) for h in b.home):
            raise ValueError("place() takes a model whose weights are on the CPU (load it with device='cpu')")
        self.modules = blocks
        self.ids = {id(t) for b in (self.fixed, *self.blocks) for t in b.tensors}
        self.device, self.ahead, self.budget, self.kind, self.link_ratio = None, 1, 0, None, LINK_RATIO
        self.streamed, self.position, self.resident, self.slots, self.hooks = [], {}, [], [], []

    def plan(self, budget: int, ahead: int) -> list[int]:
        return plan_streamed([b.nbytes for b in self.blocks], self.fixed.nbytes, budget, ahead, self.link_ratio)

    @torch.inference_mode(False)  # copies made here become Parameter data: no inference tensors
    def load(self, device: torch.device, budget: int, ahead: int, hooks: bool = False) -> None:
        streamed = self.plan(budget, ahead)  # raises before anything moves
        if self.resident and (device, ahead, streamed) == (self.device, self.ahead, self.streamed):
            return
        self.unload()
        if hooks:  # for models whose forward loop is not ours (T5): forward hooks stream the blocks in
            self.hooks = [h for i in streamed for h in self._hook(i)]
        self.device, self.ahead, self.budget, self.cuda = device, ahead, budget, device.type == "cuda"
        self.streamed, self.position = streamed, {i: k for k, i in enumerate(streamed)}
        self.resident = [self.fixed] + [b for i, b in enumerate(self.blocks) if i not in self.position]
        for block in self.resident:
            block.set([h.to(device) for h in block.home])
        self.loaded, self.next_slot = {}, 0  # loaded: block index -> slot, fetched and not yet run
        if not streamed:
            return
        for i in streamed:
            self.blocks[i].pin(self.cuda)
        size = max(self.blocks[i].nbytes for i in streamed)
        self.slots = [torch.empty(size, dtype=torch.uint8, device=device) for _ in range(ahead + 1)]
        self.slot_views = {(i, s): self.blocks[i].views(slot) for i in streamed for s, slot in enumerate(self.slots)}
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.ready = [torch.cuda.Event() for _ in self.slots]  # a slot's copy is done
            self.released = [torch.cuda.Event() for _ in self.slots]  # the block that last used it has run

    @property
    def resident_bytes(self) -> int:
        return sum(b.nbytes for b in self.resident) + sum(s.nbytes for s in self.slots)

    @property
    def streamed_bytes(self) -> int:
        """Bytes copied to the device per forward pass."""
        return sum(self.blocks[i].nbytes for i in self.streamed)

    def describe(self) -> str:
        n = len(self.blocks)
        if not self.streamed:
            return f"all {n} blocks on {self.device} ({self.resident_bytes / GiB:.1f} GiB)"
        return (
            f"{n - len(self.streamed)} of {n} blocks on {self.device} ({self.resident_bytes / GiB:.1f} GiB with "
            f"{len(self.slots)} stream buffers), {len(self.streamed)} streamed from pinned RAM "
            f"({self.streamed_bytes / GiB:.1f} GiB per pass)"
        )

    def unload(self) -> None:
        """Every tensor back to its CPU home; the device memory is released once nothing else holds it."""
        if self.slots and self.cuda:
            self.copy_stream.synchronize()
        for block in (self.fixed, *self.blocks):
            block.set(block.home)
        for hook in self.hooks:
            hook.remove()
        self.streamed, self.position, self.resident, self.slots, self.slot_views, self.hooks = [], {}, [], [], {}, []

    def _hook(self, i: int):
        open_ = {}

        def before(module, args):
            open_[i] = self.weights(i)
            open_[i].__enter__()

        def after(module, args, output):
            open_.pop(i).__exit__(None, None, None)

        module = self.modules[i]
        return module.register_forward_pre_hook(before), module.register_forward_hook(after)

    # --- streaming -----------------------------------------------------------------------------------------------

    def _fetch(self, i: int) -> None:
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.slots)
        self.loaded = {b: s for b, s in self.loaded.items() if s != slot}
        block = self.blocks[i]
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.released[slot])
                self.slots[slot][: block.nbytes].copy_(block.flat, non_blocking=True)
                self.ready[slot].record(self.copy_stream)
        else:
            self.slots[slot][: block.nbytes].copy_(block.flat)
        self.loaded[i] = slot

    @contextmanager
    def weights(self, i: int, direction: int = 1):
        """Block i's tensors on the device for the duration; prefetches the next `ahead` streamed blocks in
        `direction` (+1 forward, -1 for the backward pass), cyclically."""
        if i not in self.loaded:
            self._fetch(i)
        slot = self.loaded.pop(i)
        count = len(self.streamed)
        for step in range(1, min(self.ahead, count - 1) + 1):
            target = self.streamed[(self.position[i] + direction * step) % count]
            if target not in self.loaded:
                self._fetch(target)
        block = self.blocks[i]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.ready[slot])
        block.set(self.slot_views[i, slot])
        try:
            yield block.tensors
        finally:
            block.set(block.home)
            if self.cuda:
                self.released[slot].record(torch.cuda.current_stream(self.device))

    def __call__(self, i: int, block: nn.Module, *args):
        if i not in self.position:
            return block(*args)
        params = [t for t in self.blocks[i].tensors if t.requires_grad]
        if torch.is_grad_enabled() and (params or any(isinstance(a, Tensor) and a.requires_grad for a in args)):
            return _StreamedBlock.apply(self, i, block, len(args), *args, *params)
        with self.weights(i):
            return block(*args)


class _StreamedBlock(torch.autograd.Function):
    """A streamed block in training: forward without a graph, backward fetches the weights again and recomputes."""

    @staticmethod
    def forward(ctx, placement, i, block, n_args, *inputs):
        args = inputs[:n_args]
        ctx.placement, ctx.i, ctx.block, ctx.n_args = placement, i, block, n_args
        ctx.save_for_backward(*args)
        with placement.weights(i):
            out = block(*args)
        ctx.single = isinstance(out, Tensor)
        return out

    @staticmethod
    def backward(ctx, *grads):
        args = [a.detach().requires_grad_(a.requires_grad) for a in ctx.saved_tensors]
        with ctx.placement.weights(ctx.i, direction=-1) as tensors, torch.enable_grad():
            params = [t for t in tensors if t.requires_grad]
            out = ctx.block(*args)
            outs = (out,) if ctx.single else tuple(out)
            wrt = [a for a in args if a.requires_grad] + params
            found = iter(torch.autograd.grad(outs, wrt, grads, allow_unused=True))
            arg_grads = [next(found) if a.requires_grad else None for a in args]
            # back to where each parameter lives between calls (its CPU home), as the autograd engine expects
            homes = [h for t, h in zip(tensors, ctx.placement.blocks[ctx.i].home) if t.requires_grad]
            param_grads = [None if g is None else g.to(h.device) for g, h in zip(found, homes)]
        return (None, None, None, None, *arg_grads, *param_grads)


def _plain(i: int, block: nn.Module, *args):
    return block(*args)


def block_runner(model: nn.Module):
    """How `model`'s forward should call block i: through its Placement when one streams blocks, else directly."""
    placement = placement_of(model)
    return placement if placement is not None and placement.streamed else _plain


def placement_of(model: nn.Module) -> Placement | None:
    """The Placement of `model`'s tensors (shared with its twins, which hold the same tensor objects); None for a twin
    with tensors of its own (a LoRA's merged layers, side paths), which gets a placement of its own."""
    placement = getattr(next(model.parameters()), "_fluxkit_placement", None)
    if placement is None or placement.ids != {id(t) for _, _, t in _tensors(model)}:
        return None
    return placement


_PLACED: "weakref.WeakSet[Placement]" = weakref.WeakSet()  # placements with weights on a device


def place(
    model: nn.Module,
    device: torch.device | str,
    blocks: list[nn.Module],
    budget_bytes: int | None = None,
    activations: int = 0,
    ahead: int = 1,
    kind: str | None = None,
    hooks: bool = False,
    link_ratio: float = LINK_RATIO,
) -> Placement:
    """Put `model` (weights on the CPU) on `device` within `budget_bytes` (default: the device's free memory minus
    `activations`, the transient memory the forward pass needs), streaming the `blocks` that do not fit.

    A placement that still fits is kept. Other placed models of the same `kind` (e.g. "transformer") on the device
    are unloaded first: switching models never leaves two on the GPU. `hooks`: stream through forward hooks on the
    blocks, for models whose forward does not call `block_runner`. `link_ratio`: see plan_streamed. Returns the
    model's Placement (`.describe()`)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"streaming to {device} needs a CUDA GPU, but this PyTorch sees none (CPU-only build or no driver); "
                "run on the CPU (device='cpu') or install a CUDA build of PyTorch"
            )
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if ahead < 1:
        raise ValueError(f"ahead must be >= 1 (blocks prefetched while one computes), got {ahead}")
    placement = placement_of(model)
    for other in list(_PLACED):  # first: a twin's shared tensors go home before a placement of its own is made
        if other is not placement and other.device == device and kind is not None and other.kind == kind:
            unload_placement(other)
    if placement is None:
        placement = Placement(model, blocks)
        next(model.parameters())._fluxkit_placement = placement
    if budget_bytes is None:
        own = placement.resident_bytes if placement.device == device else 0  # its own memory counts as free
        budget_bytes = free_bytes(device) + own - activations
    placement.link_ratio = link_ratio
    placement.load(device, budget_bytes, ahead, hooks)
    placement.kind = kind
    _PLACED.add(placement)
    return placement


def unload_placement(placement: Placement) -> None:
    placement.unload()
    _PLACED.discard(placement)


def unload(model: nn.Module) -> None:
    """`model`'s weights back to the CPU: every placement holding any of them (its own, or a twin's, e.g. a LoRA'd
    twin's) is unloaded; a no-op when none is placed."""
    ids = {id(t) for _, _, t in _tensors(model)}
    for placement in list(_PLACED):
        if placement.ids & ids:
            unload_placement(placement)


def make_room(device: torch.device | str, nbytes: int) -> bool:
    """Unload placed models on the CUDA `device` until `nbytes` are free; True when they are."""
    device = torch.device(device)
    for placement in list(_PLACED):
        if free_bytes(device) >= nbytes:
            break
        if placement.device.type == device.type:
            unload_placement(placement)
    torch.cuda.empty_cache()
    return free_bytes(device) >= nbytes


# --- pipeline stages: each model on the GPU only while its stage needs it ----------------------------------------


_WHOLE = 1 << 62  # the budget of a model placed whole (it fits or the copy runs out of memory)


def _on_cpu(module: nn.Module) -> bool:
    return next(module.parameters()).device.type == "cpu"


def weight_bytes(*modules: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of `modules`."""
    return sum(t.nbytes for m in modules for _, _, t in _tensors(m))


@contextmanager
def encoders_on(text_encoders, device: torch.device | str, tokens: int = 512):
    """flux_core.conditioning.TextEncoders on `device` for the block: whole when they fit (placed transformers are
    unloaded to make room if need be), else CLIP whole and T5's blocks streamed; back to the CPU afterwards.
    A no-op for a CPU `device` or encoders already elsewhere than the CPU."""
    device = torch.device(device)
    if device.type != "cuda" or not _on_cpu(text_encoders.t5):
        yield text_encoders
        return
    need = weight_bytes(text_encoders.clip, text_encoders.t5)
    activations = activation_bytes(tokens, text_encoders.t5.config.d_model, text_encoders.dtype)
    if make_room(device, need + activations):
        with text_encoders.on(device):
            yield text_encoders
        return
    blocks = list(text_encoders.t5.encoder.block)
    try:
        place(text_encoders.clip, device, [], budget_bytes=_WHOLE)
        place(text_encoders.t5, device, blocks, activations=activations, hooks=True)
        yield text_encoders
    finally:
        unload(text_encoders.clip)
        unload(text_encoders.t5)


def transformer_on(model: nn.Module, device: torch.device | str, batch: int, img_tokens: int, txt_tokens: int,
                   budget_bytes: int | None = None, ahead: int = 1) -> Placement | None:  # fmt: skip
    """A Flux transformer kept on the CPU placed on the CUDA `device` for sampling: whole if it fits, else with its
    blocks streamed (`batch` counts cfg's second pass). Any other placed transformer is unloaded first. None (a
    no-op) on the CPU or for a model already on a GPU."""
    device = torch.device(device)
    managed = hasattr(next(model.parameters()), "_fluxkit_placement")  # on the GPU through a twin's placement
    if device.type != "cuda" or (not managed and not _on_cpu(model)):
        return None
    activations = flux_activation_bytes(model, batch, img_tokens, txt_tokens)
    if budget_bytes is None:
        make_room(device, weight_bytes(model) + activations)  # others' weights go first, ours stream if short
    weights = [t for b in model.blocks() for _, _, t in _tensors(b)]
    per_param = sum(t.nbytes for t in weights) / sum(t.numel() for t in weights)  # 2 in bf16, about 1 in fp8
    # compute grows with the tokens, copies with the bytes: LINK_RATIO was measured at 4608 tokens in bf16
    ratio = LINK_RATIO * 4608 / (batch * (img_tokens + txt_tokens)) * per_param / 2
    return place(model, device, model.blocks(), budget_bytes, activations, ahead, "transformer", link_ratio=ratio)


def decode_on(ae, latent: Tensor, device: torch.device | str, scaled: bool = True) -> Tensor:
    """ae.decode(latent) on `device` (AE weights there for the call when kept on the CPU); placed models are
    unloaded if the decode needs their room, and a decode that still runs out of memory is redone in tiles."""
    device = torch.device(device)
    if device.type != "cuda":
        return ae.decode(latent.to(ae.device, ae.dtype), scaled=scaled)
    on_cpu = _on_cpu(ae)
    pixels = latent.shape[0] * latent.shape[-2] * latent.shape[-1] * ae.params.downscale**2
    # the decoder's last level (128 channels at full size) peaks at about 6.5 such tensors: 1.6 GiB over the weights
    # at 1024 px in bf16 (bench/vram.py's pipeline peaks on an H200)
    make_room(device, (weight_bytes(ae) if on_cpu else 0) + pixels * 128 * ae.dtype.itemsize * 7)
    if on_cpu:
        place(ae, device, [], budget_bytes=_WHOLE)
    try:
        try:
            return ae.decode(latent.to(ae.device, ae.dtype), scaled=scaled)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return ae.decode_tiled(latent.cpu(), scaled=scaled)  # tiles run on the AE's device, assembled on the CPU
    finally:
        if on_cpu:
            unload(ae)
