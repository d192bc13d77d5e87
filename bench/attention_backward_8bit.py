"""Experiment (issue 16), CPU only: how far an 8-bit attention backward moves the gradients, before any kernel.

    python bench/attention_backward_8bit.py [--keys 4096] [--json out.json]      # ~1-2 minutes on 2 cores

Why: at T2V-A14B 480x832x81 the self-attention backward is ~3.9 s of a 8.93 s training step, already at
cuDNN's bf16 rate (docs/benchmarks.md, issue 16), so the 7.5 s target needs it on the 8-bit tensor cores.
SageBwd (Zhang et al., arXiv 2603.02170) runs six of the seven attention matmuls in INT8 and keeps
dP = dO V^T in 16 bits, naming the score gradient dS as the main source of error. This script emulates, in
float32 with torch's casts, the design a Triton kernel here would follow, with the shipped forward's
quantisation (wan_model/fp8_attention.py: q int8 per token, k smoothed and int8 per head, v e4m3 per
channel, P as e4m3(p') with p' = 2^(s - m + log2 448)):

    scores   s_ij = (Q8 K8^T)_ij sq_i sk                       recomputed from the forward's int8 operands
    P_ij     = p'_ij / l_i                                      m_i, l_i saved by the forward
    dV_j     = sum_i P_ij dO_i = (e4m3(p')^T e4m3(dO / l / s_do))_j * s_do        s_do: per channel
    dP_ij    = dO_i . v_j                                       bf16 operands, float32 sums (SageBwd's choice)
    dS_ij    = P_ij (dP_ij - D_i),   D_i = dO_i . O_i
    dq_i     = sk / sqrt(D) * sum_j dS_ij K8_j                  dS int8, one scale per row and key block
    dk_j     = 1 / sqrt(D) * sum_i (dS_ij sq'_i) Q8_i           (dS sq') int8, one scale per column and query block

(dq through the smoothed k' = k - mean(k) is exact: each row of dS sums to zero.) The scales sit outside
each tile's sum, so a kernel applies them once per tile. Variants: `bf16` (what training runs today, as a
flash-style kernel computes it: bf16 inputs, P and dS rounded to bf16 before their matmuls, float32 sums),
`int8-fwd` (the 8-bit forward in training, its output and log-sum-exp handed to that same bf16 backward:
the ~0.4 s lever of docs/benchmarks.md, issue 16),
`int8` (the design above), `int8-dp8` (dP on 8 bits too: dO e4m3 per row with v's channel scales folded in,
against the forward's e4m3 v). Each against exact attention in float64 on the same bf16 inputs; RMS-normed
random q and k (Wan's q/k norm), random v and dO; once with q scaled 3x (sharper rows). Reported: relative
error and cosine of dq, dk, dv. Key blocks of 128 and query blocks of 64, the forward kernel's tiles.

What it cannot say: how the error reaches the LoRA gradients through the rest of the block, nor the speed;
those need the kernel and the GPU (prediction in docs/benchmarks.md: the backward ~1.5x cuDNN's).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from wan_model.fp8_attention import FP8, FP8_MAX, INT8_MAX, LOG2E, quantize_qkv  # noqa: E402

BLOCK_M, BLOCK_N = 64, 128
VARIANTS = ("bf16", "int8-fwd", "int8", "int8-dp8")


def exact_grads(q, k, v, do):
    """Float64 autograd of softmax(q k^T / sqrt(D)) v for [L, D] inputs (one head)."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    out = torch.softmax(q @ k.t() / math.sqrt(q.shape[-1]), -1) @ v
    return torch.autograd.grad(out, (q, k, v), do.double())


