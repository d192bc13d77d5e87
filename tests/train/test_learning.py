"""Adapters learn what they are shown, end to end on the CPU (issue 15).

Six demo clips share one look (data/demo_clips.py grade 'mystyle': a violet cast over diagonal bands).
The tiny release (random transformers, the colour-preserving tiny VAE of wan_model/colour_vae.py) is
prepared, both experts' adapters are trained through train_lora.py's path (recipes/quickstart.yaml with
its paths moved here and previews off), and a prompt suite is rendered through the bundled sampler with
and without the adapters, same prompts and seeds (train/evaluate.py). Measured: the palette distance of
the renders to the training clips (mean R, G, B, brightness, saturation, warmth).

  * the adapters close at least half of the base renders' distance;
  * ablations: at 8 sampling steps with the T2V shift 12, the high-noise expert runs sigma 1 -> 0.88 and
    the low-noise expert the rest, where the colour is decided: low alone closes most of it, high alone
    little, both at least as much as low alone;
  * a flipped convention fails the same check: the sign of the training target (x0 - eps for eps - x0)
    and the sign of the LoRA scale at load (strength -1) each leave less than half closed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["mystyle, a bright ball rolling across a wooden floor", "mystyle, a slow pan over a stone wall"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny release, the style clips and their cache, shared by the module's runs."""
    from data.demo_clips import render_demo_dataset
    from train.prepare import main as prepare_main
    from wan_model.tiny_release import write_tiny_release

    root = tmp_path_factory.mktemp("learning")
    write_tiny_release(root / "release", "tiny-t2v")
    render_demo_dataset(root / "clips", grade="mystyle")
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    recipe["model"]["release"] = str(root / "release")
    recipe["dataset"].update(root=str(root / "clips"), cache_dir=str(root / "cache"))
    recipe["training"].update(sample_every=0, sample_prompts=[])
    (root / "base.yaml").write_text(yaml.safe_dump(recipe))
    assert prepare_main([str(root / "base.yaml"), "--no-progress"]) == 0
    return root


def train_run(world: Path, name: str) -> Path:
    """Train the quickstart recipe into world/name; returns the final adapters folder."""
    import train_lora

    recipe = yaml.safe_load((world / "base.yaml").read_text())
    recipe["training"]["output_dir"] = str(world / name)
    path = world / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train_lora.main([str(path)]) == 0
    return sorted((world / name / "adapters").glob("step-*"))[-1]


def render(world: Path, variants, out: str) -> dict:
    """Palette summary (train/evaluate.py summarise) of the suite rendered with each variant."""
    import json

    from train.evaluate import SuiteEntry, evaluate
    from wan_model.pipeline import load_pipeline

    pipe = load_pipeline(world / "release", "tiny-t2v", device="cpu", dtype=torch.float32)
    suite = [SuiteEntry(prompt=p, seeds=[0, 1], height=64, width=64, frames=9, steps=8) for p in PROMPTS]
    evaluate(pipe, suite, variants, world / out, clips_dir=world / "clips")
    return json.loads((world / out / "metrics.json").read_text())["summary"]["variants"]


@pytest.fixture(scope="module")
def trained(world):
    return train_run(world, "run")


def test_adapters_close_half_the_palette_distance_with_sensible_ablations(world, trained):
    from train.evaluate import Variant

    variants = [Variant("base"), Variant("both", [trained]), Variant("high_only", [trained / "high_noise.safetensors"]),
                Variant("low_only", [trained / "low_noise.safetensors"])]
    result = render(world, variants, "eval")
    d = {name: v["palette_distance"] for name, v in result.items()}
    print("palette distance to the training clips:", {k: round(v, 1) for k, v in d.items()})
    assert result["both"]["closed"] >= 0.5, d
    assert d["low_only"] < 0.6 * d["base"], d  # the low-noise expert decides the colour at these settings
    assert d["low_only"] < d["high_only"], d
    assert d["high_only"] <= d["base"] * 1.05, d  # the high-noise adapter alone does not push away
    assert d["both"] <= d["low_only"] * 1.05, d  # both at least as close as the better one alone


def test_lora_scale_sign_flipped_at_load_fails_the_check(world, trained):
    from train.evaluate import Variant

    result = render(world, [Variant("base"), Variant("negated", [trained], strength=-1.0)], "eval-negated")
    print("strength -1:", result)
    assert result["negated"]["closed"] < 0.5, result


