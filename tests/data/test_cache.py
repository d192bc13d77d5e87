"""data/cache.py: content keys, atomic shards with sha256 in index.json, corruption refused, context trim/pad."""

import json

import pytest
import torch

from data.cache import CacheError, LatentCache, entry_key, pad_context, trim_context


def _tensors(k=3, d=8):
    lens = torch.tensor([5, 2, 1])[:k]
    context = torch.randn(k, 512, d)
    context[torch.arange(512)[None, :] >= lens[:, None]] = 0  # encoder layout: zero past the length
    return {"latent_mean": torch.randn(16, 2, 4, 6), "latent_logvar": torch.randn(16, 2, 4, 6),
            "context": trim_context(context, lens), "context_lens": lens}, context


def test_key_depends_on_bytes_and_every_setting():
    base = entry_key("abc", {"bucket": "64x64x9", "prompts": ["a"]})
    assert base == entry_key("abc", {"prompts": ["a"], "bucket": "64x64x9"})  # key order is irrelevant
    assert base != entry_key("abd", {"bucket": "64x64x9", "prompts": ["a"]})
    assert base != entry_key("abc", {"bucket": "64x64x5", "prompts": ["a"]})
    assert base != entry_key("abc", {"bucket": "64x64x9", "prompts": ["b"]})


def test_trim_and_pad_round_trip():
    tensors, full = _tensors()
    assert tensors["context"].shape == (3, 5, 8)
    assert torch.equal(pad_context(tensors["context"], 512), full)


def test_put_read_and_reopen(tmp_path):
    tensors, _ = _tensors()
    cache = LatentCache(tmp_path)
    cache.put("k1", tensors, {"clip_id": "a.mp4", "bucket": "96x64x9", "window": 0, "prompts": ["x"]})
    cache.flush(force=True)
    reopened = LatentCache(tmp_path)
    assert reopened.adopted == []
    assert reopened.has("k1") and reopened.entries["k1"]["bucket"] == "96x64x9"
    assert reopened.verify("k1") is None
    out, meta = reopened.read("k1")
    assert torch.equal(out["latent_mean"], tensors["latent_mean"]) and meta["prompts"] == ["x"]
    assert not list(tmp_path.rglob("*.tmp"))  # no temp files left behind
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == 1 and len(index["entries"]["k1"]["sha256"]) == 64


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_corruption_detected_and_refused(tmp_path, damage):
    cache = LatentCache(tmp_path)
    cache.put("k1", _tensors()[0], {"clip_id": "a.mp4", "bucket": "b"})
    shard = cache.shard_path("k1")
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        shard.unlink()
    problem = cache.verify("k1")
    assert problem and {"truncate": "truncated", "flip": "corrupted", "delete": "missing"}[damage] in problem
    with pytest.raises(CacheError, match="re-run python -m data.prepare"):
        cache.read("k1")


def test_bad_index_names_the_fix(tmp_path):
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(CacheError, match="index.json: not valid JSON"):
        LatentCache(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": 99, "entries": {}}))
    with pytest.raises(CacheError, match="cache format 99"):
        LatentCache(tmp_path)


def test_shards_missing_from_an_unsaved_index_are_adopted(tmp_path):
    """A hard kill between index saves: shards on disk come back with their records on the next open."""
    cache = LatentCache(tmp_path)
    cache.put("k1", _tensors()[0], {"clip_id": "a.mp4", "bucket": "b", "window": 0})
    cache.flush(force=True)
    cache.put("k2", _tensors()[0], {"clip_id": "b.mp4", "bucket": "b", "window": 1})  # not flushed (10 s rule)
    assert set(json.loads((tmp_path / "index.json").read_text())["entries"]) == {"k1"}
    reopened = LatentCache(tmp_path)
    assert reopened.adopted == ["k2"] and reopened.entries["k2"] == cache.entries["k2"]
    assert reopened.verify("k2") is None
