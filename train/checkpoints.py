"""Training checkpoints: everything a run needs to continue on the exact same loss trajectory.

    output_dir/checkpoints/step-00000250/
      state.json                   step, recipe hash, per-expert update counts, loss history, data position
      rng-rank<k>.pt               python / numpy / torch / cuda RNG states of process k
      fp8-scaling-rank<k>.safetensors  (speed.attention_backend: cudnn_fp8) each expert's FP8 attention
                                   scaling states on process k, [blocks, 8]: the amaxes its delayed scales come from,
                                   which each process keeps for itself (DDP broadcasts no buffer)
      <expert>/adapter.safetensors LoRA weights (in-model names, fp32)
      <expert>/optimizer.pt        AdamW state;  <expert>/scheduler.pt  LR schedule state
      <expert>/deepspeed/          (DeepSpeed runs) the engine's checkpoint, frozen base weights excluded

Written to `step-N.tmp/`, every file fsynced, then renamed to `step-N/` (a rename is atomic), so a
crash leaves either a whole checkpoint or a `.tmp` folder that is ignored and cleared. state.json, written
last, holds every other file's sha256: a checkpoint truncated or altered later is refused on resume
(CheckpointError naming the file), never loaded. A failed write (disk full) leaves the earlier checkpoints.
The data position is the step itself: micro-batch i of a run is `source.batch(i)` and every random draw is
seeded by the step (train/experts.py), so nothing else about the data needs storing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wan_model.cudnn_fp8_attention import scaling_states

from .recipe import recipe_hash

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or is damaged; the message names the file and the way out."""


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (`.tmp` folders are not complete)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(output_dir: str | os.PathLike, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint of the run; else a checkpoint folder path."""
    if resume == "latest":
        found = list_checkpoints(checkpoint_root(output_dir))
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_root(output_dir)}; "
                                    f"start without --resume or pass a checkpoint folder")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: {path / 'state.json'} not found; pass a step-N folder "
                                f"from <output_dir>/checkpoints or 'latest'")
    return path


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` but state.json, by path relative to `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "state.json"}


def verify_checkpoint(path: Path) -> dict:
    """state.json of checkpoint `path` after checking every file against its recorded sha256."""
    try:
        meta = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({err}); resume from an earlier checkpoint "
                              f"folder in {path.parent}") from None
    for relative, digest in meta.get("sha256", {}).items():
        file = path / relative
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise CheckpointError(f"{file}: {'missing' if not file.is_file() else 'does not match its sha256'} in "
                                  f"{path / 'state.json'} (truncated or corrupted); resume from an earlier "
                                  f"checkpoint folder in {path.parent}")
    return meta


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP


def _expert_scaling_states(trainer) -> dict[str, torch.Tensor]:
    """Each expert's FP8 attention scaling states, stacked [blocks, STATE_SIZE] on the host; experts without
    them (other attention backends) are left out. A resume without them would calibrate every block again:
    other scales than the uninterrupted run's, so another loss trajectory."""
    stacked = {}
    for name, state in trainer.states.items():
        states = scaling_states(_unwrapped(state.model))
        if states:
            stacked[name] = torch.stack(states).cpu()
    return stacked


def _restore_scaling_states(trainer, path: Path) -> None:
    """Back into the experts' scaling states (the recipe hash already matched: same blocks, same backend). A
    checkpoint from before they were saved has none: they calibrate again, as resumes then did."""
    file = path / f"fp8-scaling-rank{trainer.accelerator.process_index}.safetensors"
    if not file.is_file():
        return
    saved = load_file(str(file))
    with torch.no_grad():
        for name, state in trainer.states.items():
            for live, value in zip(scaling_states(_unwrapped(state.model)), saved.get(name, ())):
                live.copy_(value)


def save_checkpoint(trainer, keep_last: int) -> Path:
    """Write the trainer's state at its current step (collective: every process calls it). Refuses to
    write non-finite LoRA weights. Returns the final folder."""
    root = checkpoint_root(trainer.settings.output_dir)
    final = root / f"step-{trainer.step:08d}"
    tmp = root / f"step-{trainer.step:08d}.tmp"
    weights = {name: trainer.lora_weights(name) for name in trainer.states}
    for name, tensors in weights.items():
        bad = [k for k, v in tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise RuntimeError(f"refusing to checkpoint step {trainer.step}: expert {name} LoRA weights {bad[:3]} "
                               f"are not finite; resume from {list_checkpoints(root)[-1:] or 'the start'}")
    try:
        return _write_checkpoint(trainer, weights, root, tmp, final, keep_last)
    except OSError as err:  # disk full, quota, folder gone: the earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{tmp}: cannot write the step {trainer.step} checkpoint ({err.strerror or err}); the "
                              f"last good one is {(list_checkpoints(root)[-1:] or ['none'])[0]}; free space in "
                              f"{root} and continue with --resume latest") from err


def _write_checkpoint(trainer, weights: dict, root: Path, tmp: Path, final: Path, keep_last: int) -> Path:
    acc = trainer.accelerator
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    scaling = _expert_scaling_states(trainer)
    if scaling:
        save_file(scaling, str(tmp / f"fp8-scaling-rank{acc.process_index}.safetensors"))
    for name, state in trainer.states.items():
        folder = tmp / name
        if state.engine is not None:
            state.engine.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        if acc.is_main_process:
            folder.mkdir(exist_ok=True)
            save_file(weights[name], str(folder / "adapter.safetensors"))
            if state.engine is None:
                torch.save(state.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(state.scheduler.state_dict(), folder / "scheduler.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        meta = {"step": trainer.step, "recipe_hash": recipe_hash(trainer.recipe),
                "updates": {n: s.updates for n, s in trainer.states.items()},
                "nonfinite_in_a_row": trainer.nonfinite_in_a_row, "processes": acc.num_processes,
                "data_position": {"micro_batches": trainer.step * trainer.settings.grad_accum},
                "history": trainer.history, "validation": trainer.validation_history,
                "sha256": _file_hashes(tmp)}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def load_checkpoint(trainer, path: Path) -> None:
    """Restore the trainer from a checkpoint folder written by `save_checkpoint` for the same recipe."""
    meta = verify_checkpoint(Path(path))
    expected = recipe_hash(trainer.recipe)
    if meta["recipe_hash"] != expected:
        raise ValueError(f"{path}: written by a different recipe (hash {meta['recipe_hash']}, this one {expected}); "
                         f"only training.steps, the logging, preview and output keys, speed.memory_gib and "
                         f"validation.every/timesteps/max_items may change between a run and its resume")
    if meta["processes"] != trainer.accelerator.num_processes:
        raise ValueError(f"{path}: written by {meta['processes']} processes, resumed with "
                         f"{trainer.accelerator.num_processes}; the data order would change; use the same count")
    for name, state in trainer.states.items():
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: no state for training expert {name!r}; was it frozen in that run?")
        if state.engine is not None:
            state.engine.load_checkpoint(str(folder / "deepspeed"), tag="state", load_module_strict=False)
        else:
            saved = load_file(str(folder / "adapter.safetensors"))
            inner = getattr(state.model, "module", state.model)
            params = dict(inner.named_parameters())
            with torch.no_grad():
                for key, value in saved.items():
                    params[key].copy_(value)
            state.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))
        scheduler = state.scheduler
        scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
        # The next update's lr from this run's schedule: the saved one when training.steps is unchanged; the
        # stretched schedule's when it changed (the restored optimizer holds the old plan's lr; see
        # schedule_changes). The same expression as LambdaLR's own step.
        scheduler._last_lr = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs,
                                                                                  scheduler.lr_lambdas)]
        for group, lr in zip(state.optimizer.param_groups, scheduler._last_lr):
            group["lr"] = lr
        state.updates = meta["updates"][name]
    trainer.step = meta["step"]
    trainer.history = meta["history"]
    trainer.validation_history = meta.get("validation", [])  # checkpoints written before validation existed
    trainer.nonfinite_in_a_row = meta["nonfinite_in_a_row"]
    set_rng_state(torch.load(path / f"rng-rank{trainer.accelerator.process_index}.pt", weights_only=False))
    _restore_scaling_states(trainer, path)


