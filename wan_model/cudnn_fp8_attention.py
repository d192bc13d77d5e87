"""Self-attention for training on cuDNN's FP8 fused attention (Hopper): forward and backward in e4m3.

At the A14B 480x832x81 shape (32,760 tokens, 40 heads of 128) a training step spends 5.7 s of its 8.8 s in
cuDNN's bf16 flash attention (forward 39 ms, backward 103 ms per block). cuDNN's FP8 graphs (`sdpa_fp8`,
`sdpa_fp8_backward`, reached through the cuDNN frontend package `nvidia-cudnn-frontend`) ran them in 26.3 and
79.8 ms (docs/benchmarks.md, f9778ec). Both passes come from one quantised computation: the backward
recomputes P from the same e4m3 q and k and the forward's own log-sum-exp, so its gradients are those of
what the forward computed (the 8-bit-forward-with-bf16-backward lever was not, and failed).

Quantisation, per tensor (one scale for the whole [B, L, H, D] tensor, as the graphs take it):
    q, k, v, dO       current scaling: scale = 448 / amax(x), computed in plain tensor ops before the graph
                      (fused by torch.compile into the RoPE and norm kernels that make q and k)
    k, v              smoothed first (module `cudnn_fp8_attention`): k - mean_tokens(k) leaves softmax
                      unchanged; v - mean_tokens(v) is added back after. A component shared by all rows would
                      otherwise fill the one per-tensor scale and leave the rows' own spread few bits (CPU
                      emulation, bench/fp8_attention_tensor_scaled.py: dq 1,312% off raw, 9.6% smoothed)
    P                 scale 448 (the flash loop's P = exp(s - running max) lies in [0, 1])
    O, dP, dQ, dK, dV delayed scaling: each call's graph reports the tensor's amax; the next call of the same
                      block uses scale = 448 / (AMAX_MARGIN x that amax) (TransformerEngine's "most recent"
                      amax). A value past the range saturates (cuDNN's casts do) and is counted in the state
                      (`saturation_count`). The first call of a block calibrates: it runs the graph on safe
                      scales, reads the amaxes and runs again.
Hopper's graphs write O and the gradients in e4m3 only (bf16 outputs are Blackwell's); they are taken back to
bf16 with their descales. The scaling state is one float32 [STATE_SIZE] tensor per self-attention module
(`attach_scaling_states`), handed to the ops; the ops update it in place on the device (no host sync after
the calibration).

On the CPU the same ops run an emulation in float32 (per-tensor e4m3 of the same tensors, exact softmax),
so that tiny models train through this path in tests; the GPU tests compare cuDNN with float64 attention.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_MARGIN = 2.0       # delayed scales leave one binade of headroom over the previous call's amax
STATE_SIZE = 8
# Slots of the scaling state: the last amax of each delayed-scaled tensor, then counters.
AMAX_O, AMAX_DP, AMAX_DQ, AMAX_DK, AMAX_DV, SATURATED, CALLS = range(7)
_TINY = 1e-30


# ---- scaling ---------------------------------------------------------------------------------------------------

def quantize_per_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """x -> (e4m3 x * scale, descale [1, 1, 1, 1] float32) with scale = 448 / amax(x): plain tensor ops,
    clamped before the cast (torch turns an e4m3 overflow into NaN rather than saturating)."""
    xf = x.float()
    amax = xf.abs().amax().clamp_min(1e-12)
    x8 = (xf * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return x8, (amax / E4M3_MAX).reshape(1, 1, 1, 1)


def new_scaling_state(device: torch.device | str = "cpu") -> Tensor:
    """A block's delayed-scaling state: float32 [STATE_SIZE], zero (not yet calibrated)."""
    return torch.zeros(STATE_SIZE, dtype=torch.float32, device=device)


def attach_scaling_states(model: nn.Module, device: torch.device | str | None = None) -> int:
    """Give every self-attention module of a WanTransformer (`blocks.*.self_attn`) a scaling state on
    `device` (default: where its weights are), a non-persistent float32 buffer: not in the state dict, and
    attached after the model's dtype casts. The module names it in `mutable_buffers`: training writes it, so
    whatever moves the model between memories (train.parking) must copy it back each time. Returns how many
    were attached."""
    count = 0
    for block in getattr(model, "blocks", []):
        attn = block.self_attn
        attn.register_buffer("fp8_scaling", new_scaling_state(device or attn.q.weight.device), persistent=False)
        attn.mutable_buffers = ("fp8_scaling",)
        count += 1
    return count


