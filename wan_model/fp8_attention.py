"""Self-attention on 8-bit tensor cores for sampling (Hopper): q k^T in int8, P v in FP8 (e4m3).

At T2V-A14B 480x832x81 (32,760 tokens) self-attention is half a forward's FLOPs (4 L^2 d = 879 TFLOP of
1.66 PFLOP); in bf16 it runs near 580 TFLOP/s, and Hopper's 8-bit tensor cores have twice bf16's rate.
The sampler's opt-in `--fp8-attention`. With a gradient the same forward also writes the log-sum-exp and the
backward is the exact bf16 flash backward (cuDNN's) fed this forward's output and LSE (`fp8_attention_backward`):
a third of a training step's attention work at the 8-bit rate, 0.2 s per A14B step; its gradients were
only compared with a bf16 reference that the cuDNN probe bug had broken (docs/benchmarks.md, issue 16), so
training does not offer it until they are measured again.

Quantisation (after SageAttention, Zhang et al. 2024/25), per batch b and head h:
    q:  one scale per token,  sq_i = max_d |q_id| / 127,     Q8 = round(q / sq)   int8
    k:  smoothed first, k' = k - mean_tokens(k)  (exact in real arithmetic: it adds q_i . mean(k) to every
        score of row i, which softmax cancels; it takes a shared offset out of k's int8 range), then one scale per head, sk = max |k'| / 127, K8 = round(k' / sk)  int8
    v:  one scale per channel, sv_d = max_tokens |v_d| / 448, V8 = e4m3(v / sv), stored transposed
        [B, H, D, L] (the FP8 matmul wants its reduced dimension contiguous)
    scores  s_ij = (Q8 K8^T)_ij * sq_i * sk * log2(e) / sqrt(D)            (int8 matmul, exact int32 sums)
    p'_ij   = exp2(s_ij - m_i + log2 448)   in [0, 448]: P scaled to e4m3's range by the exponent's offset
    out_i   = (e4m3(p') V8)_i * sv / sum_j p'_ij                             (FP8 matmul)
The 448 of p' cancels in the division. Why int8 for q k^T: an error in a score is an error in an
exponent; on Gaussian rows int8's 8 bits gave the scores 3-4x less error than e4m3's 3 mantissa bits
(attention output 1.1% vs 3.8% from q, k alone). Wan's q and k pass an RMSNorm over the full dim before
RoPE, so per-token norms are even and one k scale per head loses little; v has no norm, hence
per-channel scales.

Error: P and v keep e4m3's 3 mantissa bits (2^-4 relative); the docs' fidelity table measures what that
does to a whole render. `reference_fp8_attention` emulates the same quantisation in float32 (CPU
tests; the kernel is checked against it on the GPU). The Triton kernel runs where Triton and an sm_89+
GPU are present; on the CPU `fp8_attention` uses the emulation (tiny models, tests); a GPU without the
kernel is refused (the emulation's full score matrix would not fit at real sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
LOG2E = 1.4426950408889634
K_PAD = 256  # k and v rows are padded to a multiple of the largest key block the kernel tries

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the emulation below serves
    triton = None


def quantize_qkv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """q, k, v: [B, L, H, D] -> (q8 [B, Lq, H, D], k8 [B, Lk_pad, H, D] int8, vt8 [B, H, D, Lk_pad] e4m3;
    q_scale [B, Lq, H] with log2(e)/sqrt(D) folded in, k_scale [B, H], v_scale [B, H, D], float32).

    Plain tensor ops, so that under torch.compile they fuse with the RoPE and norms before them."""
    head_dim, lk = q.shape[-1], k.shape[1]
    pad = (-lk) % K_PAD
    qf = q.float()
    q_scale = (qf.abs().amax(-1) / INT8_MAX).clamp_min(1e-12)                    # [B, Lq, H]
    q8 = (qf / q_scale[..., None]).round().to(torch.int8)
    kf = k.float()
    kf = kf - kf.mean(dim=1, keepdim=True)                                       # smoothing (exact)
    k_scale = (kf.abs().amax(dim=(1, 3)) / INT8_MAX).clamp_min(1e-12)            # [B, H]
    k8 = F.pad(kf / k_scale[:, None, :, None], (0, 0, 0, 0, 0, pad)).round().to(torch.int8)
    vf = v.float()
    v_scale = (vf.abs().amax(dim=1) / FP8_MAX).clamp_min(1e-12)                  # [B, H, D]
    vt8 = F.pad((vf / v_scale[:, None]).permute(0, 2, 3, 1), (0, pad)).to(FP8).contiguous()
    return q8, k8, vt8, q_scale * (LOG2E / math.sqrt(head_dim)), k_scale, v_scale


def reference_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The kernel's arithmetic in float32 on whole rows (any device): quantised q, k, v and P, exact
    softmax normalisation. [B, L, H, D] -> [B, Lq, H, D] in q's dtype."""
    lk = k.shape[1]
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v)
    s = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8[:, :lk].float())
    s = s * (q_scale.permute(0, 2, 1)[..., None] * k_scale[:, :, None, None])   # log2 units
    p = torch.exp2(s - s.amax(-1, keepdim=True) + math.log2(FP8_MAX))
    out = torch.einsum("bhqk,bhdk->bqhd", p.to(FP8).float(), vt8[..., :lk].float())
    out = out / p.sum(-1).permute(0, 2, 1)[..., None] * v_scale[:, None]
    return out.to(q.dtype)


