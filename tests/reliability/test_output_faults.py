"""Faults while writing: a crash or a full disk mid-write leaves the previous checkpoint / export / cache
shard intact; damaged checkpoints and shards are detected by sha256 and refused, naming the file; an
unwritable or full output folder fails before training; non-finite steps are skipped and never saved."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train.checkpoints as checkpoints
import train_lora
from data.cache import CacheError, LatentCache
from train.checkpoints import CheckpointError, list_checkpoints, load_checkpoint, resolve_resume, verify_checkpoint
from train.loop import NonFiniteError, export_adapters, run
from train.run_guard import OutputNotWritableError

from tests.train.test_loop import MemorySource, make_trainer, tiny_recipe

from . import recipe, shared_runs


def _half_then_full_disk(real):
    """A writer that writes half of what `real` writes, then fails as a full disk does."""
    def write(tensors, path, *args, **kwargs):
        real(tensors, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    return write


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_disk_full_mid_checkpoint_keeps_the_last_good_one_and_resume_works(tmp_path, monkeypatch):
    r = tiny_recipe(tmp_path, steps=4, save_every=2)
    run(make_trainer(r, total_steps=2), log=False)
    root = tmp_path / "run" / "checkpoints"
    good = _tree(root / "step-00000002")

    monkeypatch.setattr(checkpoints, "save_file", _half_then_full_disk(checkpoints.save_file))
    with pytest.raises(CheckpointError, match=r"No space left on device.*last good one is .*step-00000002"):
        run(make_trainer(r), resume=resolve_resume(r.training.output_dir, "latest"), log=False)
    monkeypatch.undo()

    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # no half step-4, no .tmp left
    assert _tree(root / "step-00000002") == good
    verify_checkpoint(root / "step-00000002")
    history = run(make_trainer(r), resume=resolve_resume(r.training.output_dir, "latest"), log=False)
    assert len(history) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_refused_naming_the_file(tmp_path, damage):
    r = tiny_recipe(tmp_path, steps=2, save_every=2)
    run(make_trainer(r), log=False)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    target = ckpt / "low_noise" / ("optimizer.pt" if damage == "flip" else "adapter.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) - 100])
    elif damage == "flip":
        target.write_bytes(data[:-50] + bytes([data[-50] ^ 1]) + data[-49:])
    else:
        target.unlink()
    trainer = make_trainer(r)
    before = trainer.lora_weights("low_noise")
    with pytest.raises(CheckpointError, match=rf"{target}: (does not match its sha256|missing)"):
        load_checkpoint(trainer, ckpt)
    after = trainer.lora_weights("low_noise")
    assert all(torch.equal(before[k], after[k]) for k in before) and trainer.step == 0  # nothing loaded


def test_unreadable_state_json_is_refused_naming_the_file(tmp_path):
    r = tiny_recipe(tmp_path, steps=2, save_every=2)
    run(make_trainer(r), log=False)
    ckpt = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    (ckpt / "state.json").write_text('{"step": 2, "his')
    with pytest.raises(CheckpointError, match=rf"{ckpt / 'state.json'}: unreadable"):
        load_checkpoint(make_trainer(r), ckpt)


def test_a_crash_mid_export_keeps_the_previous_adapter_file(tmp_path, monkeypatch):
    import wan_model.lora_formats as formats

    trainer = make_trainer(tiny_recipe(tmp_path, steps=2))
    files = export_adapters(trainer)
    before = {p: p.read_bytes() for p in files}
    trainer.train_step()
    trainer.step = 0  # export again over the same step-0 files, with changed weights
    monkeypatch.setattr(formats, "save_file", _half_then_full_disk(formats.save_file))
    with pytest.raises(OSError, match="No space left"):
        export_adapters(trainer)
    assert {p: p.read_bytes() for p in files} == before
    assert not [p for p in (tmp_path / "run" / "adapters").rglob("*") if p.name.endswith(".tmp")]


def test_a_crash_mid_shard_write_keeps_the_cache_and_a_truncated_shard_is_reported(tmp_path, monkeypatch):
    def entry(value: float) -> dict:
        shape = (16, 1, 2, 2)
        return {"latent_mean": torch.full(shape, value), "latent_logvar": torch.zeros(shape),
                "context": torch.zeros(1, 4, 32), "context_lens": torch.tensor([4])}

    cache = LatentCache(tmp_path)
    cache.put("a", entry(1.0), {"clip_id": "a.mp4"})
    cache.save_index()
    shard, index = cache.shard_path("a"), cache.index_path.read_bytes()
    good = shard.read_bytes()

    real = Path.write_bytes
    def half(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_bytes", half)
    with pytest.raises(OSError, match="No space left"):
        cache.put("a", entry(2.0), {"clip_id": "a.mp4"})  # a re-encode of the same key
    monkeypatch.undo()
    assert shard.read_bytes() == good and cache.index_path.read_bytes() == index
    assert not list(tmp_path.rglob("*.tmp"))
    assert torch.equal(LatentCache(tmp_path).read("a")[0]["latent_mean"], entry(1.0)["latent_mean"])

    shard.write_bytes(good[:-16])
    reopened = LatentCache(tmp_path)
    assert "truncated" in reopened.verify("a")
    with pytest.raises(CacheError, match=rf"{shard}: shard does not match its sha256.*re-run"):
        reopened.read("a")


def test_unwritable_or_full_output_fails_before_training(tmp_path_factory, monkeypatch):
    base = shared_runs(tmp_path_factory)
    path = recipe(base, "nowhere")
    body = path.read_text().replace(str(base / "nowhere"), "/proc/wanlora-no-such-dir/run")
    path.write_text(body)
    with pytest.raises(OutputNotWritableError, match="cannot write there.*choose a writable training.output_dir"):
        train_lora.main([str(path)])

    import shutil

    import train.run_guard as guard
    full = recipe(base, "full")
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    with pytest.raises(OutputNotWritableError, match="only 0 MiB free.*free some space"):
        train_lora.main([str(full)])
    assert not (base / "full" / "checkpoints").exists() and not (base / "full" / ".lock").exists()


class PoisonedSource(MemorySource):
    """MemorySource whose batches from index `first` on are NaN."""

    def __init__(self, first: int, **kw):
        super().__init__("tiny-t2v", **kw)
        self.first = first

    def batch(self, index):
        b = super().batch(index)
        if index >= self.first:
            b.latents = torch.full_like(b.latents, float("nan"))
        return b


def test_nan_batches_are_skipped_logged_by_clip_and_stop_the_run_with_nothing_poisoned_saved(tmp_path):
    r = tiny_recipe(tmp_path, steps=8, save_every=1, keep_last=20, max_nonfinite_steps=3)
    trainer = make_trainer(r, PoisonedSource(first=2))
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row \(last: step 4.*clips \['clip"):
        run(trainer)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the step that stops the run raises before its line is logged: its clips are in the error instead
    assert [x["skipped"] for x in lines] == [False, False, True, True]
    assert all(x["clip_ids"] for x in lines[2:]) and "clip_ids" not in lines[0]
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in saved] == [f"step-{n:08d}" for n in (1, 2, 3, 4)]
    for ckpt in saved:
        verify_checkpoint(ckpt)
        for expert in ("high_noise", "low_noise"):
            weights = load_file(str(ckpt / expert / "adapter.safetensors"))
            assert all(torch.isfinite(w).all() for w in weights.values()), ckpt
    last_good = load_file(str(saved[1] / "high_noise" / "adapter.safetensors"))
    after = load_file(str(saved[-1] / "high_noise" / "adapter.safetensors"))
    assert all(torch.equal(last_good[k], after[k]) for k in after)  # skipped steps changed nothing
