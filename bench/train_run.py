"""Run our trainer (train/loop.py) for N steps at a released model's real shape, random weights, one GPU.

    python bench/train_run.py --recipe recipes/t2v_a14b_style.yaml --size 480x832 --frames 81 --steps 20

What runs is the real training loop (routing, LoRA per expert, optimizer, checkpoint, export), with two
stand-ins for what cannot be had on the GPU machine: random base weights (built on the meta device,
materialised on the GPU in bf16; the second expert then moves to host memory, as the trainer offloads
the idle one) and one synthetic cached sample (random latents of the bucket's shape, random text
embeddings). Both experts train, `routing: phased` with half the steps each, so the expert swap is
measured. A step is `--grad-accum` micro-batches (default 1, to compare with bench/train_step.py; the
recipes' 4 make each step four forward+backward passes). `--memory-gib 80` runs a 141 GB card as an 80 GB
one (the trainer's offload decision reads the cap). Reported (JSON): median s/step per expert (first step
of each phase excluded), every step's seconds, swap seconds, peak GPU memory, the loss sequence, the
exported adapter files; with --validation-items N, the seconds of each validation pass (N held-out clips of
the same shape x the recipe's validation.timesteps x each expert; the first pass compiles the no-grad
graph, expert swaps are included when the idle expert is parked).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as train_lora.py runs

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import device_fields, emit, memory_fraction_for  # noqa: E402
from bench.sample import build_expert  # noqa: E402
from train.batches import Batch  # noqa: E402
from train.loop import Trainer, run  # noqa: E402
from train.recipe import load_recipe, trains  # noqa: E402


class SyntheticSource:
    """The same random sample for every step (a one-clip overfit set)."""

    def __init__(self, latent_shape, text_dim: int, image_cond: bool):
        g = torch.Generator().manual_seed(0)
        self.batch_ = Batch(latents=torch.randn(latent_shape, generator=g),
                            context=torch.randn(1, 512, text_dim, generator=g) * 0.1,
                            context_lens=torch.tensor([120]),
                            image_cond=torch.randn(latent_shape, generator=g) if image_cond else None,
                            clip_ids=["synthetic"])

    def batch(self, index: int) -> Batch:
        return self.batch_


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", type=Path, default=Path("recipes/t2v_a14b_style.yaml"))
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--output", type=Path, default=Path("outputs/bench_train_run"))
    ap.add_argument("--phase-steps", type=int, default=None,
                    help="steps per phase before the expert changes (default: half the steps)")
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per step (the recipes' 4 make a step four forward+backward passes)")
    ap.add_argument("--offload", choices=["auto", "always", "never"], default=None,
                    help="training.offload_inactive_expert (default: the recipe's)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="cap this process's GPU memory (80: run a 141 GB H200 as an 80 GB H100)")
    ap.add_argument("--validation-items", type=int, default=0,
                    help="also time validation passes (train/validation.py) over this many synthetic held-out "
                         "clips of the same shape, every --validation-every steps")
    ap.add_argument("--validation-every", type=int, default=None, help="default: half the steps")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, check_release=False)
    training = dataclasses.replace(recipe.training, steps=args.steps, routing="phased",
                                   phase_steps=args.phase_steps or max(1, args.steps // 2), save_every=0, log_every=1,
                                   grad_accum=args.grad_accum,
                                   offload_inactive_expert=args.offload or recipe.training.offload_inactive_expert,
                                   output_dir=str(args.output), deepspeed=None, sample_every=0,
                                   sample_prompts=())
    speed = recipe.speed if args.memory_gib is None else dataclasses.replace(recipe.speed, memory_gib=args.memory_gib)
    recipe = dataclasses.replace(recipe, training=training, speed=speed)
    preset = recipe.preset
    cuda = torch.cuda.is_available()  # CPU (with the quickstart recipe) only checks the script
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    names = [n for n in (["high_noise", "low_noise"] if preset.is_moe else ["dense"]) if trains(recipe, n)]
    models = {}
    for i, name in enumerate(names):
        models[name] = build_expert(preset.transformer, device, seed=i).train()
        if not cuda:
            models[name].float()
        if i > 0:  # the trainer keeps the idle expert in host memory when both do not fit
            models[name].to("cpu")
    h, w = (int(v) for v in args.size.split("x"))
    latent_shape = (1, preset.vae.z_dim, *preset.latent_size(h, w, args.frames))
    source = SyntheticSource(latent_shape, preset.transformer.text_dim, preset.task == "i2v")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if args.memory_gib:
            torch.cuda.set_per_process_memory_fraction(memory_fraction_for(args.memory_gib, device))
    trainer = Trainer(recipe, models, source, max_video_tokens=preset.video_tokens(h, w, args.frames))
    records: list[tuple[dict, float]] = []
    step_fn = trainer.train_step

    def timed_step():
        sync()
        start = time.perf_counter()
        record = step_fn()
        sync()
        records.append((record, time.perf_counter() - start))
        return record

    trainer.train_step = timed_step
    validator, passes = None, []
    if args.validation_items:
        from train.validation import Validator

        every = args.validation_every or max(1, args.steps // 2)
        settings = dataclasses.replace(recipe.validation, every=every, fraction=recipe.validation.fraction or 0.1)
        held = [SyntheticSource(latent_shape, preset.transformer.text_dim, preset.task == "i2v").batch_
                for _ in range(args.validation_items)]
        validator = Validator(held, settings)
        score = validator.run

        def timed_pass(t):
            sync()
            start = time.perf_counter()
            result = score(t)
            sync()
            passes.append(time.perf_counter() - start)
            return result

        validator.run = timed_pass
    run(trainer, validator=validator)
    per_expert: dict[str, list[float]] = {}
    for record, seconds in records:
        per_expert.setdefault(record["expert"], []).append(seconds - (record["swap_s"] or 0.0))
    out = dict(recipe=str(args.recipe), preset=preset.name, latent_shape=latent_shape, steps=args.steps,
               grad_accum=args.grad_accum, memory_gib=args.memory_gib, speed=dataclasses.asdict(recipe.speed),
               offload_inactive_expert=trainer.offload,
               memory_plan={k: dataclasses.asdict(p) for k, p in trainer.activation_plans.items()},
               resolved_speed={k: dataclasses.asdict(v) for k, v in trainer.speeds.items()},
               step_s=[round(seconds, 2) for _, seconds in records],
               s_per_step={k: round(statistics.median(v[1:] or v), 3) for k, v in per_expert.items()},
               swap_s=[round(r["swap_s"], 2) for r, _ in records if r["swap_s"]],
               losses=[round(r["loss"], 4) for r, _ in records], experts=[r["expert"] for r, _ in records],
               timesteps=[round(r["timesteps"][0], 1) for r, _ in records],
               adapters=sorted(str(p.relative_to(args.output)) for p in args.output.rglob("*.safetensors")),
               validation=dict(items=args.validation_items, timesteps=validator.settings.timesteps,
                               experts=len(trainer.states), pass_s=[round(p, 2) for p in passes],
                               forwards_per_pass=args.validation_items * validator.settings.timesteps
                               * len(trainer.states)) if validator else None,
               **device_fields())
    emit(out, args.json)


if __name__ == "__main__":
    main()
