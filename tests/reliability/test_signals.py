"""Graceful stop through train_lora.py: SIGTERM/SIGINT -> checkpoint at the current step, exit 0 within
seconds, `--resume latest` finishes on the straight run's losses; a second signal exits at once; a second
run into a folder in use is refused naming the owner's pid and host."""

from __future__ import annotations

import signal
import socket
import time

import pytest

import train_lora
from train.checkpoints import list_checkpoints
from train.run_guard import RunLockedError

from . import (STEPS, adapters, losses, recipe, same_adapters, shared_runs, start_training, wait_for_step,
               wait_until_held)


@pytest.mark.slow
def test_first_signal_checkpoints_and_exits_cleanly_then_resume_finishes(tmp_path_factory):
    """SIGINT takes the same handler (tests/train/test_run_guard.py); one subprocess run is enough here."""
    base = shared_runs(tmp_path_factory)
    signum = signal.SIGTERM
    path, out = recipe(base, "stopped"), base / "stopped"
    proc = start_training(path)
    wait_for_step(proc, out, 3)
    sent = time.time()
    proc.send_signal(signum)
    assert proc.wait(timeout=20) == 0, proc.stdout.read()
    seconds = time.time() - sent
    text = proc.stdout.read()
    stopped_at = len(losses(out))
    assert 3 <= stopped_at < STEPS, text
    assert list_checkpoints(out / "checkpoints")[-1].name == f"step-{stopped_at:08d}"
    assert "continue with --resume latest" in text and seconds < 10, (seconds, text)
    assert not (out / ".lock").exists()

    assert train_lora.main([str(path), "--resume", "latest"]) == 0
    assert losses(out) == losses(base / "straight")
    assert same_adapters(adapters(out, STEPS), adapters(base / "straight", STEPS))


@pytest.mark.slow
def test_second_signal_exits_at_once_and_the_last_checkpoint_still_resumes(tmp_path_factory):
    base = shared_runs(tmp_path_factory)
    path, out = recipe(base, "twice"), base / "twice"
    proc = start_training(path, hold_from=3)  # step 3 is held: both signals land inside it
    wait_until_held(proc, path)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM, proc.stdout.read()
    assert time.time() - sent < 3
    assert "exiting now" in proc.stdout.read()
    assert list_checkpoints(out / "checkpoints"), "the step-2 checkpoint must survive"
    assert train_lora.main([str(path), "--resume", "latest"]) == 0
    assert losses(out) == losses(base / "straight")


@pytest.mark.slow
def test_second_run_into_the_same_output_folder_is_refused_with_owner(tmp_path_factory):
    base = shared_runs(tmp_path_factory)
    path = recipe(base, "locked")
    proc = start_training(path, hold_from=1)  # holds the lock while the second run starts
    try:
        wait_until_held(proc, path)
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on host {socket.gethostname()}"):
            train_lora.main([str(path)])
    finally:
        proc.kill()
        proc.wait()
