"""Experiment (issue 14): the sampler's int8/FP8 self-attention written in Gluon, Triton's lower-level
language, so that the tensor cores and the softmax overlap inside one warp group.

    python bench/gluon_attention.py --compile-only     # any machine with triton: compile for sm_90a, show the loop
    python bench/gluon_attention.py                    # H100/H200: error against the shipped kernel, then timing

Why: the shipped Triton kernel (wan_model/fp8_attention.py) waits for every matmul right after issuing it,
so a warp group's exponentials never run while its tensor cores work (bench/kernel_sass.py shows the
`WARPGROUP.DEPBAR.LE gsb0, 0x0` after each q k^T; docs/benchmarks.md, "Sampling speed"). Triton 3.6 gives
no handle on that. Gluon does: `warpgroup_mma(..., is_async=True)` returns at once and
`warpgroup_mma_wait(num_outstanding=1)` waits for all but the newest group. Per key block j the loop is

    1. issue q k^T_j and P_{j-1} v_{j-1}              (async, two groups)
    2. wait for q k^T_j                                 (1 outstanding: P_{j-1} v_{j-1} runs on); start
                                                        copying key tile j+2 into the stage q k^T_j read
    3. softmax of block j -> P_j, alpha_j; P_j to shared memory (while P_{j-1} v_{j-1} is on the tensor cores)
    4. wait for P_{j-1} v_{j-1}; start copying value tile j+1 into the stage it read
    5. acc *= alpha_j                                   (the rescale after the product: acc holds block j-1's
                                                         max until P_{j-1} v_{j-1} is in)
Shared memory: two-stage key and value rings, two P buffers and q, 88 KiB at 64 query rows per program
(one warp group, 254 registers: two programs share an SM); `--block-m 128` gives two warp groups one
program that share each key and value tile (112 KiB, 221 registers, one program per SM). `main` times
both against the shipped kernel. Three things the compiler did that undid the overlap, each found in the SASS
(`--compile-only`) and designed out: a product left in flight across the loop's back edge made ptxas
serialise every wgmma (info C7514); P as a register operand let block j's exponentials take P_{j-1}'s
registers, so ptxas waited for P_{j-1} v_{j-1} before them (hence P through shared memory); LLVM sank the
exponentials below the wait, their only use being the next block (hence the row sums as a dependency of
the wait). Compiled here (Triton 3.6, sm_90a): 609 instructions per thread per key block (the shipped
kernel: 603), no spills, the waits `gsb0, 0x1` after q k^T and `gsb0, 0x0` after the softmax's 66
exponentials. The ring's schedule (which tile is in which stage when read) was checked by a simulation.

The arithmetic is the shipped kernel's (module docstring there): int8 q k^T with the exponent-bias
conversion, p' = exp2(s - m + log2 448) in e4m3, per-channel v scales. Not bit-identical: acc is rescaled
after the product rather than before, and the last partial block keeps the bias trick; both far below
1e-3. The shipped kernel is autotuned: with key blocks of 64 or 256 its running maxima, hence P's e4m3
rounding, differ (3-4e-3 apart from key blocks of 128 in a float32 emulation), so `main` prints its choice.

Measured on an H200 (e20ee77; docs/benchmarks.md, "Sampling speed, fifth session"): correct (1.9e-4 from the
shipped kernel) but not faster: 57.97 ms against the shipped 56.98 ms at the A14B shape, 61.13 ms with 128
query rows. Two resident programs per SM already overlap one's softmax with the other's matmuls, so removing
the wait within a warp group gains nothing; kept as the record of that experiment, not wired. Shapes: head
dim 128, key blocks of 128, query blocks of 64 or 128, k and v padded to a multiple of 256 rows (what
`quantize_qkv` gives), at least two key blocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared,  # noqa: E402
                                                               warpgroup_mma, warpgroup_mma_wait)

from bench.attention_kernels import rel, rms_normed, time_ms  # noqa: E402
from wan_model.fp8_attention import (K_PAD, _fp8_attention_kernel, _fp8_attention_kernel_op,  # noqa: E402
                                     quantize_qkv, reference_fp8_attention)

BLOCK_M = 64
BLOCK_N = 128
HEAD_DIM = 128


@gluon.jit
def _copy_key_tile(k_ring, block, k_tile_ptrs, sk_l, BLOCK_N: gl.constexpr):
    """Start copying key tile `block` ([BLOCK_N, D], D contiguous) into its ring stage (block % 2)."""
    async_copy.async_copy_global_to_shared(k_ring.index(block % 2), k_tile_ptrs + block * BLOCK_N * sk_l)


@gluon.jit
def _copy_value_tile(v_ring, block, v_tile_ptrs, BLOCK_N: gl.constexpr):
    """Start copying value tile `block` ([D, BLOCK_N], keys contiguous) into its ring stage (block % 2)."""
    async_copy.async_copy_global_to_shared(v_ring.index(block % 2), v_tile_ptrs + block * BLOCK_N)


@gluon.jit
def _tiles_ready(newer_groups: gl.constexpr):
    """The copy group committed `newer_groups` groups ago has landed, for every thread, and it and every
    ordinary shared-memory store before it are visible to the tensor cores (the async proxy)."""
    async_copy.wait_group(newer_groups)
    gl.thread_barrier()
    fence_async_shared()


@gluon.jit
def _softmax(s, m_i, l_i, row_scale, offset, p_offset):
    """The shipped kernel's online softmax on one block of biased int32-as-float scores; P in e4m3."""
    m_new = gl.maximum(m_i, (gl.max(s, 1) - offset) * row_scale)
    p = gl.exp2(s * row_scale[:, None] - (offset * row_scale + m_new - p_offset)[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p.to(gl.float8e4nv), alpha, m_new, l_i


@gluon.jit
def _block(j, q_smem, k_ring, v_ring, p_smem, zero_s, acc, m_i, l_i, row_scale, offset, p_offset, k_tile_ptrs,
           v_tile_ptrs, sk_l, n_blocks, cols, Lk, LAST: gl.constexpr, rows_o: gl.constexpr, BLOCK_N: gl.constexpr):
    """Key block j (j >= 1): q k^T_j and P_{j-1} v_{j-1} on the tensor cores together, block j's softmax
    while P_{j-1} v_{j-1} runs.

    Both groups are issued and retired in here, so ptxas sees the whole pipeline stage (a group left in
    flight across the loop's back edge made it serialise every wgmma). P goes through shared memory, two
    buffers: as a register operand, ptxas gave block j's exponentials P_{j-1}'s registers and so waited
    for P_{j-1} v_{j-1} before them. Copies: this block's group brings key tile j+2 (into the stage q k^T_j
    has just read) and value tile j+1 (into the stage P_{j-1} v_{j-1} has just read)."""
    _tiles_ready(1)  # key tile j, value tile j-1 and P_{j-1}; the group of block j-1 may still be landing
    s_token = warpgroup_mma(q_smem, k_ring.index(j % 2).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    acc_token = warpgroup_mma(p_smem.index((j - 1) % 2), v_ring.index((j - 1) % 2).permute((1, 0)), acc,
                              is_async=True)
    s_int = warpgroup_mma_wait(1, deps=[s_token])  # q k^T_j done; P_{j-1} v_{j-1} runs on
    if j + 2 < n_blocks:
        gl.thread_barrier()  # every warp group's q k^T_j is done before its key stage is refilled
        _copy_key_tile(k_ring, j + 2, k_tile_ptrs, sk_l, BLOCK_N)
    s = (s_int + 0x4B400000).to(gl.float32, bitcast=True)
    if LAST:  # columns past Lk (the zero padding) get no weight
        s = gl.where((j * BLOCK_N + cols < Lk)[None, :], s, float("-inf"))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, row_scale, offset, p_offset)
    p_smem.index(j % 2).store(p)  # the other buffer holds P_{j-1}, which the tensor cores are reading
    # the row sums are a dependency of the wait, so that the compiler cannot sink the exponentials below it
    # (P_j is used only by the next block's product; an 8-bit P cannot be a dependency itself)
    acc, l_i = warpgroup_mma_wait(0, deps=[acc_token, l_i])
    gl.thread_barrier()  # every warp's share of P_{j-1} v_{j-1} is done before its value stage is refilled
    # value tile j+1; in the last block the last tile again, into its own stage, with the same bytes (an `if`
    # around this copy tripped an assertion in Triton 3.6's lowering)
    _copy_value_tile(v_ring, gl.minimum(j + 1, n_blocks - 1), v_tile_ptrs, BLOCK_N)
    async_copy.commit_group()  # one group per block, empty when nothing is left to copy
    acc = acc * gl.convert_layout(alpha, rows_o)[:, None]  # to block j's max, once P_{j-1} v_{j-1} is in
    return acc, m_i, l_i


@gluon.jit
def gluon_fp8_attention_kernel(Q, K, VT, QS, KS, VS, O,
                               sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_h, sv_d, sqs_b, sqs_l,
                               so_b, so_l, so_h, H, Lq, Lk,
                               HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    WARPS: gl.constexpr = BLOCK_M // 16  # one warp group per 64 query rows
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 32])
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    # 16 bytes per thread, 8 threads along a 128-byte row, 4 rows per warp: what cp.async moves best
    tile_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8],
                                                 warps_per_cta=[WARPS, 1], order=[1, 0])
    q_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], gl.int8)
    k_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], gl.int8)
    v_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HEAD_DIM, BLOCK_N], gl.float8e4nv)
    p_smem_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float8e4nv)

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    # q: [BLOCK_M, D] int8 into shared memory once (the A operand of every q k^T; fenced with the first tiles)
    tile_rows = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, tile_layout))
    tile_cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, tile_layout))
    q_rows = pid_m * BLOCK_M + tile_rows
    q = gl.load(Q + b * sq_b + h * sq_h + q_rows[:, None] * sq_l + tile_cols[None, :],
                mask=(q_rows < Lq)[:, None], other=0)
    q_smem = gl.allocate_shared_memory(gl.int8, [BLOCK_M, HEAD_DIM], q_smem_layout, value=q)

    offs_m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_s)
    row_scale = gl.load(QS + b * sqs_b + h + offs_m * sqs_l, mask=offs_m < Lq, other=0.0) * gl.load(KS + b * H + h)

    # two-stage rings of key tiles [BLOCK_N, D] (D contiguous) and value tiles [D, BLOCK_N] (keys
    # contiguous), both K-major as 8-bit wgmma wants its B operand, and two P buffers: 88 KiB, so two
    # blocks of 64 query rows share an SM and fill each other's gaps
    k_ring = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N, HEAD_DIM], k_smem_layout)
    v_ring = gl.allocate_shared_memory(gl.float8e4nv, [2, HEAD_DIM, BLOCK_N], v_smem_layout)
    p_smem = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_M, BLOCK_N], p_smem_layout)
    n_rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, tile_layout))
    n_cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, tile_layout))
    d_rows = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(1, tile_layout))
    k_tile_ptrs = K + b * sk_b + h * sk_h + n_rows[:, None] * sk_l + tile_cols[None, :]
    v_tile_ptrs = VT + b * sv_b + h * sv_h + d_rows[:, None] * sv_d + n_cols[None, :]

    offset = 12582912.0  # 1.5 * 2^23: int32 scores + 0x4B400000 read as float32 are offset + score
    p_offset = 8.807354922057604  # log2(448)
    n_blocks = gl.cdiv(Lk, BLOCK_N)
    cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

    # groups: {K0, V0}, {K1, V1}; block 0 (here) adds {K2} once q k^T_0 has read stage 0
    _copy_key_tile(k_ring, 0, k_tile_ptrs, sk_l, BLOCK_N)
    _copy_value_tile(v_ring, 0, v_tile_ptrs, BLOCK_N)
    async_copy.commit_group()
    _copy_key_tile(k_ring, 1, k_tile_ptrs, sk_l, BLOCK_N)
    _copy_value_tile(v_ring, 1, v_tile_ptrs, BLOCK_N)
    async_copy.commit_group()
    _tiles_ready(1)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    s_int = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), zero_s, use_acc=False)
    if n_blocks > 2:
        gl.thread_barrier()  # every warp group's q k^T_0 is done before stage 0 is refilled
        _copy_key_tile(k_ring, 2, k_tile_ptrs, sk_l, BLOCK_N)
    async_copy.commit_group()
    s = (s_int + 0x4B400000).to(gl.float32, bitcast=True)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=rows_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=rows_s)
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, row_scale, offset, p_offset)
    p_smem.index(0).store(p)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)

    for j in range(1, n_blocks - 1):
        acc, m_i, l_i = _block(j, q_smem, k_ring, v_ring, p_smem, zero_s, acc, m_i, l_i, row_scale, offset, p_offset,
                               k_tile_ptrs, v_tile_ptrs, sk_l, n_blocks, cols, Lk, False, rows_o, BLOCK_N)
    acc, m_i, l_i = _block(n_blocks - 1, q_smem, k_ring, v_ring, p_smem, zero_s, acc, m_i, l_i, row_scale, offset,
                           p_offset, k_tile_ptrs, v_tile_ptrs, sk_l, n_blocks, cols, Lk, True, rows_o, BLOCK_N)
    _tiles_ready(0)  # value tile n-1 (copied in block n-2) and the last P
    last = n_blocks - 1
    acc = warpgroup_mma(p_smem.index(last % 2), v_ring.index(last % 2).permute((1, 0)), acc)

    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    v_scale = gl.load(VS + (b * H + h) * HEAD_DIM + offs_d)
    out = acc / gl.convert_layout(l_i, rows_o)[:, None] * v_scale[None, :]
    out_rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=rows_o)
    gl.store(O + b * so_b + h * so_h + out_rows[:, None] * so_l + offs_d[None, :], out.to(gl.bfloat16),
             mask=(out_rows < Lq)[:, None])


