"""Where a checkpointed, compiled training step's peak memory goes: a few blocks of a preset at its real width
and token count, measured against the memory plan's parts (wan_model/memory_plan.py).

    python3 bench/checkpoint_memory.py --preset t2v-A14B --size 480x832 --frames 81 --blocks 4 \
        --fp8 matmul_dgrad --attention cudnn_fp8 --save-attention all

The second step's peak is split as the plan splits it: what the plan counts outside the transient is taken as
exact, and the rest is the measured transient (one block's recompute and backward in flight), printed beside the
plan's and as its excess in units of L x d and L x f bf16 tensors. Then the step is recorded (torch.cuda.memory
history) and replayed to the moment of its peak: the largest allocations alive there, with their sizes and, where
the trace has Python frames, the line that made each. It found that the compiled checkpoint call, with attention
recomputed inside it, held ten L x f buffers at once (22.71 GiB measured against 12.62 planned, 681b393); the
model now runs that call only in blocks that keep attention, and the plan counts its transient
(`--no-compiled-checkpoint`: the checkpoint around the compiled block everywhere, for an A/B in one tree).
"""

from __future__ import annotations

import argparse
import dataclasses
import linecache
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.train_step import OUR_TARGETS, add_lora, build_ours  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.memory_plan import GIB, predicted_peak  # noqa: E402
from wan_model.speed import SpeedOptions, apply_speed_options  # noqa: E402


def live_at_peak(snapshot: dict, top: int) -> list[dict]:
    """Replays the recorded allocator trace: the `top` largest allocations alive when the recorded total
    was highest, each with its size and the innermost frames that name where it was made."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for event in snapshot["device_traces"][torch.cuda.current_device()]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] in ("free_requested", "free") and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    rows = []
    for event in sorted(at_peak, key=lambda e: -e["size"])[:top]:
        frames = [f for f in event.get("frames", [])  # Python frames outside torch (Inductor's code is in /tmp)
                  if f["filename"].endswith(".py") and "/torch/" not in f["filename"]][:2]
        rows.append(dict(mib=round(event["size"] / 2**20, 1),
                         made_at=[f"{Path(f['filename']).name}:{f['line']} {f['name']}: "
                                  f"{linecache.getline(f['filename'], f['line']).strip()[:140]}" for f in frames]))
    return rows


def measure(args, cfg, latent_shape, device) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = build_ours(cfg, device, "full")
    params = add_lora(model, OUR_TARGETS, args.rank)
    options = SpeedOptions(compile=True, save_attention=args.save_attention, fp8_base=args.fp8,
                           attention_backend=args.attention, compiled_checkpoint=not args.no_compiled_checkpoint)
    apply_speed_options(model, options, device)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(latent_shape, generator=g, device=device, dtype=torch.bfloat16)
    target = torch.randn(latent_shape, generator=g, device=device, dtype=torch.bfloat16)
    context = torch.randn((1, cfg.text_len, cfg.text_dim), generator=g, device=device, dtype=torch.bfloat16)
    t = torch.tensor([500.0], device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(latents, t, context).float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # compiles, and makes AdamW's state
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")  # C++ frames name no buffer
    # Early stop ends a checkpoint's recompute by raising an exception from a pack hook inside the compiled
    # block's autograd Function; with Python stacks recorded, that raise came back as "SystemError: ... returned
    # NULL without setting an exception" (b8c33da, checkpoint around the compiled block, bf16 attention). The
    # unrecorded first step ran the same path. Around a compiled block, early stop saves nothing: the block is
    # one Function, recomputed whole before its tensors are packed.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        step()
    torch.cuda.synchronize()
    peak_gib = (torch.cuda.max_memory_allocated() - before) / GIB
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    tokens = math.prod(latent_shape[2:]) // math.prod(cfg.patch_size)
    saved = cfg.num_layers if args.save_attention == "all" else 0
    parts = predicted_peak(cfg, tokens, saved, rank=args.rank, fp8_weights=args.fp8 != "none",
                           fp8_dgrad=args.fp8 == "matmul_dgrad", fp8_attention=args.attention == "cudnn_fp8",
                           compiled_checkpoint=model._compiled_checkpoint is not None)
    transient = peak_gib - (parts["total"] - parts["transient"])
    ld, lf = tokens * cfg.dim * 2 / GIB, tokens * cfg.ffn_dim * 2 / GIB
    result = dict(peak_gib=round(peak_gib, 2), predicted_gib=round(parts["total"], 2),
                  transient_gib=round(transient, 2), predicted_transient_gib=round(parts["transient"], 2),
                  transient_excess_in_ld=round((transient - parts["transient"]) / ld, 2),
                  transient_excess_in_lf=round((transient - parts["transient"]) / lf, 2),
                  live_at_peak=live_at_peak(snapshot, args.top))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832", help="HxW in pixels")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--blocks", type=int, default=4, help="blocks of the preset to build (its width and tokens)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--fp8", default="matmul_dgrad", choices=["none", "storage", "matmul", "matmul_dgrad"])
    ap.add_argument("--attention", default="cudnn_fp8", choices=["auto", "sdpa", "flash", "cudnn_fp8"])
    ap.add_argument("--save-attention", default="all", choices=["none", "all"])
    ap.add_argument("--no-compiled-checkpoint", action="store_true",
                    help="the checkpoint around the compiled block in every block (speed.compiled_checkpoint: false)")
    ap.add_argument("--top", type=int, default=12, help="allocations listed at the peak")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("checkpoint_memory: needs a CUDA device (it reads the CUDA allocator's peak and trace)")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    device = torch.device("cuda")
    preset = PRESETS[args.preset]
    cfg = dataclasses.replace(preset.transformer, num_layers=args.blocks)
    h, w = (int(v) for v in args.size.split("x"))
    latent_shape = (1, cfg.in_dim, *preset.latent_size(h, w, args.frames))
    emit(dict(preset=args.preset, size=args.size, frames=args.frames, blocks=args.blocks, fp8=args.fp8,
              attention=args.attention, save_attention=args.save_attention,
              compiled_checkpoint=not args.no_compiled_checkpoint, device=torch.cuda.get_device_name(),
              torch=torch.__version__, **measure(args, cfg, latent_shape, device)), args.json)


if __name__ == "__main__":
    main()
