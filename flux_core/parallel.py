"""One image on several devices: sequence parallelism over `torch.distributed`.

Inside `sequence_parallel(group)`, every Flux forward splits its text and image tokens across the group's ranks
(each rank runs its share through every block: modulation, norms, MLPs and projections are per token) and the
joint attention runs over the whole sequence, by one of two schemes:
  kv       every rank sends its tokens' keys and values to every other rank (one grouped exchange per block) and
           attends with its own queries over all keys; queries and outputs never move (Llama 3's all-gather
           context parallelism). On GPUs it attends over its own keys while the others' arrive, then over
           theirs, and merges the two by their log-sum-exps.
  ulysses  (DeepSpeed's) one all-to-all trades each rank's tokens of all heads for all tokens of its heads,
           attention runs per head group, a second all-to-all sends the results back.
On 2 ranks both move the same bytes, and kv makes one exchange per block where ulysses makes two, and hides it
(bench/distributed.py). Beyond 2 ranks kv's bytes grow with the rank count and ulysses' do not: "auto" takes kv
for 2 ranks, ulysses for more (the head count must divide by the ranks).
RoPE is applied before the exchange, token by token, so the order the ranks' tokens meet in does not matter
(attention has no mask). Every rank ends with the whole output. Token counts need not divide evenly. Every rank
passes the same inputs, as in one process.

    torch.distributed.init_process_group()          # under torchrun: NCCL on GPUs, gloo on CPUs
    with sequence_parallel():                       # the default group: every rank
        velocity = model(img, img_ids, txt, txt_ids, timesteps, y, guidance)
"""
import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from . import math as flux_math
from .ops import onednn_inference

SCHEMES = ("auto", "kv", "ulysses")
_active: list[tuple[dist.ProcessGroup, str]] = []  # (group, scheme) of the open sequence_parallel contexts
_attending: list["Shards"] = []  # the forwards whose blocks are running


@contextlib.contextmanager
def sequence_parallel(group: dist.ProcessGroup | None = None, scheme: str = "auto") -> Iterator[None]:
    """Flux forwards inside this context run sequence-parallel over `group` (default: the whole world), attention
    by `scheme` (see above)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown sequence-parallel scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    _active.append((group or dist.group.WORLD, scheme))
    try:
        yield
    finally:
        _active.pop()


def current_group() -> dist.ProcessGroup | None:
    """The group of the innermost open sequence_parallel context, None outside one."""
    return _active[-1][0] if _active else None


def shards(txt_len: int, img_len: int) -> "Shards | None":
    """This rank's share of a (txt_len + img_len)-token forward; None outside `sequence_parallel` or on one rank."""
    if not _active or dist.get_world_size(_active[-1][0]) == 1:
        return None
    return Shards(*_active[-1], txt_len, img_len)


