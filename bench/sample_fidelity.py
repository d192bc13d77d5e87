"""What each number-changing sampling lever does to a whole render: final latent and decoded video against
the bf16 path, same seed, same random weights.

    python bench/sample_fidelity.py --preset t2v-A14B --size 480x832 --frames 17           # GPU, A14B width
    python bench/sample_fidelity.py --preset tiny-t2v --size 64x64 --frames 9 --device cpu  # tiny, CPU

A long comparison (81 frames, 40 steps: several minutes per variant at A14B) can span calls: with --cache DIR
each finished variant's final latent and decoded video are kept in DIR, and a later run with the same settings
reuses them instead of rendering again.

Variants (wan_model/sampling_speed.py): bf16 (the reference), fp8w (block linears in e4m3; FP8 matmuls
on CUDA, dequantised bf16/fp32 matmuls on the CPU), fp8a (int8/FP8 self-attention; the float32 emulation
on the CPU), fast (both). Each variant renders with freshly built experts of the same seeds (official
init, random head) and a random VAE, the preset's full step count unless --steps, guidance as the preset.
Reported per variant: relative error of the final latent ||x - x_bf16|| / ||x_bf16||, PSNR of the decoded
video against the bf16 video (pixels in [-1, 1], peak-to-peak 2), and seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.sample import random_pipeline  # noqa: E402
from bench.report import git_commit  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.pipeline import GenerationRequest  # noqa: E402
from wan_model.sampling_speed import SamplingSpeed  # noqa: E402

VARIANTS = {"bf16": SamplingSpeed(), "fp8w": SamplingSpeed(fp8_weights="matmul"),
            "fp8a": SamplingSpeed(fp8_attention=True), "fast": SamplingSpeed(fp8_weights="matmul", fp8_attention=True)}


class SeededTextEncoder:
    """Random [B, 512, dim] embeddings that depend on the prompt only (zero past 40 tokens)."""

    def __init__(self, dim: int, device, dtype):
        self.dim, self.device, self.dtype = dim, device, dtype

    def encode(self, prompts: list[str]):
        rows = []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(sum(map(ord, prompt)))
            row = torch.randn(512, self.dim, generator=gen)
            row[40:] = 0
            rows.append(row)
        return torch.stack(rows).to(self.device, self.dtype), torch.full((len(prompts),), 40, device=self.device)


def render(preset, speed: SamplingSpeed, compile_: bool, request: GenerationRequest, device, dtype):
    pipe = random_pipeline(preset, device, dtype, dataclasses.replace(speed, compile=compile_),
                           SeededTextEncoder(preset.transformer.text_dim, device, dtype))
    start = time.perf_counter()
    result = pipe.generate(request)
    seconds = time.perf_counter() - start
    del pipe
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result.latents.float(), result.video.float(), seconds


def cached_render(cache: Path | None, key: str, name: str, render_variant):
    """render_variant() -> (latents, video, seconds), kept in cache/<key>_<name>.pt when a cache is given."""
    path = cache / f"{key}_{name}.pt" if cache is not None else None
    if path is not None and path.exists():
        saved = torch.load(path)
        print(f"{name}: reused {path}", flush=True)
        return saved["latents"], saved["video"], saved["seconds"]
    latents, video, seconds = render_variant()
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        torch.save(dict(latents=latents.cpu(), video=video.cpu(), seconds=seconds), partial)
        partial.replace(path)  # whole or absent: a run cut mid-write leaves no half file to reuse
    return latents, video, seconds


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((video - reference).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's full step count")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--compile", action="store_true", help="compile the blocks in every variant")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep each variant's latent and video here; a later run with the same settings reuses them")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    preset = PRESETS[args.preset]
    h, w = (int(v) for v in args.size.split("x"))
    image = None
    if preset.task == "i2v":
        image = torch.rand(3, h, w, generator=torch.Generator().manual_seed(7)) * 2 - 1
    request = GenerationRequest(prompt="a lighthouse at dusk, waves", seed=0, height=h, width=w, frames=args.frames,
                                steps=args.steps or preset.sample_steps, image=image)
    variants = ["bf16"] + [v for v in args.variants if v != "bf16"]
    key = f"{args.preset}_{args.size}_{args.frames}f_{request.steps}s_{'compiled' if args.compile else 'eager'}"
    reference = None
    rows = []
    for name in variants:
        latents, video, seconds = cached_render(
            args.cache, key, name, lambda: render(preset, VARIANTS[name], args.compile, request, device, dtype))
        latents, video = latents.to(device), video.to(device)
        if reference is None:
            reference = (latents, video)
            row = dict(variant=name, seconds=round(seconds, 2))
        else:
            rel = float((latents - reference[0]).norm() / reference[0].norm())
            row = dict(variant=name, latent_rel_err=round(rel, 5), video_psnr_db=round(psnr(video, reference[1]), 2),
                       seconds=round(seconds, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = dict(preset=args.preset, size=args.size, frames=args.frames, steps=request.steps, compile=args.compile,
                   commit=git_commit(), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   torch=torch.__version__, rows=rows)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
