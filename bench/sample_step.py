"""One classifier-free-guidance step of sampling, ours and diffusers' side by side in one run, one GPU.

    python bench/sample_step.py --preset t2v-A14B --size 480x832 --frames 81 \\
        --variants diffusers bf16 compile compile+fp8w compile+fp8a fast fast-2pass
    python bench/sample_step.py --preset ti2v-5B --size 704x1280 --frames 121 --variants diffusers fast

A CFG step is what a sampler runs per denoising step: the conditional and the unconditional prediction.
diffusers' `WanPipeline` runs them as two batch-1 forwards of `WanTransformer3DModel` (bf16, its default
attention: torch SDPA); that is the "diffusers" row. Our rows (wan_model/sampling_speed.py's levers):
  bf16           eager blocks, bf16 weights, SDPA (cuDNN) attention; one forward of batch 2
  compile        + torch.compile of each block
  compile+fp8w   + block linears in e4m3 on FP8 tensor cores (fp8_weights=matmul)
  compile+fp8a   + self-attention int8/FP8 (fp8_attention)
  fast           all three (sample.py --fast)
  fast-2pass     as fast, but two batch-1 forwards (the batch-of-2 lever, measured)
  fast-exact-accum  as fast, the FP8 GEMMs with cuBLAS's promoted (float32) accumulation: the fast-accumulation
                 lever, measured
Every model gets random bf16 weights of the real shape (built on the meta device, materialised on the
GPU); TI2V-5B gets per-token timesteps as both pipelines give it. Per row: median seconds per CFG step
over the timed steps (after warm-up steps, which include compilation), peak GPU memory of the row
(the expert's weights included), and the speed-up against the diffusers row of the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit, git_commit, profiled_kernels  # noqa: E402
from bench.train_step import build_diffusers, init_random_  # noqa: E402
from wan_model.attention import attention_backend  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.sampling_speed import SamplingSpeed, prepare_expert  # noqa: E402

VARIANTS = {
    "bf16": (SamplingSpeed(), 1),
    "compile": (SamplingSpeed(compile=True), 1),
    "compile+fp8w": (SamplingSpeed(compile=True, fp8_weights="matmul"), 1),
    "compile+fp8a": (SamplingSpeed(compile=True, fp8_attention=True), 1),
    "fast": (SamplingSpeed.fast(), 1),
    "fast-2pass": (SamplingSpeed.fast(), 2),
    "fast-exact-accum": (dataclasses.replace(SamplingSpeed.fast(), fp8_fast_accum=False), 1),
}


def build_ours(cfg, device):
    from wan_model.transformer import WanTransformer, keep_float32_parameters_

    with torch.device("meta"):
        model = WanTransformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    init_random_(model)
    # As load_pipeline loads the sampler's experts (since 9ca32d9): the float32-read parameters in float32.
    return keep_float32_parameters_(model).eval().requires_grad_(False)


def kernel_profile(step, top: int) -> list[dict]:
    """One more call of `step` under torch.profiler: the `top` GPU kernels by total time, and their share."""
    events, _ = profiled_kernels(step)
    total = sum(e.self_device_time_total for e in events)
    return [dict(kernel=e.key[:160], calls=e.count, ms=round(e.self_device_time_total / 1e3, 2),
                 share=round(e.self_device_time_total / total, 4)) for e in events[:top]]


def run_variant(name: str, preset, latent_shape, device, warmup: int, steps: int, profile_top: int = 0) -> dict:
    cfg = preset.transformer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn((2, *latent_shape), generator=gen, device=device, dtype=torch.bfloat16)
    context = torch.randn((2, cfg.text_len, cfg.text_dim), generator=gen, device=device, dtype=torch.bfloat16)
    tokens = math.prod(latent_shape[1:]) // math.prod(cfg.patch_size)
    per_token = preset.task == "ti2v"
    t = torch.full((2, tokens) if per_token else (2,), 700.0, device=device)
    if per_token:
        t[:, : tokens // latent_shape[1]] = 0.0  # the clean first frame's tokens

    if name == "diffusers":
        model = build_diffusers(cfg, device).eval().requires_grad_(False)

        def cfg_step():
            return [model(hidden_states=latents[i:i + 1], timestep=t[i:i + 1], encoder_hidden_states=context[i:i + 1],
                          return_dict=False)[0] for i in range(2)]
        speed = None
    else:
        speed, passes = VARIANTS[name]
        model = prepare_expert(build_ours(cfg, device), speed)

        def cfg_step():
            with attention_backend(speed.attention_backend):
                if passes == 1:
                    return model(latents, t, context)
                return [model(latents[i:i + 1], t[i:i + 1], context[i:i + 1]) for i in range(2)]
    weights_gib = torch.cuda.memory_allocated() / 2**30
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = cfg_step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            del out
        kernels = kernel_profile(cfg_step, profile_top) if profile_top else None
    result = dict(variant=name, s_per_cfg_step=round(statistics.median(times[warmup:]), 3),
                  step_times=[round(x, 3) for x in times], weights_gib=round(weights_gib, 2),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  speed=None if speed is None else vars(speed))
    if kernels:
        result["kernels"] = kernels
    model = None  # the closures above hold it too; drop the weights before the next row
    gc.collect()
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--variants", nargs="+", default=["diffusers", "fast"], choices=["diffusers", *VARIANTS])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, one step under torch.profiler: its N most expensive GPU kernels")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/sample_step.py times GPU kernels: run it on a CUDA machine")
    device = torch.device("cuda")
    preset = PRESETS[args.preset]
    h, w = (int(v) for v in args.size.split("x"))
    latent_shape = (preset.transformer.in_dim, *preset.latent_size(h, w, args.frames))
    rows = []
    for name in args.variants:
        try:
            row = run_variant(name, preset, latent_shape, device, args.warmup, args.steps, args.profile)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            row = dict(variant=name, error=str(err).splitlines()[0][:300])
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["s_per_cfg_step"] for r in rows if r["variant"] == "diffusers" and "s_per_cfg_step" in r), None)
    for r in rows:
        if base and "s_per_cfg_step" in r:
            r["vs_diffusers"] = round(base / r["s_per_cfg_step"], 3)
    summary = dict(preset=args.preset, size=args.size, frames=args.frames, latent_shape=latent_shape,
                   commit=git_commit(), device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
