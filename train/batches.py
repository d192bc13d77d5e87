"""Micro-batches of cached training pairs, and the random-access source the loop reads them from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class Batch:
    """One micro-batch of cached training pairs, all from one bucket.

    latents: [B, C, F, H, W] clean VAE latents x0; context: [B, L, D] text embeddings; context_lens: [B];
    image_cond: [B, 16, F, H, W] (i2v: VAE latents of the first frame then black frames) or None;
    clip_ids: which clips these are (named when a step goes non-finite)."""

    latents: Tensor
    context: Tensor
    context_lens: Tensor | None
    image_cond: Tensor | None
    clip_ids: list[str]

    def to(self, device: torch.device) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.latents), move(self.context), move(self.context_lens), move(self.image_cond),
                     self.clip_ids)


class BatchSource(Protocol):
    """Random access to this process's micro-batches: `batch(i)` is the same for the same i, so a resumed
    run continues from micro-batch `step * grad_accum` with nothing but the step stored."""

    def batch(self, index: int) -> Batch: ...


class LoaderSource:
    """`BatchSource` over a resumable bucket loader (data.dataset.make_dataloader).

    Process k of n takes the loader's global batches k, k + n, k + 2n, ...; batch(i) is global batch
    i * n + k, found by epoch = g // len(loader) and position = g % len(loader). Consecutive calls read
    on from the open iterator; any other index (a resume, or n > 1) re-positions the loader first."""

    def __init__(self, loader, process_index: int = 0, num_processes: int = 1):
        if len(loader) == 0:
            raise ValueError("the data loader yields no batches; is batch_size larger than every bucket with "
                             "drop_last, or is the cache empty?")
        self.loader, self.rank, self.world = loader, process_index, num_processes
        self.iterator, self.next_global = None, None

    def batch(self, index: int) -> Batch:
        g = index * self.world + self.rank
        if g != self.next_global:
            epoch, position = divmod(g, len(self.loader))
            self.loader.load_state_dict({**self.loader.state_dict(), "epoch": epoch, "position": position})
            self.loader.set_epoch(epoch)
            self.iterator = iter(self.loader)
        raw = next(self.iterator, None)
        if raw is None:  # end of an epoch: the next one starts at its batch 0
            self.loader.set_epoch(g // len(self.loader))
            self.iterator = iter(self.loader)
            raw = next(self.iterator)
        self.next_global = g + 1 if self.world == 1 else None
        return Batch(raw["latents"], raw["context"], raw["context_len"], raw.get("image_cond"), list(raw["clip_id"]))