def bf16_flash_backward(q, k, v, do, out, lse):
    """Today's backward as a flash kernel computes it from a forward's output and natural-log log-sum-exp:
    P = exp(S - LSE) recomputed from bf16 q and k, float32 sums, P and dS rounded to bf16 before their matmuls."""
    qf, kf, vf, dof = (t.float() for t in (q, k, v, do))
    scale = 1 / math.sqrt(q.shape[-1])
    p = torch.exp(qf @ kf.t() * scale - lse)
    d = (dof * out.bfloat16().float()).sum(-1, keepdim=True)       # the forward's bf16 output, as training saves it
    dv = p.bfloat16().float().t() @ dof
    ds = (p * (dof @ vf.t() - d)).bfloat16().float()
    return ds @ kf * scale, ds.t() @ qf * scale, dv


def bf16_flash_grads(q, k, v, do):
    """Today's forward and backward (bf16 operands, float32 sums, P rounded to bf16 before P v)."""
    s = q.float() @ k.float().t() / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, -1, keepdim=True)
    out = torch.exp(s - lse).bfloat16().float() @ v.float()
    return bf16_flash_backward(q, k, v, do, out, lse)


def tile_scale(x: torch.Tensor, rows: bool, block: int, qmax: float) -> torch.Tensor:
    """Per-row scales over column blocks (rows=True) or per-column scales over row blocks, broadcast to x
    ([Lq, Lk]; a last, partial block is a tile of its own, as in a kernel)."""
    if rows:
        padded = torch.nn.functional.pad(x, (0, -x.shape[1] % block))
        blocks = padded.unflatten(1, (-1, block))                 # [Lq, nb, block]
        s = blocks.abs().amax(-1, keepdim=True) / qmax
        return s.expand_as(blocks).flatten(1)[:, : x.shape[1]]
    padded = torch.nn.functional.pad(x, (0, 0, 0, -x.shape[0] % block))
    blocks = padded.unflatten(0, (-1, block))                     # [nb, block, Lk]
    s = blocks.abs().amax(1, keepdim=True) / qmax
    return s.expand_as(blocks).flatten(0, 1)[: x.shape[0]]


def int8_forward(q, k, v):
    """The shipped forward kernel's arithmetic for [L, D] bf16 inputs (one head): returns the int8 operands and
    scales, log2-unit scores s, row maxima m, p' = 2^(s - m + log2 448), l = sum p' and the output (float32)."""
    length = q.shape[0]
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(*(t[None, :, None] for t in (q, k, v)))
    q8, k8, sq, sk = q8[0, :, 0].float(), k8[0, :length, 0].float(), q_scale[0, :, 0], k_scale[0, 0]
    v8, sv = vt8[0, 0, :, :length].float().t(), v_scale[0, 0]         # [L, D] e4m3 values, [D]
    s = (q8 @ k8.t()) * sq[:, None] * sk
    m = s.amax(-1, keepdim=True)
    p_prime = torch.exp2(s - m + math.log2(FP8_MAX))
    l = p_prime.sum(-1, keepdim=True)
    out = (p_prime.to(FP8).float() @ v8) * sv / l
    return q8, k8, sq, sk, v8, sv, m, p_prime, l, out


def int8_forward_bf16_backward_grads(q, k, v, do):
    """The 8-bit forward kept for training with today's bf16 backward fed its output and log-sum-exp (as cuDNN's
    backward takes them): the recomputed P's rows carry the forward's LSE error, D = rowsum(dO O) its output's."""
    *_, m, _, l, out = int8_forward(q, k, v)
    lse = (m - math.log2(FP8_MAX) + torch.log2(l)) * math.log(2)    # log2 -> natural log, as flash kernels keep it
    return bf16_flash_backward(q, k, v, do, out, lse)


