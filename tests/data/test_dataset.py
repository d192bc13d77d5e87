"""data/dataset.py: items sampled from the cached posterior per (seed, epoch, index), context restored to 512,
batches that never mix buckets, a resumable position that counts consumed batches, workers see the epoch."""

import pytest
import torch

from data.cache import CacheError, LatentCache, trim_context
from data.dataset import CachedDataset, make_dataloader

# bucket -> (entries, latent shape [C, F, H, W])
BUCKETS = {"96x64x17": (5, (16, 5, 8, 12)), "64x64x17": (3, (16, 5, 8, 8)), "64x96x1": (2, (16, 1, 12, 8))}


def _entry(shape, k, seed, logvar=0.0, image_cond=False):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, 9, (k,), generator=g)
    context = torch.randn(k, 512, 4, generator=g)
    context[torch.arange(512)[None] >= lens[:, None]] = 0
    out = {"latent_mean": torch.randn(shape, generator=g), "latent_logvar": torch.full(shape, logvar),
           "context": trim_context(context, lens), "context_lens": lens}
    if image_cond:
        out["image_cond"] = torch.randn(shape, generator=g)
    return out


@pytest.fixture
def cache_dir(tmp_path):
    cache, n = LatentCache(tmp_path), 0
    for bucket, (count, shape) in BUCKETS.items():
        for _ in range(count):
            cache.put(f"key{n:02d}", _entry(shape, 3, n, image_cond=True),
                      {"clip_id": f"clip{n:02d}.mp4", "bucket": bucket, "window": 0})
            n += 1
    cache.save_index()
    return tmp_path


def test_item_sampling_is_seeded_per_epoch_and_index(cache_dir):
    ds = CachedDataset(cache_dir, seed=3)
    assert len(ds) == 10
    a = ds[0]
    assert a["latents"].shape == (16, 5, 8, 12) and a["bucket"] == "96x64x17"  # sorted by clip id: clip00 first
    assert a["context"].shape == (512, 4) and a["image_cond"].shape == (16, 5, 8, 12)
    assert a["context"][a["context_len"]:].abs().sum() == 0 and a["context"][a["context_len"] - 1].abs().sum() > 0
    assert torch.equal(ds[0]["latents"], a["latents"])  # same (seed, epoch, index): same sample
    ds.epoch = 1
    assert not torch.equal(ds[0]["latents"], a["latents"])  # a new posterior sample each epoch
    assert not torch.equal(CachedDataset(cache_dir, seed=4)[0]["latents"], a["latents"])
    tensors, _ = LatentCache(cache_dir).read(ds.keys[0])
    noise = (a["latents"] - tensors["latent_mean"]) / torch.exp(0.5 * tensors["latent_logvar"])
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1  # z = mean + std * N(0, 1)
    variants = {CachedDataset(cache_dir, seed=s)[0]["context_len"] for s in range(12)}
    assert len(variants) > 1  # the prompt variant varies with the seed (3 variants stored)


def test_batches_never_mix_buckets_and_cover_every_item(cache_dir):
    loader = make_dataloader(CachedDataset(cache_dir), batch_size=2, seed=0)
    for epoch in range(2):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            assert len(set(batch["bucket"])) == 1
            b = len(batch["clip_id"])
            assert batch["latents"].shape[0] == b and batch["context"].shape == (b, 512, 4)
            assert batch["context_len"].dtype == torch.long and batch["image_cond"].shape == batch["latents"].shape
            seen += batch["clip_id"]
        assert sorted(seen) == [f"clip{i:02d}.mp4" for i in range(10)]
    assert len(loader) == 3 + 2 + 1


def test_resume_continues_with_the_same_batches(cache_dir):
    loader = make_dataloader(CachedDataset(cache_dir), batch_size=2, seed=5)
    loader.set_epoch(1)
    full = [(b["clip_id"], b["latents"]) for b in loader]
    loader = make_dataloader(CachedDataset(cache_dir), batch_size=2, seed=5)
    loader.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state["position"] == 2 and state["epoch"] == 1
    resumed = make_dataloader(CachedDataset(cache_dir), batch_size=2, seed=5)
    resumed.load_state_dict(state)
    rest = [(b["clip_id"], b["latents"]) for b in resumed]
    assert [r[0] for r in rest] == [f[0] for f in full[2:]]
    assert all(torch.equal(r[1], f[1]) for r, f in zip(rest, full[2:]))
    with pytest.raises(ValueError, match="seed"):
        make_dataloader(CachedDataset(cache_dir), batch_size=2, seed=6).load_state_dict(state)


def test_workers_see_the_epoch(cache_dir):
    plain = make_dataloader(CachedDataset(cache_dir), batch_size=5, seed=0, num_workers=0)
    workers = make_dataloader(CachedDataset(cache_dir), batch_size=5, seed=0, num_workers=1)
    plain.set_epoch(2)
    workers.set_epoch(2)
    for a, b in zip(plain, workers):
        assert a["clip_id"] == b["clip_id"] and torch.equal(a["latents"], b["latents"])


def test_corrupt_shard_and_empty_cache_raise(cache_dir, tmp_path_factory):
    ds = CachedDataset(cache_dir)
    shard = ds.cache.shard_path(ds.keys[3])
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CacheError, match="does not match its sha256"):
        ds[3]
    with pytest.raises(CacheError, match="run python -m data.prepare"):
        CachedDataset(tmp_path_factory.mktemp("empty"))
