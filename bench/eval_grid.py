"""An evaluation grid at a released model's size: `train.evaluate.evaluate` (what `sample.py evaluate`
runs) on random experts, timed: wall time, each adapter switch, each render, and the total against the
sum of the renders.

    python bench/eval_grid.py --preset t2v-A14B --size 480x832 --frames 17 --steps 20 --prompts 2 --adapters 2 --fast

The experts, VAE and text encoder are built once (random weights, as bench/sample.py); the adapters are
random rank-32 LoRAs on every block linear, written in our export format (one file per expert with its
expert in the metadata); the variants are the base model plus each adapter, one seed per prompt. A second
pass over the same grid measures the resume: every render's settings match its sidecar, so none re-renders.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.sample import bench_device, random_pipeline  # noqa: E402
from bench.report import git_commit  # noqa: E402
from train.evaluate import SuiteEntry, Variant, evaluate  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.lora_formats import META_EXPERT, LoraModule, lora_targets, save_lora  # noqa: E402
from wan_model.sampling_speed import SamplingSpeed  # noqa: E402


def write_random_adapter(folder: Path, cfg, experts: list[str], rank: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for expert in experts:
        weights = {name: LoraModule(down=torch.randn(rank, i, generator=gen) * 0.01,
                                    up=torch.randn(o, rank, generator=gen) * 0.01, alpha=float(rank))
                   for name, (i, o) in lora_targets(cfg).items() if name.startswith("blocks.")}
        save_lora(weights, folder / f"{expert}.safetensors", {META_EXPERT: expert})
    return folder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--fast", action="store_true", help="sample.py --fast (compile, fp8 weights, fp8 attention)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device, dtype = bench_device()
    preset = PRESETS[args.preset]
    names = ["high_noise", "low_noise"] if preset.is_moe else ["dense"]
    work = Path(tempfile.mkdtemp(prefix="eval_grid_"))
    adapters = [write_random_adapter(work / f"adapter-{i}", preset.transformer, names, args.rank, seed=i)
                for i in range(args.adapters)]
    start = time.perf_counter()
    pipe = random_pipeline(preset, device, dtype, SamplingSpeed.fast() if args.fast else SamplingSpeed())
    build_s = time.perf_counter() - start
    h, w = (int(v) for v in args.size.split("x"))
    suite = [SuiteEntry(prompt=f"prompt {i}: a lighthouse at dusk", seeds=[0], height=h, width=w, frames=args.frames,
                        steps=args.steps) for i in range(args.prompts)]
    variants = [Variant("base")] + [Variant(a.name, [a]) for a in adapters]
    out = work / "eval"
    passes = []
    for _ in range(2):
        torch.manual_seed(0)
        evaluate(pipe, suite, variants, out, progress=False)
        metrics = json.loads((out / "metrics.json").read_text())
        passes.append(dict(timing=metrics["timing"], switches=[round(s["seconds"], 3) for s in metrics["switches"]],
                           render_s=[round(m["seconds"], 2) for m in metrics["renders"].values()]))
        print(json.dumps(passes[-1]), flush=True)
    summary = dict(preset=args.preset, size=args.size, frames=args.frames, steps=args.steps, prompts=args.prompts,
                   variants=[v.name for v in variants], fast=args.fast, build_s=round(build_s, 1), passes=passes,
                   commit=git_commit(), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    emit(summary, args.json)


if __name__ == "__main__":
    main()
