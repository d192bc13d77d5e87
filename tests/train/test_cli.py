import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bad_recipe_prints_one_error_line_and_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny-t2v}\ndataset: {root: clips}\ntraining: {stpes: 3}\n")
    for command in (["train_lora.py"], ["-m", "train.prepare"]):
        proc = subprocess.run([sys.executable, *command, str(recipe)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error: ")
        assert "training.stpes is not a known key; did you mean 'steps'" in proc.stderr


def test_sample_mistakes_print_one_error_line_and_exit_2(tmp_path):
    """sample.py and sample.py evaluate: each user mistake is one `error:` line naming the fix, exit 2."""
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file")
    lora = tmp_path / "good.safetensors"
    import torch
    from safetensors.torch import save_file
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 64),
               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(64, 4)}, str(lora))
    suite = tmp_path / "suite.yaml"
    suite.write_text("prompts:\n  - prompt: 'a fox'\n    seeds: [zero]\n")
    base = ["sample.py", "--release", str(release), "--prompt", "a fox", "--size", "32x32", "--frames", "5",
            "--steps", "1", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "out")]
    cases = {
        "missing LoRA": (base + ["--lora", str(tmp_path / "nope.safetensors")], "does not exist"),
        "corrupt LoRA": (base + ["--lora", str(corrupt)], "--lora"),
        "strength abc": (base + ["--lora", f"{lora}:abc"], "is not a number"),
        "unknown expert": (base + ["--lora", f"{lora}@middle_noise"], "@middle_noise: this model has no expert"),
        "missing release": (["sample.py", "--release", str(tmp_path / "none"), "--prompt", "x"], "no such folder"),
        "bad suite": (["sample.py", "evaluate", "--release", str(release), "--suite", str(suite)], "suite"),
    }
    for what, (command, expected) in cases.items():
        proc = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, what
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and expected in lines[-1], (what, lines)


def test_run_cli_ends_the_process_group_after_main_returns(tmp_path):
    """A process group formed by the run ends once main has returned, also after a user error: left to the
    interpreter's exit, a finished two-process gloo run aborted now and then (train.cli.end_process_group)."""
    import torch.distributed as dist

    from data.typed_config import ConfigError
    from train.cli import run_cli

    def forms_group(fail: bool):
        def main(_argv):
            dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg-{fail}", rank=0, world_size=1)
            assert dist.is_initialized()
            if fail:
                raise ConfigError("bad recipe")
            return 0
        return main

    assert run_cli(forms_group(False)) == 0 and not dist.is_initialized()
    assert run_cli(forms_group(True)) == 2 and not dist.is_initialized()


