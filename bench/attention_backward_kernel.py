"""Experiment (issue 16): the 8-bit attention backward of bench/attention_backward_8bit.py as a Triton kernel.
Not wired into training: this is the first version, written on a CPU-only machine, to be timed on the GPU.

    TRITON_INTERPRET=1 python bench/attention_backward_kernel.py --check-cpu   # triton + numpy < 2.3, ~1 min
    python bench/attention_backward_kernel.py --compile-only    # any machine with triton: registers, spills (sm_90a)
    python bench/attention_backward_kernel.py [--json out.json] # H100/H200: check, then time at the A14B shape

One program per key block of one (batch, head), looping over the query blocks (FlashAttention-2's order).
Per (query block i, key block j), with the shipped forward's quantised operands (wan_model/fp8_attention.py)
and its row statistics m (max score, log2 units) and l (sum of p'):

    s   = (Q8_i K8_j^T) sq_i sk                    int8 tensor cores, exact int32 sums
    p'  = 2^(s - m_i + log2 448)                   P = p' / l
    dV_j += e4m3(p')^T DO8_i                        e4m3; DO8 = e4m3(dO / l / s_do), s_do per channel
    dP  = dO_i V_j^T                               bf16 operands (the error-sensitive product stays 16-bit)
    dS  = P (dP - D_i)                              D = rowsum(dO * O)
    dK_j += (int8(dS sq'_i / g_j))^T Q8_i * g_j     one scale per column of the tile
    dQ_i += int8(dS / r_i) K8_j * r_i sk / sqrt(d)  one scale per row of the tile, added atomically (float32)

The 8-bit products want their summed index contiguous in memory (wgmma's K-major rule for 8-bit types), so
dV, dK and dQ read transposed copies: DO8^T and Q8^T [B, H, D, Lq], K8^T [B, H, D, Lk]. Tensor-core work per
tile: int8 s, bf16 dP, e4m3 dV, int8 dK, int8 dQ = 3 bf16-units against 5 in a bf16 backward.

Prediction (written before any GPU run): correct to the emulation within float32 summation order (~1e-5);
at the A14B shape (1 x 32,760 tokens x 40 heads x 128, one training sample) ~1.5x cuDNN's bf16 backward
(96 ms per block on the H100, docs/benchmarks.md) if it reaches the forward kernel's efficiency; the dQ
atomics (BLOCK_M x 128 float32 adds per tile) may cost a good part of that.

`--check-cpu` runs the kernel in Triton's interpreter against the emulation. The interpreter converts float32
to e4m3 wrongly (docs/benchmarks.md, fifth session), so under it p' is first rounded to the e4m3 grid in
float32 (`_e4m3_grid`), which makes the conversion exact; and it multiplies bf16 operands of `tl.dot` as
their bit patterns, so there dP's operands go to float32 first (the same products). On the GPU neither.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention_backward_8bit import (BLOCK_M as EMULATED_BLOCK_M, BLOCK_N as EMULATED_BLOCK_N,  # noqa: E402
                                           int8_grads, rms_normed)
from bench.attention_kernels import rel  # noqa: E402
from wan_model.fp8_attention import FP8, FP8_MAX, K_PAD, quantize_qkv  # noqa: E402

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, warps, stages) timed on the GPU; the first matches the emulation's tiles (the check).
CONFIGS = [(64, 128, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 1), (64, 128, 4, 2)]


@triton.jit
def _e4m3_grid(x):
    """x >= 0 rounded to the nearest e4m3 value, in float32 (normal range: ties to even; below 2^-6 the
    subnormal step 2^-9), so that the conversion after it is exact."""
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = tl.floor(x * 512.0 + 0.5) * (1.0 / 512.0)
    return tl.where(x < 0.015625, subnormal, normal)


@triton.jit
def _to_int8(x):
    """Round to nearest (ties away from zero) into int8; |x| <= 127 by the caller's scale."""
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int32).to(tl.int8)