if triton is not None:
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                for m, n, w, s in [(64, 128, 4, 3), (64, 128, 4, 2), (64, 128, 4, 4), (64, 64, 4, 3),
                                   (64, 256, 4, 2), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3)]]

    @triton.jit
    def _exp2(x, EXP_F16: tl.constexpr):
        """2^x; with EXP_F16 in half precision, two per instruction (ex2.approx.f16x2): the exponential
        unit is the kernel's bottleneck beside the tensor cores, and p' goes to e4m3 (3 mantissa bits) next."""
        if EXP_F16:
            y = tl.inline_asm_elementwise("ex2.approx.f16x2 $0, $1;", "=r,r", [x.to(tl.float16)],
                                          dtype=tl.float16, is_pure=True, pack=2)
        else:
            y = tl.math.exp2(x)
        return y

    @triton.autotune(configs=_CONFIGS, key=["Lq", "Lk", "HEAD_DIM", "EXP_F16", "WRITE_LSE"])
    @triton.jit
    def _fp8_attention_kernel(Q, K, VT, QS, KS, VS, O, LSE, SHIFT,
                              sq_b, sq_l, sq_h, sk_b, sk_l, sk_h, sv_b, sv_h, sv_d, sqs_b, sqs_l,
                              so_b, so_l, so_h, H, Lq, Lk,
                              HEAD_DIM: tl.constexpr, EXP_F16: tl.constexpr, WRITE_LSE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < Lq
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_l + offs_d[None, :], mask=row_ok[:, None],
                    other=0.0)
        row_scale = tl.load(QS + b * sqs_b + h + offs_m * sqs_l, mask=row_ok, other=0.0) * tl.load(KS + b * H + h)
        kt_ptrs = K + b * sk_b + h * sk_h + offs_n[None, :] * sk_l + offs_d[:, None]       # [D, BN]: K^T
        v_ptrs = VT + b * sv_b + h * sv_h + offs_n[:, None] + offs_d[None, :] * sv_d       # [BN, D]
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        # int32 scores -> float32 without a conversion instruction (those issue at the exp2 unit's rate):
        # for |x| < 2^22, bits(1.5 * 2^23) + x read as a float is 1.5 * 2^23 + x exactly (|x| <= D * 127^2).
        # The offset is folded into the row's shift below; the row max is taken on the offset values.
        offset = 12582912.0  # 1.5 * 2^23, whose bits are 0x4B400000
        p_offset = 8.807354922057604  # log2(448): p' = 448 p fills e4m3's range
        n_full = (Lk // BLOCK_N) * BLOCK_N
        for start_n in range(0, n_full, BLOCK_N):
            s = (tl.dot(q, tl.load(kt_ptrs + start_n * sk_l)) + 0x4B400000).to(tl.float32, bitcast=True)
            m_new = tl.maximum(m_i, (tl.max(s, 1) - offset) * row_scale)
            p = _exp2(s * row_scale[:, None] - (offset * row_scale + m_new - p_offset)[:, None], EXP_F16)
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p.to(tl.float32), 1)
            acc = tl.dot(p.to(tl.float8e4nv), tl.load(v_ptrs + start_n), acc * alpha[:, None])
            m_i = m_new
        if n_full < Lk:  # the last, partial key block: columns past Lk get no weight
            s = tl.dot(q, tl.load(kt_ptrs + n_full * sk_l)).to(tl.float32)
            s = tl.where((n_full + offs_n < Lk)[None, :], s * row_scale[:, None], float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - (m_new - p_offset)[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(tl.float8e4nv), tl.load(v_ptrs + n_full), acc * alpha[:, None])
            m_i = m_new  # the LSE below reads it (the output alone would not notice: acc and l share the shift)
        v_scale = tl.load(VS + (b * H + h) * HEAD_DIM + offs_d)
        out = acc / l_i[:, None] * v_scale[None, :]
        tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_l + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None])
        if WRITE_LSE:  # for a backward: natural-log LSE of the unsmoothed scores, [B, H, Lq, 1] float32
            # l_i sums p' = 448 * 2^(s - m): log2 sum 2^s = m + log2 l - log2 448; SHIFT adds back q . mean(k)
            lse_ptrs = (b * H + h) * Lq + offs_m
            lse = (m_i + tl.math.log2(l_i) - p_offset) * 0.6931471805599453
            tl.store(LSE + lse_ptrs, lse + tl.load(SHIFT + lse_ptrs, mask=row_ok, other=0.0), mask=row_ok)


