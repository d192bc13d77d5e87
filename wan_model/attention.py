"""Multi-head attention kernel of the Wan DiT, on batched `[B, L, heads, head_dim]` tensors.

Backends, chosen once per process with `set_attention_backend`:
  * "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / memory-efficient
    kernels on a GPU, a plain kernel on the CPU);
  * "flash": flash-attention's `flash_attn_func` (v3 `flash_attn_interface` preferred over v2
    `flash_attn`); an error when neither is installed;
  * "auto" (default): flash-attention 3 when importable and the inputs are fp16/bf16 CUDA tensors, else
    sdpa, except at lengths where sdpa's cuDNN kernel fails: there PyTorch's own FlashAttention-2 kernel.
    Not flash-attention 2 by default: on an H100 at the A14B shape (32,760 tokens, 40 heads of 128, bf16)
    sdpa's cuDNN kernel ran the forward in 38 ms against 60 ms for its FlashAttention-2 kernel
    (forward+backward 133 ms against 233 ms), so FA2 is used only when asked for by name or as fallback;
  * "cudnn_fp8": self-attention on cuDNN's FP8 fused attention, forward and backward (`cudnn_fp8_attention.py`;
    Hopper, the `nvidia-cudnn-frontend` package; it changes the numbers), cross-attention as "auto". Each
    self-attention module carries its delayed-scaling state (`attach_scaling_states`).
  * "fp8": self-attention on 8-bit tensor cores (`fp8_attention.py`; it changes the numbers, see its
    docstring), cross-attention as "auto". Set for a render with `attention_backend`. With a gradient the
    forward is 8-bit and the backward cuDNN's bf16 one, fed its LSE: a bench lever only (docs/benchmarks.md:
    its gradients are not yet measured against a correct bf16 reference).
`prepare_attention` tries cuDNN forward+backward once per (batch, lengths, heads) and caches the answer;
the DiT calls it before its blocks, so compiled blocks only read the cache.
No mask: Wan attends over every video token and over all text_len text tokens (padded rows included).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .cudnn_fp8_attention import cudnn_fp8_attention
from .fp8_attention import fp8_attention

BACKENDS = ("sdpa", "flash", "auto", "fp8", "cudnn_fp8")
_CUDNN_CHECKED = ("auto", "fp8", "cudnn_fp8")  # backends whose bf16 calls take cuDNN's SDPA where it works
_backend = "auto"


def _find_flash_attn(module: str):
    """`module.flash_attn_func`, or None when the package is not installed."""
    try:
        return importlib.import_module(module).flash_attn_func
    except ImportError:
        return None


_flash3_func = _find_flash_attn("flash_attn_interface")  # flash-attention 3 (Hopper)
_flash_attn_func = _flash3_func or _find_flash_attn("flash_attn")


def set_attention_backend(name: str) -> None:
    """Select the kernel every later `attention` call uses: "sdpa" | "flash" | "auto" | "fp8" | "cudnn_fp8"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "flash" and _flash_attn_func is None:
        raise ImportError("attention backend 'flash' needs flash-attention: pip install flash-attn "
                          "(or flash-attn 3's flash_attn_interface); use 'sdpa' or 'auto' without it")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def self_attention_on_flash_package(backend: str) -> bool:
    """Whether `attention` hands CUDA bf16 self-attention to the flash-attention package under `backend`. Its
    kernels are no aten ops in every release, so selective checkpointing cannot keep their outputs
    (`speed.py`: the compiled checkpoint call is then not used)."""
    return backend == "flash" or (backend == "auto" and _flash3_func is not None)


@contextlib.contextmanager
def attention_backend(name: str):
    """`set_attention_backend(name)` for the duration of a `with` block (a render), then the previous one."""
    global _backend
    previous = _backend
    set_attention_backend(name)
    try:
        yield
    finally:
        _backend = previous


# (batch, q_len, kv_len, heads, head_dim) -> whether the cuDNN kernel ran forward and backward there.
_cudnn_works: dict[tuple[int, int, int, int, int], bool] = {}


# A correct attention backward gives sum_keys dv = sum_queries dO (P's rows sum to one); bf16 rounding leaves
# 5e-5 to 5e-4 of it (H200, 80 to 32,760 tokens), the broken cached graph of issue 16 left 1.6.
IDENTITY_TOLERANCE = 1e-2