def scaling_states(model: nn.Module) -> list[Tensor]:
    """The model's scaling states, one per block, in block order (none without `attach_scaling_states`)."""
    return [b.self_attn.fp8_scaling for b in getattr(model, "blocks", []) if hasattr(b.self_attn, "fp8_scaling")]


def saturation_count(model: nn.Module) -> int:
    """Values that saturated e4m3 in delayed-scaled tensors, summed over calls and blocks (one host sync)."""
    states = scaling_states(model)
    return int(torch.stack([s[SATURATED] for s in states]).sum().item()) if states else 0


def _delayed_scales(amax: Tensor, fallback: Tensor) -> Tensor:
    """448 / (AMAX_MARGIN x the last amax) per slot, `fallback` where no amax was recorded yet; [n] float32."""
    return torch.where(amax > 0, E4M3_MAX / (AMAX_MARGIN * amax.clamp_min(_TINY)), fallback)


def _record(state: Tensor, slots: slice, amax: Tensor, scales: Tensor) -> None:
    """Store the call's amaxes; count tensors whose amax passed the range its scale gave (saturated)."""
    state[SATURATED] += (amax * scales > E4M3_MAX).sum()
    state[CALLS] += 1
    state[slots] = amax


# Scaling states already calibrated, per pass, keyed by storage and offset: compiled code may hand the op another
# tensor object over the same buffer, and a storage object lives exactly as long as its memory (PyTorch keeps one
# Python object per storage), so a freed state leaves the map and a new state at a reused address is a stranger.
# A state met for the first time is read once (a host sync): one that already holds amaxes, as an expert's states
# do after parking in host memory and coming back to the device in new buffers, needs no calibration. A state is
# recorded only once its calibration has run, so a failed call leaves it to calibrate again.
_calibrated: dict[str, weakref.WeakKeyDictionary] = {"forward": weakref.WeakKeyDictionary(),
                                                     "backward": weakref.WeakKeyDictionary()}
_PASS_SLOTS = {"forward": slice(AMAX_O, AMAX_O + 1), "backward": slice(AMAX_DP, AMAX_DV + 1)}


def _needs_calibration(state: Tensor, pass_name: str) -> bool:
    if state.storage_offset() in _calibrated[pass_name].get(state.untyped_storage(), ()):
        return False
    if bool((state[_PASS_SLOTS[pass_name]] > 0).all()):
        _mark_calibrated(state, pass_name)
        return False
    return True


def _mark_calibrated(state: Tensor, pass_name: str) -> None:
    _calibrated[pass_name].setdefault(state.untyped_storage(), set()).add(state.storage_offset())


# ---- the arithmetic, emulated in float32 (CPU) --------------------------------------------------------------------

def _e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """x rounded to e4m3 at `scale` and back, saturating (the graphs' casts)."""
    return (x * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() / scale


def _heads_first(x8: Tensor, descale: Tensor) -> Tensor:
    return x8.float().transpose(1, 2) * descale.reshape(())


def _emulated_forward(q8, k8, v8, descale_q, descale_k, descale_v, scale_o) -> tuple[Tensor, Tensor, Tensor]:
    """(o8 [B, Lq, H, D] e4m3, lse [B, H, Lq, 1] float32, amax_o [1]) as the forward graph computes them."""
    q, k, v = _heads_first(q8, descale_q), _heads_first(k8, descale_k), _heads_first(v8, descale_v)
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    out = _e4m3(p, torch.tensor(E4M3_MAX)) @ v / p.sum(-1, keepdim=True)
    lse = m + p.sum(-1, keepdim=True).log()
    scale_o = scale_o.reshape(())
    o8 = (out * scale_o).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).transpose(1, 2).contiguous()
    return o8, lse, out.abs().amax().reshape(1)


