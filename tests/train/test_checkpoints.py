"""Checkpoints: kill-and-resume continues the exact loss trajectory; atomic folders; keep_last; recipe hash."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.checkpoints import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from train.loop import run

from .test_loop import make_trainer, tiny_recipe


def test_resume_latest_continues_the_exact_loss_curve_and_adapters(tmp_path):
    straight = make_trainer(tiny_recipe(tmp_path / "a", steps=6, routing="phased", phase_steps=2))
    full = run(straight, log=False)

    recipe = tiny_recipe(tmp_path / "b", steps=6, routing="phased", phase_steps=2, save_every=3)
    first = make_trainer(recipe, total_steps=3)  # "killed" after step 3 (its checkpoint is the end one)
    run(first, log=False)
    torch.manual_seed(1234)  # the resumed process starts with a different global RNG state
    resumed = make_trainer(recipe)
    history = run(resumed, resume=resolve_resume(recipe.training.output_dir, "latest"), log=False)

    assert [h["loss"] for h in history] == [h["loss"] for h in full]
    assert [h["expert"] for h in history] == [h["expert"] for h in full]
    for name in straight.states:
        a, b = straight.lora_weights(name), resumed.lora_weights(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_under_cudnn_fp8_attention_keeps_each_blocks_scaling_history(tmp_path):
    """attention_backend cudnn_fp8 scales O and the gradients by the block's previous call's amaxes (CPU: its
    emulation). The checkpoint keeps those states, so a resumed run quantises with the scales the uninterrupted
    run uses and follows its loss curve bit for bit; without them every block would calibrate again."""
    from wan_model.attention import set_attention_backend
    from wan_model.cudnn_fp8_attention import CALLS
    from wan_model.speed import SpeedOptions

    fp8_attention = SpeedOptions(compile=False, save_attention="none", fp8_base="none", attention_backend="cudnn_fp8")

    def recipe_in(folder, **training):
        recipe = tiny_recipe(tmp_path / folder, steps=6, routing="phased", phase_steps=2, **training)
        return dataclasses.replace(recipe, speed=fp8_attention)

    try:
        straight = make_trainer(recipe_in("a"))
        full = run(straight, log=False)
        recipe = recipe_in("b", save_every=3)
        first = make_trainer(recipe, total_steps=3)
        run(first, log=False)
        last = list_checkpoints(tmp_path / "b" / "run" / "checkpoints")[-1]
        saved = load_file(str(last / "fp8-scaling-rank0.safetensors"))
        assert set(saved) == {"high_noise", "low_noise"}
        assert all(bool((states[:, CALLS] > 0).all()) for states in saved.values())  # both experts ran by step 3
        resumed = make_trainer(recipe)
        history = run(resumed, resume=resolve_resume(recipe.training.output_dir, "latest"), log=False)
    finally:
        set_attention_backend("auto")
    assert [h["loss"] for h in history] == [h["loss"] for h in full]
    for name in straight.states:
        a, b = straight.lora_weights(name), resumed.lora_weights(name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_checkpoints_are_complete_folders_and_only_the_last_k_are_kept(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=5, save_every=1, keep_last=2)
    trainer = make_trainer(recipe)
    run(trainer, log=False)
    kept = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in kept] == ["step-00000004", "step-00000005"]
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    meta = json.loads((kept[-1] / "state.json").read_text())
    assert meta["step"] == 5 and len(meta["history"]) == 5
    for name in ("high_noise", "low_noise"):
        assert {p.name for p in (kept[-1] / name).iterdir()} == {"adapter.safetensors", "optimizer.pt", "scheduler.pt"}
    assert (kept[-1] / "rng-rank0.pt").is_file()


def test_resume_refuses_a_different_recipe(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=2)
    run(make_trainer(recipe), log=False)
    other = tiny_recipe(tmp_path, steps=4, seed=7)
    with pytest.raises(ValueError, match="different recipe"):
        run(make_trainer(other), resume=resolve_resume(other.training.output_dir, "latest"), log=False)


def test_a_poisoned_adapter_is_never_written(tmp_path):
    trainer = make_trainer(tiny_recipe(tmp_path, steps=2))
    with torch.no_grad():
        next(iter(trainer.states["low_noise"].params)).fill_(float("nan"))
    with pytest.raises(RuntimeError, match="not finite"):
        save_checkpoint(trainer, keep_last=2)
    assert not list_checkpoints(tmp_path / "run" / "checkpoints")


def test_resume_latest_without_checkpoints_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        resolve_resume(tmp_path, "latest")


def _tiny_run(tmp_path, steps: int, out: str) -> Path:
    """A tiny release, a 6-clip latent cache and a recipe pointing at both (what quickstart.yaml does)."""
    import yaml

    from data.cache import LatentCache
    from wan_model.tiny_release import write_tiny_release

    release = tmp_path / "release"
    if not release.exists():
        write_tiny_release(release, "tiny-t2v", seed=0)
    cache_dir = tmp_path / "cache"
    if not cache_dir.exists():
        cache = LatentCache(cache_dir)
        for n in range(6):
            g = torch.Generator().manual_seed(n)
            shape = (16, 2, 4, 4)
            cache.put(f"key{n:02d}", {"latent_mean": torch.randn(shape, generator=g),
                                      "latent_logvar": torch.full(shape, -4.0),
                                      "context": torch.randn(2, 6, 32, generator=g),
                                      "context_lens": torch.tensor([6, 4])},
                      {"clip_id": f"clip{n}.mp4", "bucket": "64x64x5", "window": 0})
        cache.save_index()
    body = {"model": {"preset": "tiny-t2v", "release": str(release), "dtype": "float32"},
            "dataset": {"root": str(tmp_path), "cache_dir": str(cache_dir)},
            "experts": {"high_noise": {"lora": {"rank": 4, "alpha": 4}},
                        "low_noise": {"lora": {"rank": 4, "alpha": 4}}},
            "training": {"steps": steps, "batch_size": 2, "precision": "fp32", "gradient_checkpointing": False,
                         "routing": "phased", "phase_steps": 2, "output_dir": str(tmp_path / out), "save_every": 2}}
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def _losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_lora_cli_stop_and_resume_reads_the_same_batches(tmp_path):
    """train_lora.py on a real release folder and latent cache: --max-steps then --resume latest gives the
    loss sequence of one straight run (the loader position and epoch are restored from the step)."""
    import train_lora

    straight = _tiny_run(tmp_path, steps=8, out="a")
    assert train_lora.main([str(straight)]) == 0
    split = _tiny_run(tmp_path, steps=8, out="b")
    assert train_lora.main([str(split), "--max-steps", "4"]) == 0
    assert train_lora.main([str(split), "--resume"]) == 0
    # 6 clips / batch 2: the run crosses 2 epochs. Exact on CPU; CUDA kernels may differ in the last bit.
    expected = _losses(tmp_path / "a")
    assert _losses(tmp_path / "b") == (pytest.approx(expected, rel=1e-5) if torch.cuda.is_available() else expected)
    for expert in ("high_noise", "low_noise"):
        assert (tmp_path / "b" / "adapters" / "step-00000008" / f"{expert}.safetensors").is_file()


def test_a_fresh_run_refuses_a_folder_with_checkpoints_and_resume_trims_the_step_log(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=4, save_every=2)
    run(make_trainer(recipe, total_steps=3))  # checkpoints at 2 and 3; metrics.jsonl has steps 0..2
    with pytest.raises(FileExistsError, match="--resume latest"):
        run(make_trainer(recipe), log=False)
    run(make_trainer(recipe), resume=resolve_resume(recipe.training.output_dir, list_checkpoints(
        tmp_path / "run" / "checkpoints")[0]), log=True)  # resume from step 2: steps 2, 3 logged again
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]


def test_a_resume_with_other_steps_names_the_lr_jump_of_a_decaying_schedule(tmp_path):
    """training.steps may change on a resume; a cosine schedule then spans the new length, and the lr the
    next update uses is not the one the checkpointed run planned: train_lora says so, per expert, with both
    values. Unchanged steps, or a constant schedule, say nothing."""
    import dataclasses

    from train.checkpoints import schedule_changes
    from train.recipe import LRScheduleSettings

    recipe = tiny_recipe(tmp_path, steps=8, routing="phased", phase_steps=4, save_every=4)
    cosine = {n: dataclasses.replace(e, lr_schedule=LRScheduleSettings(kind="cosine", warmup_steps=1))
              for n, e in recipe.experts.items()}
    recipe = dataclasses.replace(recipe, experts=cosine)
    run(make_trainer(recipe, total_steps=4), log=False)
    checkpoint = list_checkpoints(tmp_path / "run" / "checkpoints")[0]
    assert schedule_changes(recipe, checkpoint) == []
    longer = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, steps=16))
    notes = schedule_changes(longer, checkpoint)
    assert len(notes) == 1 and notes[0].startswith("high_noise: the cosine lr schedule now spans 8 updates")
    assert "after 4 updates its lr moves from 0 to 0.0183" in notes[0]
    # The resumed run uses the stretched schedule from its first update (the restored optimizer held the old
    # plan's lr, 0, for one update).
    resumed = make_trainer(dataclasses.replace(longer, training=dataclasses.replace(
        longer.training, output_dir=str(tmp_path / "run"))))
    load_checkpoint(resumed, checkpoint)
    records = [resumed.train_step() for _ in range(6)]  # steps 4-7 on low_noise, then 8 and 9 on high_noise
    high = [r["lr"] for r in records if r["expert"] == "high_noise"]
    assert high[0] == pytest.approx(0.0183, rel=5e-3) and high[0] > high[1] > 0  # the note rounds to 3 digits
    constant = {n: dataclasses.replace(e, lr_schedule=LRScheduleSettings(kind="constant")) for n, e in cosine.items()}
    run(make_trainer(dataclasses.replace(recipe, experts=constant, training=dataclasses.replace(
        recipe.training, output_dir=str(tmp_path / "constant"))), total_steps=4), log=False)
    kept = list_checkpoints(tmp_path / "constant" / "checkpoints")[0]
    assert schedule_changes(dataclasses.replace(longer, experts=constant), kept) == []
