"""Frozen base linears stored in float8 (e4m3) with one scale per output channel.

LoRA training never updates the DiT's base weights, so they need not sit in bf16: e4m3 storage halves
them (A14B expert: 14.0e9 block-linear weights, 28.1 GB -> 14.0 GB) and pays for keeping more
activations. Quantisation, per output row o of W: [out, in],

    s_o   = max_i |W_oi| / 448                       (448 = largest finite e4m3 value)
    Q_oi  = e4m3(W_oi / s_o)                          round to nearest
    W'_oi = Q_oi * s_o                                dequantised, in the compute dtype

e4m3 keeps 3 mantissa bits, so |W - W'| <= 2^-4 |W| for normal values and <= 2^-10 s_o in the
subnormal range (|W / s_o| < 2^-6): a relative error of a few percent per weight, about 2-3% on
the outputs of random layers (`tests/wan_model/test_fp8.py` asserts the bound and the output error).

`FP8Linear` is an `nn.Linear` subclass, so PEFT wraps it like any Linear; `weight` is a property that
returns the dequantised weight, and `state_dict` / `load_state_dict` keep the official `weight` / `bias`
keys (saved dequantised, loaded quantised). Two compute modes:
  * "storage": y = x W'^T + b with W' dequantised on the fly (bf16 matmuls forward and backward);
  * "matmul":  forward through `torch._scaled_mm` on e4m3 operands (x quantised per row, W per output
    channel; Hopper's FP8 tensor cores, about 2x bf16's rate), backward dx = dy W' in bf16. CUDA only.
  * "matmul_dgrad": "matmul", and the input gradient on FP8 too. The weight's scale is per output
    channel, which in dx = dy W' is the summed dimension, so it is folded into dy first:
        dx[n, i] = sum_o (dy[n, o] s_o) Q[o, i],   g = dy * s (per column), g quantised per row (e4m3)
    and dx = _scaled_mm(e4m3(g / sg), Q) * sg. The frozen linears' input-gradient matmuls are as many
    FLOPs as their forward (0.785 PFLOP per A14B 480p step). Q needs a column-major copy per call (a
    transpose of the e4m3 weight, 0.35 GB per A14B block).
Two forward-only refinements of the FP8 matmul:
  * `fast_accum` (the sampler's): the tensor cores accumulate the e4m3 products in their own precision
    instead of cuBLAS promoting partial sums to float32 every few k-blocks, as TransformerEngine and torchao
    run forward GEMMs. The extra rounding is far below e4m3's own (docs/benchmarks.md measures both).
    Training keeps the promoted accumulation, whose FP8 tables were measured with it.
  * `x_amax`: a caller that knows a bound on each input row's max |x| passes it, and the row scale is taken
    from it instead of a reduction over x (the FFN: `gelu_row_bound`). A bound below a row's true max only
    clips that row's largest values to +-448 (the quantiser clamps).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
FP8Mode = Literal["storage", "matmul", "matmul_dgrad"]
FP8_MODES = ("storage", "matmul", "matmul_dgrad")
# |GELU_tanh(x)| for x below its minimum at x = -0.7525 never exceeds 0.17004 (0.16992 after bf16 rounding);
# GELU increases above it. So max_i |GELU(h_i)| = GELU(max_i h_i) whenever that is at least this bound.
GELU_NEGATIVE_BOUND = 0.171


def quantize_rows(w: Tensor, amax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """w: [rows, cols] -> (q: [rows, cols] float8_e4m3fn, scale: [rows] float32), w ~= q * scale[:, None].

    amax: [rows] max |w| per row when the caller knows it (or a bound on it), else reduced here.
    Rows of zeros get scale 1 (q = 0) rather than a division by zero."""
    w32 = w.float()
    amax = w32.abs().amax(dim=1) if amax is None else amax.float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w32 / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def gelu_row_bound(h: Tensor) -> Tensor:
    """h: [..., n], the input of a tanh GELU -> [...] float32 >= max |GELU(h)| over each row, taken before GELU.

    The row's plain max through GELU, floored at GELU_NEGATIVE_BOUND: equal to the row's max |GELU| wherever
    that is at least the bound (a real FFN row: everywhere), a little coarser elsewhere, never below it in
    float32. It lets the FFN's second linear quantise GELU(h) in one pass instead of evaluating GELU twice
    (docs/benchmarks.md, "Sampling speed, sixth session"). Computed in float32, as Inductor's fused kernels
    compute GELU: there the scales equal the two-pass ones bit for bit; eager code rounds GELU(h) to bf16
    first, which can put the bound up to half a bf16 step below the row's max (that value clips by <= 2^-9)."""
    return F.gelu(h.detach().float().amax(dim=-1), approximate="tanh").clamp_min(GELU_NEGATIVE_BOUND)


def dequantize_rows(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q: [rows, cols] e4m3, scale: [rows] float32 -> [rows, cols] `dtype` = q * scale[:, None]."""
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


class _FP8MatmulLinear(torch.autograd.Function):
    """y = e4m3(x / sx) e4m3(W / sw)^T * sx sw^T + b forward on FP8 tensor cores; dx = dy W' in bf16.

    Nothing activation-sized is saved for backward (the weight is frozen, so x is not needed)."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None, out_dtype: torch.dtype,
                fp8_dgrad: bool = False, fast_accum: bool = False, x_amax: Tensor | None = None) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = quantize_rows(x2, None if x_amax is None else x_amax.reshape(-1))
        # _scaled_mm wants the second operand column-major: q.t() of a row-major [out, in] q is exactly that.
        y = torch._scaled_mm(xq, q.t(), scale_a=xs[:, None], scale_b=scale[None, :], out_dtype=out_dtype,
                             use_fast_accum=fast_accum)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(q, scale)
        ctx.x_dtype, ctx.fp8_dgrad = x.dtype, fp8_dgrad
        return y.view(*lead, q.shape[0])

    @staticmethod
    def backward(ctx, dy: Tensor):
        q, scale = ctx.saved_tensors
        if ctx.fp8_dgrad:
            dx = fp8_input_grad(dy, q, scale)
        else:
            dx = dy @ dequantize_rows(q, scale, dy.dtype)
        return dx.to(ctx.x_dtype), None, None, None, None, None, None, None