def _emulated_backward(q8, k8, v8, o8, do8, lse, descales, scales) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq8, dk8, dv8 e4m3 [B, L, H, D], amax [4]: dP, dQ, dK, dV) as the backward graph computes them.
    descales: q, k, v, o, dO; scales: dP, dQ, dK, dV ([1] float32 each)."""
    dsq, dsk, dsv, dso, dsdo = descales
    q, k, v = _heads_first(q8, dsq), _heads_first(k8, dsk), _heads_first(v8, dsv)
    o, do = _heads_first(o8, dso), _heads_first(do8, dsdo)
    attn_scale = 1.0 / math.sqrt(q.shape[-1])
    p = torch.exp(q @ k.transpose(-1, -2) * attn_scale - lse)
    dv = _e4m3(p, torch.tensor(E4M3_MAX)).transpose(-1, -2) @ do
    dp = p * (do @ v.transpose(-1, -2) - (do * o).sum(-1, keepdim=True))
    dp8 = _e4m3(dp, scales[0].reshape(()))
    dq, dk = dp8 @ k * attn_scale, dp8.transpose(-1, -2) @ q * attn_scale
    grads = [(g * s.reshape(())).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).transpose(1, 2).contiguous()
             for g, s in ((dq, scales[1]), (dk, scales[2]), (dv, scales[3]))]
    amax = torch.stack([t.abs().amax() for t in (dp, dq, dk, dv)])
    return (*grads, amax)


# ---- cuDNN's graphs -------------------------------------------------------------------------------------------------

def _import_frontend():
    # Load torch's libcudnn first: the frontend dlopens libcudnn.so.9 by name and so binds the copy already in
    # the process (one library, one version), as bench/cudnn_fp8_attention.py checked (cuDNN 9.19, frontend 1.32).
    torch.backends.cudnn.version()
    try:
        import cudnn
    except ImportError as exc:
        raise ImportError("attention_backend cudnn_fp8 needs the cuDNN frontend: pip install nvidia-cudnn-frontend "
                          "(it binds the libcudnn torch loads; Hopper or later)") from exc
    return cudnn


@dataclass
class _Graph:
    graph: object
    tensors: dict
    workspace_bytes: int


_graphs: dict[tuple, _Graph] = {}
_handles: dict[int, object] = {}


def _handle(cudnn, device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    handle = _handles[index]
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


def _declare(graph, cudnn, name: str, batch: int, heads: int, length: int, head_dim: int, data_type):
    """A [B, H, L, D] graph tensor over contiguous [B, L, H, D] memory."""
    return graph.tensor(name=name, dim=(batch, heads, length, head_dim),
                        stride=(length * heads * head_dim, head_dim, heads * head_dim, 1), data_type=data_type)


def _scalar(graph, cudnn, name: str):
    return graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)


def _build(cudnn, graph) -> None:
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


def _graph(pass_name: str, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
           device: torch.device) -> _Graph:
    """The forward or backward FP8 graph for this shape, built once (about a second) and cached."""
    key = (pass_name, batch, heads, q_len, kv_len, head_dim, device)
    if key in _graphs:
        return _graphs[key]
    cudnn = _import_frontend()
    graph, tensors = declare_graph(pass_name, batch, heads, q_len, kv_len, head_dim, device)
    _build(cudnn, graph)
    _graphs[key] = _Graph(graph, tensors, int(graph.get_workspace_size()))
    return _graphs[key]


def declare_graph(pass_name: str, batch: int, heads: int, q_len: int, kv_len: int, head_dim: int,
                  device: torch.device) -> tuple[object, dict]:
    """(cuDNN graph, its tensors by variant-pack name) of the forward or backward pass, declared, not built:
    `_graph` builds the heuristics' first plan; bench/cudnn_fp8_plans.py builds and times them all."""
    cudnn = _import_frontend()
    handle = _handle(cudnn, device)
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    graph = cudnn.pygraph(name=f"wanlora_sdpa_fp8_{pass_name}", io_data_type=e4m3, intermediate_data_type=f32,
                          compute_data_type=f32, handle=handle)
    lengths = dict(q=q_len, k=kv_len, v=kv_len, o=q_len, dO=q_len)
    names = ("q", "k", "v") if pass_name == "forward" else ("q", "k", "v", "o", "dO")
    t = {n: _declare(graph, cudnn, n, batch, heads, lengths[n], head_dim, e4m3) for n in names}
    stats_dims, stats_strides = (batch, heads, q_len, 1), (heads * q_len, q_len, 1, 1)

    def output(tensor, like: str | None, data_type):
        if like is None:
            tensor.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(data_type)
        else:
            n = lengths[like]
            tensor.set_output(True).set_dim((batch, heads, n, head_dim)).set_stride(
                (n * heads * head_dim, head_dim, heads * head_dim, 1)).set_data_type(data_type)

    attn_scale = 1.0 / math.sqrt(head_dim)
    if pass_name == "forward":
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[n] = _scalar(graph, cudnn, n)
        o, stats, _amax_s, amax_o = graph.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            generate_stats=True, attn_scale=attn_scale, use_causal_mask=False, name="sdpa_fp8")
        output(o, "o", e4m3)
        stats.set_output(True).set_dim(stats_dims).set_stride(stats_strides).set_data_type(f32)
        output(amax_o, None, f32)
        t.update(out=o, stats=stats, amax_o=amax_o)
    else:
        t["stats"] = graph.tensor(name="stats", dim=stats_dims, stride=stats_strides, data_type=f32)
        for n in _BACKWARD_SCALARS:
            t[n] = _scalar(graph, cudnn, n)
        dq, dk, dv, amax_dq, amax_dk, amax_dv, amax_dp = graph.sdpa_fp8_backward(
            q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
            **{n: t[n] for n in _BACKWARD_SCALARS}, attn_scale=attn_scale, use_causal_mask=False,
            use_deterministic_algorithm=False, name="sdpa_fp8_backward")
        for grad, like in ((dq, "q"), (dk, "k"), (dv, "v")):
            output(grad, like, e4m3)
        for amax in (amax_dp, amax_dq, amax_dk, amax_dv):
            output(amax, None, f32)
        t.update(dQ=dq, dK=dk, dV=dv, amax_dP=amax_dp, amax_dQ=amax_dq, amax_dK=amax_dk, amax_dV=amax_dv)
    return graph, t


