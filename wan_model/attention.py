"""Multi-head attention kernel of the Wan DiT, on batched `[B, L, heads, head_dim]` tensors.

Backends, chosen once per process with `set_attention_backend`:
  * "sdpa": `torch.nn.functional.scaled_dot_product_attention` (flash / cuDNN / memory-efficient
    kernels on a GPU, a plain kernel on the CPU);
  * "flash": flash-attention's `flash_attn_func` (v3 `flash_attn_interface` preferred over v2
    `flash_attn`); an error when neither is installed;
  * "auto" (default): flash-attention 3 when importable and the inputs are fp16/bf16 CUDA tensors, else
    sdpa. Not flash-attention 2: on an H100 at the A14B shape (32,760 tokens, 40 heads of 128, bf16)
    sdpa's cuDNN kernel ran the forward in 38 ms against 60 ms for its FlashAttention-2 kernel
    (forward+backward 133 ms against 233 ms), so FA2 is used only when asked for by name.
No mask: Wan attends over every video token and over all text_len text tokens (padded rows included).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("sdpa", "flash", "auto")
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
    """Select the kernel every later `attention` call uses: "sdpa" | "flash" | "auto"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    if name == "flash" and _flash_attn_func is None:
        raise ImportError("attention backend 'flash' needs flash-attention: pip install flash-attn "
                          "(or flash-attn 3's flash_attn_interface); use 'sdpa' or 'auto' without it")
    _backend = name


def get_attention_backend() -> str:
    return _backend


def _use_flash(q: Tensor) -> bool:
    if _backend == "flash":
        return True
    return (_backend == "auto" and _flash3_func is not None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16))


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(head_dim)) v per head.

    q: [B, Lq, heads, head_dim]; k, v: [B, Lk, heads, head_dim]; all one dtype.
    Returns [B, Lq, heads, head_dim] in q's dtype.
    """
    if _use_flash(q):
        out = _flash_attn_func(q, k, v)
        # flash-attention 3 returns (out, softmax_lse) in some releases.
        return out[0] if isinstance(out, tuple) else out
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