def test_a_refused_run_keeps_the_recipe_in_the_run_folder_and_prints_one_error_line(tmp_path):
    """train_lora.py on an output_dir that holds another run's checkpoints, without --resume or with --resume
    of a different recipe, is refused, before any weights load: one `error:` line, exit 2, and the run's
    recipe.yaml (what the evaluation report shows) is the recipe that trained it. It was overwritten by the
    new recipe before the refusal, and the different-recipe refusal was a ValueError traceback."""
    import yaml

    from tests.train.test_checkpoints import _tiny_run

    recipe = _tiny_run(tmp_path, steps=2, out="run")
    proc = subprocess.run([sys.executable, "train_lora.py", str(recipe)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept = (tmp_path / "run" / "recipe.yaml").read_text()
    assert kept == recipe.read_text()
    body = yaml.safe_load(recipe.read_text())
    body["training"]["seed"] = 7  # defines the trajectory: a different recipe
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(body))
    for path, extra, expected in ((other, [], "--resume latest"), (other, ["--resume", "latest"], "different recipe"),
                                  (other, ["--resume", str(tmp_path / "run" / "checkpoints" / "step-00000002")],
                                   "different recipe"),
                                  # the finished run resumed: it re-exported its adapters, silently
                                  (recipe, ["--resume", "latest"], "this run stops at step 2 (training.steps")):
        proc = subprocess.run([sys.executable, "train_lora.py", str(path), *extra], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (extra, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and expected in lines[-1], (extra, lines)
        assert (tmp_path / "run" / "recipe.yaml").read_text() == kept, extra
    # A finished run whose final export did not happen (killed between checkpoint and export): the resume
    # exports it, the way to recover it.
    import shutil

    shutil.rmtree(tmp_path / "run" / "adapters" / "step-00000002")
    proc = subprocess.run([sys.executable, "train_lora.py", str(recipe), "--resume", "latest"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "adapters" / "step-00000002" / "low_noise.safetensors").is_file()


def test_sample_out_with_a_dot_writes_that_name_with_the_frames_and_fps(tmp_path):
    """--out is a path without extension: 'fox-0.5' writes fox-0.5.mp4 (it wrote fox-0.mp4, and
    'fox-0.8' then overwrote it); the mp4 has the requested frames at the preset's fps."""
    import av

    import sample
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    for out in ("fox-0.5", "fox-0.8", "fox.mp4"):
        assert sample.main(["--release", str(release), "--prompt", "a fox", "--size", "32x32", "--frames", "5",
                            "--steps", "1", "--device", "cpu", "--dtype", "float32",
                            "--out", str(tmp_path / out)]) == 0
    assert sorted(p.name for p in tmp_path.glob("fox*")) == [
        "fox-0.5.mp4", "fox-0.5.png", "fox-0.8.mp4", "fox-0.8.png", "fox.mp4", "fox.png"]
    with av.open(str(tmp_path / "fox-0.5.mp4")) as container:
        assert container.streams.video[0].average_rate == 16
        assert sum(1 for _ in container.decode(video=0)) == 5


def test_i2v_without_image_is_one_error_naming_the_option_before_loading_weights(tmp_path, monkeypatch):
    import pytest

    import sample
    import wan_model.pipeline
    from train.cli import UsageError
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-i2v")

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the missing --image was reported")

    monkeypatch.setattr(wan_model.pipeline, "load_pipeline", no_load)
    with pytest.raises(UsageError, match="--image"):
        sample.main(["--release", str(release), "--prompt", "a fox", "--size", "32x32", "--frames", "5",
                     "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "out")])


def test_lora_folder_at_an_expert_applies_that_experts_file_only(tmp_path, capsys):
    """`--lora adapters/step-N@high_noise` (our export folder, one file per expert) puts high_noise.safetensors
    on the high-noise expert; it used to stack low_noise.safetensors on the high-noise expert as well."""
    import sample
    from tests.wan_model.test_pipeline import random_lora
    from wan_model.config import PRESETS
    from wan_model.lora_formats import META_EXPERT, save_lora
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    step = tmp_path / "step-00000002"
    for seed, expert in enumerate(("high_noise", "low_noise")):
        save_lora(random_lora(PRESETS["tiny-t2v"].transformer, seed=seed), step / f"{expert}.safetensors",
                  {META_EXPERT: expert})
    assert sample.main(["--release", str(release), "--prompt", "a fox", "--size", "32x32", "--frames", "5",
                        "--steps", "1", "--device", "cpu", "--dtype", "float32", "--lora", f"{step}@high_noise",
                        "--out", str(tmp_path / "out")]) == 0
    applied = [line for line in capsys.readouterr().out.splitlines() if line.startswith("LoRA ")]
    assert len(applied) == 1 and "high_noise.safetensors" in applied[0] and applied[0].endswith("-> high_noise")


def test_sample_image_sets_the_shape_within_the_size_and_exact_size_keeps_it(tmp_path, capsys, monkeypatch):
    """TI2V with a portrait image at --size 32x64 renders 64x32 (the official sizing, and says so);
    --exact-size renders 32x64; no --size renders the preset's sample_size; --guide LOW,HIGH on the dense
    model is one error before any weight loads."""
    import av
    import numpy as np
    import pytest
    from PIL import Image

    import sample
    import wan_model.pipeline
    from train.cli import UsageError
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-ti2v")
    image = tmp_path / "portrait.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 48, 3), dtype=np.uint8)).save(image)
    base = ["--release", str(release), "--prompt", "a fox", "--frames", "5", "--steps", "1", "--device", "cpu",
            "--dtype", "float32"]

    def size_of(out):
        with av.open(str(out.with_suffix(".mp4"))) as container:
            stream = container.streams.video[0]
            return stream.height, stream.width

    assert sample.main(base + ["--image", str(image), "--size", "32x64", "--out", str(tmp_path / "fit")]) == 0
    assert size_of(tmp_path / "fit") == (64, 32) and "rendered 64x32" in capsys.readouterr().out
    assert sample.main(base + ["--image", str(image), "--size", "32x64", "--exact-size",
                               "--out", str(tmp_path / "exact")]) == 0
    assert size_of(tmp_path / "exact") == (32, 64) and "rendered" not in capsys.readouterr().out
    with pytest.raises(UsageError, match="--exact-size sizes an image-conditioned video"):
        sample.main(base + ["--exact-size", "--out", str(tmp_path / "no-image")])
    assert sample.main(base + ["--out", str(tmp_path / "default")]) == 0
    assert size_of(tmp_path / "default") == (64, 64)  # tiny-ti2v's sample_size (704x1280 for TI2V-5B)

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the --guide mistake was reported")

    monkeypatch.setattr(wan_model.pipeline, "load_pipeline", no_load)
    with pytest.raises(UsageError, match="one model"):
        sample.main(base + ["--guide", "3,5", "--out", str(tmp_path / "guide")])
