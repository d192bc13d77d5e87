"""Reliability tests (issue 9): faults, bad inputs and interruptions lose nothing. Shared helpers for
driving `train_lora.py` in a subprocess on the tiny release and cache of tests/train/test_checkpoints.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

# Each step sleeps first, so a signal or a kill lands between known steps on a loaded 2-core machine;
# the sleep changes no number. Threads are pinned to the test process's count: same reductions, same bits.
_SLOW_TRAIN = """
import pathlib, sys, time, torch
torch.set_num_threads({threads})
import train.loop as loop
step = loop.Trainer.train_step
def held(self):
    pathlib.Path({marker!r}).touch()  # inside train_step: a signal now is a signal mid-step
    time.sleep(600)
loop.Trainer.train_step = lambda self: (time.sleep({delay}) if self.step < {hold_from} else held(self), step(self))[1]
import train_lora
sys.exit(train_lora.main(sys.argv[1:]))
"""


def start_training(recipe: Path, *args: str, delay: float = 0.3, hold_from: int = 10**9) -> subprocess.Popen:
    """`python train_lora.py RECIPE ARGS` with each step delayed by `delay` s, and held (600 s) from step
    `hold_from` on: a run caught mid-step whatever the load; stdout+stderr piped."""
    code = _SLOW_TRAIN.format(threads=torch.get_num_threads(), delay=delay, hold_from=hold_from,
                              marker=str(held_marker(recipe)))
    return subprocess.Popen([sys.executable, "-c", code, str(recipe), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def held_marker(recipe: Path) -> Path:
    """The file a run started by `start_training(recipe, hold_from=k)` creates once it is held in step k."""
    return recipe.with_suffix(".held")


def wait_until_held(proc: subprocess.Popen, recipe: Path, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not held_marker(recipe).exists():
        if proc.poll() is not None or time.time() > end:
            proc.kill()
            raise AssertionError(f"training was never held (exit {proc.returncode}):\n{proc.stdout.read()}")
        time.sleep(0.01)


def logged_steps(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wait_for_step(proc: subprocess.Popen, output_dir: Path, steps: int, timeout: float = 60.0) -> None:
    """Block until metrics.jsonl holds `steps` lines; fail with the run's output if it exits or stalls."""
    end = time.time() + timeout
    while len(logged_steps(output_dir)) < steps:
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before step {steps}:\n{proc.stdout.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"no step {steps} after {timeout} s:\n{proc.stdout.read()}")
        time.sleep(0.01)


def losses(output_dir: Path) -> list[float]:
    return [line["loss"] for line in logged_steps(output_dir)]


def adapters(output_dir: Path, step: int) -> dict[str, tuple[dict, dict]]:
    """Every exported adapter file of `step` (ComfyUI and diffusers formats) -> (tensors, header metadata)."""
    from safetensors import safe_open

    folder = output_dir / "adapters" / f"step-{step:08d}"
    out = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out[path.relative_to(folder).as_posix()] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


def same_adapters(a: dict, b: dict) -> bool:
    """Bitwise-equal tensors and equal metadata in the same files."""
    import torch

    return a.keys() == b.keys() and all(
        a[n][1] == b[n][1] and a[n][0].keys() == b[n][0].keys()
        and all(torch.equal(a[n][0][k], b[n][0][k]) for k in a[n][0]) for n in a)


STEPS = 8  # the shared runs' length; _tiny_run saves every 2 steps
_SHARED: dict[str, Path] = {}


def shared_runs(tmp_path_factory) -> Path:
    """A folder with the tiny release, cache and one uninterrupted run (`straight/`) of STEPS steps, made
    once per session; tests add their own runs next to it with `recipe(base, name)`."""
    if "base" not in _SHARED:
        import train_lora

        base = tmp_path_factory.mktemp("cli")
        assert train_lora.main([str(recipe(base, "straight"))]) == 0
        _SHARED["base"] = base
    return _SHARED["base"]


def recipe(base: Path, name: str) -> Path:
    """Recipe YAML for a STEPS-step run into `base/name`, on `base`'s release and cache."""
    from tests.train.test_checkpoints import _tiny_run

    return _tiny_run(base, steps=STEPS, out=name)