EXP_F16 = False  # half-precision exp2 in the kernel (bench/attention_kernels.py measures both)


def _launch(q8: Tensor, k8: Tensor, vt8: Tensor, q_scale: Tensor, k_scale: Tensor, v_scale: Tensor, kv_len: int,
            exp_f16: bool, lse_shift: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """The Triton kernel on quantised operands (see `quantize_qkv`) -> (out [B, Lq, H, D] bf16, and with
    `lse_shift` [B, H, Lq, 1] the log-sum-exp the backward needs, float32 of the same shape, else None)."""
    batch, q_len, heads, head_dim = q8.shape
    out = torch.empty(q8.shape, device=q8.device, dtype=torch.bfloat16)
    lse = None if lse_shift is None else torch.empty_like(lse_shift)

    def grid(meta):
        return (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads)

    _fp8_attention_kernel[grid](q8, k8, vt8, q_scale, k_scale, v_scale, out,
                                out if lse is None else lse, out if lse_shift is None else lse_shift,
                                q8.stride(0), q8.stride(1), q8.stride(2), k8.stride(0), k8.stride(1), k8.stride(2),
                                vt8.stride(0), vt8.stride(1), vt8.stride(2), q_scale.stride(0), q_scale.stride(1),
                                out.stride(0), out.stride(1), out.stride(2), heads, q_len, kv_len,
                                HEAD_DIM=head_dim, EXP_F16=exp_f16, WRITE_LSE=lse is not None)
    return out, lse


@torch.library.custom_op("wanlora::fp8_attention_kernel", mutates_args=())
def _fp8_attention_kernel_op(q8: Tensor, k8: Tensor, vt8: Tensor, q_scale: Tensor, k_scale: Tensor,
                             v_scale: Tensor, kv_len: int, exp_f16: bool = False) -> Tensor:
    """The sampler's kernel call (no log-sum-exp) -> [B, Lq, H, D] bf16."""
    return _launch(q8, k8, vt8, q_scale, k_scale, v_scale, kv_len, exp_f16)[0]


@_fp8_attention_kernel_op.register_fake
def _(q8, k8, vt8, q_scale, k_scale, v_scale, kv_len, exp_f16=False):
    return torch.empty(q8.shape, device=q8.device, dtype=torch.bfloat16)


def kernel_available(device: torch.device) -> bool:
    """Triton is installed and the GPU has FP8 tensor cores (sm_89 and later)."""
    return (triton is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (8, 9))


def _check_kernel(q: Tensor) -> None:
    if not kernel_available(q.device) or q.shape[-1] not in (32, 64, 128, 256):
        raise RuntimeError(f"fp8 attention needs Triton and a GPU with FP8 tensor cores (sm_89+: Ada, Hopper) "
                           f"and a head size of 32, 64, 128 or 256 (here {q.shape[-1]}); sample without "
                           f"--fp8-attention, train with attention_backend auto")


def fp8_attention(q: Tensor, k: Tensor, v: Tensor, cudnn_backward: bool = True) -> Tensor:
    """softmax(q k^T / sqrt(D)) v with q k^T in int8 and P v in e4m3 (module docstring).

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; D a power of two >= 32. Returns [B, Lq, H, D] in q's dtype.
    When a gradient is needed, the forward also writes the log-sum-exp and the backward is the exact bf16
    flash backward fed this forward's output and LSE (`fp8_attention_backward`; cudnn_backward: cuDNN's
    kernel, else FlashAttention-2's, for lengths where cuDNN fails)."""
    if q.device.type != "cpu":
        _check_kernel(q)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Keys and values shared by every token are taken out first (differentiable steps) and the value
        # mean added back after: attention(q, k, v) = attention(q, k - mean k, v - mean v) + mean v exactly.
        # The backward needs it: fed an approximate LSE and output, its dS = P (dO v_j - dO O_i) no longer
        # cancels exactly, and a shared offset multiplies what is left. A key offset enters through
        # dQ = dS K (dq 8% off at an offset of twice k's spread), a value offset through D = dO O ~ dO mean(v)
        # (dq 30%, dk 17% at ten times v's spread; CPU tests); smoothed, both sit at the forward's own error.
        k = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype)
        v_mean = v.float().mean(dim=1, keepdim=True)
        v = (v.float() - v_mean).to(v.dtype)
        operands = _training_operands(q, k, v)
        out, _ = _fp8_attention_train_op(q, k, v, *operands, k.shape[1], cudnn_backward)
        return (out.float() + v_mean).to(q.dtype)
    if q.device.type == "cpu":
        return reference_fp8_attention(q, k, v)
    return _kernel_attention(q, k, v)