def split_sizes(length: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first length % parts shares one longer."""
    return [length // parts + (rank < length % parts) for rank in range(parts)]


class Shards:
    """The split of one forward's tokens: rank r holds text tokens txt_sizes[r] and image tokens img_sizes[r],
    laid out [its text | its image] as a whole-sequence forward lays out [text | image]."""

    def __init__(self, group: dist.ProcessGroup, scheme: str, txt_len: int, img_len: int):
        self.group, self.world, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        self.scheme = ("kv" if self.world == 2 else "ulysses") if scheme == "auto" else scheme
        self.txt_sizes, self.img_sizes = split_sizes(txt_len, self.world), split_sizes(img_len, self.world)
        self.sizes = [t + i for t, i in zip(self.txt_sizes, self.img_sizes)]  # tokens per rank
        self.total = txt_len + img_len

    def _mine(self, x: Tensor, sizes: list[int]) -> Tensor:
        return x.split(sizes, dim=1)[self.rank]

    def split(self, txt: Tensor, img: Tensor, pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, Lt, D) text, (B, Li, D) image, (B, Lt + Li, ...) RoPE -> this rank's tokens and their rotations."""
        txt_pe, img_pe = pe.split((txt.shape[1], img.shape[1]), dim=1)
        pe = torch.cat((self._mine(txt_pe, self.txt_sizes), self._mine(img_pe, self.img_sizes)), dim=1)
        return self._mine(txt, self.txt_sizes), self._mine(img, self.img_sizes), pe

    def gather(self, img: Tensor) -> Tensor:
        """(B, Li_r, C) this rank's image tokens -> (B, Li, C) all of them, on every rank."""
        longest = max(self.img_sizes)  # all_gather wants equal shapes (gloo): pad, then trim
        padded = img.new_zeros(img.shape[0], longest, img.shape[2])
        padded[:, : img.shape[1]] = img
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded.contiguous(), group=self.group)
        return torch.cat([piece[:, :size] for piece, size in zip(pieces, self.img_sizes)], dim=1)

    @contextlib.contextmanager
    def attending(self) -> Iterator[None]:
        """flux_core.math.attention runs over the whole sequence while the blocks run."""
        previous, flux_math.sequence_attention = flux_math.sequence_attention, _sequence_attention
        _attending.append(self)
        try:
            yield
        finally:
            _attending.pop()
            flux_math.sequence_attention = previous

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """(B, L_r, H, D) q, k, v of this rank's tokens -> (B, L_r, H*D): attention over every rank's tokens."""
        if self.scheme == "ulysses":
            q, k, v_all = self.to_heads(q, k, v)
            return self.to_tokens(flux_math.local_attention(q, k, v_all.to(v.dtype)))
        keys, values, arriving = self.exchange_keys_values(q, k, v)
        length = v.shape[1]
        if not (length and keys.shape[1] > length and flux_math.partial_attention_fits(q, k, v)):
            for request in arriving:
                request.wait()
            return flux_math.local_attention(q, keys, values)
        # While the other ranks' keys arrive, attend over this rank's own; then over theirs, and merge the two.
        heads_first = lambda t: t.transpose(1, 2)  # noqa: E731  (B, L, H, D) -> (B, H, L, D)
        q = heads_first(q.to(v.dtype))
        own = flux_math.partial_attention(q, heads_first(keys[:, :length]), heads_first(values[:, :length]))
        for request in arriving:
            request.wait()
        theirs = flux_math.partial_attention(q, heads_first(keys[:, length:]), heads_first(values[:, length:]))
        return flux_math.merge_attention(*own, *theirs).transpose(1, 2).flatten(2)

    def exchange_keys_values(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, list]:
        """(B, L_r, H, D) this rank's q, k, v -> (B, L, H, D) every rank's keys and values, this rank's first (the
        order of keys means nothing to attention), and the exchange's requests, in flight: wait before reading."""
        batch, length, heads, dim = v.shape
        # (L, B, H, D) buffers: each rank's tokens one contiguous slice, which the exchange fills in place. Keys in
        # v's dtype (the attention's), unless the CPU path wants them float32.
        k_dtype = k.dtype if onednn_inference(v, q, k) else v.dtype
        keys, values = (v.new_empty(self.total, batch, heads, dim, dtype=d) for d in (k_dtype, v.dtype))
        keys[:length], values[:length] = k.transpose(0, 1), v.transpose(0, 1)  # one copy each, casting on the way
        exchange, start = [], length
        for peer in (p for p in range(self.world) if p != self.rank):
            theirs, start = slice(start, start + self.sizes[peer]), start + self.sizes[peer]
            peer_rank = dist.get_global_rank(self.group, peer)
            for buffer in (keys, values):  # both sides know the sizes: an empty share is neither sent nor awaited
                if length:
                    exchange.append(dist.P2POp(dist.isend, buffer[:length], peer_rank, self.group))
                if self.sizes[peer]:
                    exchange.append(dist.P2POp(dist.irecv, buffer[theirs], peer_rank, self.group))
        arriving = dist.batch_isend_irecv(exchange) if exchange else []  # one NCCL group: one kernel
        return keys.transpose(0, 1), values.transpose(0, 1), arriving

    def to_heads(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Ulysses' first all-to-all: (B, L_r, H, D) q, k, v of this rank's tokens -> (B, L, h, D) of all tokens
        for this rank's h = H / ranks heads."""
        batch, length, heads, dim = v.shape
        if heads % self.world:
            raise ValueError(f"sequence parallel needs the head count ({heads}) divisible by the ranks ({self.world})")
        local, total = heads // self.world, self.total
        # The exchange's buffers: v's dtype, which the attention computes in, unless the CPU path wants float32 q, k
        # (then v rides along in float32, exactly, and is cast back). Laid out (destination, token, ...) so that each
        # rank receives each of q, k, v whole, (L, B, h, D) in rank order: no concatenation after, and a layout
        # (B, L, h, D) that the attention kernels take as they take one device's tensors.
        dtype = torch.float32 if onednn_inference(v, q, k) else v.dtype
        send = v.new_empty(3, self.world, length, batch, local, dim, dtype=dtype)
        for i, t in enumerate((q, k, v)):  # one strided copy each, casting on the way
            send[i] = t.view(batch, length, self.world, local, dim).permute(2, 1, 0, 3, 4)
        received = send.new_empty(3, total, batch, local, dim)
        per_token = batch * local * dim
        for i in range(3):
            dist.all_to_all_single(received[i].view(-1), send[i].view(-1), [n * per_token for n in self.sizes],
                                   [length * per_token] * self.world, group=self.group)  # fmt: skip
        return received.transpose(1, 2)  # q, k, v each (B, L, h, D)

    def to_tokens(self, out: Tensor) -> Tensor:
        """Ulysses' second all-to-all: (B, L, h*D) attention output of this rank's heads -> (B, L_r, H*D) of its
        tokens."""
        batch, _, width = out.shape
        length = self.sizes[self.rank]
        send = out.transpose(0, 1).contiguous()  # (L, B, h*D): each rank's tokens one slice (a view when B = 1)
        received = send.new_empty(self.world, length, batch, width)
        per_token = batch * width
        dist.all_to_all_single(received.view(-1), send.view(-1), [length * per_token] * self.world,
                               [n * per_token for n in self.sizes], group=self.group)  # fmt: skip
        return received.permute(2, 1, 0, 3).reshape(batch, length, self.world * width)  # (B, L_r, W * h * D)


@torch.compiler.disable  # one stable hook (no recompiles per forward); compiled blocks run the collectives eagerly
def _sequence_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _attending[-1].attention(q, k, v)