def test_target_sign_flipped_in_training_fails_the_check(world, monkeypatch):
    import train.objective
    from train.evaluate import Variant

    monkeypatch.setattr(train.objective, "flow_target", lambda x0, noise: x0 - noise)
    flipped = train_run(world, "flipped")
    result = render(world, [Variant("base"), Variant("flipped", [flipped])], "eval-flipped")
    print("target flipped:", result)
    assert result["flipped"]["closed"] < 0.5, result


def test_validation_is_logged_and_the_best_step_named(world, trained):
    import json

    run = trained.parents[1]
    summary = json.loads((run / "summary.json").read_text())
    passes = summary["validation"]
    assert [p["steps_done"] for p in passes] == [50, 100, 150, 200]
    assert set(summary["best_validation"]) == {"high_noise", "low_noise"}
    for name, best in summary["best_validation"].items():
        assert best["loss"] == min(p["experts"][name]["loss"] for p in passes)
        assert len(passes[0]["experts"][name]["bands"]) == 4
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("validation" in line for line in lines) == 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "logs"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"validation/high_noise", "validation/low_noise"} <= set(tags)
    assert [e.step for e in events.Scalars("validation/low_noise")] == [50, 100, 150, 200]
    assert sum(t.startswith("validation_by_t/low_noise/") for t in tags) == 4
    # The low-noise expert trained from step 50 on: its held-out loss fell from the first pass.
    assert passes[-1]["experts"]["low_noise"]["loss"] < passes[0]["experts"]["low_noise"]["loss"]
    card = (trained / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "instance_prompt: mystyle" in card
    assert "[875, 1000)" in card and "[0, 875)" in card and "load_into_transformer_2" not in card  # no hub model
    assert "5 clips used" in card and "validation loss at this step" in card


def test_resume_keeps_the_validation_set_and_noise(world, trained):
    """A run stopped at step 100 and resumed gives the straight run's validation passes exactly."""
    import json

    import train_lora

    recipe = yaml.safe_load((world / "base.yaml").read_text())
    recipe["training"]["output_dir"] = str(world / "resumed")
    path = world / "resumed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train_lora.main([str(path), "--max-steps", "100"]) == 0
    assert train_lora.main([str(path), "--resume", "latest"]) == 0
    straight = json.loads((trained.parents[1] / "summary.json").read_text())["validation"]
    resumed = json.loads((world / "resumed" / "summary.json").read_text())["validation"]
    assert resumed == straight


def test_train_lora_plans_memory_for_the_caches_largest_bucket(world, capsys):
    """speed.save_attention: auto through train_lora.py: the plan is made for the largest cached bucket
    (its tokens from the preset's strides), logged, and written to summary.json."""
    import json

    import train_lora
    from data.buckets import bucket_size
    from data.dataset import CachedDataset
    from wan_model.config import get_preset

    recipe = yaml.safe_load((world / "base.yaml").read_text())
    recipe["training"].update(output_dir=str(world / "auto"), gradient_checkpointing=True)
    recipe["speed"] = dict(compile=False, save_attention="auto", host_checkpoints="auto", fp8_base="none",
                           memory_gib=4.0)
    path = world / "auto.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train_lora.main([str(path), "--max-steps", "2"]) == 0
    plans = json.loads((world / "auto" / "summary.json").read_text())["memory_plan"]
    assert set(plans) == {"high_noise", "low_noise"}
    # Both experts stay resident on a CPU run: each plans within 4 GiB less what the other one keeps.
    assert all(4.0 - 0.01 < p["budget_gib"] < 4.0 for p in plans.values())
    preset = get_preset("tiny-t2v")
    buckets = set(CachedDataset(recipe["dataset"]["cache_dir"]).buckets)
    tokens = max(preset.video_tokens(h, w, f) for w, h, f in map(bucket_size, buckets))
    batch = recipe["training"].get("batch_size", 1)
    inputs_gib = preset.transformer.num_layers * tokens * batch * preset.transformer.dim * 2 / 2**30
    assert plans["high_noise"]["parts_gib"]["inputs"] == round(inputs_gib, 2)
    out = capsys.readouterr()
    assert "memory plan:" in out.out + out.err


def test_train_lora_asks_for_expandable_cuda_segments_and_keeps_a_users_setting():
    import os
    import subprocess
    import sys

    code = "import os, train_lora; print(os.environ['PYTORCH_CUDA_ALLOC_CONF'])"
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_CUDA_ALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "expandable_segments:True"
    env["PYTORCH_CUDA_ALLOC_CONF"] = "max_split_size_mb:128"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "max_split_size_mb:128"