def _kernel_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v)
    return _fp8_attention_kernel_op(q8.contiguous(), k8.contiguous(), vt8.contiguous(), q_scale.contiguous(),
                                    k_scale.contiguous(), v_scale.contiguous(), k.shape[1], EXP_F16).to(q.dtype)


# ---- training: the 8-bit forward with the exact bf16 backward ------------------------------------------------
# The forward is the sampler's kernel (a third of attention's work in a training step); the backward recomputes
# P = exp(S - LSE) from the bf16 q and k, so the forward must hand it the LSE of the *unsmoothed* scores: the
# kernel's own is that of q . (k - mean k), short by q . mean(k) / sqrt(D) per row (softmax ignores the shift,
# the LSE does not; `fp8_attention` hands in keys already smoothed, so the shift is only bf16's residue there).
# The error this leaves in the gradients is the forward's: docs/benchmarks.md (issue 16).

def _training_operands(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
    """The kernel's quantised operands and the LSE shift q . mean_tokens(k) / sqrt(D) as [B, H, Lq, 1]
    float32; plain tensor ops on detached inputs (no graph through the quantisation), fused under compile."""
    q, k, v = q.detach(), k.detach(), v.detach()
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v)
    k_mean = k.float().mean(dim=1, keepdim=True)                                  # [B, 1, H, D]
    shift = (q.float() * k_mean).sum(-1) / math.sqrt(q.shape[-1])                 # [B, Lq, H]
    return (q8.contiguous(), k8.contiguous(), vt8.contiguous(), q_scale.contiguous(), k_scale.contiguous(),
            v_scale.contiguous(), shift.transpose(1, 2).unsqueeze(-1).contiguous())


