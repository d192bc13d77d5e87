"""Experiment (issue 14), CPU only: what lazy rescaling would cost the int8/FP8 attention kernel in accuracy.

    python bench/lazy_rescale.py                     # ~1 minute on 2 cores

The shipped kernel (wan_model/fp8_attention.py) keeps a running row maximum m and, for every key block,
rescales its accumulator by alpha = 2^(m_old - m_new) before the next P v product: 64 multiplies per thread
per block (the FMUL row of `bench/kernel_sass.py`), and a dependency between consecutive tensor-core
products. FlashAttention-4's lazy rescaling moves m only when a block's maximum exceeds it by more than tau
(log2 units); otherwise the stale m is kept and p' = 2^(s - m + log2 448 - tau) stays within e4m3's 448. The
price is that every p' sits 2^tau lower in e4m3's range, where small probabilities lose mantissa bits to
the subnormals. This script measures that price with a float32 emulation of the kernel's block loop (int8
q k^T, key blocks of 128, e4m3 P through torch's cast, which rounds to nearest like the GPU's; the
Triton interpreter's cast is faulty, docs/benchmarks.md) on RMS-normed random q, k (Wan's q/k norm) and
random v, against exact float32 attention: once as Wan's diffuse random rows, once with q scaled up 3x
(sharper rows, as trained attention often is). It also counts how often rows rescale.

The fourth session's interpreter-based figures for this (4.9% at tau 3, 7.4% at tau 8) are void; these
replace them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.fp8_attention import FP8, FP8_MAX, quantize_qkv  # noqa: E402

LOG2_FP8_MAX = math.log2(FP8_MAX)


def blockwise_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tau: float,
                        block: int = 128) -> tuple[torch.Tensor, float]:
    """The kernel's loop in float32 for [1, L, H, D] inputs; tau 0 is the shipped kernel (rescale whenever the
    maximum rises). Returns (out [1, Lq, H, D] float32, share of (row, block) steps that rescaled after the
    first block)."""
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v)
    lk = k.shape[1]
    outs, rescaled, steps = [], 0, 0
    for h in range(q.shape[2]):
        scores = (q8[0, :, h].float() @ k8[0, :lk, h].float().T) * (q_scale[0, :, h, None] * k_scale[0, h])
        vt = vt8[0, h, :, :lk].float()                                                     # [D, Lk]
        m = torch.full((scores.shape[0],), float("-inf"))
        l = torch.zeros(scores.shape[0])
        acc = torch.zeros(scores.shape[0], vt.shape[0])
        for j, start in enumerate(range(0, lk, block)):
            s = scores[:, start:start + block]
            block_max = s.amax(1)
            grow = block_max > m + tau if tau > 0 else block_max > m
            m_new = torch.where(grow, torch.maximum(m, block_max), m)
            if j > 0:
                rescaled += int(grow.sum())
                steps += grow.numel()
            p = torch.exp2(s - m_new[:, None] + (LOG2_FP8_MAX - tau))
            alpha = torch.exp2(m - m_new)
            l = l * alpha + p.sum(1)
            acc = acc * alpha[:, None] + p.clamp(max=FP8_MAX).to(FP8).float() @ vt[:, start:start + block].T
            m = m_new
        outs.append(acc / l[:, None] * v_scale[0, h])
    return torch.stack(outs, dim=1)[None], rescaled / max(steps, 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=8192, help="sequence length (keys); A14B 480p has 32,760")
    ap.add_argument("--queries", type=int, default=512, help="query rows evaluated (a slice of the sequence)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--taus", type=float, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    d, heads = 128, args.heads
    rows = []
    for sharpness in (1.0, 3.0):
        q = torch.randn(1, args.keys, heads, d)
        k = torch.randn(1, args.keys, heads, d)
        q = q / q.flatten(2).pow(2).mean(-1).sqrt()[..., None, None] * sharpness   # RMS norm over all heads
        k = k / k.flatten(2).pow(2).mean(-1).sqrt()[..., None, None]
        v = torch.randn(1, args.keys, heads, d)
        q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        qs = q[:, : args.queries]
        exact = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qs.float(), k.float()) / math.sqrt(d), -1)
        exact = torch.einsum("bhqk,bkhd->bqhd", exact, v.float())
        baseline = None
        for tau in args.taus:
            # quantize_qkv scales q per token, so a query slice quantises as it would in the whole sequence
            out, share = blockwise_attention(qs, k, v, tau)
            baseline = out if tau == 0 else baseline
            row = dict(q_scale=sharpness, tau=tau, keys=args.keys, err_vs_exact=round(rel(out, exact), 5),
                       rescaled_share=round(share, 4))
            if baseline is not None and tau != 0:
                row["diff_vs_tau0"] = round(rel(out, baseline), 5)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
