"""SIGKILL at a random step, then `--resume latest`: the loss sequence and the exported adapters equal an
uninterrupted run's bit for bit (CPU, fp32). The lock the killed run left is taken over."""

from __future__ import annotations

import json
import random
import signal

import pytest
import torch
from safetensors.torch import load_file

import train_lora
from train.checkpoints import list_checkpoints

from . import STEPS, adapters, losses, recipe, same_adapters, shared_runs, start_training, wait_for_step


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_is_bitwise_the_straight_run(tmp_path_factory):
    base = shared_runs(tmp_path_factory)
    killed, out = recipe(base, "killed"), base / "killed"
    kill_after = random.Random().randint(3, STEPS - 1)  # steps logged before the kill; first checkpoint at 2
    # Held at step kill_after whatever the load; the kill may still land inside the checkpoint write before it.
    proc = start_training(killed, hold_from=kill_after)
    wait_for_step(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL

    done, logged = list_checkpoints(out / "checkpoints"), len(losses(out))  # a loaded machine may pass kill_after
    assert done and int(done[-1].name.split("-")[1]) <= logged < STEPS, (logged, done)
    assert json.loads((out / ".lock").read_text())["pid"] == proc.pid  # left behind by the kill
    assert train_lora.main([str(killed), "--resume", "latest"]) == 0

    straight = base / "straight"
    assert losses(out) == losses(straight) and len(losses(out)) == STEPS, f"killed after step {logged}"
    assert adapters(out, STEPS) and same_adapters(adapters(out, STEPS), adapters(straight, STEPS))
    ends = list_checkpoints(out / "checkpoints")[-1], list_checkpoints(straight / "checkpoints")[-1]
    for expert in ("high_noise", "low_noise"):
        a, b = (load_file(str(end / expert / "adapter.safetensors")) for end in ends)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), expert
    assert not (out / ".lock").exists()