_BACKWARD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                     "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")


def _execute(g: _Graph, pack: dict, device: torch.device) -> None:
    cudnn = _import_frontend()
    workspace = torch.empty(max(1, g.workspace_bytes), dtype=torch.uint8, device=device)
    g.graph.execute({g.tensors[name]: value for name, value in pack.items()}, workspace,
                    handle=_handle(cudnn, device))


# The graphs' constant scalars, one tensor per (value, device): a Python float made into a CUDA tensor on every
# call is a host-to-device copy that waits for the stream (4 per block and step).
_constants: dict[tuple[float, str], Tensor] = {}


def _scalar_tensor(x: Tensor | float, device) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=torch.float32).reshape(1, 1, 1, 1).contiguous()
    key = (float(x), str(torch.device(device)))
    if key not in _constants:
        _constants[key] = torch.full((1, 1, 1, 1), float(x), dtype=torch.float32, device=device)
    return _constants[key]


def _cudnn_forward(q8, k8, v8, descale_q, descale_k, descale_v, scale_o) -> tuple[Tensor, Tensor, Tensor]:
    q8, k8, v8 = q8.contiguous(), k8.contiguous(), v8.contiguous()
    batch, q_len, heads, head_dim = q8.shape
    g = _graph("forward", batch, heads, q_len, k8.shape[1], head_dim, q8.device)
    o8 = torch.empty_like(q8)
    lse = torch.empty(batch, heads, q_len, 1, dtype=torch.float32, device=q8.device)
    amax_o = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=q8.device)
    dev = q8.device
    _execute(g, dict(q=q8, k=k8, v=v8, descale_q=descale_q, descale_k=descale_k, descale_v=descale_v,
                     descale_s=_scalar_tensor(1.0 / E4M3_MAX, dev), scale_s=_scalar_tensor(E4M3_MAX, dev),
                     scale_o=_scalar_tensor(scale_o, dev), out=o8, stats=lse, amax_o=amax_o), dev)
    return o8, lse, amax_o.reshape(1)


def _cudnn_backward(q8, k8, v8, o8, do8, lse, descales, scales) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q8, k8, v8, o8, do8 = (x.contiguous() for x in (q8, k8, v8, o8, do8))
    batch, q_len, heads, head_dim = q8.shape
    dev = q8.device
    g = _graph("backward", batch, heads, q_len, k8.shape[1], head_dim, dev)
    dq8, dk8, dv8 = torch.empty_like(q8), torch.empty_like(k8), torch.empty_like(v8)
    amax = torch.empty(4, dtype=torch.float32, device=dev)          # dP, dQ, dK, dV
    dsq, dsk, dsv, dso, dsdo = (_scalar_tensor(d, dev) for d in descales)
    s_dp, s_dq, s_dk, s_dv = (_scalar_tensor(s, dev) for s in scales)
    _execute(g, dict(q=q8, k=k8, v=v8, o=o8, dO=do8, stats=lse, descale_q=dsq, descale_k=dsk, descale_v=dsv,
                     descale_o=dso, descale_dO=dsdo, descale_s=_scalar_tensor(1.0 / E4M3_MAX, dev),
                     scale_s=_scalar_tensor(E4M3_MAX, dev), scale_dP=s_dp, descale_dP=1.0 / s_dp,
                     scale_dQ=s_dq, scale_dK=s_dk, scale_dV=s_dv, dQ=dq8, dK=dk8, dV=dv8,
                     amax_dP=amax[0:1].view(1, 1, 1, 1), amax_dQ=amax[1:2].view(1, 1, 1, 1),
                     amax_dK=amax[2:3].view(1, 1, 1, 1), amax_dV=amax[3:4].view(1, 1, 1, 1)), dev)
    return dq8, dk8, dv8, amax


