"""DeepSpeed ZeRO-2 on CPU (DS_ACCELERATOR=cpu): the per-expert engines train, match the plain loop's first
loss, and leave the idle expert untouched. Runs in a subprocess: accelerate's state is process-global, so a
DeepSpeed Accelerator must not share a process with the plain tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.loop import run

from .test_loop import make_trainer, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys, torch
from pathlib import Path
from tests.train.test_loop import MemorySource, tiny_models, tiny_recipe
from train.loop import Trainer, make_accelerator, run
recipe = tiny_recipe(Path(sys.argv[1]), steps=3, routing="phased", phase_steps=2, deepspeed=sys.argv[2])
acc = make_accelerator(recipe.training)
trainer = Trainer(recipe, tiny_models(recipe), MemorySource("tiny-t2v", batch_size=2), acc)
low_before = trainer.lora_weights("low_noise")
records = [trainer.train_step() for _ in range(2)]  # both on high_noise
low_after = trainer.lora_weights("low_noise")
untouched = all(torch.equal(low_before[k], low_after[k]) for k in low_before)
history = run(trainer, log=False)  # step 3 on low_noise, then checkpoint + export
if acc.is_main_process:
    print("RESULT " + json.dumps({"losses": [h["loss"] for h in history], "untouched": untouched,
                                   "engine": type(trainer.states["high_noise"].model).__name__,
                                   "norms": [r["grad_norm"] for r in records]}))
"""


def run_deepspeed(tmp_path, stage: str, launcher: list[str] | None = None) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "MASTER_PORT": str(29600 + os.getpid() % 300)}
    script = tmp_path / "ds_run.py"
    script.write_text(SCRIPT)
    cmd = (launcher or [sys.executable]) + [str(script), str(tmp_path / "ds"), stage]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_zero2_on_cpu_matches_the_plain_first_loss_and_keeps_the_idle_expert(tmp_path):
    result = run_deepspeed(tmp_path, "zero2")
    plain = run(make_trainer(tiny_recipe(tmp_path / "plain", steps=3, routing="phased", phase_steps=2)), log=False)
    assert result["engine"] == "DeepSpeedEngine"
    assert result["untouched"]
    assert len(result["losses"]) == 3
    assert abs(result["losses"][0] - plain[0]["loss"]) < 1e-5 * abs(plain[0]["loss"])
    assert (tmp_path / "ds" / "run" / "adapters" / "step-00000003" / "high_noise.safetensors").is_file()
    assert (tmp_path / "ds" / "run" / "checkpoints" / "step-00000003" / "low_noise" / "deepspeed").is_dir()
