"""What every benchmark script prints: one JSON line, optionally also saved for docs/bench/."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch


def device_fields() -> dict:
    """Peak GPU memory since the last reset and the device name (None / 'cpu' on a CPU smoke run)."""
    if not torch.cuda.is_available():
        return {"peak_gib": None, "device": "cpu"}
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "device": torch.cuda.get_device_name()}


def memory_fraction_for(gib: float, device: torch.device) -> float:
    """The `torch.cuda.set_per_process_memory_fraction` that caps this process at `gib` GiB (at most 1)."""
    return min(1.0, gib * 2**30 / torch.cuda.get_device_properties(device).total_memory)


def profiled_kernels(step) -> tuple[list, float]:
    """One more call of `step` under torch.profiler: its GPU kernels (profiler events with device time,
    most expensive first) and the call's wall time in seconds."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(events, key=lambda e: e.self_device_time_total, reverse=True), wall


def emit(result: dict, json_path: Path | None) -> None:
    print(json.dumps(result))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2))


def git_commit() -> str:
    """BENCH_COMMIT when set, else git's HEAD, with "+modified" when tracked files differ from it: the device
    machine's copy of the tree carries an older .git (2026-12-05: a result named 28564e0 for 2012313's tree),
    so a figure never names a commit whose code it did not run."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True, cwd=root)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/bench"],
                                capture_output=True, text=True, cwd=root)
    except OSError:
        return "unknown"
    if head.returncode != 0 or not head.stdout.strip():
        return "unknown"
    clean = status.returncode == 0 and not status.stdout.strip()  # a failing status: not known to be clean
    return head.stdout.strip() if clean else f"{head.stdout.strip()}+modified (set BENCH_COMMIT)"
