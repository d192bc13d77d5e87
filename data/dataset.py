"""Training items from the latent cache only (never the videos): what the trainer iterates.

Item i of epoch e, from cache entry i (entries ordered by clip id, window, key):
  latents    [C, F, H, W]  z = mean + exp(logvar / 2) * eps, eps ~ N(0, I) from a generator seeded by
                           hash(seed, e, i): a fresh posterior sample each epoch, the same on a re-run
  context    [512, D]      the text embedding of prompt variant v (zero-padded back to text_len),
                           v = hash(seed, e, i) mod K, so the variant changes with the epoch
  context_len int          real tokens of that variant
  image_cond [C, F, H, W]  only when the cache holds it (I2V)
  bucket     str           '832x480x81'; clip_id str
Batches come from `make_dataloader`: data.buckets.BucketBatchSampler groups items by bucket, so every
tensor in a batch has one shape; its position is saved and restored with the loader's state_dict.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from wan_model.config import TEXT_LEN

from .buckets import BucketBatchSampler
from .cache import CacheError, LatentCache, entry_order, pad_context


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit generator seed from (seed, epoch, index): blake2b, so no two items share a stream."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class CachedDataset(Dataset):
    """Items of a prepared cache (module docstring). `epoch` is set by the loader (`BucketLoader.set_epoch`).

    check: verify each shard's sha256 as it is read (a corrupt shard raises CacheError naming it)."""

    def __init__(self, cache_dir: str | os.PathLike, seed: int = 0, text_len: int = TEXT_LEN, check: bool = True):
        self.cache = LatentCache(cache_dir)
        entries = self.cache.entries
        if not entries:
            raise CacheError(f"{self.cache.index_path}: the cache holds no entries; run "
                             f"python -m data.prepare CONFIG.yaml first")
        self.keys = entry_order(entries)
        self.buckets: list[str] = [entries[k]["bucket"] for k in self.keys]
        self.seed, self.text_len, self.check = seed, text_len, check
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> dict:
        tensors, meta = self.cache.read(self.keys[index], check=self.check)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        mean, logvar = tensors["latent_mean"].float(), tensors["latent_logvar"].float()
        noise = torch.randn(mean.shape, generator=generator)
        variant = int(torch.randint(tensors["context"].shape[0], (), generator=generator))
        item = {"latents": mean + torch.exp(0.5 * logvar) * noise,
                "context": pad_context(tensors["context"][variant], self.text_len),
                "context_len": int(tensors["context_lens"][variant]),
                "bucket": self.buckets[index], "clip_id": meta["clip_id"]}
        if "image_cond" in tensors:
            item["image_cond"] = tensors["image_cond"].float()
        return item


def collate(items: list[dict]) -> dict:
    """Stack one bucket's items: latents [B, C, F, H, W], context [B, 512, D], context_len [B] int64,
    image_cond [B, C, F, H, W] if present; bucket and clip_id as lists."""
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}; batches must come from BucketBatchSampler")
    out = {"latents": torch.stack([i["latents"] for i in items]),
           "context": torch.stack([i["context"] for i in items]),
           "context_len": torch.tensor([i["context_len"] for i in items], dtype=torch.long),
           "bucket": [i["bucket"] for i in items], "clip_id": [i["clip_id"] for i in items]}
    if "image_cond" in items[0]:
        out["image_cond"] = torch.stack([i["image_cond"] for i in items])
    return out


class BucketLoader:
    """A DataLoader over one-bucket batches, with epochs and a resumable position.

    The position counts batches *consumed* by the caller (not those prefetched by workers), so a
    `state_dict()` taken after n batches resumes at batch n + 1 of the same epoch order. Its format is
    BucketBatchSampler's ({'seed', 'epoch', 'position', 'fingerprint'}), checked on load."""

    def __init__(self, dataset: CachedDataset, batch_size: int, seed: int, num_workers: int = 0,
                 drop_last: bool = False, shuffle: bool = True):
        self.dataset = dataset
        self.sampler = BucketBatchSampler(dataset.buckets, batch_size, seed, drop_last, shuffle)
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers, collate_fn=collate,
                                 pin_memory=torch.cuda.is_available(), persistent_workers=False)
        self.consumed = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its shuffle, latent samples and prompt variants); a new epoch starts at batch 0."""
        if epoch != self.sampler.epoch:
            self.consumed = 0
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict]:
        if self.consumed >= len(self.sampler):  # a finished epoch iterated again starts over
            self.consumed = 0
        self.sampler.load_state_dict({**self.sampler.state_dict(), "position": self.consumed})
        self.dataset.epoch = self.sampler.epoch  # non-persistent workers copy the dataset at each iter()
        for batch in self.loader:
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "position": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration continues epoch state['epoch'] after state['position'] batches."""
        self.sampler.load_state_dict(state)
        self.consumed = int(state["position"])


def make_dataloader(dataset: CachedDataset, batch_size: int, seed: int, num_workers: int = 0,
                    drop_last: bool = False, shuffle: bool = True) -> BucketLoader:
    """Batches that never mix buckets (BucketBatchSampler), resumable via state_dict/load_state_dict."""
    return BucketLoader(dataset, batch_size, seed, num_workers, drop_last, shuffle)