def schedule_changes(recipe, checkpoint: Path) -> list[str]:
    """training.steps may change on a resume, and a linear or cosine lr schedule then spans the new length
    (load_checkpoint): one line per expert whose next lr is not the one the checkpointed run planned."""
    from .experts import experts_from_recipe, planned_updates
    from .lora import lr_factor

    experts = [e for e in experts_from_recipe(recipe) if e.trains]
    planned = planned_updates(experts, recipe.training, recipe.training.steps)
    notes = []
    for expert in experts:
        path = Path(checkpoint) / expert.name / "scheduler.pt"
        if not path.is_file():
            continue
        saved = torch.load(path, weights_only=False)  # LambdaLR's state: last_epoch updates done, _last_lr next
        updates, before = saved.get("last_epoch"), (saved.get("_last_lr") or [None])[0]
        if updates is None or before is None:
            continue
        base = (saved.get("base_lrs") or [expert.optimizer.lr])[0]
        now = base * lr_factor(updates, expert.lr_schedule, planned[expert.name])
        if abs(now - before) > 1e-6 * max(abs(before), 1e-12):
            notes.append(f"{expert.name}: the {expert.lr_schedule.kind} lr schedule now spans "
                         f"{planned[expert.name]} updates (training.steps {recipe.training.steps}); after "
                         f"{updates} updates its lr moves from {before:.3g} to {now:.3g}")
    return notes
