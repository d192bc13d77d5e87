"""What `attention_backend: cudnn_fp8` costs around cuDNN's FP8 graphs: one self-attention call, forward and
backward, at the A14B training shape, eager and compiled, with the kernel time split by kernel.

    PYTHONPATH=/tmp/site:$PWD python3 bench/cudnn_fp8_overhead.py --json OUT.json      # one Hopper GPU
    python bench/cudnn_fp8_overhead.py --seq 256 --heads 2 --iters 1                   # CPU: the script only

Why: the FP8 graphs alone ran 1.50 s faster per A14B step than cuDNN's bf16 attention (40 blocks x
(12.9 + 23.4) ms, docs/benchmarks.md, f9778ec), but the step gained 1.03 s. The rest should be the work the
backend adds around the graphs: k and v smoothing (two means, two subtractions), per-tensor amax and e4m3
casts of q, k, v and dO, the e4m3 outputs taken back to bf16, the value mean added back. Whether that is
~0.47 s per step (12 ms per block) and which kernels carry it decides what to fuse.

What runs (inputs as a Wan block hands them to attention: [B, L, H, D] bf16, q and k RMS-normalised over the
H*D row, k with one shared offset; dO Gaussian / sqrt(L); seeded):
  * bf16: torch SDPA on cuDNN's backend over the [B, H, L, D] views, the recipes' `auto` path on Hopper;
  * cudnn_fp8 eager: `cudnn_fp8_attention(q, k, v, state)`;
  * cudnn_fp8 compiled: the same function under `torch.compile` (the trainer compiles whole blocks, so its
    smoothing and casts fuse with the norm and RoPE kernels there; alone they fuse only with each other).
Each: forward alone and forward + backward, CUDA events, median of --iters after --warmup calls (the first
cudnn_fp8 call calibrates its scales). Then one forward + backward under torch.profiler: device time per
kernel (top --top kernels), and the sum of cuDNN's attention kernels against everything else.
Reported: JSON (rewritten after every stage, so a run cut short keeps what it measured) and printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.cudnn_fp8_attention import cudnn_fp8_attention, new_scaling_state  # noqa: E402

# Kernel names of cuDNN's fused attention (bf16 and FP8 graphs): everything else counts as the wrapper's work.
ATTENTION_KERNEL_MARKS = ("sdpa", "fmha", "flash", "attention", "cudnn")


def inputs(batch: int, seq: int, heads: int, head_dim: int, device: torch.device, seed: int):
    g = torch.Generator(device=device).manual_seed(seed)

    def rms_rows(x):  # RMS norm over the whole H*D row, as the block's norm_q / norm_k
        flat = x.reshape(batch, seq, heads * head_dim)
        return (flat * torch.rsqrt(flat.pow(2).mean(-1, keepdim=True) + 1e-6)).reshape_as(x)

    shape = (batch, seq, heads, head_dim)
    q = rms_rows(torch.randn(shape, generator=g, device=device))
    k = rms_rows(torch.randn(shape, generator=g, device=device)) + torch.randn(heads, head_dim, generator=g,
                                                                                device=device)
    v = torch.randn(shape, generator=g, device=device)
    d_out = torch.randn(shape, generator=g, device=device) / seq ** 0.5
    return [t.to(torch.bfloat16) for t in (q, k, v, d_out)]


def sdpa_bf16(q, k, v, device: torch.device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.CUDNN_ATTENTION if device.type == "cuda" else SDPBackend.MATH
    with sdpa_kernel(backend):
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                v.transpose(1, 2))
    return out.transpose(1, 2)


def timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    """Median ms of `fn()` over `iters` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def kernel_split(fn, device: torch.device, top: int) -> dict:
    """One call of `fn` under the profiler: device ms per kernel, attention kernels against the rest."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time if device.type == "cuda" else event.cpu_time
        entry = per_kernel.setdefault(event.name, [0.0, 0])
        entry[0] += us / 1e3
        entry[1] += 1
    attention_ms = sum(ms for name, (ms, _) in per_kernel.items()
                       if any(mark in name.lower() for mark in ATTENTION_KERNEL_MARKS))
    total_ms = sum(ms for ms, _ in per_kernel.values())
    ranked = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:top]
    return {"total_ms": round(total_ms, 3), "attention_kernels_ms": round(attention_ms, 3),
            "other_kernels_ms": round(total_ms - attention_ms, 3),
            "top": [{"kernel": name[:160], "ms": round(ms, 3), "calls": calls} for name, (ms, calls) in ranked]}


def add_shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The attention call's shape (default: one A14B self-attention at 480x832x81), timing and seed."""
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="where the results go (rewritten after every stage)")
    add_shape_arguments(ap)
    ap.add_argument("--top", type=int, default=15, help="kernels listed per variant")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled variant")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    q0, k0, v0, d_out = inputs(args.batch, args.seq, args.heads, args.head_dim, device, args.seed)
    result = {"shape": [args.batch, args.seq, args.heads, args.head_dim], "device":
              torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "variants": {}}

    def save():
        text = json.dumps(result, indent=1)
        if args.json:
            Path(args.json).write_text(text + "\n")

    state = new_scaling_state(device)
    compiled = None if args.no_compile else torch.compile(cudnn_fp8_attention)
    variants = {"bf16": lambda q, k, v: sdpa_bf16(q, k, v, device),
                "cudnn_fp8_eager": lambda q, k, v: cudnn_fp8_attention(q, k, v, state)}
    if compiled is not None:
        variants["cudnn_fp8_compiled"] = lambda q, k, v: compiled(q, k, v, state)
    for name, attend in variants.items():
        q, k, v = (t.detach().requires_grad_(True) for t in (q0, k0, v0))

        def forward():
            with torch.no_grad():
                attend(q, k, v)

        def forward_backward():
            out = attend(q, k, v)
            torch.autograd.backward(out, d_out)

        try:
            t0 = time.perf_counter()
            forward_backward()  # compiles / calibrates; not timed
            if device.type == "cuda":
                torch.cuda.synchronize()
            entry = {"first_call_s": round(time.perf_counter() - t0, 2)}
            result["variants"][name] = entry
            entry["forward_ms"] = round(timed(forward, args.iters, args.warmup, device), 3)
            entry["forward_backward_ms"] = round(timed(forward_backward, args.iters, args.warmup, device), 3)
            save()
            entry["kernels"] = kernel_split(forward_backward, device, args.top)
        except Exception as exc:  # one variant failing leaves the others' figures
            result["variants"].setdefault(name, {})["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        save()
        print(name, json.dumps({k: v for k, v in result["variants"][name].items() if k != "kernels"}), flush=True)
    base = result["variants"].get("bf16", {}).get("forward_backward_ms")
    for name, entry in result["variants"].items():
        if base and "forward_backward_ms" in entry:
            # Under the recipes' save_attention: all a step runs each of the 40 blocks' attention op once
            # forward and once backward; the checkpoint recompute keeps the op's saved output but runs the
            # smoothing and casts before it again, so a step pays their forward share once more than this.
            entry["step_saving_s_40_blocks"] = round(40 * (base - entry["forward_backward_ms"]) / 1e3, 3)
    save()
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