def gluon_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v as the shipped kernel computes it, on the Gluon schedule. [B, L, H, 128]."""
    if q.shape[-1] != HEAD_DIM or k.shape[1] < 2 * BLOCK_N:
        raise ValueError(f"the experiment handles head dim {HEAD_DIM} and at least {2 * BLOCK_N} keys")
    operands = [t.contiguous() for t in quantize_qkv(q, k, v)]
    return launch(*operands, k.shape[1]).to(q.dtype)


def launch(q8, k8, vt8, q_scale, k_scale, v_scale, kv_len: int, block_m: int = BLOCK_M) -> torch.Tensor:
    """The kernel on quantised operands (`quantize_qkv`'s, contiguous) -> [B, Lq, H, D] bf16. block_m 64:
    one warp group per program, two programs per SM; 128: two warp groups sharing each key and value tile."""
    batch, q_len, heads, _ = q8.shape
    assert k8.shape[1] % K_PAD == 0 and BLOCK_N < kv_len <= k8.shape[1], "at least two key blocks, padded keys"
    out = torch.empty(q8.shape, device=q8.device, dtype=torch.bfloat16)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    gluon_fp8_attention_kernel[grid](q8, k8, vt8, q_scale, k_scale, v_scale, out,
                                     q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1),
                                     k8.stride(2), vt8.stride(0), vt8.stride(1), vt8.stride(2), q_scale.stride(0),
                                     q_scale.stride(1), out.stride(0), out.stride(1), out.stride(2), heads, q_len,
                                     kv_len, HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                                     num_warps=block_m // 16)
    return out


def compile_only(block_m: int, show_sequence: bool) -> None:
    """Compile for sm_90a here (no GPU needed) and print the main loop's instruction mix and waits."""
    from bench.kernel_sass import compile_for_hopper, print_build

    build = compile_for_hopper(gluon_fp8_attention_kernel, dict(HEAD_DIM=HEAD_DIM, BLOCK_M=block_m, BLOCK_N=BLOCK_N),
                               num_warps=block_m // 16, gluon=True)
    print_build(f"BLOCK_M {block_m} ({block_m // 16} warps)", build, block_m * BLOCK_N // (32 * (block_m // 16)),
                show_sequence)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--sequence", action="store_true", help="with --compile-only: the loop's instruction sequence")
    ap.add_argument("--block-m", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    ap.add_argument("--shape", default="2,32760,40,128", help="B,L,H,D (default: T2V-A14B 480x832x81, CFG batch)")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args(argv)
    if args.compile_only:
        for block_m in args.block_m:
            compile_only(block_m, args.sequence)
        return
    b, seq, h, d = (int(x) for x in args.shape.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (rms_normed((b, seq, h, d), gen, "cuda") for _ in range(2))
    v = torch.randn(b, seq, h, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    # first a small problem with partial query and key blocks, against the float32 emulation (a fault here
    # would lose the CUDA context, so it runs before the big one)
    small = slice(0, 1000)
    q_s, k_s, v_s = q[:, small], k[:, small], v[:, small]
    reference = reference_fp8_attention(q_s, k_s, v_s)
    shipped_small = _fp8_attention_kernel_op(*(t.contiguous() for t in quantize_qkv(q_s, k_s, v_s)), small.stop)
    ours_small = gluon_fp8_attention(q_s, k_s, v_s)
    print(f"{small.stop} rows against the float32 emulation: gluon {rel(ours_small, reference):.2e}, "
          f"shipped {rel(shipped_small, reference):.2e}", flush=True)
    ours = gluon_fp8_attention(q, k, v)
    shipped = _fp8_attention_kernel_op(*(t.contiguous() for t in quantize_qkv(q, k, v)), seq)
    print(f"gluon vs shipped kernel at {args.shape}: {rel(ours, shipped):.2e} (rel. difference; the shipped "
          f"kernel's autotuned config: {_fp8_attention_kernel.best_config})", flush=True)
    flops = 4 * b * h * seq * seq * d
    operands = [t.contiguous() for t in quantize_qkv(q, k, v)]
    variants = [("shipped", lambda: _fp8_attention_kernel_op(*operands, seq))]
    for block_m in args.block_m:
        if block_m != BLOCK_M:
            other = launch(*operands, seq, block_m=block_m)
            print(f"gluon BLOCK_M {block_m} vs BLOCK_M {BLOCK_M}: {rel(other, ours):.2e}", flush=True)
        variants.append((f"gluon BLOCK_M {block_m}", lambda block_m=block_m: launch(*operands, seq, block_m=block_m)))
    for name, fn in variants:
        ms = time_ms(fn, reps=args.iters)
        print(f"{name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s (kernel alone, same quantised operands)")


if __name__ == "__main__":
    main()