@torch.library.custom_op("wanlora::fp8_attention_train", mutates_args=())
def _fp8_attention_train_op(q: Tensor, k: Tensor, v: Tensor, q8: Tensor, k8: Tensor, vt8: Tensor, q_scale: Tensor,
                            k_scale: Tensor, v_scale: Tensor, lse_shift: Tensor, kv_len: int,
                            cudnn_backward: bool) -> tuple[Tensor, Tensor]:
    """(out [B, Lq, H, D] bf16, lse [B, H, Lq, 1] float32, natural log). q, k, v are taken for the backward."""
    if q8.device.type == "cpu":
        return _reference_forward(q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift, kv_len)
    return _launch(q8, k8, vt8, q_scale, k_scale, v_scale, kv_len, EXP_F16, lse_shift)


@_fp8_attention_train_op.register_fake
def _(q, k, v, q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift, kv_len, cudnn_backward):
    return torch.empty(q8.shape, device=q8.device, dtype=torch.bfloat16), torch.empty_like(lse_shift)


def _reference_forward(q8, k8, vt8, q_scale, k_scale, v_scale, lse_shift, kv_len) -> tuple[Tensor, Tensor]:
    """`reference_fp8_attention`'s arithmetic from quantised operands, with the LSE (CPU training)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8[:, :kv_len].float())
    s = s * (q_scale.permute(0, 2, 1)[..., None] * k_scale[:, :, None, None])    # log2 units
    m = s.amax(-1, keepdim=True)
    p = torch.exp2(s - m + math.log2(FP8_MAX))
    l = p.sum(-1, keepdim=True)
    out = torch.einsum("bhqk,bhdk->bqhd", p.to(FP8).float(), vt8[..., :kv_len].float())
    out = out / l.permute(0, 2, 1, 3) * v_scale[:, None]
    lse = (m + torch.log2(l) - math.log2(FP8_MAX)) * math.log(2) + lse_shift
    return out.to(torch.bfloat16), lse


def fp8_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                           cudnn: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The flash-attention backward from a forward's out [B, Lq, H, D] and lse [B, H, Lq, 1] (natural log):
    P = exp(q k^T / sqrt(D) - lse), dV = P^T dO, dS = P (dO V^T - rowsum(dO O)), dQ = dS K / sqrt(D),
    dK = dS^T Q / sqrt(D). On CUDA cuDNN's kernel (or FlashAttention-2's), on the CPU the same in float32."""
    if q.device.type == "cpu":
        return _reference_backward(grad_out, q, k, v, out, lse)
    scale = 1.0 / math.sqrt(q.shape[-1])
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dot, ot = grad_out.contiguous().transpose(1, 2), out.transpose(1, 2)
    if cudnn:
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse, None, None, None, None, None, q.shape[1], k.shape[1], 0.0, False, scale=scale)
    else:
        grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse.squeeze(-1), None, None, q.shape[1], k.shape[1], 0.0, False, None, None,
            scale=scale)
    return tuple(g.transpose(1, 2) for g in grads)


def _reference_backward(grad_out, q, k, v, out, lse) -> tuple[Tensor, Tensor, Tensor]:
    scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = torch.promote_types(q.dtype, torch.float32)
    qf, kf, vf, dof, of = (t.to(dtype).transpose(1, 2) for t in (q, k, v, grad_out, out))   # [B, H, L, D]
    p = torch.exp(qf @ kf.transpose(-1, -2) * scale - lse.to(dtype))
    dv = p.transpose(-1, -2) @ dof
    ds = p * (dof @ vf.transpose(-1, -2) - (dof * of).sum(-1, keepdim=True))
    dq, dk = ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale
    return tuple(g.transpose(1, 2).to(t.dtype) for g, t in ((dq, q), (dk, k), (dv, v)))


def _train_setup_context(ctx, inputs, output):
    q, k, v, *_, cudnn_backward = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.cudnn_backward = cudnn_backward


def _train_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = fp8_attention_backward(grad_out, q, k, v, out, lse, ctx.cudnn_backward)
    return (dq, dk, dv) + (None,) * 9


_fp8_attention_train_op.register_autograd(_train_backward, setup_context=_train_setup_context)
