"""Run our trainer (train/loop.py) for N steps at a released model's real shape, random weights, one GPU.

    python bench/train_run.py --recipe recipes/t2v_a14b_style.yaml --size 480x832 --frames 81 --steps 20

What runs is the real training loop (routing, LoRA per expert, optimizer, checkpoint, export), with two
stand-ins for what cannot be had on the GPU machine: random base weights (built on the meta device,
materialised on the GPU in bf16; the second expert then moves to host memory, as the trainer offloads
the idle one) and one synthetic cached sample (random latents of the bucket's shape, random text
embeddings). Both experts train, `routing: phased` with half the steps each, so the expert swap is
measured. Reported (JSON): median s/step per expert (first step of each phase excluded), swap seconds,
peak GPU memory, the loss sequence, the exported adapter files.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import device_fields, emit  # noqa: E402
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
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    recipe = load_recipe(args.recipe, check_release=False)
    training = dataclasses.replace(recipe.training, steps=args.steps, routing="phased",
                                   phase_steps=max(1, args.steps // 2), save_every=0, log_every=1,
                                   output_dir=str(args.output), deepspeed=None, sample_every=0)
    recipe = dataclasses.replace(recipe, training=training)
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
    vs = preset.vae.stride
    latent_shape = (1, preset.vae.z_dim, (args.frames - 1) // vs[0] + 1, h // vs[1], w // vs[2])
    source = SyntheticSource(latent_shape, preset.transformer.text_dim, preset.task == "i2v")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(recipe, models, source)
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
    run(trainer)
    per_expert: dict[str, list[float]] = {}
    for record, seconds in records:
        per_expert.setdefault(record["expert"], []).append(seconds - (record["swap_s"] or 0.0))
    out = dict(recipe=str(args.recipe), preset=preset.name, latent_shape=latent_shape, steps=args.steps,
               offload_inactive_expert=trainer.offload,
               s_per_step={k: round(statistics.median(v[1:] or v), 3) for k, v in per_expert.items()},
               swap_s=[round(r["swap_s"], 2) for r, _ in records if r["swap_s"]],
               losses=[round(r["loss"], 4) for r, _ in records], experts=[r["expert"] for r, _ in records],
               timesteps=[round(r["timesteps"][0], 1) for r, _ in records],
               adapters=sorted(str(p.relative_to(args.output)) for p in args.output.rglob("*.safetensors")),
               **device_fields())
    emit(out, args.json)


if __name__ == "__main__":
    main()