def int8_grads(q, k, v, do, dp_8bit: bool):
    """The 8-bit design of the module docstring for [L, D] bf16 inputs (one head); returns dq, dk, dv."""
    head_dim = q.shape[-1]
    # Forward (the shipped kernel's arithmetic): log2-unit scores, p' in [0, 448], out from e4m3(p') and e4m3 v.
    q8, k8, sq, sk, v8, sv, m, p_prime, l, out = int8_forward(q, k, v)
    dof = do.float()
    d = (dof * out.bfloat16().float()).sum(-1, keepdim=True)       # the forward's bf16 output, as training saves it
    p = p_prime / l
    # dV = sum_i p'_ij (dO_i / l_i): dO / l quantised per channel (the summed index is the token).
    do_l = dof / l
    s_do = (do_l.abs().amax(0) / FP8_MAX).clamp_min(1e-30)
    dv = (p_prime.to(FP8).float().t() @ (do_l / s_do).to(FP8).float()) * s_do
    if dp_8bit:  # dP_ij = sum_d (dO_id sv_d) V8_jd: v's channel scales folded into dO, dO'' per row in e4m3
        do_v = dof * sv
        s_dov = (do_v.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(1e-30)
        dp = ((do_v / s_dov).to(FP8).float() @ v8.t()) * s_dov
    else:
        dp = dof @ v.float().t()
    ds = p * (dp - d)
    # dq_i = sk / sqrt(D) sum_j dS_ij K8_j (scores here are natural-log units: s carried log2(e), dS does not)
    ds_row_scale = tile_scale(ds, rows=True, block=BLOCK_N, qmax=INT8_MAX).clamp_min(1e-30)
    dq = ((ds / ds_row_scale).round() * ds_row_scale) @ k8 * (sk / math.sqrt(head_dim))
    # dk_j = 1/sqrt(D) sum_i (dS_ij sq'_i) Q8_i, sq' the per-token q scale without log2(e)/sqrt(D)
    sq_plain = sq / (LOG2E / math.sqrt(head_dim))
    g = ds * sq_plain[:, None]
    g_col_scale = tile_scale(g, rows=False, block=BLOCK_M, qmax=INT8_MAX).clamp_min(1e-30)
    dk = ((g / g_col_scale).round() * g_col_scale).t() @ q8 / math.sqrt(head_dim)
    return dq, dk, dv


def rms_normed(shape, gen) -> torch.Tensor:
    x = torch.randn(shape, generator=gen)
    return (x / x.pow(2).mean(-1, keepdim=True).sqrt()).bfloat16()


def compare(grads, reference) -> dict:
    row = {}
    for name, g, r in zip(("dq", "dk", "dv"), grads, reference):
        g, r = g.double().flatten(), r.flatten()
        row[f"{name}_rel_err"] = round(float((g - r).norm() / r.norm()), 5)
        row[f"{name}_cosine"] = round(float(g @ r / (g.norm() * r.norm())), 6)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=4096, help="sequence length (a multiple of 128)")
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for rows_kind, q_gain in (("Wan-like (diffuse)", 1.0), ("q scaled 3x (sharper)", 3.0)):
        per_variant = {name: [] for name in VARIANTS}
        for _ in range(args.heads):
            q = (rms_normed((args.keys, 128), gen).float() * q_gain).bfloat16()
            k = rms_normed((args.keys, 128), gen)
            v = torch.randn(args.keys, 128, generator=gen).bfloat16()
            do = (torch.randn(args.keys, 128, generator=gen) / math.sqrt(args.keys)).bfloat16()
            reference = exact_grads(q, k, v, do)
            per_variant["bf16"].append(compare(bf16_flash_grads(q, k, v, do), reference))
            per_variant["int8-fwd"].append(compare(int8_forward_bf16_backward_grads(q, k, v, do), reference))
            per_variant["int8"].append(compare(int8_grads(q, k, v, do, dp_8bit=False), reference))
            per_variant["int8-dp8"].append(compare(int8_grads(q, k, v, do, dp_8bit=True), reference))
        for name, heads in per_variant.items():
            row = {"rows": rows_kind, "variant": name}
            for key in heads[0]:
                row[key] = round(sum(h[key] for h in heads) / len(heads), 6)
            rows.append(row)
            print(json.dumps(row), flush=True)
    emit(dict(keys=args.keys, heads=args.heads, block_m=BLOCK_M, block_n=BLOCK_N, device="cpu",
              torch=torch.__version__, rows=rows), args.json)


if __name__ == "__main__":
    main()