def _cudnn_round_trip(batch: int, q_len: int, kv_len: int, heads: int, head_dim: int,
                      device: torch.device) -> float:
    """One cuDNN forward + backward on random bf16 tensors laid out as `attention` passes them, with a random
    output gradient laid out as the output (as training's); returns the worst head's
    |sum_keys dv - sum_queries dO| / |sum_queries dO| (NaN when a gradient is not finite)."""
    q = torch.randn(batch, q_len, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(batch, kv_len, heads, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    out = torch.ops.aten._scaled_dot_product_cudnn_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                             v.transpose(1, 2), None, True)[0]
    grad_out = torch.randn_like(out)                                       # [B, heads, q_len, head_dim]
    out.backward(grad_out)
    dv_sum, do_sum = v.grad.float().sum(1), grad_out.float().sum(2)       # [B, heads, head_dim]
    error = ((dv_sum - do_sum).norm(dim=-1) / do_sum.norm(dim=-1)).max()
    finite = torch.isfinite(q.grad).all() & torch.isfinite(k.grad).all()
    return float(torch.where(finite, error, torch.nan))


def _try_cudnn(batch: int, q_len: int, kv_len: int, heads: int, head_dim: int, device: torch.device) -> bool:
    """Whether cuDNN attention runs forward and backward at this shape and its backward is right there.

    Two round trips: the first builds the backward graph PyTorch then caches for the shape and serves to every
    later call of it; the second checks, through that graph, an identity every correct backward meets. The
    probe must look like the training step: under the trainer's autocast an earlier probe's
    `out.sum().backward()` handed cuDNN a float32, broadcast gradient, and every later backward at that shape
    came out wrong (dv's token sum 160% off dO's on an H200, torch 2.11, cuDNN 9.19; docs/benchmarks.md, issue
    16). So: autocast off, a bf16 gradient laid out as the output, and a failed check falls back to
    FlashAttention-2 with a warning instead of training on wrong gradients."""
    try:
        with torch.autocast(device.type, enabled=False):
            _cudnn_round_trip(batch, q_len, kv_len, heads, head_dim, device)
            error = _cudnn_round_trip(batch, q_len, kv_len, heads, head_dim, device)
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        raise  # no answer about cuDNN: the step itself would not fit either
    except RuntimeError:
        return False
    if not error < IDENTITY_TOLERANCE:  # NaN too
        warnings.warn(f"cuDNN attention's backward at batch {batch}, lengths {q_len} x {kv_len}, {heads} heads of "
                      f"{head_dim} fails a check every correct backward meets (dv's token sum {error:.3g} off "
                      f"dO's); this shape uses FlashAttention-2 instead")
        return False
    return True


def prepare_attention(batch: int, q_len: int, kv_lens: tuple[int, ...], heads: int, head_dim: int,
                      device: torch.device) -> None:
    """Decide, once per shape, whether `attention` may use the cuDNN kernel for these lengths (CUDA, "auto")."""
    if _backend not in _CUDNN_CHECKED or device.type != "cuda" or _flash3_func is not None:
        return
    for kv_len in kv_lens:
        key = (batch, q_len, kv_len, heads, head_dim)
        if key not in _cudnn_works:
            with torch.enable_grad():
                _cudnn_works[key] = _try_cudnn(*key, device)


def _use_flash(q: Tensor) -> bool:
    if _backend == "flash":
        return True
    return (_backend in _CUDNN_CHECKED and _flash3_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16))


def attention(q: Tensor, k: Tensor, v: Tensor, self_attention: bool = False,
              scaling_state: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head.

    q: [B, Lq, heads, head_dim]; k, v: [B, Lk, heads, head_dim]; all one dtype. self_attention: k and v
    come from the video tokens (the "fp8" and "cudnn_fp8" backends apply to those only); scaling_state: the
    call site's "cudnn_fp8" state. Returns [B, Lq, heads, head_dim] in q's dtype.
    """
    if self_attention and _backend == "cudnn_fp8":
        return cudnn_fp8_attention(q, k, v, scaling_state)
    if self_attention and _backend == "fp8":
        return fp8_attention(q, k, v, cudnn_backward=_cudnn_works.get(
            (q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3]), True))
    if _use_flash(q):
        out = _flash_attn_func(q, k, v)
        # flash-attention 3 returns (out, softmax_lse) in some releases.
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _backend in _CUDNN_CHECKED and not _cudnn_works.get((q.shape[0], q.shape[2], k.shape[2], q.shape[1], q.shape[3]),
                                                   True):
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)
