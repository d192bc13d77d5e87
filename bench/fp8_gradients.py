"""What FP8 base weights do to LoRA training (issue 16's FP8 table): gradients, then loss curves.

    python bench/fp8_gradients.py --preset t2v-A14B --size 480x832 --frames 81 --loss-steps 0  # GPU: gradients
    python bench/fp8_gradients.py --preset t2v-A14B --skip-gradients                           # GPU: loss curves
    python bench/fp8_gradients.py --preset tiny-t2v --size 64x64 --frames 9 --loss-steps 20    # CPU: the script only

On the H200 one gradient pass (a mode at four timesteps) of the real A14B shape takes ~115 s, and the
bf16 reference and repeat are two of them: give each call at most two modes, or `--skip-repeat`.

Part 1, gradients at the real shape: one random expert (official init, random head) with rank-32 LoRA on the
ten block linears, its B factors random (PEFT's zero B would give A no gradient), checkpointing on every
block as in training. For each timestep (spread over the high-noise range [875, 1000) and the low-noise
range [0, 875)) and each `fp8_base` mode (and `fp8_attention`, `matmul_dgrad+fp8_attention`: the 8-bit
self-attention forward fed to the bf16 backward, `set_attention_backend('fp8')`, with bf16 or FP8 weights;
`matmul_dgrad+cudnn_fp8`: cuDNN's FP8 self-attention forward and backward, `attention_backend: cudnn_fp8`;
`+fast_accum`: the forward FP8 GEMMs with fast accumulation, as the sampler's; asked for by name),
the LoRA gradient of the flow-matching loss on one fixed sample (x_t = (1 - s) x_0 + s n, target n - x_0)
against the bf16 model's: cosine similarity and relative error ||g - g_bf16|| / ||g_bf16|| over all LoRA
parameters, and over each kind of linear.

A second bf16 run ("none-repeat", left out by --skip-repeat) gives the floor: what the GPU's own
nondeterminism changes. Random weights lack real checkpoints' activation outliers, so the FP8 matmul modes'
per-token quantisation error is probably understated here; one random expert serves both timestep ranges
(the expert column labels t). T2V-A14B (boundary 875) and TI2V-5B (one expert) are supported; I2V's
conditioning channels are not built.

Part 2, loss curves: the same LoRA trained with AdamW for --loss-steps steps on a fixed synthetic target
(eight fixed samples cycled, timesteps drawn from one seed, so every mode sees the same sequence), per
mode; reported every --loss-every steps, and the final loss relative to bf16's. --loss-blocks and
--loss-size shrink the model and clip for this part (the real shape costs ~9 s a step; two blocks at
240x416x21 run the four curves in under 140 s, eight did not finish them in 260 s). --loss-steps 0 skips
it. The JSON is rewritten after each gradient mode and each curve, so a run cut by a time limit keeps what finished.

FP8 matmul modes run their FP8 kernels on CUDA only; on the CPU every mode dequantises (storage numerics).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.report import git_commit  # noqa: E402
from bench.train_step import OUR_TARGETS, add_lora  # noqa: E402
from wan_model.attention import set_attention_backend  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.fp8 import FP8Linear  # noqa: E402
from wan_model.speed import SpeedOptions, apply_speed_options  # noqa: E402
from wan_model.transformer import WanTransformer  # noqa: E402

# fp8_base modes; "+fp8_attention": with the 8-bit self-attention forward too (attention backend "fp8");
# "+cudnn_fp8": with cuDNN's FP8 self-attention forward and backward (attention backend "cudnn_fp8");
# "+fast_accum": the forward FP8 GEMMs with fast accumulation (the sampler's; training's default promotes)
MODES = ("none", "storage", "matmul", "matmul_dgrad", "fp8_attention", "matmul_dgrad+fp8_attention",
         "matmul_dgrad+cudnn_fp8", "matmul_dgrad+fast_accum", "matmul_dgrad+cudnn_fp8+fast_accum")
KINDS = {"self_attn": "self_attn.", "cross_attn": "cross_attn.", "ffn": "ffn."}


def build(cfg, device, dtype, mode: str, rank: int) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """The same random expert and LoRA for every mode (seeded), then `mode`'s fp8 base weights."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanTransformer(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.init_weights()
    nn.init.normal_(model.head.head.weight, std=0.02)  # the official init zeroes it
    add_lora(model, OUR_TARGETS, rank)
    gen = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    model.enable_gradient_checkpointing(True)
    weights, *levers = mode.split("+")
    if weights == "fp8_attention":
        weights, levers = "none", ["fp8_attention"]
    apply_speed_options(model, SpeedOptions(compile=False, save_attention="none", fp8_base=weights,
                                            attention_backend="cudnn_fp8" if "cudnn_fp8" in levers else "auto"))
    if "fp8_attention" in levers:
        set_attention_backend("fp8")  # a bench lever, not a SpeedOptions choice (wan_model/speed.py says why)
    if "fast_accum" in levers:  # as bench/train_step.py --fp8-fast-accum: not yet a recipe option
        for module in model.modules():
            if isinstance(module, FP8Linear):
                module.fast_accum = True
    return model, [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def sample(cfg, latent_shape, device, dtype, t: float, seed: int):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x0 = torch.randn(latent_shape, generator=gen)
    noise = torch.randn(latent_shape, generator=gen)
    context = torch.randn((1, cfg.text_len, cfg.text_dim), generator=gen)
    s = t / 1000.0
    xt = (1 - s) * x0 + s * noise
    return (xt.to(device, dtype), torch.tensor([t], device=device), context.to(device, dtype),
            (noise - x0).to(device, torch.float32))


def loss_of(model, batch, device, dtype):
    xt, t, context, target = batch
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        pred = model(xt, t, context)
    return torch.nn.functional.mse_loss(pred.float(), target)


def gradients(cfg, latent_shape, device, dtype, mode, rank, timesteps) -> dict[float, dict[str, torch.Tensor]]:
    model, params = build(cfg, device, dtype, mode, rank)
    out = {}
    for t in timesteps:
        model.zero_grad(set_to_none=True)
        loss_of(model, sample(cfg, latent_shape, device, dtype, t, seed=2), device, dtype).backward()
        out[t] = {n: p.grad.detach().float().flatten().cpu() for n, p in params}
    del model
    return out


def compare(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    row = {}
    for kind, marker in [("all", "")] + list(KINDS.items()):
        names = [n for n in reference if marker in n]
        # float64: over 10^8 elements float32 sums drift enough to report cosines above 1 (seen: 1.012)
        g = torch.cat([grads[n] for n in names]).double()
        r = torch.cat([reference[n] for n in names]).double()
        row[f"{kind}_cosine"] = round(float(torch.nn.functional.cosine_similarity(g, r, dim=0)), 6)
        row[f"{kind}_rel_err"] = round(float((g - r).norm() / r.norm()), 6)
    return row


def loss_curve(cfg, latent_shape, device, dtype, mode, rank, steps, every, lr) -> list[float]:
    model, params = build(cfg, device, dtype, mode, rank)
    optimizer = torch.optim.AdamW([p for _, p in params], lr=lr)
    draw = torch.Generator(device="cpu").manual_seed(3)
    curve = []
    for step in range(steps):
        t = float(torch.rand((), generator=draw)) * 1000.0
        loss = loss_of(model, sample(cfg, latent_shape, device, dtype, t, seed=4 + step % 8), device, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps - 1:
            curve.append(round(float(loss.detach()), 6))
    del model
    return curve


def keep(summary: dict, json_path: Path | None) -> None:
    """The results so far on disk (emit prints them too, once, at the end)."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(summary, indent=2))


def compare_curves(curves: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Each curve against bf16's ("none", the first): final loss, its ratio, and the mean absolute gap."""
    final = {mode: curve[-1] for mode, curve in curves.items()}
    reference = curves["none"]
    return dict(final=final, final_vs_bf16={m: round(v / final["none"], 4) for m, v in final.items()},
                mean_abs_gap_vs_bf16={m: round(sum(abs(a - b) for a, b in zip(c, reference)) / len(c), 6)
                                      for m, c in curves.items()})


# Presets these benches build (I2V's conditioning channels are not built)
BENCH_PRESETS = sorted(n for n in PRESETS if "i2v" not in n.split("-"))


def device_and_dtype() -> tuple[torch.device, torch.dtype]:
    """The GPU in bf16 when there is one; else the CPU in float32 (a smoke run of the script)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def latent_shape_of(preset, size: str, frames: int):
    h, w = (int(v) for v in size.split("x"))
    return (1, preset.transformer.in_dim, *preset.latent_size(h, w, frames))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=BENCH_PRESETS)
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--modes", nargs="+", choices=MODES[1:],
                    default=[m for m in MODES[1:] if "fast_accum" not in m])
    ap.add_argument("--timesteps", type=float, nargs="+", default=[990.0, 930.0, 880.0, 700.0, 400.0, 100.0])
    ap.add_argument("--loss-steps", type=int, default=300)
    ap.add_argument("--loss-every", type=int, default=10)
    ap.add_argument("--loss-blocks", type=int, default=2, help="blocks of the model in the loss-curve part")
    ap.add_argument("--loss-size", default="240x416")
    ap.add_argument("--loss-frames", type=int, default=21)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--skip-gradients", action="store_true")
    ap.add_argument("--skip-repeat", action="store_true", help="no second bf16 run (the noise floor)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device, dtype = device_and_dtype()
    preset = PRESETS[args.preset]
    cfg = preset.transformer
    summary = dict(preset=args.preset, size=args.size, frames=args.frames, rank=args.rank, modes=args.modes,
                   commit=git_commit(), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")
    if not args.skip_gradients:
        shape = latent_shape_of(preset, args.size, args.frames)
        start = time.perf_counter()
        reference = gradients(cfg, shape, device, dtype, "none", args.rank, args.timesteps)
        rows = []
        for mode in (["none-repeat"] if not args.skip_repeat else []) + args.modes:
            grads = gradients(cfg, shape, device, dtype, mode.removesuffix("-repeat"), args.rank, args.timesteps)
            for t in args.timesteps:
                expert = "dense" if not preset.is_moe else "high_noise" if t >= preset.boundary_timestep else "low_noise"
                rows.append(dict(mode=mode, t=t, expert=expert, **compare(grads[t], reference[t])))
                print(rows[-1], flush=True)
            del grads
            summary.update(gradients=rows, gradient_seconds=round(time.perf_counter() - start, 1))
            keep(summary, args.json)  # kept if a later mode or the loss-curve part is cut short
    if args.loss_steps <= 0:
        emit(summary, args.json)
        return
    small = dataclasses.replace(cfg, num_layers=min(args.loss_blocks, cfg.num_layers))
    shape = latent_shape_of(preset, args.loss_size, args.loss_frames)
    summary["loss"] = loss = dict(blocks=small.num_layers, size=args.loss_size, frames=args.loss_frames,
                                  steps=args.loss_steps, every=args.loss_every, lr=args.lr, curves={})
    for mode in ["none", *args.modes]:
        loss["curves"][mode] = loss_curve(small, shape, device, dtype, mode, args.rank, args.loss_steps,
                                          args.loss_every, args.lr)
        print(f"loss curve {mode}: final {loss['curves'][mode][-1]}", flush=True)
        loss.update(compare_curves(loss["curves"]))
        keep(summary, args.json)  # kept if a later curve is cut short
    emit(summary, args.json)


if __name__ == "__main__":
    main()
