"""Time sampling with our pipeline at the released models' real shapes, random weights, on one GPU.

    python bench/sample.py --preset t2v-A14B --size 480x832 --frames 81 --steps 4
    python bench/sample.py --preset ti2v-5B --size 704x1280 --frames 121 --steps 4 --image
    python bench/sample.py --preset tiny-t2v --size 64x64 --frames 9        # CPU: checks the script only

Experts and VAE are built on the meta device and materialised on the GPU with random bf16 weights.
The UMT5 encoder is replaced by random embeddings (its cost is one forward per prompt, outside the
loop). Each step runs both guidance branches in one batch of 2, as the pipeline always does. Reported
(JSON): seconds per denoising step (median over the timed steps, first step excluded), VAE decode
seconds, peak GPU memory of the whole generation, whether the expert switch happened.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import device_fields, emit  # noqa: E402
from bench.vae import build_random as build_random_vae  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.pipeline import GenerationRequest, WanPipeline  # noqa: E402
from wan_model.sampling_speed import SamplingSpeed  # noqa: E402
from wan_model.transformer import WanTransformer, keep_float32_parameters_  # noqa: E402


class RandomTextEncoder:
    """Stands in for UMT5-XXL: random [B, 512, dim] embeddings, zero past a length of 40 tokens."""

    def __init__(self, dim: int, device, dtype):
        self.dim, self.device, self.dtype = dim, device, dtype

    def encode(self, prompts: list[str]):
        context = torch.randn(len(prompts), 512, self.dim, device=self.device, dtype=self.dtype)
        context[:, 40:] = 0
        return context, torch.full((len(prompts),), 40, device=self.device)


def build_expert(cfg, device, seed: int) -> WanTransformer:
    with torch.device("meta"):
        model = WanTransformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    torch.nn.init.normal_(model.head.head.weight, std=0.02)  # the official init zeroes it
    # As load_pipeline loads the sampler's experts (since 9ca32d9): the float32-read parameters in float32.
    return keep_float32_parameters_(model).eval().requires_grad_(False)


def bench_device() -> tuple[torch.device, torch.dtype]:
    """The GPU in bf16 when there is one, else the CPU in float32 (a CPU run checks a script only)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def random_pipeline(preset, device, dtype, speed: SamplingSpeed | None = None, text_encoder=None) -> WanPipeline:
    """A pipeline of the preset with random weights: experts of seeds 0 and 1 (official init, random head),
    a random VAE of seed 123, RandomTextEncoder unless another is given; `speed` applied to the experts."""
    names = ["high_noise", "low_noise"] if preset.is_moe else ["dense"]
    # .to(dtype) casts every parameter: the float32-read ones go back to float32, as load_pipeline keeps them.
    experts = {name: keep_float32_parameters_(build_expert(preset.transformer, device, seed=i).to(dtype))
               for i, name in enumerate(names)}
    torch.manual_seed(123)
    vae = build_random_vae(preset.vae, device, dtype)
    text_encoder = text_encoder or RandomTextEncoder(preset.transformer.text_dim, device, dtype)
    return WanPipeline(preset, experts, vae, text_encoder, device=device, dtype=dtype, speed=speed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--image", action="store_true", help="condition on a random first frame (I2V / TI2V)")
    ap.add_argument("--compile", action="store_true", help="compile the experts' blocks")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    device, dtype = bench_device()
    preset = PRESETS[args.preset]
    pipe = random_pipeline(preset, device, dtype, SamplingSpeed(compile=args.compile))
    step_times, seen = [], []
    for name, model in pipe.experts.items():
        def hook(mod, args_, name=name):
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter())
            seen.append(name)
        model.register_forward_pre_hook(hook)
    h, w = (int(v) for v in args.size.split("x"))
    image = torch.rand(3, h, w) * 2 - 1 if args.image or preset.task == "i2v" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = pipe.generate(GenerationRequest(prompt="benchmark", seed=0, height=h, width=w, frames=args.frames,
                                             steps=args.steps, image=image))
    total = time.perf_counter() - start
    deltas = [b - a for a, b in zip(step_times, step_times[1:])]
    out = dict(preset=args.preset, size=args.size, frames=args.frames, steps=args.steps, image=image is not None,
               compile=args.compile, s_per_step=round(statistics.median(deltas[1:] or deltas), 3) if deltas else None,
               first_step_s=round(deltas[0], 3) if deltas else None,
               stages_s={k: round(v, 3) for k, v in result.seconds.items()}, total_s=round(total, 2),
               experts_run=seen, video_shape=list(result.video.shape), **device_fields())
    emit(out, args.json)


if __name__ == "__main__":
    main()
