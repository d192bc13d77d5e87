"""Training logs: TensorBoard scalars, `metrics.jsonl` (the loss curve for the report), a tqdm bar.

    outputs/<run>/logs/      TensorBoard: loss/<expert>, loss_by_t/<lo>-<hi> (10 buckets of 100 train
                             timesteps), lr/<expert>, grad_norm/<expert>, perf/steps_per_s, perf/memory_gb,
                             perf/swap_s
                             validation/<expert>, validation_by_t/<expert>/t<band centre> (held-out loss)
    outputs/<run>/metrics.jsonl  one JSON line per step: step, expert, loss, grad_norm, lr, skipped; and one
                             per validation pass: step (the last step done), steps_done, validation
Only the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

BUCKET = 100  # train timesteps per loss bucket: [0, 100), ..., [900, 1000)


def timestep_buckets(timesteps: list[float], losses: list[float]) -> dict[str, list[float]]:
    """Group per-sample losses by timestep bucket: {'000-100': [...], ...} (only buckets that occur)."""
    out: dict[str, list[float]] = defaultdict(list)
    for t, loss in zip(timesteps, losses):
        lo = min(int(t) // BUCKET, 9) * BUCKET
        out[f"{lo:03d}-{lo + BUCKET:03d}"].append(loss)
    return dict(out)


def _row(line: str) -> dict | None:
    """One metrics.jsonl line, or None for a blank or half-written one (a kill during the write)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and "step" in row else None


def _open_jsonl(path: Path, start_step: int):
    """Open the step log for appending from `start_step`: lines of later steps (logged after the checkpoint a
    run resumes from) are dropped first, atomically, so every step appears once."""
    if path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if (row := _row(line)) is not None and row["step"] < start_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")


class MetricsLogger:
    """Per-step logging; `log_every` steps are averaged into each TensorBoard point."""

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int, log_every: int, enabled: bool):
        self.enabled = enabled
        self.log_every = log_every
        self.pending: list[dict] = []
        self.last_time = time.perf_counter()
        self.last_step = start_step
        self.writer = self.bar = self.jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(out / "logs"))
        self.jsonl = _open_jsonl(out / "metrics.jsonl", start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        line = {k: record[k] for k in ("step", "expert", "loss", "grad_norm", "lr", "skipped")}
        if record.get("clip_ids"):
            line["clip_ids"] = record["clip_ids"]
        self.jsonl.write(json.dumps(line) + "\n")
        self.jsonl.flush()
        self.bar.update(1)
        self.bar.set_postfix(expert=record["expert"], loss=f"{record['loss']:.4f}")
        self.pending.append(record)
        if record["swap_s"]:
            self.writer.add_scalar("perf/swap_s", record["swap_s"], record["step"])
        if len(self.pending) >= self.log_every:
            self.flush()

    def flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        step = self.pending[-1]["step"]
        by_expert: dict[str, list[dict]] = defaultdict(list)
        for r in self.pending:
            by_expert[r["expert"]].append(r)
        for name, records in by_expert.items():
            good = [r for r in records if not r["skipped"]]
            if good:
                self.writer.add_scalar(f"loss/{name}", sum(r["loss"] for r in good) / len(good), step)
                self.writer.add_scalar(f"grad_norm/{name}", sum(r["grad_norm"] for r in good) / len(good), step)
            self.writer.add_scalar(f"lr/{name}", records[-1]["lr"], step)
        ts = [t for r in self.pending if not r["skipped"] for t in r["timesteps"]]
        ls = [x for r in self.pending if not r["skipped"] for x in r["sample_losses"]]
        for bucket, values in timestep_buckets(ts, ls).items():
            finite = [v for v in values if math.isfinite(v)]
            if finite:
                self.writer.add_scalar(f"loss_by_t/{bucket}", sum(finite) / len(finite), step)
        now = time.perf_counter()
        self.writer.add_scalar("perf/steps_per_s", (step + 1 - self.last_step) / max(now - self.last_time, 1e-9), step)
        if torch.cuda.is_available():
            self.writer.add_scalar("perf/memory_gb", torch.cuda.max_memory_allocated() / 2**30, step)
        self.last_time, self.last_step = now, step + 1
        self.pending = []
        self.writer.flush()

    def log_validation(self, record: dict) -> None:
        """A validation pass ({"step", "steps_done", "experts": {name: {"loss", "bands"}}}): one metrics.jsonl
        line and TensorBoard validation/<expert> and validation_by_t/<expert>/<band centre>."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": record["step"], "steps_done": record["steps_done"],
                                     "validation": record["experts"]}) + "\n")
        self.jsonl.flush()
        for name, result in record["experts"].items():
            self.writer.add_scalar(f"validation/{name}", result["loss"], record["steps_done"])
            for centre, loss in result["bands"].items():
                self.writer.add_scalar(f"validation_by_t/{name}/t{int(centre):04d}", loss, record["steps_done"])
        self.writer.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        self.writer.close()
        self.jsonl.close()
        self.bar.close()
