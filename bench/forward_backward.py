"""Time our Wan DiT's forward and forward+backward at a released model's real shape, on one GPU.

    python bench/forward_backward.py --preset t2v-A14B --size 480x832 --frames 81
    python bench/forward_backward.py --preset ti2v-5B --size 704x1280 --frames 121
    python bench/forward_backward.py --preset tiny-t2v --size 64x96 --frames 9     # CPU: checks the script only

The model is built on the meta device and materialised on the GPU with random bf16 weights
(`to_empty` + `init_weights`, nothing to download). The base weights are frozen as in LoRA training,
so backward computes the activation gradients (here down to the latents), not 14B weight gradients.
Gradient checkpointing on every block (`--checkpoint-every 0` turns it off); `--compile` compiles the blocks
(the warm-up step absorbs the compilation). ti2v presets get a
per-token timestep with the first latent frame at t=0, as in TI2V training.

Latents: 480x832, 81 frames with the Wan 2.1 VAE (4x8x8) -> [1, 16, 21, 60, 104], 21*30*52 = 32,760 tokens.
Reported (JSON, one line): median forward ms (no grad), median forward+backward ms, peak GPU memory of
the training step (torch.cuda.max_memory_allocated), tokens, device.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.attention import set_attention_backend  # noqa: E402
from wan_model.config import PRESETS, ModelPreset  # noqa: E402
from wan_model.transformer import WanTransformer  # noqa: E402


def latent_shape(preset: ModelPreset, height: int, width: int, frames: int, batch: int = 1) -> tuple[int, ...]:
    """[B, in_dim, F, H, W] of the DiT input for a video of `frames` x `height` x `width` pixels."""
    sf, sh, sw = preset.vae.stride
    if (frames - 1) % sf or height % sh or width % sw:
        raise ValueError(f"{preset.name}: frames must be 1 + {sf}k and the size a multiple of {sh}x{sw}, "
                         f"got {frames} frames of {height}x{width}")
    return (batch, preset.transformer.in_dim, (frames - 1) // sf + 1, height // sh, width // sw)


def build_random(preset: ModelPreset, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 checkpoint_every: int = 1) -> WanTransformer:
    """A frozen WanTransformer of the preset's shape with random weights, built without a CPU copy."""
    with torch.device("meta"):
        model = WanTransformer(preset.transformer).to(dtype)  # cast on meta: no fp32 copy on the device
    model = model.to_empty(device=device)
    model.init_weights()
    # init_weights zeroes the output projection (the official init); random values keep the output informative.
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.requires_grad_(False)
    if checkpoint_every:
        model.enable_gradient_checkpointing(True, every=checkpoint_every)
    return model


def random_inputs(preset: ModelPreset, shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [B, C, F, H, W], timestep [B] or [B, L] for ti2v, context [B, text_len, text_dim])."""
    cfg = preset.transformer
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    timestep = torch.full((shape[0],), 700.0, device=device)
    if preset.task == "ti2v":
        grid = [n // p for n, p in zip(shape[2:], cfg.patch_size)]
        timestep = timestep[:, None].repeat(1, math.prod(grid))
        timestep[:, : grid[1] * grid[2]] = 0.0  # first latent frame is the clean image
    context = torch.randn((shape[0], cfg.text_len, cfg.text_dim), generator=gen, device=device, dtype=dtype)
    return latents, timestep, context


def measure(model: WanTransformer, inputs, warmup: int = 1, iters: int = 3) -> dict:
    """Median forward (no grad) and forward+backward times in ms, and the step's peak memory in GiB."""
    latents, timestep, context = inputs
    cuda = latents.is_cuda

    def timed(fn) -> float:
        if not cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    def forward():
        with torch.no_grad():
            model(latents, timestep, context)

    def train_step():
        x = latents.detach().requires_grad_(True)
        model(x, timestep, context).float().square().mean().backward()

    fwd = [timed(forward) for _ in range(warmup + iters)][warmup:]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step = [timed(train_step) for _ in range(warmup + iters)][warmup:]
    return dict(forward_ms=round(statistics.median(fwd), 1), forward_backward_ms=round(statistics.median(step), 1),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832", help="HxW in pixels")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=1, help="checkpoint every n-th block; 0: off")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash"])
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (WanTransformer.compile_blocks)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args(argv)

    set_attention_backend(args.attention)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    height, width = (int(v) for v in args.size.split("x"))
    shape = latent_shape(preset, height, width, args.frames, args.batch)
    model = build_random(preset, device, checkpoint_every=args.checkpoint_every)
    if args.compile:
        model.compile_blocks()
    result = dict(preset=args.preset, size=args.size, frames=args.frames, latents=list(shape),
                  tokens=math.prod(n // p for n, p in zip(shape[2:], preset.transformer.patch_size)),
                  checkpoint_every=args.checkpoint_every, attention=args.attention, compile=args.compile,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__)
    result.update(measure(model, random_inputs(preset, shape, device), args.warmup, args.iters))
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