def fp8_input_grad(dy: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """dx = dy W' with W' = q * scale[:, None] ([out, in]), as one FP8 matmul (module docstring).

    dy: [..., out] -> [..., in] in dy's dtype."""
    lead = dy.shape[:-1]
    g = dy.reshape(-1, dy.shape[-1]).float() * scale[None, :]
    gq, gs = quantize_rows(g)
    ones = torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32)
    # The second operand must be column-major: the transpose of a contiguous q^T [in, out] is.
    dx = torch._scaled_mm(gq, q.t().contiguous().t(), scale_a=gs[:, None], scale_b=ones, out_dtype=dy.dtype)
    return dx.view(*lead, q.shape[1])


class FP8Linear(nn.Linear):
    """A frozen `nn.Linear` whose weight lives in e4m3 with per-output-channel scales (module docstring).

    Buffers `weight_fp8: [out, in]` float8_e4m3fn and `weight_scale: [out]` float32 (not in the state
    dict); `bias: [out]` stays a (frozen) parameter in the compute dtype. `.to(dtype)` casts only the
    bias: the quantised weight keeps its dtype, and moves with the module between devices."""

    def __init__(self, weight: Tensor, bias: Tensor | None, mode: FP8Mode = "storage",
                 compute_dtype: torch.dtype = torch.bfloat16, fast_accum: bool = False):
        nn.Module.__init__(self)  # not nn.Linear.__init__: `weight` is a property here, not a parameter
        if mode not in FP8_MODES:
            raise ValueError(f"FP8Linear: mode must be one of {FP8_MODES}, got {mode!r}")
        self.out_features, self.in_features = weight.shape
        self.mode = mode
        self.fast_accum = fast_accum
        self.compute_dtype = compute_dtype
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("weight_fp8", q, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: FP8Mode = "storage", fast_accum: bool = False) -> "FP8Linear":
        """Quantise a frozen Linear; the compute dtype is its weight's dtype (bf16 in training)."""
        if linear.weight.requires_grad:
            raise ValueError(f"FP8Linear: the base weight {tuple(linear.weight.shape)} requires grad; fp8 storage "
                             "is for frozen base weights: call model.requires_grad_(False) (or attach LoRA) first")
        return cls(linear.weight, linear.bias, mode, compute_dtype=linear.weight.dtype, fast_accum=fast_accum)

    @property
    def weight(self) -> Tensor:
        """[out, in] dequantised weight in the compute dtype (a new tensor each call)."""
        return dequantize_rows(self.weight_fp8, self.weight_scale, self.compute_dtype)

    @property
    def quantizes_input(self) -> bool:
        """Whether forward quantises its input to e4m3 (an FP8 matmul mode on CUDA), so an `x_amax` bound
        is used rather than ignored."""
        return self.mode != "storage" and self.weight_fp8.is_cuda

    def forward(self, x: Tensor, x_amax: Tensor | None = None) -> Tensor:
        """x: [..., in] -> [..., out] in the compute dtype (autocast's bf16 included). x_amax: [...] a bound
        on each row's max |x| for the FP8 matmul's input scale (module docstring); ignored in storage mode."""
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) \
            else self.compute_dtype
        if self.mode != "storage" and x.is_cuda:
            return _FP8MatmulLinear.apply(x.to(dtype), self.weight_fp8, self.weight_scale, self.bias, dtype,
                                          self.mode == "matmul_dgrad", self.fast_accum, x_amax)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), dequantize_rows(self.weight_fp8, self.weight_scale, dtype), bias)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would turn the e4m3 buffer (a floating dtype) into bf16: move it, keep its dtype.
        q, scale = self.weight_fp8, self.weight_scale
        device = fn(torch.empty(0, device=q.device)).device
        super()._apply(fn, recurse)
        self._buffers["weight_fp8"] = q.to(device)
        self._buffers["weight_scale"] = scale.to(device)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: checkpoint has {tuple(w.shape)}, the model "
                                  f"[{self.out_features}, {self.in_features}]")
            else:
                q, scale = quantize_rows(w.to(self.weight_fp8.device))
                self.weight_fp8.copy_(q)
                self.weight_scale.copy_(scale)
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key in unexpected_keys:
            unexpected_keys.remove(key)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fp8 e4m3 {self.mode}{', fast accumulation' * self.fast_accum}")


def quantize_linears_(model: nn.Module, names: list[str], mode: FP8Mode = "storage", fast_accum: bool = False) -> int:
    """Replace the frozen `nn.Linear` modules at the given dotted `names` by `FP8Linear`; returns the count.

    A name may point at a PEFT LoRA layer: its `base_layer` is quantised, the LoRA A/B stay as they are."""
    count = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        module = getattr(parent, attr)
        if hasattr(module, "base_layer"):  # PEFT LoRA layer
            parent, attr, module = module, "base_layer", module.base_layer
        if isinstance(module, FP8Linear):
            continue
        if type(module) is not nn.Linear:
            raise TypeError(f"quantize_linears_: {name} is {type(module).__name__}, expected nn.Linear "
                            "(or a PEFT LoRA layer around one)")
        setattr(parent, attr, FP8Linear.from_linear(module, mode, fast_accum))
        count += 1
    return count
