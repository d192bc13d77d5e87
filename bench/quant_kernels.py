"""Experiment (issue 14): the sampler's FP8 activation quantisation, two faster forms, timed against the
Inductor kernels the compiled blocks run today. Nothing here is wired into the model yet.

    python bench/quant_kernels.py                      # H100/H200: both experiments, A14B and 5B shapes
    TRITON_INTERPRET=1 python bench/quant_kernels.py --check-cpu   # any machine with triton and numpy < 2.3
    python bench/quant_kernels.py --compile-only       # any machine with triton: registers, spills (sm_90a)

Why (docs/benchmarks.md, "Sampling speed, fifth session"): in a `--fast` CFG step of T2V-A14B at 480p,
Inductor's fused kernels take ~540 ms of 4.1 s, and the 1.6x target needs 0.10 s less. Two of them are far
from the memory traffic they need:

1. **LayerNorm + modulation + per-row e4m3 quantisation** before the q/k/v linears and before the FFN
   (`modulate` then `fp8.quantize_rows`, twice per block): 1.5 ms and 1.05 ms per call for ~1.0 GB of traffic
   (~0.25 ms at the H200's 4 TB/s). A looped reduction re-reads the row for the mean and variance, for the
   max and for the cast. The kernel here holds the whole row (5,120 or 3,072 values) in registers: one read
   of x, shift and scale added from the official `modulation + e0` in place, one write of the e4m3 row and
   its scale (and of the bf16 row, which attached LoRA layers read).
2. **GELU + per-row quantisation of the FFN's hidden state** (3.0 ms per call at A14B, 121 ms per step):
   the two-pass reduction evaluates the tanh-GELU for the row's max and again for the cast. For a row h,
   max_i |GELU(h_i)| = GELU(max_i h_i) whenever that is at least 0.171: GELU is increasing above -0.7525 and
   |GELU| of any input below is at most 0.17004 (its minimum), 0.16992 after bf16 rounding; rounding to bf16
   is monotone, so the bf16 GELU of the max is the max of the bf16 GELUs. The first pass then is a plain max
   of h, and GELU runs once; the quantised row is identical wherever that condition holds (real FFN rows:
   everywhere), and elsewhere the scale is max(that, 0.171) / 448, a little coarser, never clipping. Computed
   in float32: Inductor's fused kernels (the compiled blocks) keep h + bias and GELU unrounded, and there the
   scales come out equal to the two-pass ones (a CPU smoke run of `time_gpu`, compiled: all rows); eager code
   rounds GELU's values to bf16 first, so there the bound may sit up to half a bf16 step below the row's max,
   whose value then clips by at most 2^-9.

3. **q's RMS norm + RoPE + int8 quantisation** (`Attention.forward`'s norm_q and apply_rope, then
   `fp8_attention.quantize_qkv`'s q part): Inductor fuses them with k's into one 101 ms kernel per A14B step
   (2.5 ms per block). The kernel here reads each token's q row twice (the sum of squares, then eight heads
   at a time: norm, RoPE on channel pairs, per-head max, int8), L2 serving the second read.

Prediction (written before any GPU run): (1) ~0.35 ms per call at A14B, saving ~(1.5 + 1.05 - 2 x 0.35) x 40
= ~75 ms per CFG step; (2) ~1.3 ms per call (3.6 GB read, 0.9 GB written, one GELU), saving ~65 ms; together
4.11 -> ~3.97 s, 1.61x at the 8352216 run's diffusers time; (3) q alone at ~0.25 ms per call (read 671 MB
twice, mostly from L2, write 335 MB) against whatever Inductor's q share of the 2.5 ms is (the reference here
is q's path alone, compiled). Integration plan if they hold: (1) a custom op
called by `WanBlock` under no_grad when the consumers are FP8 matmul linears, `FP8Linear.forward(x,
x_fp8=None)` taking the pre-quantised row (LoRA hooks still receive the bf16 row); (2) `FP8Linear.forward(x,
input_amax=None)` with the FFN passing GELU(max h) (autograd unaffected: the amax is a constant).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.fp8 import FP8, FP8_MAX, quantize_rows  # noqa: E402
from wan_model.fp8_attention import INT8_MAX, LOG2E  # noqa: E402
from wan_model.rope import apply_rope, rope_tables  # noqa: E402
from wan_model.transformer import modulate  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    sys.exit("error: bench/quant_kernels.py needs the triton package (pip install triton==<the GPU machine's version>)")

# The arguments the JIT marks divisible by 16 at the real shapes (aligned tensors; D 5,120 or 3,072)
ALIGNED = {"X", "E0", "MOD", "M", "Q", "S", "D", "sx_row", "se_b", "se_l"}
CALLS = 20  # back-to-back calls per timed sample: the kernels are ~0.3-3 ms, the Python launch ~50 us
GELU_NEGATIVE_BOUND = 0.171  # >= |bf16(GELU(x))| for every x < -0.7525 (the minimum is -0.17004)
Q_SHAPES = {  # token grid (F, H, W), heads of 128
    "a14b-480p": ((21, 30, 52), 40),
    "5b-720p": ((31, 22, 40), 24),
    "tiny": ((3, 4, 5), 3),
}
SHAPES = {  # tokens, dim, FFN dim, per-token modulation
    "a14b-480p": (32760, 5120, 13824, False),
    "5b-720p": (27280, 3072, 14336, True),
    "tiny": (37, 320, 1100, True),
}


@triton.jit
def _modulate_quant_kernel(X, E0, MOD, M, Q, S, L, D, sx_row, se_b, se_l, eps,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_M: tl.constexpr):
    """One row per program: m = LN(x) * (1 + scale) + shift in float32 (shift = MOD[CHUNK] + E0[b, t, CHUNK],
    scale the next chunk, as `(modulation + e0).unbind(2)`), m rounded to bf16, then e4m3 with the row's
    scale max|m| / 448 (`fp8.quantize_rows`)."""
    row = tl.program_id(0)
    b = row // L
    t = row % L
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(X + row.to(tl.int64) * sx_row + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(x, axis=0), D.to(tl.float32))
    diff = tl.where(mask, x - mean, 0.0)
    rstd = tl.math.rsqrt(tl.math.div_rn(tl.sum(diff * diff, axis=0), D.to(tl.float32)) + eps)
    e0 = E0 + b.to(tl.int64) * se_b + t.to(tl.int64) * se_l
    shift = tl.load(MOD + CHUNK * D + cols, mask=mask, other=0.0) + tl.load(e0 + CHUNK * D + cols, mask=mask, other=0.0)
    scale = (tl.load(MOD + (CHUNK + 1) * D + cols, mask=mask, other=0.0)
             + tl.load(e0 + (CHUNK + 1) * D + cols, mask=mask, other=0.0))
    m = (shift + diff * rstd * (1.0 + scale)).to(tl.bfloat16)
    out = row.to(tl.int64) * D + cols
    if WRITE_M:
        tl.store(M + out, m, mask=mask)
    mf = m.to(tl.float32)
    amax = tl.max(tl.where(mask, tl.abs(mf), 0.0), axis=0)
    s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    q = tl.clamp(tl.math.div_rn(mf, s), -448.0, 448.0).to(Q.dtype.element_ty)
    tl.store(Q + out, q, mask=mask)
    tl.store(S + row, s)


@triton.jit
def _modulated_chunk(x_row, e0, MOD, cols, mask, mean, rstd, D, CHUNK: tl.constexpr):
    """Columns `cols` of one row's m = LN(x) * (1 + scale) + shift, rounded to bf16 (both chunked passes)."""
    x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(MOD + CHUNK * D + cols, mask=mask, other=0.0) + tl.load(e0 + CHUNK * D + cols, mask=mask, other=0.0)
    scale = (tl.load(MOD + (CHUNK + 1) * D + cols, mask=mask, other=0.0)
             + tl.load(e0 + (CHUNK + 1) * D + cols, mask=mask, other=0.0))
    return (shift + (x - mean) * rstd * (1.0 + scale)).to(tl.bfloat16)


