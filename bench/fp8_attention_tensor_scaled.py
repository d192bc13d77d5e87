"""Experiment (issue 16), CPU only: the gradient error of cuDNN-style FP8 attention on Wan-like rows, with and
without smoothing keys and values first.

    python bench/fp8_attention_tensor_scaled.py [--keys 2048] [--heads 2] [--json out.json]   # ~1 min, 2 cores

Why: cuDNN's FP8 fused attention ran 1.49x (forward) and 1.29x (backward) cuDNN's bf16 SDPA at the A14B shape,
the lever that can reach the 7.5 s step (docs/benchmarks.md, issue 16), with 7-9% error on its gradients, but
measured on Gaussian v. Real blocks' values can share a component many times their spread (block 20 of the
random-weight A14B expert: 15x), and one e4m3 scale per tensor then spends its range on that shared part.
This emulates, in float32 with torch's e4m3 casts, what the probe ran (`bench/cudnn_fp8_attention.py`):
q, k, v and dO in e4m3 with one scale per tensor (amax / 448); P scaled by 448 into e4m3 for P v and
P^T dO; O, dS (cuDNN's dP) and the gradients written in e4m3, each with its amax scale; sums in float32;
D = rowsum(dO O) from the e4m3 dO and O. Variants:
  * `bf16`: a flash kernel in bf16 (today's training), the reference point;
  * `e4m3`: the above on the raw q, k, v;
  * `e4m3-smoothed`: k and v minus their token means first, v's mean added to the output after (exact in real
    arithmetic), the gradients through that step as autograd gives them (dk loses its token mean; dv gets
    dO's token mean back).
Rows: RMS-normed random q, k and Gaussian v ("Gaussian"), and the same with a shared component in q and k
(1.6x their spread) and in v (15x; "block-20-like"). Each against float64 autograd of exact attention on the
same bf16 inputs: relative error and cosine of dq, dk, dv.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention_backward_8bit import bf16_flash_grads, compare, exact_grads, rms_normed  # noqa: E402
from bench.report import emit  # noqa: E402
from wan_model.fp8_attention import FP8, FP8_MAX  # noqa: E402

VARIANTS = ("bf16", "e4m3", "e4m3-smoothed")


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to e4m3 with one scale for the whole tensor (amax -> 448), back in float32."""
    scale = (x.abs().amax() / FP8_MAX).clamp_min(1e-30)
    return (x / scale).to(FP8).float() * scale


def tensor_scaled_grads(q, k, v, do) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of cuDNN-style FP8 attention (module docstring) for [L, D] inputs (one head)."""
    scale = 1 / math.sqrt(q.shape[-1])
    q8, k8, v8, do8 = (e4m3(t.float()) for t in (q, k, v, do))
    s = q8 @ k8.t() * scale
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse)
    p8 = (p * FP8_MAX).to(FP8).float() / FP8_MAX                   # P into e4m3 with the fixed scale 448
    out8 = e4m3(p8 @ v8)
    d = (do8 * out8).sum(-1, keepdim=True)
    dv = e4m3(p8.t() @ do8)
    ds8 = e4m3(p * (do8 @ v8.t() - d))
    return e4m3(ds8 @ k8 * scale), e4m3(ds8.t() @ q8 * scale), dv


def smoothed_grads(q, k, v, do) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same on k - mean k and v - mean v (bf16, as the model would hand them), mean v added back; the
    gradients carried through the smoothing as autograd would: dk - mean dk, dv - mean dv + mean_tokens dO."""
    ks = (k.float() - k.float().mean(0)).bfloat16()
    vs = (v.float() - v.float().mean(0)).bfloat16()
    dq, dk, dv = tensor_scaled_grads(q, ks, vs, do)
    return dq, dk - dk.mean(0), dv - dv.mean(0) + do.float().sum(0) / do.shape[0]


def inputs(keys: int, shared: bool, gen: torch.Generator):
    q, k = rms_normed((keys, 128), gen).float(), rms_normed((keys, 128), gen).float()
    v = torch.randn(keys, 128, generator=gen)
    if shared:  # one vector every token carries, as the block input's timestep modulation puts there
        q = q + 1.6 * torch.randn(128, generator=gen)
        k = k + 1.6 * torch.randn(128, generator=gen)
        v = v + 15.0 * torch.randn(128, generator=gen)
    do = torch.randn(keys, 128, generator=gen) / math.sqrt(keys)
    return tuple(t.bfloat16() for t in (q, k, v, do))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for rows_kind, shared in (("Gaussian", False), ("block-20-like (shared q, k 1.6x; v 15x)", True)):
        per_variant = {name: [] for name in VARIANTS}
        for _ in range(args.heads):
            q, k, v, do = inputs(args.keys, shared, gen)
            reference = exact_grads(q, k, v, do)
            per_variant["bf16"].append(compare(bf16_flash_grads(q, k, v, do), reference))
            per_variant["e4m3"].append(compare(tensor_scaled_grads(q, k, v, do), reference))
            per_variant["e4m3-smoothed"].append(compare(smoothed_grads(q, k, v, do), reference))
        for name, heads in per_variant.items():
            row = {"rows": rows_kind, "variant": name}
            row.update({key: round(sum(h[key] for h in heads) / len(heads), 6) for key in heads[0]})
            rows.append(row)
            print(json.dumps(row), flush=True)
    emit(dict(keys=args.keys, heads=args.heads, device="cpu", torch=torch.__version__, rows=rows), args.json)


if __name__ == "__main__":
    main()