# ---- the two passes with their scaling ------------------------------------------------------------------------------

def _forward_pass(q8, k8, v8, descale_q, descale_k, descale_v, state) -> tuple[Tensor, Tensor, Tensor]:
    """(o8, lse, descale_o [1, 1, 1, 1]); updates `state`."""
    run = _emulated_forward if q8.device.type == "cpu" else _cudnn_forward
    # |O| <= max |v| (each row is a convex combination of v's rows) = 448 x descale_v (per-tensor scaling puts
    # v's amax at 448): a scale that cannot saturate, read from the descale rather than a pass over v
    safe = (1.0 / descale_v.reshape(()).clamp_min(_TINY)).reshape(1)
    slots = slice(AMAX_O, AMAX_O + 1)
    if _needs_calibration(state, "forward"):
        state[slots] = run(q8, k8, v8, descale_q, descale_k, descale_v, safe)[2]
        _mark_calibrated(state, "forward")
    scale_o = _delayed_scales(state[slots], safe)
    o8, lse, amax_o = run(q8, k8, v8, descale_q, descale_k, descale_v, scale_o)
    _record(state, slots, amax_o, scale_o)
    return o8, lse, (1.0 / scale_o).reshape(1, 1, 1, 1)


def _backward_pass(q8, k8, v8, o8, do8, lse, descales, state) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq8, dk8, dv8, descales [3] of dQ, dK, dV); updates `state`."""
    run = _emulated_backward if q8.device.type == "cpu" else _cudnn_backward
    dsv, dsdo = descales[2].reshape(()), descales[4].reshape(())
    # |dP_ij| = P_ij |dO_i . v_j - dO_i . O_i| <= 2 max||dO_i|| max||v_j|| <= 2 D (448 descale_dO) (448 descale_v)
    # (a row's norm is at most sqrt(D) x the tensor's amax, which per-tensor scaling puts at 448): safe for dP,
    # read from the descales rather than two passes over dO and v. It only scales the first calibration run,
    # whose dP amax is all that is kept; the gradients have no cheap bound, so that run uses scale 1 for them.
    bound = 2 * q8.shape[-1] * (E4M3_MAX * dsdo) * (E4M3_MAX * dsv)
    fallback = torch.stack([E4M3_MAX / bound.clamp_min(_TINY), *(torch.ones((), device=q8.device),) * 3])
    slots = slice(AMAX_DP, AMAX_DV + 1)
    if _needs_calibration(state, "backward"):
        # the state is written once, after both runs: a call that fails between them leaves it to calibrate again
        amax = run(q8, k8, v8, o8, do8, lse, descales, fallback)[3]               # dP's amax is now right
        state[slots] = run(q8, k8, v8, o8, do8, lse, descales, _delayed_scales(amax, fallback))[3]
        _mark_calibrated(state, "backward")
    scales = _delayed_scales(state[slots], fallback)
    dq8, dk8, dv8, amax = run(q8, k8, v8, o8, do8, lse, descales, scales)
    _record(state, slots, amax, scales)
    return dq8, dk8, dv8, 1.0 / scales[1:]


# ---- the ops and their autograd ---------------------------------------------------------------------------------

# Two ops, so that selective checkpointing keeps only what the backward needs. The forward graph's op is what
# save_attention keeps (MUST_SAVE: its e4m3 output, log-sum-exp and descale, 1 byte an element); the bf16 output
# is taken from them by a second op, cheap to recompute, which carries the gradient. One op returning both kept
# the bf16 copy too: 2 more bytes an element, 12.5 GiB over the 40 blocks of an A14B step at 480p.

@torch.library.custom_op("wanlora::cudnn_fp8_attention", mutates_args=())
def _attention_op(q8: Tensor, k8: Tensor, v8: Tensor, descale_q: Tensor, descale_k: Tensor, descale_v: Tensor,
                  state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(o8 [B, Lq, H, D] e4m3, lse [B, H, Lq, 1] float32, descale_o [1, 1, 1, 1]): the forward graph on the e4m3
    inputs; no gradient of its own (`_output_op` carries it). `state` is updated in place (declared pure to
    torch.compile so that it stays one opaque call that selective checkpointing can keep)."""
    return _forward_pass(q8, k8, v8, descale_q, descale_k, descale_v, state)


