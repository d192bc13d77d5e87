"""Sequence parallelism for the Wan DiT, DeepSpeed-Ulysses style: one long clip split over P processes.

Each process keeps L/P of the video tokens through the whole block stack. Only self-attention needs
every token; there two all-to-alls swap the split (Ulysses, arXiv:2309.14509):

    q, k, v  [B, L/P, H, D]  --all-to-all-->  [B, L, H/P, D]   (all tokens, H/P heads)
    attention per head group                                    (exact: heads are independent)
    out      [B, L, H/P, D]  --all-to-all-->  [B, L/P, H, D]

Cross-attention (local queries over the full 512 text rows), the FFN, norms and modulation are per token
and run on the local shard unchanged. The head's output is gathered along the sequence so every process
returns the whole prediction. Gradients: each process's parameter gradients are its shard's share; the
true gradient is their sum over the group (`reduce_gradients`).

Requirements: L divisible by P (one bucket's token count: 21 x 45 x 80 = 75,600 at 1280x720x81, P = 2),
heads divisible by P (40 and 24 heads: P in 2, 4, 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def _all_to_all(x: Tensor, group) -> Tensor:
    """Exchange dim-0 chunks: chunk j of x goes to rank j; chunk j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted view's strides
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: Tensor, world: int, group) -> Tensor:
    """[B, L/P, H, D] (my tokens, all heads) -> [B, L, H/P, D] (all tokens, my heads)."""
    b, ls, h, d = x.shape
    chunks = x.reshape(b, ls, world, h // world, d).permute(2, 0, 1, 3, 4)  # [P, B, L/P, H/P, D] by head group
    out = _all_to_all(chunks, group)  # [P, B, L/P, H/P, D] by sequence shard
    return out.permute(1, 0, 2, 3, 4).reshape(b, world * ls, h // world, d)


def _heads_to_seq(x: Tensor, world: int, group) -> Tensor:
    """[B, L, H/P, D] (all tokens, my heads) -> [B, L/P, H, D] (my tokens, all heads)."""
    b, length, hp, d = x.shape
    chunks = x.reshape(b, world, length // world, hp, d).permute(1, 0, 2, 3, 4)  # by sequence shard
    out = _all_to_all(chunks, group)  # [P, B, L/P, H/P, D] by head group
    return out.permute(1, 2, 0, 3, 4).reshape(b, length // world, world * hp, d)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world, group):
        ctx.world, ctx.group = world, group
        return _seq_to_heads(x, world, group)

    @staticmethod
    def backward(ctx, grad):  # the adjoint of a permutation is its inverse
        return _heads_to_seq(grad, ctx.world, ctx.group), None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world, group):
        ctx.world, ctx.group = world, group
        return _heads_to_seq(x, world, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.world, ctx.group), None, None


class _GatherSequence(torch.autograd.Function):
    """[B, L/P, ...] -> [B, L, ...] on every process; backward keeps this process's slice of the gradient
    (every process computes the same loss from the same gathered tensor)."""

    @staticmethod
    def forward(ctx, x, world, rank, group):
        ctx.rank, ctx.length = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return grad[:, ctx.rank * ctx.length:(ctx.rank + 1) * ctx.length], None, None, None


@dataclass
class SequenceParallel:
    """A process group that splits each sample's video tokens; `group=None` is the default world."""

    group: object = None

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def shard(self, x: Tensor) -> Tensor:
        """This process's slice of dim 1 (the token axis): [B, L, ...] -> [B, L/P, ...]."""
        length = x.shape[1]
        if length % self.world:
            raise ValueError(f"sequence parallel: {length} video tokens do not split over {self.world} "
                             f"processes; choose a bucket whose token count is a multiple of {self.world}")
        step = length // self.world
        return x[:, self.rank * step:(self.rank + 1) * step]

    def gather(self, x: Tensor) -> Tensor:
        return _GatherSequence.apply(x, self.world, self.rank, self.group)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """Self-attention over all tokens from local shards [B, L/P, H, D]; `attend` is the kernel."""
        if q.shape[2] % self.world:
            raise ValueError(f"sequence parallel: {q.shape[2]} heads do not split over {self.world} processes")
        q, k, v = (_SeqToHeads.apply(t, self.world, self.group) for t in (q, k, v))
        return _HeadsToSeq.apply(attend(q, k, v), self.world, self.group)

    def reduce_gradients(self, params) -> None:
        """Sum the parameters' gradients over the group: each process holds its shard's share."""
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, group=self.group)