@triton.jit
def _attention_backward_kernel(Q8, Q8T, K8, K8T, V, DO, DO8T, QS, KS, M, LSUM, DELTA, SDO, DQ, DK, DV,
                               H, Lq, Lk, LqP, LkP, sm_scale, sq_plain,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               GRID_P: tl.constexpr):
    """Layouts (contiguous): Q8, DO [B, Lq, H, D]; K8 [B, LkP, H, D]; V, DK, DV [B, Lk, H, D]; Q8T, DO8T
    [B, H, D, LqP]; K8T [B, H, D, LkP]; QS [B, Lq, H] (log2(e)/sqrt(D) folded in); KS [B, H]; M, LSUM, DELTA
    [B, H, Lq]; SDO [B, H, D]; DQ [B, Lq, H, D] float32, zeroed (atomic adds)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Lk
    row_stride = H * HEAD_DIM
    # Key-block operands, loaded once: K8^T [D, BN] for s (D contiguous), K8 [BN, D] for dQ (BN contiguous),
    # V^T [D, BN] bf16 for dP.
    kt = tl.load(K8 + b * LkP * row_stride + h * HEAD_DIM + offs_n[None, :] * row_stride + offs_d[:, None])
    k_nd = tl.load(K8T + (b * H + h) * HEAD_DIM * LkP + offs_d[None, :] * LkP + offs_n[:, None])
    vt = tl.load(V + b * Lk * row_stride + h * HEAD_DIM + offs_n[None, :] * row_stride + offs_d[:, None],
                 mask=key_ok[None, :], other=0.0)
    sk = tl.load(KS + b * H + h)
    s_do = tl.load(SDO + (b * H + h) * HEAD_DIM + offs_d)
    dv_acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dk_acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    log2_fp8_max = 8.807354922057604
    stats = (b * H + h) * Lq
    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Lq
        q = tl.load(Q8 + b * Lq * row_stride + h * HEAD_DIM + offs_m[:, None] * row_stride + offs_d[None, :],
                    mask=row_ok[:, None], other=0)
        q_md = tl.load(Q8T + (b * H + h) * HEAD_DIM * LqP + offs_d[None, :] * LqP + offs_m[:, None])
        do8 = tl.load(DO8T + (b * H + h) * HEAD_DIM * LqP + offs_d[None, :] * LqP + offs_m[:, None])
        do = tl.load(DO + b * Lq * row_stride + h * HEAD_DIM + offs_m[:, None] * row_stride + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        sq = tl.load(QS + b * Lq * H + offs_m * H + h, mask=row_ok, other=0.0)
        m = tl.load(M + stats + offs_m, mask=row_ok, other=0.0)
        l = tl.load(LSUM + stats + offs_m, mask=row_ok, other=1.0)
        delta = tl.load(DELTA + stats + offs_m, mask=row_ok, other=0.0)

        s = tl.dot(q, kt).to(tl.float32) * (sq * sk)[:, None]
        p = tl.math.exp2(s - (m - log2_fp8_max)[:, None])
        p = tl.where(key_ok[None, :], p, 0.0)
        if GRID_P:
            p8 = _e4m3_grid(p).to(tl.float8e4nv)
        else:
            p8 = p.to(tl.float8e4nv)
        dv_acc = tl.dot(tl.trans(p8), do8, dv_acc)

        if GRID_P:  # the interpreter multiplies bf16 operands as their bit patterns: float32 there
            dp = tl.dot(do.to(tl.float32), vt.to(tl.float32))
        else:
            dp = tl.dot(do, vt)
        # Per-element divisions cost the special-function unit per score: reciprocals of row / column vectors.
        ds = p * (1.0 / l)[:, None] * (dp - delta[:, None])

        g = ds * (sq * sq_plain)[:, None]
        g_scale = tl.maximum(tl.max(tl.abs(g), 0) / 127.0, 1e-30)
        g8 = _to_int8(g * (1.0 / g_scale)[None, :])
        dk_acc += tl.dot(tl.trans(g8), q_md).to(tl.float32) * g_scale[:, None]

        r_scale = tl.maximum(tl.max(tl.abs(ds), 1) / 127.0, 1e-30)
        ds8 = _to_int8(ds * (1.0 / r_scale)[:, None])
        dq = tl.dot(ds8, k_nd).to(tl.float32) * (r_scale * (sk * sm_scale))[:, None]
        # relaxed: the adds need no ordering among themselves (the default acq_rel would fence every one)
        tl.atomic_add(DQ + b * Lq * row_stride + h * HEAD_DIM + offs_m[:, None] * row_stride + offs_d[None, :], dq,
                      mask=row_ok[:, None], sem="relaxed")

    out = b * Lk * row_stride + h * HEAD_DIM + offs_n[:, None] * row_stride + offs_d[None, :]
    tl.store(DK + out, dk_acc * sm_scale, mask=key_ok[:, None])
    tl.store(DV + out, dv_acc * s_do[None, :], mask=key_ok[:, None])


def prepare(q, k, v, do, out):
    """The kernel's operands from bf16 q, k, v, dO [B, L, H, D] and the forward's output O: quantised q, k (as
    the forward), their transposed copies, the row statistics m and l (here from the quantised scores in
    chunks; an integrated forward would write them), D = rowsum(dO O), and dO / l in e4m3 per channel."""
    batch, lq, heads, head_dim = q.shape
    lk = k.shape[1]
    q8, k8, _, q_scale, k_scale, _ = quantize_qkv(q, k, v)
    lq_pad = lq + (-lq) % K_PAD
    q8t = F.pad(q8.permute(0, 2, 3, 1), (0, lq_pad - lq)).contiguous()
    k8t = k8.permute(0, 2, 3, 1).contiguous()
    m = torch.empty(batch, heads, lq, device=q.device)
    lsum = torch.empty_like(m)
    for bi in range(batch):
        for hi in range(heads):
            kf = k8[bi, :lk, hi].float()
            for start in range(0, lq, 4096):
                rows = slice(start, start + 4096)
                s = (q8[bi, rows, hi].float() @ kf.t()) * q_scale[bi, rows, hi, None] * k_scale[bi, hi]
                m[bi, hi, rows] = s.amax(-1)
                lsum[bi, hi, rows] = torch.exp2(s - m[bi, hi, rows, None] + math.log2(FP8_MAX)).sum(-1)
    delta = (do.float() * out.float()).sum(-1).permute(0, 2, 1).contiguous()        # [B, H, Lq]
    do_l = do.float() / lsum.permute(0, 2, 1)[..., None]                            # [B, Lq, H, D]
    s_do = (do_l.abs().amax(1) / FP8_MAX).clamp_min(1e-30)                          # [B, H, D]
    do8t = F.pad((do_l / s_do[:, None]).permute(0, 2, 3, 1), (0, lq_pad - lq)).to(FP8).contiguous()
    return dict(q8=q8.contiguous(), q8t=q8t, k8=k8.contiguous(), k8t=k8t, v=v.contiguous(), do=do.contiguous(),
                do8t=do8t, qs=q_scale.contiguous(), ks=k_scale.contiguous(), m=m, lsum=lsum, delta=delta,
                s_do=s_do.contiguous(), lq=lq, lk=lk, lq_pad=lq_pad, head_dim=head_dim)


def backward(ops: dict, config=CONFIGS[0]):
    """dq, dk, dv [B, L, H, D] float32 from `prepare`'s operands."""
    block_m, block_n, warps, stages = config
    batch, lq, heads, head_dim = ops["q8"].shape
    dq = torch.zeros(ops["q8"].shape, device=ops["q8"].device, dtype=torch.float32)
    dk = torch.empty(ops["v"].shape, device=dq.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    grid = (triton.cdiv(ops["lk"], block_n), batch * heads)
    extra = {} if INTERPRETED else dict(num_warps=warps, num_stages=stages)
    _attention_backward_kernel[grid](
        ops["q8"], ops["q8t"], ops["k8"], ops["k8t"], ops["v"], ops["do"], ops["do8t"], ops["qs"], ops["ks"],
        ops["m"], ops["lsum"], ops["delta"], ops["s_do"], dq, dk, dv,
        heads, lq, ops["lk"], ops["lq_pad"], ops["k8"].shape[1], 1 / math.sqrt(head_dim),
        math.sqrt(head_dim) / math.log2(math.e), HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        GRID_P=INTERPRETED, **extra)
    return dq, dk, dv


def check_against_emulation(length: int, device) -> dict:
    """One head of `length` tokens: the kernel against bench/attention_backward_8bit.py's emulation."""
    from wan_model.fp8_attention import reference_fp8_attention

    gen = torch.Generator().manual_seed(0)
    q, k = rms_normed((length, 128), gen), rms_normed((length, 128), gen)
    v = torch.randn(length, 128, generator=gen).bfloat16()
    do = (torch.randn(length, 128, generator=gen) / math.sqrt(length)).bfloat16()
    emulated = int8_grads(q, k, v, do, dp_8bit=False)
    q4, k4, v4, do4 = (t[None, :, None].to(device) for t in (q, k, v, do))
    out = reference_fp8_attention(q4, k4, v4)
    got = backward(prepare(q4, k4, v4, do4, out), (EMULATED_BLOCK_M, EMULATED_BLOCK_N, 8, 2))
    return {name: rel(g[0, :, 0].cpu(), e) for name, g, e in zip(("dq", "dk", "dv"), got, emulated)}


def compile_only() -> None:
    """Compile for sm_90a without a GPU (bench/kernel_sass.py) and print registers, spills and shared memory."""
    from bench.kernel_sass import compile_for_hopper

    pointers = ["*i8", "*i8", "*i8", "*i8", "*bf16", "*bf16", "*fp8e4nv"] + ["*fp32"] * 9
    for block_m, block_n, warps, stages in CONFIGS:
        build = compile_for_hopper(_attention_backward_kernel,
                                   dict(HEAD_DIM=128, BLOCK_M=block_m, BLOCK_N=block_n, GRID_P=False),
                                   num_warps=warps, num_stages=stages, pointers=pointers,
                                   scalar_types={"sm_scale": "fp32", "sq_plain": "fp32"},
                                   divisible={"Q8", "Q8T", "K8", "K8T", "V", "DO", "DO8T", "DQ", "DK", "DV",
                                              "LqP", "LkP"})
        # wgmma by operand type: IGMMA int8, QGMMA e4m3, HGMMA bf16; IMMA / HMMA would be mma.sync fallbacks.
        kinds = {kind: len(re.findall(rf"\b{kind}\.", build.sass)) for kind in ("IGMMA", "QGMMA", "HGMMA", "IMMA", "HMMA")}
        print(json.dumps(dict(config=[block_m, block_n, warps, stages], registers=build.registers,
                              spill_store_bytes=build.spill_store_bytes, shared_bytes=build.shared_bytes,
                              tensor_core_instructions=kinds)), flush=True)


def time_gpu(json_path: Path | None) -> None:
    from bench.attention_kernels import rms_normed as normed_heads, time_ms

    device = torch.device("cuda")
    errors = check_against_emulation(1000, device)
    print(json.dumps(dict(check="kernel vs emulation, 1,000 tokens", **{k: float(f"{v:.2e}") for k, v in errors.items()})),
          flush=True)
    batch, length, heads, head_dim = 1, 32_760, 40, 128
    gen = torch.Generator(device=device).manual_seed(0)
    q, k = (normed_heads((batch, length, heads, head_dim), gen, device) for _ in range(2))
    v = torch.randn(batch, length, heads, head_dim, generator=gen, device=device).bfloat16()
    do = (torch.randn(batch, length, heads, head_dim, generator=gen, device=device) / math.sqrt(length)).bfloat16()
    # bf16 SDPA (cuDNN on Hopper), forward and backward, as training runs it.
    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    out_ref = F.scaled_dot_product_attention(qt, kt, vt)
    ref = torch.autograd.grad(out_ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True)
    sdpa_backward_ms = time_ms(lambda: torch.autograd.grad(out_ref, (qt, kt, vt), do.transpose(1, 2), retain_graph=True))
    ref = [g.transpose(1, 2) for g in ref]
    from wan_model.fp8_attention import fp8_attention

    with torch.no_grad():
        out = fp8_attention(q, k, v)
        ops = prepare(q, k, v, do, out)
    flops = 2.5 * 4 * batch * heads * length * length * head_dim
    rows = [dict(variant="sdpa bf16 backward", ms=round(sdpa_backward_ms, 2), tflops=round(flops / sdpa_backward_ms / 1e9, 1))]
    print(json.dumps(rows[-1]), flush=True)
    for config in CONFIGS:
        try:
            grads = backward(ops, config)
            ms = time_ms(lambda: backward(ops, config))
            row = dict(variant="8-bit kernel", config=list(config), ms=round(ms, 2), tflops=round(flops / ms / 1e9, 1),
                       speedup_vs_sdpa=round(sdpa_backward_ms / ms, 3),
                       **{f"{n}_rel_err_vs_sdpa_bf16": round(rel(g, r), 5) for n, g, r in zip(("dq", "dk", "dv"), grads, ref)})
        except Exception as err:  # a config that does not compile or fit: say so, go on
            row = dict(variant="8-bit kernel", config=list(config), error=str(err).splitlines()[0][:200])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if json_path:
        json_path.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                             triton=triton.__version__, check=errors, rows=rows), indent=2))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-cpu", action="store_true")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.check_cpu:
        if not INTERPRETED:
            sys.exit("--check-cpu runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
        errors = check_against_emulation(320, torch.device("cpu"))
        print(json.dumps(dict(check="kernel (interpreter) vs emulation, 320 tokens", **errors)))
        assert all(e < 1e-3 for e in errors.values()), errors
    elif args.compile_only:
        compile_only()
    else:
        time_gpu(args.json)


if __name__ == "__main__":
    main()