@_attention_op.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, state):
    batch, q_len, heads, _ = q8.shape
    return (q8.new_empty(q8.shape), q8.new_empty((batch, heads, q_len, 1), dtype=torch.float32),
            q8.new_empty((1, 1, 1, 1), dtype=torch.float32))


@torch.library.custom_op("wanlora::cudnn_fp8_attention_output", mutates_args=())
def _output_op(q: Tensor, k: Tensor, v: Tensor, q8: Tensor, k8: Tensor, v8: Tensor, o8: Tensor, lse: Tensor,
               descale_q: Tensor, descale_k: Tensor, descale_v: Tensor, descale_o: Tensor, state: Tensor) -> Tensor:
    """out [B, Lq, H, D] in q's dtype = o8 x descale_o. q, k, v (bf16) take the gradient, which the backward
    graph computes from the e4m3 copies, o8 and lse."""
    return o8.float().mul_(descale_o.reshape(())).to(q.dtype)   # in place: one float32 temporary, not two


@_output_op.register_fake
def _(q, k, v, q8, k8, v8, o8, lse, descale_q, descale_k, descale_v, descale_o, state):
    return q.new_empty(q.shape)  # contiguous, as the real op's (o8 is)


@torch.library.custom_op("wanlora::cudnn_fp8_attention_backward", mutates_args=())
def _backward_op(q8: Tensor, k8: Tensor, v8: Tensor, o8: Tensor, do8: Tensor, lse: Tensor, descale_q: Tensor,
                 descale_k: Tensor, descale_v: Tensor, descale_o: Tensor, descale_do: Tensor,
                 state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq8, dk8, dv8 e4m3 [B, L, H, D], their descales [3] float32); `state` updated in place."""
    return _backward_pass(q8, k8, v8, o8, do8, lse, (descale_q, descale_k, descale_v, descale_o, descale_do), state)


@_backward_op.register_fake
def _(q8, k8, v8, o8, do8, lse, descale_q, descale_k, descale_v, descale_o, descale_do, state):
    return q8.new_empty(q8.shape), k8.new_empty(k8.shape), v8.new_empty(v8.shape), q8.new_empty(3, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _q, _k, _v, *kept = inputs  # q8, k8, v8, o8, lse, descale_q, descale_k, descale_v, descale_o, state
    ctx.save_for_backward(*kept)


def _backward(ctx, grad_out):
    q8, k8, v8, o8, lse, descale_q, descale_k, descale_v, descale_o, state = ctx.saved_tensors
    do8, descale_do = quantize_per_tensor(grad_out)
    dq8, dk8, dv8, descales = _backward_op(q8, k8, v8, o8, do8, lse, descale_q, descale_k, descale_v, descale_o,
                                           descale_do, state)
    grads = tuple(g8.float().mul_(d).to(grad_out.dtype) for g8, d in zip((dq8, dk8, dv8), descales))
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


_output_op.register_autograd(_backward, setup_context=_setup_context)


def cudnn_fp8_attention(q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v on cuDNN's FP8 graphs (module docstring); differentiable in q, k, v.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] bf16; state: this call site's scaling state (`new_scaling_state`),
    float32 on q's device. Returns [B, Lq, H, D] in q's dtype."""
    if state is None or state.dtype != torch.float32 or state.shape != (STATE_SIZE,):
        raise ValueError("cudnn_fp8 attention needs each self-attention's scaling state, a float32 "
                         f"[{STATE_SIZE}] tensor: call cudnn_fp8_attention.attach_scaling_states(model) after "
                         "the model's last dtype or device change (apply_speed_options does)")
    # Keys and values shared by every token are taken out first (differentiable: the gradient passes through
    # the mean exactly) and the value mean added back: attention(q, k, v) = attention(q, k', v') + mean v.
    k = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype)
    v_mean = v.float().mean(dim=1, keepdim=True)
    v = (v.float() - v_mean).to(v.dtype)
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t.detach()) for t in (q, k, v))
    o8, lse, descale_o = _attention_op(q8, k8, v8, dq, dk, dv, state)
    out = _output_op(q, k, v, q8, k8, v8, o8, lse, dq, dk, dv, descale_o, state)
    return (out.float() + v_mean).to(q.dtype)
