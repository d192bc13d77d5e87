"""Train per-expert LoRA adapters from a recipe.

    accelerate launch train_lora.py recipes/quickstart.yaml [--resume [PATH|latest]] [--max-steps N]
    python train_lora.py recipes/quickstart.yaml            (one process, no launcher)

Reads the recipe (train/recipe.py), loads the training experts' base weights from the release folder,
reads batches from the prepared latent cache (run `python -m train.prepare RECIPE` first) and runs
train/loop.py. Outputs under training.output_dir: checkpoints/, adapters/, logs/, metrics.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Before torch starts CUDA: expandable segments keep the allocator from fragmenting. The memory plan
# (speed.save_attention: auto) keeps 4% of the budget free for reserved-but-unused memory; with the
# default allocator the A14B 720p step under 80 GiB held 14.9 GiB of it and ran out (63.7 GiB
# allocated), with expandable segments it peaked at 66.8 GiB (docs/benchmarks.md). A user's own
# PYTORCH_CUDA_ALLOC_CONF is kept.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_lora.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="recipe YAML (see recipes/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH|latest",
                        help="continue from a checkpoint folder, or the newest one of the run (default: latest)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this step (the LR schedule still spans training.steps)")
    args = parser.parse_args(argv)

    from data.buckets import bucket_size
    from data.dataset import CachedDataset, make_dataloader
    from train.checkpoints import resolve_resume
    from train.batches import LoaderSource
    from train.loop import Trainer, make_accelerator, run
    from train.recipe import load_recipe, trains
    from train.run_guard import GracefulStop, RunLock, check_output_writable
    from wan_model.checkpoint import load_transformer
    from wan_model.files import atomic_write_text
    from wan_model.release import load_release

    from train.demo import ensure_tiny_inputs

    # A tiny-* recipe (recipes/quickstart.yaml) on a fresh clone: make its release, clips and cache first.
    ensure_tiny_inputs(args.recipe, tell=lambda step, text: print(f"[wanlora] {text}", flush=True))
    recipe = load_recipe(args.recipe)
    s = recipe.training
    if args.max_steps is not None and not 1 <= args.max_steps <= s.steps:
        parser.error(f"--max-steps must be in [1, training.steps = {s.steps}], got {args.max_steps}")
    accelerator = make_accelerator(s)
    # Before any weights load, and before the run folder's recipe.yaml is rewritten below: what run() and
    # load_checkpoint would refuse later (another run's checkpoints without --resume, a checkpoint of a
    # different recipe or process count) is refused here, so a refused command leaves that folder as it was.
    resume = resolve_resume(s.output_dir, args.resume) if args.resume else None
    resumed_at = check_resume(recipe, resume, accelerator.num_processes, args.max_steps)
    if resume is not None and accelerator.is_main_process:
        from train.checkpoints import schedule_changes

        print(f"[wanlora] resuming from {resume} (step {resumed_at})", flush=True)
        for note in schedule_changes(recipe, resume):
            print(f"[wanlora] {note}", flush=True)
    release = load_release(recipe.model.release, recipe.preset.name)
    dtype = torch.bfloat16 if s.precision == "bf16" else torch.float32
    # Loaded on the host; the trainer moves them to the device (or keeps the idle one on the host).
    models = {name: load_transformer(path, dtype=dtype, device="cpu")
              for name, path in release.expert_paths.items() if trains(recipe, name)}
    dataset = CachedDataset(recipe.dataset.cache_dir, seed=recipe.dataset.seed, text_len=recipe.preset.text_len)
    loader = make_dataloader(dataset, s.batch_size, seed=s.seed)
    # Sequence-parallel processes all read the same batches (each takes a share of its tokens).
    sp = s.sequence_parallel > 1
    source = LoaderSource(loader, 0 if sp else accelerator.process_index, 1 if sp else accelerator.num_processes)
    # The largest sample a step can draw: what speed.save_attention: auto plans the memory for.
    max_tokens = max(recipe.preset.video_tokens(h, w, f) for w, h, f in map(bucket_size, set(dataset.buckets)))
    trainer = Trainer(recipe, models, source, accelerator, total_steps=args.max_steps, max_video_tokens=max_tokens)
    validator = None
    if recipe.validation.every:
        from train.validation import Validator, held_out_batches

        batches = held_out_batches(recipe.dataset.cache_dir, recipe.validation.max_items, recipe.preset.text_len)
        validator = Validator(batches, recipe.validation)
    lock = RunLock(s.output_dir) if accelerator.is_main_process else None
    if lock:
        # fp32 LoRA weights + two AdamW moments per checkpoint, kept twice while the next one is written.
        lora_bytes = sum(p.numel() * 4 for state in trainer.states.values() for p in state.params)
        check_output_writable(s.output_dir, need_bytes=6 * lora_bytes)
        lock.acquire()
        # The run folder keeps the recipe it was trained with (the evaluation report shows it).
        atomic_write_text(Path(s.output_dir) / "recipe.yaml", Path(args.recipe).read_text(encoding="utf-8"))
    try:
        with GracefulStop() as stop:
            history = run(trainer, resume, stop_requested=lambda: stop.stop, validator=validator)
    finally:
        if lock:
            lock.release()
    if accelerator.is_main_process and history:
        print(f"done: step {trainer.step}, last loss {history[-1]['loss']:.4f}; outputs in {s.output_dir}")
        from train.validation import best_steps

        for name, best in best_steps(trainer.validation_history).items():
            print(f"best validation step of {name}: {best['step']} (loss {best['loss']:.4f})")
    return 0


def check_resume(recipe, resume: Path | None, processes: int, stop_at: int | None = None) -> int | None:
    """Refuse, as one `error:` line, a start that run() / load_checkpoint would refuse only after the models
    load: checkpoints of an earlier run without --resume (FileExistsError), or a resume checkpoint written by
    a different recipe or process count (CheckpointError; load_checkpoint raises a plain ValueError); and a
    resume with nothing left to do: the checkpoint at or past the step the run stops at (`stop_at`, default
    training.steps) with that step's adapters exported (without them, the resume exports them). Returns the
    checkpoint's step (None without --resume)."""
    import json

    from train.checkpoints import CheckpointError, checkpoint_root, list_checkpoints
    from train.export import adapter_dir
    from train.recipe import expert_names, recipe_hash, trains

    output_dir = recipe.training.output_dir
    if resume is None:
        if list_checkpoints(checkpoint_root(output_dir)):
            raise FileExistsError(f"{checkpoint_root(output_dir)} holds checkpoints of an earlier run; continue it "
                                  f"with --resume latest, or set another training.output_dir (or delete that folder)")
        return
    try:
        meta = json.loads((Path(resume) / "state.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{Path(resume) / 'state.json'}: unreadable ({err}); resume from an earlier checkpoint "
                              f"folder in {Path(resume).parent}") from None
    expected = recipe_hash(recipe)
    if meta.get("recipe_hash") != expected:
        raise CheckpointError(f"{resume}: written by a different recipe (hash {meta.get('recipe_hash')}, this one "
                              f"{expected}); only training.steps, the logging, preview and output keys, speed.memory_gib "
                              f"and validation.every/timesteps/max_items may change between a run and its resume: "
                              f"resume with the recipe that started the run, or start a new run in another "
                              f"training.output_dir")
    step, stop_at = meta.get("step", 0), stop_at or recipe.training.steps
    exported = adapter_dir(output_dir, step)
    if step >= stop_at and all((exported / f"{name}.safetensors").is_file()
                               for name in expert_names(recipe.preset) if trains(recipe, name)):
        raise CheckpointError(f"{resume}: the checkpoint is at step {step} and this run stops at step {stop_at} "
                              f"(training.steps or --max-steps): nothing is left to train, and its adapters are in "
                              f"{exported}; raise training.steps (or --max-steps) to continue")
    if meta.get("processes", processes) != processes:
        raise CheckpointError(f"{resume}: written by {meta['processes']} processes, resumed with {processes}; the "
                              f"data order would change; launch with --num_processes {meta['processes']}")
    return step


if __name__ == "__main__":
    from train.cli import run_cli

    sys.exit(run_cli(main))