@triton.jit
def _modulate_quant_chunked_kernel(X, E0, MOD, M, Q, S, L, D, sx_row, se_b, se_l, eps,
                                   CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, WRITE_M: tl.constexpr):
    """The same row in chunks of BLOCK_C: four passes (mean, variance, m's max, the cast), the repeated reads
    served by the L2 cache; few registers, so many rows per SM are in flight where the whole-row kernel
    holds one."""
    row = tl.program_id(0)
    b = row // L
    t = row % L
    x_row = X + row.to(tl.int64) * sx_row
    e0 = E0 + b.to(tl.int64) * se_b + t.to(tl.int64) * se_l
    out = row.to(tl.int64) * D
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, D, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        total += tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32)
    mean = tl.math.div_rn(tl.sum(total, axis=0), D.to(tl.float32))
    squares = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, D, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        diff = tl.where(cols < D, tl.load(x_row + cols, mask=cols < D, other=0.0).to(tl.float32) - mean, 0.0)
        squares += diff * diff
    rstd = tl.math.rsqrt(tl.math.div_rn(tl.sum(squares, axis=0), D.to(tl.float32)) + eps)
    peak = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, D, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < D
        m = _modulated_chunk(x_row, e0, MOD, cols, mask, mean, rstd, D, CHUNK)
        if WRITE_M:
            tl.store(M + out + cols, m, mask=mask)
        peak = tl.maximum(peak, tl.where(mask, tl.abs(m.to(tl.float32)), 0.0))
    amax = tl.max(peak, axis=0)
    s = tl.where(amax > 0, tl.math.div_rn(amax, 448.0), 1.0)
    for start in range(0, D, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        mask = cols < D
        m = _modulated_chunk(x_row, e0, MOD, cols, mask, mean, rstd, D, CHUNK).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(m, s), -448.0, 448.0).to(Q.dtype.element_ty)
        tl.store(Q + out + cols, q, mask=mask)
    tl.store(S + row, s)


@triton.jit
def _q_norm_rope_int8_kernel(X, W, COS, SIN, Q8, QS, L, sx_row, eps, score_scale,
                             NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PER_STEP: tl.constexpr):
    """One token per program: y = bf16(x * rsqrt(mean(x^2) + eps) * w) over all heads (RMSNorm), z = bf16(y cos
    + rot(y) sin) per head (channel pairs (2i, 2i+1) -> (-x_{2i+1}, x_{2i})), then per head s = max|z| / 127 and
    q8 = round_half_even(z / s): `quantize_qkv`'s q; s is stored times `score_scale` (log2 e / sqrt(D))."""
    row = tl.program_id(0)
    t = row % L
    x_row = X + row.to(tl.int64) * sx_row
    heads = tl.arange(0, HEADS_PER_STEP)
    chans = tl.arange(0, HEAD_DIM)
    tile = heads[:, None] * HEAD_DIM + chans[None, :]
    squares = tl.zeros([HEADS_PER_STEP, HEAD_DIM], dtype=tl.float32)
    for h0 in range(0, NUM_HEADS, HEADS_PER_STEP):
        ok = (h0 + heads < NUM_HEADS)[:, None]
        x = tl.load(x_row + h0 * HEAD_DIM + tile, mask=ok, other=0.0).to(tl.float32)
        squares += x * x
    rstd = tl.math.rsqrt(tl.math.div_rn(tl.sum(tl.sum(squares, axis=1), axis=0), NUM_HEADS * HEAD_DIM * 1.0) + eps)
    cos = tl.load(COS + t.to(tl.int64) * HEAD_DIM + chans)[None, :]
    sin = tl.load(SIN + t.to(tl.int64) * HEAD_DIM + chans)[None, :]
    for h0 in range(0, NUM_HEADS, HEADS_PER_STEP):
        ok = (h0 + heads < NUM_HEADS)[:, None]
        x = tl.load(x_row + h0 * HEAD_DIM + tile, mask=ok, other=0.0).to(tl.float32)
        w = tl.load(W + h0 * HEAD_DIM + tile, mask=ok, other=0.0).to(tl.float32)
        y = (x * rstd * w).to(tl.bfloat16).to(tl.float32)
        first, second = tl.split(tl.reshape(y, (HEADS_PER_STEP, HEAD_DIM // 2, 2)))
        rotated = tl.reshape(tl.join(-second, first), (HEADS_PER_STEP, HEAD_DIM))
        z = (y * cos + rotated * sin).to(tl.bfloat16).to(tl.float32)
        s = tl.maximum(tl.math.div_rn(tl.max(tl.abs(z), axis=1), 127.0), 1e-12)
        # round half to even, as torch.round: adding 1.5 * 2^23 leaves no fraction bits (|v| <= 127)
        v = (tl.math.div_rn(z, s[:, None]) + 12582912.0) - 12582912.0
        out = row.to(tl.int64) * (NUM_HEADS * HEAD_DIM) + h0 * HEAD_DIM + tile
        tl.store(Q8 + out, v.to(tl.int8), mask=ok)
        tl.store(QS + row.to(tl.int64) * NUM_HEADS + h0 + heads, s * score_scale, mask=h0 + heads < NUM_HEADS)


def q_quant_fused(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, L, heads * 128] bf16 (q's linear output); weight: [heads * 128] (norm_q); cos, sin: [1, L, 1, 128]
    float32 (`rope_tables`). Returns (q8 [B, L, heads, 128] int8, q_scale [B, L, heads] float32 with
    log2(e) / sqrt(128) folded in), as `quantize_qkv` returns them for q."""
    bsz, length, dim = x.shape
    head_dim = dim // heads
    q8 = torch.empty(bsz, length, heads, head_dim, device=x.device, dtype=torch.int8)
    qs = torch.empty(bsz, length, heads, device=x.device, dtype=torch.float32)
    _q_norm_rope_int8_kernel[(bsz * length,)](x, weight, cos.contiguous(), sin.contiguous(), q8, qs, length,
                                              x.stride(1), eps, LOG2E / math.sqrt(head_dim), NUM_HEADS=heads,
                                              HEAD_DIM=head_dim, HEADS_PER_STEP=8, num_warps=4)
    return q8, qs


def q_quant_reference(x, weight, cos, sin, eps: float, heads: int):
    """The model's q path from the linear's output to `quantize_qkv`'s q8 and q_scale."""
    y = torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)
    z = apply_rope(y.unflatten(-1, (heads, -1)), cos, sin).float()
    scale = (z.abs().amax(-1) / INT8_MAX).clamp_min(1e-12)
    return (z / scale[..., None]).round().to(torch.int8), scale * (LOG2E / math.sqrt(z.shape[-1]))


def q_inputs(shape: str, device, seed: int = 0):
    grid, heads = Q_SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = math.prod(grid)
    x = (torch.randn(2, tokens, heads * 128, generator=gen, device=device) * 2).to(torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(heads * 128, generator=gen, device=device)).to(torch.bfloat16)
    cos, sin = rope_tables(grid, 128, torch.device(device))
    return x, weight, cos, sin, heads


def modulate_quant_fused(x: torch.Tensor, e0: torch.Tensor, modulation: torch.Tensor, chunk: int, eps: float,
                         write_m: bool, chunked: bool = False, q_dtype: torch.dtype = FP8
                         ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """x: [B, L, D] bf16 contiguous; e0: [B, 1 or L, 6, D] float32 contiguous; modulation: [1, 6, D] float32.
    Returns (m [B*L, D] bf16 or None, q [B*L, D] e4m3, scale [B*L] float32). `chunked`: the four-pass kernel;
    q_dtype float32 keeps q unrounded (the CPU check: the interpreter's e4m3 conversion is wrong)."""
    bsz, length, dim = x.shape
    rows = bsz * length
    q = torch.empty(rows, dim, device=x.device, dtype=q_dtype)
    s = torch.empty(rows, device=x.device, dtype=torch.float32)
    m = torch.empty(rows, dim, device=x.device, dtype=torch.bfloat16) if write_m else q
    se_l = e0.stride(1) if e0.shape[1] > 1 else 0
    if chunked:
        _modulate_quant_chunked_kernel[(rows,)](x, e0, modulation, m, q, s, length, dim, x.stride(1), e0.stride(0),
                                                se_l, eps, CHUNK=chunk, BLOCK_C=1024, WRITE_M=write_m, num_warps=4)
    else:  # 8,192 columns at 16 warps: 79 registers; 4,096 at 8: 80 (--compile-only). One or three rows per
        # SM in flight: little to hide memory latency with, hence the chunked kernel beside it
        block = triton.next_power_of_2(dim)
        _modulate_quant_kernel[(rows,)](x, e0, modulation, m, q, s, length, dim, x.stride(1), e0.stride(0), se_l,
                                        eps, CHUNK=chunk, BLOCK_D=block, WRITE_M=write_m,
                                        num_warps=16 if block >= 8192 else 8)
    return (m if write_m else None), q, s


def modulate_quant_reference(x, e0, modulation, chunk: int, eps: float, write_m: bool):
    """What a compiled WanBlock computes before its q/k/v linears (chunk 0) or its FFN (chunk 3)."""
    parts = (modulation + e0).unbind(2)
    m = modulate(x, parts[chunk], parts[chunk + 1], eps)
    q, s = quantize_rows(m.reshape(-1, m.shape[-1]))
    return (m.reshape(-1, m.shape[-1]) if write_m else None), q, s


def gelu_quant_reference(h: torch.Tensor, bias: torch.Tensor):
    """FFN hidden state after the first FP8 linear, as the model quantises it for the second: [N, F] bf16."""
    return quantize_rows(F.gelu(h + bias, approximate="tanh"))


def gelu_quant_bounded(h: torch.Tensor, bias: torch.Tensor):
    """The same rows with the row maximum taken before GELU (module docstring, 2), in float32 as Inductor's
    fused kernels compute the reference (they keep h + bias and GELU unrounded): the same scales there."""
    hb = h + bias
    amax = F.gelu(hb.float().amax(-1), approximate="tanh").clamp_min(GELU_NEGATIVE_BOUND)
    scale = amax / FP8_MAX
    q = (F.gelu(hb, approximate="tanh").float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def compare(name: str, ours, ref) -> dict:
    """Bitwise agreement of the quantised rows and scales (and of the bf16 rows when both wrote them)."""
    (m1, q1, s1), (m0, q0, s0) = ours, ref
    out = dict(case=name, q_equal=float((q1.view(torch.uint8) == q0.view(torch.uint8)).float().mean()),
               scale_equal=float((s1 == s0).float().mean()),
               q_rel_err=float((q1.float() * s1[:, None] - q0.float() * s0[:, None]).norm()
                               / (q0.float() * s0[:, None]).norm()))
    if m1 is not None and m0 is not None:
        out["m_equal"] = float((m1 == m0).float().mean())
    return out


def inputs(shape: str, device, seed: int = 0):
    tokens, dim, ffn, per_token = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(2, tokens, dim, generator=gen, device=device) * 3 + 0.5).to(torch.bfloat16)
    e0 = torch.randn(2, tokens if per_token else 1, 6, dim, generator=gen, device=device) * 0.1
    modulation = torch.randn(1, 6, dim, generator=gen, device=device) / dim**0.5
    # The first FP8 linear's output: roughly Gaussian per row, a few large channels as real FFNs have.
    h = torch.randn(2 * tokens, ffn, generator=gen, device=device)
    h[:, : ffn // 64] *= 4
    bias = (torch.randn(ffn, generator=gen, device=device) * 0.1).to(torch.bfloat16)
    return x, e0, modulation, h.to(torch.bfloat16), bias


def check_cpu() -> None:
    """The Triton kernels under TRITON_INTERPRET=1 against the eager formula. Triton 3.6's interpreter rounds
    float32 to bf16 by truncation (the GPU: to nearest), and its e4m3 conversion loses the carry when rounding
    crosses a binade (125.2 -> 64, 7.9 -> 4) and rounds ties away from zero, so q is checked before the cast
    (q_dtype float32), cast by torch, and the kernel's own cast is left to the GPU run."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("--check-cpu runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
    x, e0, modulation, h, bias = inputs("tiny", "cpu")
    for chunk in (0, 3):
        for e0_case in (e0, e0[:, :1].contiguous()):
            ref = modulate_quant_reference(x, e0_case, modulation, chunk, 1e-6, write_m=True)
            for chunked in (False, True):
                m, q, scale = modulate_quant_fused(x, e0_case, modulation, chunk, 1e-6, write_m=True,
                                                   chunked=chunked, q_dtype=torch.float32)
                ours = (m, q.to(FP8), scale)  # torch's cast rounds to nearest, as the GPU's does
                row = compare(f"modulate chunk {chunk}, e0 rows {e0_case.shape[1]}, "
                              f"{'chunked' if chunked else 'whole row'}", ours, ref)
                print(json.dumps(row))
                # One bf16 step for m and the scale (truncation here, rounding on the GPU), so q within one e4m3
                # step (2^-3 relative; 2^-9 of the scale below e4m3's normal range) plus the scale's step.
                m1, m0 = ours[0].float(), ref[0].float()
                assert ((m1 - m0).abs() <= m0.abs() * 2**-7).all(), row
                assert ((ours[2] - ref[2]).abs() <= ref[2] * 2**-7).all(), row
                d1, d0 = ours[1].float() * ours[2][:, None], ref[1].float() * ref[2][:, None]
                step = torch.maximum(d1.abs(), d0.abs()) * (2**-3 + 2**-6) + ref[2][:, None] * 2**-9
                assert ((d1 - d0).abs() <= step).all(), row
    x, weight, cos, sin, heads = q_inputs("tiny", "cpu")
    q8, qs = q_quant_fused(x, weight, cos, sin, 1e-6, heads)
    r8, rs = q_quant_reference(x, weight, cos, sin, 1e-6, heads)
    # bf16 by truncation here: the normed and the rotated values may each sit one bf16 step off, so q8 may
    # move by up to 2 of its 127 steps and the scale by 2^-6; a wrong rotation or norm moves far more
    row = dict(case="q norm + rope + int8", q8_equal=float((q8 == r8).float().mean()),
               q8_max_diff=int((q8.int() - r8.int()).abs().max()), scale_rel=float(((qs - rs) / rs).abs().max()))
    print(json.dumps(row))
    assert row["q8_max_diff"] <= 2 and row["scale_rel"] <= 2**-6 and row["q8_equal"] > 0.8, row
    q1, s1 = gelu_quant_bounded(h, bias)
    q0, s0 = gelu_quant_reference(h, bias)
    row = compare("gelu bound, eager", (None, q1, s1), (None, q0, s0))
    print(json.dumps(row))
    assert ((s1 - s0).abs() <= s0 * 2**-8).all() and row["q_equal"] > 0.9, row
    q1, s1 = torch.compile(gelu_quant_bounded, dynamic=False)(h, bias)
    q0, s0 = torch.compile(gelu_quant_reference, dynamic=False)(h, bias)
    row = compare("gelu bound, compiled", (None, q1, s1), (None, q0, s0))
    print(json.dumps(row))
    assert row["q_equal"] == 1.0 and row["scale_equal"] == 1.0, row
    low = torch.full((1, 8), -0.75, dtype=torch.bfloat16)  # every GELU near its minimum: the coarser scale
    q, s = gelu_quant_bounded(low, torch.zeros(8, dtype=torch.bfloat16))
    exact = quantize_rows(F.gelu(low, approximate="tanh"))[1]
    assert abs(float(s[0]) * FP8_MAX - GELU_NEGATIVE_BOUND) < 1e-6 and float(s[0]) > float(exact[0])
    assert q.float().abs().max() <= FP8_MAX
    print("cpu check passed")


def compile_only() -> None:
    from bench.kernel_sass import compile_for_hopper

    for dim in (5120, 3072):
        block = triton.next_power_of_2(dim)
        for warps in (4, 8, 16):
            build = compile_for_hopper(_modulate_quant_kernel, dict(CHUNK=0, BLOCK_D=block, WRITE_M=True),
                                       num_warps=warps, num_stages=1, maxnreg=None,
                                       pointers=["*bf16", "*fp32", "*fp32", "*bf16", "*fp8e4nv", "*fp32"],
                                       scalar_types={"eps": "fp32"}, divisible=ALIGNED)
            loads = sum(1 for line in build.sass.splitlines() if "LDG" in line)
            print(f"dim {dim} (BLOCK_D {block}), {warps} warps: {build.registers} registers, "
                  f"{build.spill_store_bytes} bytes spilled, {loads} global loads")
    build = compile_for_hopper(_q_norm_rope_int8_kernel, dict(NUM_HEADS=40, HEAD_DIM=128, HEADS_PER_STEP=8),
                               num_warps=4, num_stages=1,
                               pointers=["*bf16", "*bf16", "*fp32", "*fp32", "*i8", "*fp32"],
                               scalar_types={"eps": "fp32", "score_scale": "fp32"},
                               divisible={"X", "W", "COS", "SIN", "Q8", "QS", "sx_row"})
    print(f"q norm + rope + int8, 40 heads, 4 warps: {build.registers} registers, {build.spill_store_bytes} bytes "
          f"spilled, {build.shared_bytes} bytes of shared memory")


def time_gpu(shapes: list[str], json_path: Path | None, device: torch.device = torch.device("cuda"),
             timer=None) -> None:
    """Each experiment at each shape: agreement with the compiled PyTorch path and milliseconds per call.
    `device` and `timer` (fn -> ms) exist for a CPU smoke run of this function under the interpreter."""
    from bench.attention_kernels import time_ms
    from wan_model.sampling_speed import SAMPLER_COMPILE_OPTIONS

    timed = timer or (lambda fn: time_ms(fn, calls=CALLS))

    reference = torch.compile(modulate_quant_reference, options=SAMPLER_COMPILE_OPTIONS, dynamic=False)
    gelu_ref = torch.compile(gelu_quant_reference, options=SAMPLER_COMPILE_OPTIONS, dynamic=False)
    gelu_bound = torch.compile(gelu_quant_bounded, options=SAMPLER_COMPILE_OPTIONS, dynamic=False)
    q_reference = torch.compile(q_quant_reference, options=SAMPLER_COMPILE_OPTIONS, dynamic=False)
    rows = []

    def keep(row: dict) -> None:  # printed and written at once: a run cut by a time limit keeps its rows
        rows.append(row)
        print(json.dumps(row), flush=True)
        if json_path:
            name = torch.cuda.get_device_name() if device.type == "cuda" else str(device)
            json_path.write_text(json.dumps(dict(device=name, torch=torch.__version__,
                                                 triton=triton.__version__, rows=rows), indent=1))

    for shape in shapes:
        x, e0, modulation, h, bias = inputs(shape, device)
        for write_m in (False, True):
            for chunk in (0,):  # chunk 3 (before the FFN) is the same kernel at another offset
                ref = reference(x, e0, modulation, chunk, 1e-6, write_m)
                ours = modulate_quant_fused(x, e0, modulation, chunk, 1e-6, write_m)
                row = compare(f"{shape} modulate+quant chunk {chunk}{' +bf16 row' if write_m else ''}", ours, ref)
                row["inductor_ms"] = timed(lambda: reference(x, e0, modulation, chunk, 1e-6, write_m))
                row["fused_ms"] = timed(lambda: modulate_quant_fused(x, e0, modulation, chunk, 1e-6, write_m))
                row["chunked_ms"] = timed(lambda: modulate_quant_fused(x, e0, modulation, chunk, 1e-6, write_m,
                                                                         chunked=True))
                row["chunked_equal_q"] = compare("", modulate_quant_fused(x, e0, modulation, chunk, 1e-6, write_m,
                                                                          chunked=True), ref)["q_equal"]
                keep(row)
        q0, s0 = gelu_ref(h, bias)
        q1, s1 = gelu_bound(h, bias)
        row = compare(f"{shape} gelu+quant", (None, q1, s1), (None, q0, s0))
        row["inductor_ms"] = timed(lambda: gelu_ref(h, bias))
        row["bounded_ms"] = timed(lambda: gelu_bound(h, bias))
        keep(row)
        x = e0 = h = None  # free the inputs before the next shape
        qx, weight, cos, sin, heads = q_inputs(shape, device)
        q8, qs = q_quant_fused(qx, weight, cos, sin, 1e-6, heads)
        r8, rs = q_reference(qx, weight, cos, sin, 1e-6, heads)
        row = dict(case=f"{shape} q norm + rope + int8", q8_equal=float((q8 == r8).float().mean()),
                   q8_max_diff=int((q8.int() - r8.int()).abs().max()), scale_equal=float((qs == rs).float().mean()),
                   inductor_ms=timed(lambda: q_reference(qx, weight, cos, sin, 1e-6, heads)),
                   fused_ms=timed(lambda: q_quant_fused(qx, weight, cos, sin, 1e-6, heads)))
        keep(row)
        qx = None
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check-cpu", action="store_true")
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--shapes", nargs="+", default=["a14b-480p", "5b-720p"], choices=list(SHAPES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.check_cpu:
        check_cpu()
    elif args.compile_only:
        compile_only()
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/quant_kernels.py times GPU kernels: run it on a CUDA machine (or --check-cpu)")
        time_gpu(args.shapes, args.json)


if __name__ == "__main__":
    main()
