r"""cuDNN's FP8 fused attention against cuDNN's bf16 SDPA at the Wan2.2 A14B training shape: speed and gradients.

    PYTHONPATH=/tmp/site:$PWD python3 bench/cudnn_fp8_attention.py --json OUT.json \
        [--batch 1 --heads 40 --seq 32760 --head-dim 128 --iters 5]          # one Hopper GPU

Why: a training step spends 4.24 s in 40 calls of cuDNN's bf16 flash-attention backward (~105 ms each) and
1.57 s in its forward (~38 ms each). cuDNN also ships an FP8 attention (forward and backward, Hopper and later),
reachable through the cuDNN frontend Python package (`cudnn`, 1.32.0: `pygraph.sdpa_fp8` and
`pygraph.sdpa_fp8_backward`). This measures whether its backward is markedly faster than the bf16 one, and how
far its outputs and gradients are from bf16's.

What runs, at a small shape first (B=1, H=2, S=1024, D=128: is the graph's meaning right?) and then at the
training shape (default B=1, H=40, S=32760, D=128):
  * inputs as a Wan block hands them to attention: contiguous [B, S, H, D] bf16 (attention sees the
    [B, H, S, D] view with strides (S*H*D, D, H*D, 1)); q and k RMS-normalised over the whole H*D row, k plus
    one shared random [H, D] offset, v Gaussian, dO Gaussian / sqrt(S); seeded;
  * bf16 reference: torch SDPA under `sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`, forward alone and backward
    alone (CUDA events, warm-up, median of --iters);
  * exact reference: attention forward and backward in float64 arithmetic, a block of query rows at a time
    (at the small shape also checked against autograd float64 and float32 math attention); it also gives the
    largest softmax probability and score gradient, which the FP8 scales need;
  * FP8: q, k, v, dO cast to e4m3 with one scale per tensor (descale = amax / 448); the forward graph
    (training mode: O and the softmax stats) and the backward graph built as the frontend's own tests build
    them; output dtypes tried in order of preference (bf16 O / bf16 gradients first; cuDNN allows those on
    Blackwell only, so on Hopper they are expected to fail, which is recorded), then e4m3 (then e5m2 for the
    gradients). Scales: scale_s = 448 for P (flash attention's P is in [0, 1]); O, dP (cuDNN's name for the
    score gradient dS) and the FP8 gradients by delayed scaling (run, read the amax cuDNN reports, set
    scale = max / amax, run again); the backward also once more with P scaled from its true maximum (the
    backward's P is normalised, ~1/S). Each graph's execute is timed alone, in ms and TFLOP/s (forward
    4*B*H*S^2*D FLOPs, backward 2.5x that);
  * accuracy: relative L2 error ||x - ref|| / ||ref|| and cosine of O, dQ, dK, dV against the bf16 SDPA and
    against the exact reference (and, for context, bf16 SDPA's own error against the exact reference);
  * the cost of the casts an FP8 attention adds around itself (q, k, v, dO to e4m3; dQ, dK, dV back to bf16).

Robustness (one run on a lent GPU has to tell): every stage is wrapped, a failure is written to the JSON
(error and last traceback lines) and the script goes on, so a failing FP8 graph still leaves the bf16 timings.
Each shape runs in its own worker process (this script with --worker), so a crash inside cuDNN ends one shape,
not the run; the workers' JSON files (OUT.json.<shape>.worker.json) are rewritten at every stage and merged
into OUT.json, which is printed at the end. If the FP8 graphs fail at S % 128 != 0 (cuDNN before 9.7 wanted
multiples of 128 on Hopper), the training shape is measured again at the next multiple of 128. Without a CUDA
GPU the script says so and exits 0.

Setup on the GPU machine (torch's own cuDNN 9 is used; the frontend is pointed at the libcudnn torch loaded):

    pip install --no-deps --target /tmp/site \
        .whl/nvidia_cudnn_frontend-1.32.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # main() reports that there is nothing to measure without torch
    torch = None
    F = None

E4M3_MAX = 448.0
ATTENTION_CALLS_PER_STEP = 40  # A14B: 40 blocks, one self-attention each
SMALL_SHAPE = (1, 2, 1024, 128)  # the correctness run: small enough for textbook math attention
CALIBRATION_STEP = 16.0  # run B of a scale calibration uses scale / 16 (see calibrate_scales)
TRACEBACK_LINES = 15


# --------------------------------------------------------------------------------------------------
# Shapes, report, timing
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    seq: int
    head_dim: int

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def heads_first_dims(self):
        """[B, H, S, D]: the order attention (torch's SDPA and cuDNN's graphs) names the axes in."""
        return (self.batch, self.heads, self.seq, self.head_dim)

    @property
    def bshd_strides(self):
        """Element strides of that [B, H, S, D] view over contiguous [B, S, H, D] memory."""
        return (self.seq * self.heads * self.head_dim, self.head_dim, self.heads * self.head_dim, 1)

    @property
    def stats_dims(self):
        return (self.batch, self.heads, self.seq, 1)

    @property
    def stats_strides(self):
        return (self.heads * self.seq, self.seq, 1, 1)

    @property
    def forward_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim

    @property
    def backward_flops(self) -> float:
        return 2.5 * self.forward_flops

    def as_dict(self) -> dict:
        return dict(batch=self.batch, heads=self.heads, seq=self.seq, head_dim=self.head_dim,
                    attn_scale=self.attn_scale)


def describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:4000]


def json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats become strings (strict parsers reject NaN), unknown objects their str()."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


class Report:
    """The JSON result. Rewritten after every stage so that a crash keeps what was measured before it."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.data: Dict[str, Any] = {"script": "bench/cudnn_fp8_attention.py",
                                     "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def save(self) -> None:
        if not self.path:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(json_safe(self.data), f, indent=2)
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not end the measurements; the JSON is printed at the end
            print(f"could not write {self.path}: {describe_exception(exc)}", file=sys.stderr, flush=True)

    def stage(self, section: dict, name: str, fn: Callable[[dict], Any]) -> Any:
        """Run fn(entry) as one stage: its details go into section[name]; an exception is recorded, not raised.

        The entry is saved as running before the stage starts, so if the process dies inside it (a segfault in
        a library), the JSON names the stage.
        """
        entry: Dict[str, Any] = {"running": True}
        section[name] = entry
        self.save()
        print(f"[stage] {name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            result = fn(entry)
            entry["ok"] = True
            return result
        except Exception as exc:  # noqa: BLE001 -- the whole point: record and go on
            entry["ok"] = False
            entry["error"] = describe_exception(exc)
            entry["traceback_tail"] = traceback.format_exc().strip().splitlines()[-TRACEBACK_LINES:]
            print(f"[stage] {name} FAILED: {entry['error'][:500]}", file=sys.stderr, flush=True)
            return None
        finally:
            entry.pop("running", None)
            entry["seconds"] = round(time.perf_counter() - start, 3)
            print(f"[stage] {name} done in {entry['seconds']} s", file=sys.stderr, flush=True)
            self.save()


def time_cuda_ms(fn: Callable[[], Any], iters: int, warmup: int) -> dict:
    """GPU time of fn alone: CUDA events around each call on the current stream, after warm-up calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(1, iters)):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop))
    return dict(median_ms=statistics.median(samples), min_ms=min(samples), max_ms=max(samples),
                samples_ms=[round(s, 4) for s in samples])


def with_tflops(timing: dict, flops: float) -> dict:
    timing["tflops_at_median"] = flops / (timing["median_ms"] * 1e-3) / 1e12
    return timing


# --------------------------------------------------------------------------------------------------
# Inputs, references, error measures
# --------------------------------------------------------------------------------------------------


@dataclass
class AttentionInputs:
    q: Any  # [B, S, H, D] bf16, contiguous
    k: Any
    v: Any
    dO: Any


def make_wan_like_inputs(shape: AttentionShape, seed: int, device) -> AttentionInputs:
    """q, k, v, dO as a Wan block hands them to attention: contiguous [B, S, H, D] bf16.

    q and k go through RMS normalisation over the whole H*D row, as Wan's q/k norms do (their learned weight
    left out). k also gets one random [H, D] offset shared by every token: real keys carry such a common
    component; the softmax ignores it, but K's FP8 scale has to cover it. v is Gaussian, dO Gaussian / sqrt(S).
    """
    b, h, s, d = shape.batch, shape.heads, shape.seq, shape.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def gaussian(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=torch.float32)

    def rms_normalised():
        x = gaussian(b, s, h * d)
        x.mul_(torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6))
        return x.view(b, s, h, d)

    q = rms_normalised().to(torch.bfloat16)
    k = rms_normalised().add_(gaussian(1, 1, h, d)).to(torch.bfloat16)
    v = gaussian(b, s, h, d).to(torch.bfloat16)
    dO = gaussian(b, s, h, d).div_(math.sqrt(s)).to(torch.bfloat16)
    return AttentionInputs(q=q, k=k, v=v, dO=dO)


def heads_first(x):
    """[B, S, H, D] -> the [B, H, S, D] view attention takes (no copy)."""
    return x.transpose(1, 2)


def bf16_sdpa_forward_backward(inputs: AttentionInputs, shape: AttentionShape, iters: int, warmup: int,
                               entry: dict) -> dict:
    """torch SDPA on bf16: forward alone and backward alone timed; out and grads kept.

    cuDNN's kernels are asked for (`sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`: training runs them); should torch
    refuse them here, flash attention stands in so the FP8 results still have a bf16 reference, and
    entry["backend"] says which ran. The forward is timed with inputs that require grad, so it is the
    training forward (it also writes the log-sum-exp the backward needs). The backward is autograd through
    one forward's graph kept with retain_graph, so each timed call is the backward kernel (plus view
    bookkeeping).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attempts = entry.setdefault("attempts", [])
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                result = _time_sdpa_and_keep_results(inputs, shape, iters, warmup, entry)
        except Exception as exc:  # noqa: BLE001 -- try the next backend, keep the reason
            attempts.append(dict(backend=backend, ok=False, error=describe_exception(exc)))
            for key in ("forward", "backward", "out_strides"):
                entry.pop(key, None)
            continue
        attempts.append(dict(backend=backend, ok=True))
        entry["backend"] = backend
        return result
    raise RuntimeError("torch SDPA ran with neither cuDNN nor flash attention; see attempts")


def _time_sdpa_and_keep_results(inputs: AttentionInputs, shape: AttentionShape, iters: int, warmup: int,
                                entry: dict) -> dict:
    leaves = [t.detach().clone().requires_grad_(True) for t in (inputs.q, inputs.k, inputs.v)]
    q_v, k_v, v_v = (heads_first(t) for t in leaves)
    dO_v = heads_first(inputs.dO)

    def forward():
        return F.scaled_dot_product_attention(q_v, k_v, v_v)

    out = forward()

    def backward():
        return torch.autograd.grad(out, leaves, dO_v, retain_graph=True)

    grads = backward()
    entry["forward"] = with_tflops(time_cuda_ms(forward, iters, warmup), shape.forward_flops)
    entry["backward"] = with_tflops(time_cuda_ms(backward, iters, warmup), shape.backward_flops)
    entry["out_strides"] = list(out.stride())
    return dict(out=heads_first(out.detach()).contiguous(), dq=grads[0].contiguous(), dk=grads[1].contiguous(),
                dv=grads[2].contiguous())


def exact_attention_reference(q, k, v, dO, attn_scale: float, rows_per_block: int) -> dict:
    """Attention forward and backward in float64 arithmetic, one head and one block of query rows at a time.

    float64 so that nothing (a TF32 override of float32 matmuls, as NGC containers set) blurs the reference;
    results are stored as float32, far below any error measured here. Only [rows, S] of scores is ever held,
    so it runs at S=32760. Returns out, dq, dk, dv ([B, S, H, D]), lse ([B, H, S], natural log, what cuDNN's
    stats hold) and the largest values the FP8 recipe has to scale: the softmax probability P, dP = dO V^T,
    and the score gradient dS = P (dP - D) (per scaled logit; times attn_scale per raw logit q.k).
    """
    b_n, s_n, h_n, d_n = q.shape
    device, f64 = q.device, torch.float64
    out = torch.empty(b_n, s_n, h_n, d_n, dtype=torch.float32, device=device)
    dq = torch.empty_like(out)
    dk = torch.empty_like(out)
    dv = torch.empty_like(out)
    lse = torch.empty(b_n, h_n, s_n, dtype=torch.float32, device=device)
    amax_p = torch.zeros((), dtype=f64, device=device)
    amax_dp = torch.zeros_like(amax_p)
    amax_ds = torch.zeros_like(amax_p)
    for b in range(b_n):
        for h in range(h_n):
            qh, kh, vh, gh = (t[b, :, h].to(f64) for t in (q, k, v, dO))  # [S, D] each
            dk_acc = torch.zeros_like(kh)
            dv_acc = torch.zeros_like(vh)
            for r0 in range(0, s_n, rows_per_block):
                r1 = min(s_n, r0 + rows_per_block)
                qc, gc = qh[r0:r1], gh[r0:r1]
                p = qc @ kh.T
                p.mul_(attn_scale)
                row_max = p.amax(dim=1, keepdim=True)
                p.sub_(row_max).exp_()
                row_sum = p.sum(dim=1, keepdim=True)
                p.div_(row_sum)
                lse[b, h, r0:r1] = (row_max + row_sum.log()).squeeze(1).float()
                oc = p @ vh
                out[b, r0:r1, h] = oc.float()
                dv_acc.addmm_(p.T, gc)
                ds = gc @ vh.T  # dP = dO V^T
                amax_dp = torch.maximum(amax_dp, ds.abs().amax())
                ds.sub_((gc * oc).sum(dim=1, keepdim=True)).mul_(p)  # dS = P (dP - D), D = rowsum(dO * O)
                amax_p = torch.maximum(amax_p, p.amax())
                amax_ds = torch.maximum(amax_ds, ds.abs().amax())
                dq[b, r0:r1, h] = (ds @ kh).mul_(attn_scale).float()
                dk_acc.addmm_(ds.T, qc, alpha=attn_scale)
                del p, ds, oc
            dk[b, :, h] = dk_acc.float()
            dv[b, :, h] = dv_acc.float()
    amax = dict(p=float(amax_p), dp=float(amax_dp), ds_per_scaled_logit=float(amax_ds),
                ds_per_raw_logit=float(amax_ds) * attn_scale)
    return dict(out=out, dq=dq, dk=dk, dv=dv, lse=lse, amax=amax)


def math_attention(q, k, v, dO, attn_scale: float, dtype) -> dict:
    """Textbook attention with autograd in dtype (small shapes only): the check on the blocked reference."""
    qf, kf, vf = (t.to(dtype).detach().requires_grad_(True) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", qf, kf) * attn_scale
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, dim=-1), vf)
    dq, dk, dv = torch.autograd.grad(out, (qf, kf, vf), dO.to(dtype))
    return dict(out=out.detach(), dq=dq, dk=dk, dv=dv)


def rows_per_block_for(seq: int) -> int:
    """Query rows per block of the exact reference: ~1 GB of float64 scores per block."""
    return max(64, min(seq, (1 << 27) // max(1, seq)))


def error_metrics(x, ref, chunk: int = 1 << 24) -> dict:
    """||x - ref|| / ||ref||, cosine, norm ratio and max error, in float64, chunk by chunk (no full copies)."""
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: {tuple(x.shape)} vs reference {tuple(ref.shape)}")
    xf, rf = x.reshape(-1), ref.reshape(-1)
    sums = torch.zeros(4, dtype=torch.float64, device=x.device)  # |d|^2, |r|^2, |x|^2, x.r
    max_err = torch.zeros((), dtype=torch.float64, device=x.device)
    nonfinite = torch.zeros((), dtype=torch.int64, device=x.device)
    for i in range(0, xf.numel(), chunk):
        a = xf[i:i + chunk].double()
        r = rf[i:i + chunk].double()
        nonfinite += (~torch.isfinite(a)).sum()
        d = a - r
        sums += torch.stack([(d * d).sum(), (r * r).sum(), (a * a).sum(), (a * r).sum()])
        max_err = torch.maximum(max_err, d.abs().max())
    d2, r2, x2, xr = (float(s) for s in sums)
    return dict(rel_l2=math.sqrt(d2 / r2) if r2 > 0 else float("nan"),
                cosine=xr / math.sqrt(x2 * r2) if x2 > 0 and r2 > 0 else float("nan"),
                norm_ratio=math.sqrt(x2 / r2) if r2 > 0 else float("nan"),
                max_abs_err=float(max_err), ref_max_abs=float(ref.abs().max()), nonfinite_count=int(nonfinite))


# --------------------------------------------------------------------------------------------------
# FP8 casts
# --------------------------------------------------------------------------------------------------


def fp8_max(dtype) -> float:
    return float(torch.finfo(dtype).max)


def scalar_tensor(value: float, device):
    """A [1, 1, 1, 1] float32 tensor: the form every cuDNN scale, descale and amax takes."""
    return torch.full((1, 1, 1, 1), float(value), dtype=torch.float32, device=device)


def quantize_per_tensor(x, fp8_dtype):
    """x -> (x_fp8, descale) with one scale for the whole tensor: scale = max / amax, descale = amax / max.

    Stays on the device (no host sync), as a training step would run it. Clamped before the cast because
    torch turns an e4m3 overflow into NaN rather than saturating.
    """
    top = fp8_max(fp8_dtype)
    amax = x.abs().amax().float().clamp_(min=1e-12)
    data = (x.float() * (top / amax)).clamp_(-top, top).to(fp8_dtype)
    return data, (amax / top).reshape(1, 1, 1, 1)


def dequantize(x8, descale: float):
    return x8.float().mul_(descale)


def floor_power_of_two(x: float) -> float:
    return 2.0 ** math.floor(math.log2(x))


@dataclass
class Fp8Inputs:
    q: Any  # [B, S, H, D] e4m3
    k: Any
    v: Any
    dO: Any
    descale_q: Any  # [1, 1, 1, 1] float32 on the device
    descale_k: Any
    descale_v: Any
    descale_dO: Any


def quantize_inputs(inputs: AttentionInputs) -> Fp8Inputs:
    e4m3 = torch.float8_e4m3fn
    (q8, dq), (k8, dk), (v8, dv), (g8, dg) = (quantize_per_tensor(t, e4m3) for t in
                                              (inputs.q, inputs.k, inputs.v, inputs.dO))
    return Fp8Inputs(q=q8, k=k8, v=v8, dO=g8, descale_q=dq, descale_k=dk, descale_v=dv, descale_dO=dg)


# --------------------------------------------------------------------------------------------------
# The cuDNN frontend: import, graphs, execution
# --------------------------------------------------------------------------------------------------


def loaded_library_path(prefix: str) -> Optional[str]:
    """Path of the first shared object mapped into this process whose file name starts with prefix."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        return None
    return None


def import_cudnn_frontend(entry: dict):
    """Import `cudnn` so that it binds the libcudnn torch already loaded, and say which one that is.

    The frontend dlopens libcudnn itself: first from LD_LIBRARY_PATH, then from site-packages. Putting the
    directory of torch's copy first makes both use one library (one version, one set of loaded kernels).
    """
    entry["torch_cudnn_version"] = torch.backends.cudnn.version()  # loads torch's libcudnn
    lib = loaded_library_path("libcudnn.so")
    entry["libcudnn_loaded_by_torch"] = lib
    if lib:
        old = os.environ.get("LD_LIBRARY_PATH", "")
        os.environ["LD_LIBRARY_PATH"] = os.path.dirname(lib) + (os.pathsep + old if old else "")
    import cudnn

    entry["frontend_version"] = getattr(cudnn, "__version__", None)
    entry["frontend_path"] = getattr(cudnn, "__file__", None)
    for name in ("backend_version", "backend_version_string"):
        try:
            entry[name] = getattr(cudnn, name)()
        except Exception as exc:  # noqa: BLE001
            entry[name] = f"unavailable: {describe_exception(exc)}"
    return cudnn


def create_cudnn_handle(cudnn):
    """A cuDNN handle on torch's current stream, so CUDA events on that stream time the graphs' kernels."""
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    return handle


def new_fp8_graph(cudnn, handle, name: str):
    return cudnn.pygraph(name=name, io_data_type=cudnn.data_type.FP8_E4M3,
                         intermediate_data_type=cudnn.data_type.FLOAT, compute_data_type=cudnn.data_type.FLOAT,
                         handle=handle)


def declare_heads_first(graph, shape: AttentionShape, data_type, name: str):
    """A [B, H, S, D] graph tensor over [B, S, H, D] memory (the BSHD layout)."""
    return graph.tensor(name=name, dim=shape.heads_first_dims, stride=shape.bshd_strides, data_type=data_type)


def declare_scalar(graph, cudnn, name: str):
    return graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)


def mark_output(tensor, dims, strides, data_type):
    tensor.set_output(True).set_dim(dims).set_stride(strides).set_data_type(data_type)


def build_graph(cudnn, graph, backend_only: bool) -> None:
    """validate -> operation graph -> plans (heuristics A, then fallback) -> support check -> build.

    backend_only: the frontend 1.32 also ranks its own Python (CuTe DSL) engines, which need packages the
    --no-deps install leaves out; they should decline by themselves, but if a build fails the graph is
    rebuilt with them hidden (an instance attribute override of the candidate list), cuDNN's engines only.
    """
    if backend_only:
        graph._candidate_engines = lambda: []
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans()


def describe_selected_plan(graph) -> dict:
    info: Dict[str, Any] = {}
    try:
        info["plan_count"] = len(graph.plans)
        index = getattr(graph, "_plan_index", 0)
        info["plan_index"] = index
        info["plan_name"] = graph.get_plan_name_at_index(index)
        engine = graph.selected_engine
        info["python_engine"] = engine.name if engine is not None else None
    except Exception as exc:  # noqa: BLE001 -- only a description
        info["describe_error"] = describe_exception(exc)
    return info


def build_fp8_forward_graph(cudnn, handle, shape: AttentionShape, o_type, backend_only: bool):
    """Training forward: O (o_type) and the softmax stats (float32 [B, H, S, 1]) from e4m3 q, k, v.

    cuDNN's names: S = softmax(Q K^T * attn_scale) (the probabilities; in the flash loop exp(scores - running
    max), so in [0, 1]), quantised with scale_s before S V;
    descale_s undoes it; scale_o quantises O; amax_o reports O's absolute maximum. amax_s is left virtual,
    as the frontend's own FP8 test does (its docstring: deprecated, set scale_s from bounds instead).
    """
    graph = new_fp8_graph(cudnn, handle, "sdpa_fp8_forward")
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    t = {name: declare_heads_first(graph, shape, e4m3, name) for name in ("q", "k", "v")}
    for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[name] = declare_scalar(graph, cudnn, name)
    o, stats, _amax_s, amax_o = graph.sdpa_fp8(
        q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
        descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
        generate_stats=True, attn_scale=shape.attn_scale, use_causal_mask=False, name="sdpa_fp8")
    mark_output(o, shape.heads_first_dims, shape.bshd_strides, o_type)
    mark_output(stats, shape.stats_dims, shape.stats_strides, f32)
    mark_output(amax_o, (1, 1, 1, 1), (1, 1, 1, 1), f32)
    t.update(o=o, stats=stats, amax_o=amax_o)
    build_graph(cudnn, graph, backend_only)
    return graph, t


BACKWARD_SCALARS = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                    "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")


def build_fp8_backward_graph(cudnn, handle, shape: AttentionShape, o_type, grad_type, backend_only: bool):
    """dQ, dK, dV (grad_type) from e4m3 q, k, v, dO, the forward's O (o_type) and stats.

    cuDNN's names: dS = dO V^T, dP = dSoftmax(dS) (the gradient of the scores, what is usually called dS),
    quantised with scale_dP before dQ = dP K and dK = dP^T Q, descale_dP undoes it; scale_s / descale_s as in
    the forward, for P in dV = P^T dO; scale_dQ/dK/dV quantise the gradients; amax_* report maxima.
    """
    graph = new_fp8_graph(cudnn, handle, "sdpa_fp8_backward")
    e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
    t = {name: declare_heads_first(graph, shape, e4m3, name) for name in ("q", "k", "v", "dO")}
    t["o"] = declare_heads_first(graph, shape, o_type, "o")
    t["stats"] = graph.tensor(name="stats", dim=shape.stats_dims, stride=shape.stats_strides, data_type=f32)
    for name in BACKWARD_SCALARS:
        t[name] = declare_scalar(graph, cudnn, name)
    dq, dk, dv, amax_dq, amax_dk, amax_dv, amax_dp = graph.sdpa_fp8_backward(
        q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
        **{name: t[name] for name in BACKWARD_SCALARS},
        attn_scale=shape.attn_scale, use_causal_mask=False, use_deterministic_algorithm=False,
        name="sdpa_fp8_backward")
    for grad in (dq, dk, dv):
        mark_output(grad, shape.heads_first_dims, shape.bshd_strides, grad_type)
    for amax in (amax_dq, amax_dk, amax_dv, amax_dp):
        mark_output(amax, (1, 1, 1, 1), (1, 1, 1, 1), f32)
    t.update(dQ=dq, dK=dk, dV=dv, amax_dQ=amax_dq, amax_dK=amax_dk, amax_dV=amax_dv, amax_dP=amax_dp)
    build_graph(cudnn, graph, backend_only)
    return graph, t


def build_first_supported(entry: dict, variants: List[tuple], build: Callable):
    """Try graph variants in order of preference and keep the first that builds; every attempt is recorded.

    variants: (label, cudnn data type, torch dtype). A variant that fails is retried once with cuDNN's
    engines only (see build_graph) before moving on.
    """
    attempts = entry.setdefault("build_attempts", [])
    for label, cudnn_type, torch_dtype in variants:
        for backend_only in (False, True):
            start = time.perf_counter()
            try:
                graph, tensors = build(cudnn_type, backend_only)
            except Exception as exc:  # noqa: BLE001 -- an unsupported variant is an answer, not a crash
                attempts.append(dict(variant=label, backend_only=backend_only, ok=False,
                                     error=describe_exception(exc), seconds=round(time.perf_counter() - start, 3)))
                continue
            attempts.append(dict(variant=label, backend_only=backend_only, ok=True,
                                 seconds=round(time.perf_counter() - start, 3), plan=describe_selected_plan(graph)))
            entry["variant"] = label
            return label, cudnn_type, torch_dtype, graph, tensors
    raise RuntimeError("no variant of this graph could be built; see build_attempts")


class GraphRunner:
    """A built graph bound to its buffers; calling it runs the graph once on the handle's stream.

    The variant pack maps graph tensors to torch tensors, as the frontend's own tests pass them. Should the
    frontend refuse those on the first call (its pack normalisation reads torch's FP8 tensors through DLPack),
    the same buffers go as raw device addresses, a form its execute() documents and the backend reads anyway.
    """

    def __init__(self, graph, pack: dict, workspace, handle, entry: dict):
        self.graph, self.pack, self.workspace, self.handle, self.entry = graph, pack, workspace, handle, entry
        self.calls = 0
        self.pointer_pack = None

    def __call__(self) -> None:
        if self.pointer_pack is None:
            try:
                self.graph.execute(self.pack, self.workspace, handle=self.handle)
                self.calls += 1
                return
            except Exception as exc:  # noqa: BLE001 -- retried once with addresses, below
                if self.calls:
                    raise
                self.entry["execute_with_torch_tensors_failed"] = describe_exception(exc)
                self.pointer_pack = {t: x.data_ptr() for t, x in self.pack.items()}
        self.graph.execute(self.pointer_pack, self.workspace.data_ptr(), handle=self.handle)
        self.calls += 1


def workspace_for(graph, device):
    size = graph.get_workspace_size()
    return torch.empty(max(1, int(size)), dtype=torch.uint8, device=device), int(size)


@dataclass
class ScaleToCalibrate:
    """One FP8 quantisation cuDNN performs inside the graph, and the amax it reports for it."""

    name: str
    scale: Any  # [1,1,1,1] graph input the kernel multiplies by before the cast
    amax: Any  # [1,1,1,1] graph output
    initial_scale: float
    fmax: float  # largest value of the FP8 type the result is cast to
    descale: Any = None  # graph input that must stay 1 / scale (descale_dP), or None
    fallback_amax: Optional[float] = None  # from a reference, used if the amax units cannot be told


def set_scale(item: ScaleToCalibrate, scale: float) -> None:
    item.scale.fill_(scale)
    if item.descale is not None:
        item.descale.fill_(1.0 / scale)


def classify_amax_units(amax_a: float, amax_b: float) -> str:
    """Run B used scale / 16: an amax in true units stays put, one measured after scaling drops 16x."""
    if not (amax_a > 0 and amax_b > 0 and math.isfinite(amax_a) and math.isfinite(amax_b)):
        return "unknown"
    shift = math.log2(amax_b / amax_a)
    if abs(shift) < 0.25:
        return "true_units"
    if abs(shift + math.log2(CALIBRATION_STEP)) < 0.25:
        return "scaled_units"
    return "unknown"


def true_amax_from(item: ScaleToCalibrate, reported: float, scale_used: float, units: str) -> Optional[float]:
    if units == "true_units":
        return reported
    if units == "scaled_units":
        return reported / scale_used
    return item.fallback_amax


def scale_for(item: ScaleToCalibrate, true_amax: Optional[float], otherwise: float) -> float:
    if true_amax is not None and true_amax > 0 and math.isfinite(true_amax):
        return item.fmax / true_amax
    return otherwise


def calibrate_scales(execute: Callable[[], None], items: List[ScaleToCalibrate]) -> dict:
    """Delayed scaling as TransformerEngine does it: run, read cuDNN's amax outputs, set scale = max / amax.

    The documentation does not say whether an amax output is in true units or in units of the scale the
    kernel applied, so the graph runs with the initial scales (A) and with every scale divided by 16 (B;
    smaller, so nothing saturates): a true-unit amax stays, a scaled one drops 16x. Then the scales from A
    are set and the graph runs once more (C): dQ and dK depend on how dP was quantised, so their amax is
    measured again with dP's final scale, and C's amaxes give the final scales, which are left set.
    """
    def run_and_read(scales: Dict[str, float]) -> Dict[str, float]:
        for item in items:
            set_scale(item, scales[item.name])
        execute()
        return {item.name: float(item.amax) for item in items}

    initial = {item.name: item.initial_scale for item in items}
    amax_a = run_and_read(initial)
    amax_b = run_and_read({name: scale / CALIBRATION_STEP for name, scale in initial.items()})
    units = {item.name: classify_amax_units(amax_a[item.name], amax_b[item.name]) for item in items}
    scales_c = {item.name: scale_for(item, true_amax_from(item, amax_a[item.name], item.initial_scale,
                                                          units[item.name]), item.initial_scale) for item in items}
    amax_c = run_and_read(scales_c)
    report = {}
    for item in items:
        true_amax = true_amax_from(item, amax_c[item.name], scales_c[item.name], units[item.name])
        final = scale_for(item, true_amax, scales_c[item.name])
        set_scale(item, final)
        report[item.name] = dict(initial_scale=item.initial_scale, amax_run_a=amax_a[item.name],
                                 amax_run_b_scale_over_16=amax_b[item.name], amax_units=units[item.name],
                                 scale_run_c=scales_c[item.name], amax_run_c=amax_c[item.name],
                                 true_amax=true_amax, reference_amax=item.fallback_amax, final_scale=final)
    return report


def read_scalar(t) -> float:
    return float(t.reshape(-1)[0])


# --------------------------------------------------------------------------------------------------
# One shape, stage by stage
# --------------------------------------------------------------------------------------------------


@dataclass
class ShapeRun:
    """Everything one shape's stages hand each other."""

    shape: AttentionShape
    device: Any
    cudnn: Any
    handle: Any
    iters: int
    warmup: int
    inputs: Optional[AttentionInputs] = None
    bf16: Optional[dict] = None  # out, dq, dk, dv from cuDNN bf16 SDPA ([B, S, H, D])
    exact: Optional[dict] = None  # float64-arithmetic reference (exact_attention_reference)
    fp8_inputs: Optional[Fp8Inputs] = None
    fwd: Optional[dict] = None
    bwd: Optional[dict] = None
    ref_amax: Dict[str, float] = field(default_factory=dict)

    def reference_amax(self, name: str) -> Optional[float]:
        """Absolute maximum of out / dq / dk / dv: exact reference first, bf16 SDPA otherwise."""
        if name not in self.ref_amax:
            for ref in (self.exact, self.bf16):
                if ref is not None and name in ref:
                    self.ref_amax[name] = float(ref[name].abs().amax())
                    break
        return self.ref_amax.get(name)

    def compare(self, name: str, x) -> dict:
        """x against the bf16 SDPA and the exact reference (where those ran)."""
        result = {}
        for label, ref in (("vs_bf16_sdpa", self.bf16), ("vs_exact_reference", self.exact)):
            if ref is not None and name in ref:
                result[label] = error_metrics(x, ref[name])
        return result


def stage_inputs(run: ShapeRun, seed: int, entry: dict) -> None:
    run.inputs = make_wan_like_inputs(run.shape, seed, run.device)
    entry["seed"] = seed
    entry["amax"] = {n: float(getattr(run.inputs, n).abs().amax().float()) for n in ("q", "k", "v", "dO")}
    entry["bytes_per_bf16_tensor"] = run.inputs.q.numel() * 2


def stage_bf16_reference(run: ShapeRun, entry: dict) -> None:
    run.bf16 = bf16_sdpa_forward_backward(run.inputs, run.shape, run.iters, run.warmup, entry)
    entry["amax"] = {n: float(t.abs().amax().float()) for n, t in run.bf16.items()}


def stage_exact_reference(run: ShapeRun, entry: dict, self_check: bool) -> None:
    rows = rows_per_block_for(run.shape.seq)
    entry["rows_per_block"] = rows
    entry["arithmetic"] = "float64 (results stored as float32)"
    i = run.inputs
    run.exact = exact_attention_reference(i.q, i.k, i.v, i.dO, run.shape.attn_scale, rows)
    entry["amax"] = dict(run.exact["amax"])
    entry["amax"].update({n: float(run.exact[n].abs().amax()) for n in ("out", "dq", "dk", "dv")})
    if run.bf16 is not None:
        entry["bf16_sdpa_vs_exact_reference"] = {n: error_metrics(run.bf16[n], run.exact[n])
                                                 for n in ("out", "dq", "dk", "dv")}
    if self_check:
        # float64 math checks the blocked code; float32 math shows what a float32 reference would have cost
        # here (TF32 overrides included), for the record.
        for label, dtype in (("float64", torch.float64), ("float32", torch.float32)):
            math_ref = math_attention(i.q, i.k, i.v, i.dO, run.shape.attn_scale, dtype)
            entry[f"blocked_reference_vs_autograd_{label}_math"] = {
                n: error_metrics(run.exact[n], math_ref[n]) for n in ("out", "dq", "dk", "dv")}
            del math_ref
        try:
            entry["matmul_allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # noqa: BLE001 -- informative only
            pass
        entry["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")


def stage_quantize_inputs(run: ShapeRun, entry: dict) -> None:
    run.fp8_inputs = quantize_inputs(run.inputs)
    f = run.fp8_inputs
    entry["descale"] = {n: read_scalar(getattr(f, "descale_" + n)) for n in ("q", "k", "v", "dO")}
    entry["cast_error"] = {n: error_metrics(getattr(f, n).float() * getattr(f, "descale_" + n).reshape(()),
                                            getattr(run.inputs, n)) for n in ("q", "k", "v", "dO")}


def stage_fp8_forward_setup(run: ShapeRun, entry: dict) -> None:
    """Build the forward graph (bf16 O first, then e4m3 O), bind buffers, calibrate scale_o, run once."""
    cudnn, shape, device = run.cudnn, run.shape, run.device
    variants = [("bf16_output", cudnn.data_type.BFLOAT16, torch.bfloat16),
                ("fp8_e4m3_output", cudnn.data_type.FP8_E4M3, torch.float8_e4m3fn)]
    label, _o_type, o_dtype, graph, t = build_first_supported(
        entry, variants, lambda o_type, backend_only: build_fp8_forward_graph(cudnn, run.handle, shape, o_type,
                                                                               backend_only))
    o_is_fp8 = o_dtype != torch.bfloat16
    f = run.fp8_inputs
    b, s, h, d = shape.batch, shape.seq, shape.heads, shape.head_dim
    o = torch.empty(b, s, h, d, dtype=o_dtype, device=device)
    stats = torch.empty(shape.stats_dims, dtype=torch.float32, device=device)
    amax_o = scalar_tensor(float("nan"), device)
    scales = dict(scale_s=scalar_tensor(E4M3_MAX, device),  # unnormalised P of the online softmax is in [0, 1]
                  descale_s=scalar_tensor(1.0 / E4M3_MAX, device),
                  scale_o=scalar_tensor(1.0, device))
    pack = {t["q"]: heads_first(f.q), t["k"]: heads_first(f.k), t["v"]: heads_first(f.v),
            t["descale_q"]: f.descale_q, t["descale_k"]: f.descale_k, t["descale_v"]: f.descale_v,
            t["descale_s"]: scales["descale_s"], t["scale_s"]: scales["scale_s"], t["scale_o"]: scales["scale_o"],
            t["o"]: heads_first(o), t["stats"]: stats, t["amax_o"]: amax_o}
    workspace, entry["workspace_bytes"] = workspace_for(graph, device)
    execute = GraphRunner(graph, pack, workspace, run.handle, entry)
    ref_amax_o = run.reference_amax("out")
    if o_is_fp8:
        initial = E4M3_MAX / ref_amax_o if ref_amax_o else 1.0
        item = ScaleToCalibrate("O", scales["scale_o"], amax_o, initial, E4M3_MAX, fallback_amax=ref_amax_o)
        entry["scale_calibration"] = calibrate_scales(execute, [item])
    execute()
    torch.cuda.synchronize()
    scale_o = read_scalar(scales["scale_o"])
    entry["scales"] = dict(scale_s=E4M3_MAX, descale_s=1.0 / E4M3_MAX, scale_o=scale_o)
    entry["kernel_amax_o"] = read_scalar(amax_o)
    entry["reference_amax_o"] = ref_amax_o
    run.fwd = dict(graph=graph, execute=execute, o=o, o_is_fp8=o_is_fp8, descale_o=1.0 / scale_o,
                   stats=stats, label=label)


def stage_fp8_forward_timing(run: ShapeRun, entry: dict) -> None:
    entry["variant"] = run.fwd["label"]
    entry.update(with_tflops(time_cuda_ms(run.fwd["execute"], run.iters, run.warmup), run.shape.forward_flops))


def stage_fp8_forward_accuracy(run: ShapeRun, entry: dict) -> None:
    fwd = run.fwd
    fwd["execute"]()
    torch.cuda.synchronize()
    out = dequantize(fwd["o"], fwd["descale_o"]) if fwd["o_is_fp8"] else fwd["o"].float()
    entry["variant"] = fwd["label"]
    entry["out"] = run.compare("out", out)
    entry["out_amax_dequantized"] = float(out.abs().amax())
    if run.exact is not None:
        # cuDNN's stats are the natural-log log-sum-exp of the scaled scores, one per query row.
        entry["stats_vs_exact_lse"] = error_metrics(fwd["stats"].reshape(run.exact["lse"].shape), run.exact["lse"])


def backward_o_and_stats(run: ShapeRun, entry: dict):
    """O (e4m3) and stats for the backward: the FP8 forward's own when it ran, else the references'."""
    if run.fwd is not None and run.fwd["o_is_fp8"]:
        entry["o_and_stats_from"] = "fp8_forward"
        return run.fwd["o"], run.fwd["descale_o"], run.fwd["stats"]
    if run.fwd is not None:
        entry["o_and_stats_from"] = "fp8_forward (bf16 O cast to e4m3)"
        o8, descale = quantize_per_tensor(run.fwd["o"], torch.float8_e4m3fn)
        return o8, read_scalar(descale), run.fwd["stats"]
    if run.exact is not None:
        entry["o_and_stats_from"] = "exact_reference (FP8 forward unavailable; its stats come from bf16 q, k)"
        o8, descale = quantize_per_tensor(run.exact["out"], torch.float8_e4m3fn)
        stats = run.exact["lse"].reshape(run.shape.stats_dims).contiguous()
        return o8, read_scalar(descale), stats
    raise RuntimeError("neither the FP8 forward nor the exact reference produced O and stats")


def score_gradient_bound(run: ShapeRun) -> float:
    """An upper bound on |dP| (cuDNN's name for the score gradient), safe whatever cuDNN's exact convention.

    |P (dO.v - D)| <= |dO.v| + |D| <= 2 max|dO_i| max|v_j| (P <= 1, |O_i| <= max|v_j|), times attn_scale if
    that is above 1; from the exact reference (x1.25) when it ran, per scaled logit (the larger convention).
    """
    amax = run.exact["amax"] if run.exact is not None else None
    if amax and amax["ds_per_scaled_logit"] > 0:
        return 1.25 * max(amax["ds_per_scaled_logit"], amax["ds_per_raw_logit"])
    i = run.inputs
    max_do = float(i.dO.float().norm(dim=-1).amax())
    max_v = float(i.v.float().norm(dim=-1).amax())
    return 1.1 * 2.0 * max_do * max_v * max(1.0, run.shape.attn_scale)


def stage_fp8_backward_setup(run: ShapeRun, entry: dict) -> None:
    """Build the backward graph (bf16 gradients first, then e4m3, then e5m2), bind buffers, calibrate, run."""
    cudnn, shape, device = run.cudnn, run.shape, run.device
    o8, descale_o, stats = backward_o_and_stats(run, entry)
    variants = [("bf16_grads", cudnn.data_type.BFLOAT16, torch.bfloat16),
                ("fp8_e4m3_grads", cudnn.data_type.FP8_E4M3, torch.float8_e4m3fn),
                ("fp8_e5m2_grads", cudnn.data_type.FP8_E5M2, torch.float8_e5m2)]
    e4m3 = cudnn.data_type.FP8_E4M3
    label, _grad_type, grad_dtype, graph, t = build_first_supported(
        entry, variants, lambda grad_type, backend_only: build_fp8_backward_graph(cudnn, run.handle, shape, e4m3,
                                                                                  grad_type, backend_only))
    grads_fp8 = grad_dtype != torch.bfloat16
    f = run.fp8_inputs
    b, s, h, d = shape.batch, shape.seq, shape.heads, shape.head_dim
    grads = {n: torch.empty(b, s, h, d, dtype=grad_dtype, device=device) for n in ("dQ", "dK", "dV")}
    amaxes = {n: scalar_tensor(float("nan"), device) for n in ("amax_dQ", "amax_dK", "amax_dV", "amax_dP")}
    scalars = dict(descale_q=f.descale_q, descale_k=f.descale_k, descale_v=f.descale_v,
                   descale_o=scalar_tensor(descale_o, device), descale_dO=f.descale_dO,
                   scale_s=scalar_tensor(E4M3_MAX, device), descale_s=scalar_tensor(1.0 / E4M3_MAX, device),
                   scale_dP=scalar_tensor(1.0, device), descale_dP=scalar_tensor(1.0, device),
                   scale_dQ=scalar_tensor(1.0, device), scale_dK=scalar_tensor(1.0, device),
                   scale_dV=scalar_tensor(1.0, device))
    pack = {t["q"]: heads_first(f.q), t["k"]: heads_first(f.k), t["v"]: heads_first(f.v),
            t["o"]: heads_first(o8), t["dO"]: heads_first(f.dO), t["stats"]: stats}
    pack.update({t[n]: scalars[n] for n in BACKWARD_SCALARS})
    pack.update({t[n]: heads_first(grads[n]) for n in grads})
    pack.update({t[n]: amaxes[n] for n in amaxes})
    workspace, entry["workspace_bytes"] = workspace_for(graph, device)
    execute = GraphRunner(graph, pack, workspace, run.handle, entry)
    bound = score_gradient_bound(run)
    entry["score_gradient_bound_for_first_run"] = bound
    ds_reference = run.exact["amax"]["ds_per_raw_logit"] if run.exact is not None else None
    items = [ScaleToCalibrate("dP", scalars["scale_dP"], amaxes["amax_dP"], E4M3_MAX / bound, E4M3_MAX,
                              descale=scalars["descale_dP"], fallback_amax=ds_reference)]
    if grads_fp8:
        top = fp8_max(grad_dtype)
        for grad, ref_name in (("dQ", "dq"), ("dK", "dk"), ("dV", "dv")):
            ref = run.reference_amax(ref_name)
            items.append(ScaleToCalibrate(grad, scalars["scale_" + grad], amaxes["amax_" + grad],
                                          top / ref if ref else 1.0, top, fallback_amax=ref))
    entry["scale_calibration"] = calibrate_scales(execute, items)
    if run.exact is not None:
        entry["reference_amax_for_comparison"] = dict(run.exact["amax"])
    execute()
    torch.cuda.synchronize()
    entry["scales"] = {n: read_scalar(scalars[n]) for n in BACKWARD_SCALARS}
    entry["kernel_amax"] = {n: read_scalar(a) for n, a in amaxes.items()}
    run.bwd = dict(graph=graph, execute=execute, grads=grads, grads_fp8=grads_fp8, scalars=scalars,
                   amaxes=amaxes, label=label)


def stage_fp8_backward_timing(run: ShapeRun, entry: dict) -> None:
    entry["variant"] = run.bwd["label"]
    entry.update(with_tflops(time_cuda_ms(run.bwd["execute"], run.iters, run.warmup), run.shape.backward_flops))


def dequantized_grads(run: ShapeRun) -> dict:
    bwd = run.bwd
    out = {}
    for grad, name in (("dQ", "dq"), ("dK", "dk"), ("dV", "dv")):
        x = bwd["grads"][grad]
        out[name] = dequantize(x, 1.0 / read_scalar(bwd["scalars"]["scale_" + grad])) if bwd["grads_fp8"] else x.float()
    return out


def backward_accuracy(run: ShapeRun) -> dict:
    bwd = run.bwd
    bwd["execute"]()
    torch.cuda.synchronize()
    grads = dequantized_grads(run)
    result = {name: run.compare(name, x) for name, x in grads.items()}
    result["kernel_amax"] = {n: read_scalar(a) for n, a in bwd["amaxes"].items()}
    result["dequantized_amax"] = {n: float(x.abs().amax()) for n, x in grads.items()}
    return result


def stage_fp8_backward_accuracy(run: ShapeRun, entry: dict) -> None:
    """The calibrated recipe (scale_s = 448), then, for comparison, P quantised with a scale from its amax.

    In the backward P = exp(S - stats) is normalised: at S=32760 its entries are ~1e-5..1e-3, so 448 * P
    mostly lands in e4m3's subnormals. The second variant scales P by a power of two below 448 / (1.25 *
    max P) (max P from the exact reference) to see what that costs or gains in dV.
    """
    bwd = run.bwd
    entry["variant"] = bwd["label"]
    entry["recipe_scale_s_448"] = backward_accuracy(run)
    if run.exact is None or not run.exact["amax"]["p"] > 0:
        entry["recipe_scale_s_from_amax_p"] = "skipped: no exact reference for max P"
        return
    scale_s = floor_power_of_two(E4M3_MAX / (1.25 * run.exact["amax"]["p"]))
    sc = bwd["scalars"]
    try:
        sc["scale_s"].fill_(scale_s)
        sc["descale_s"].fill_(1.0 / scale_s)
        variant = backward_accuracy(run)
        variant["scale_s"] = scale_s
        entry["recipe_scale_s_from_amax_p"] = variant
    finally:
        sc["scale_s"].fill_(E4M3_MAX)
        sc["descale_s"].fill_(1.0 / E4M3_MAX)


def stage_cast_overheads(run: ShapeRun, entry: dict) -> None:
    """What an FP8 attention adds around itself in a bf16 model: the e4m3 casts in, the bf16 casts out."""
    i = run.inputs
    e4m3 = torch.float8_e4m3fn

    def forward_casts():
        return [quantize_per_tensor(x, e4m3) for x in (i.q, i.k, i.v)]

    grads = run.bwd["grads"] if run.bwd is not None else None

    def backward_casts():
        quantize_per_tensor(i.dO, e4m3)
        if grads is not None and run.bwd["grads_fp8"]:
            return [g.to(torch.bfloat16) for g in grads.values()]  # a real step multiplies by descale too
        return None

    entry["forward_q_k_v_to_e4m3"] = time_cuda_ms(forward_casts, run.iters, run.warmup)
    entry["backward_dO_to_e4m3_and_grads_to_bf16"] = time_cuda_ms(backward_casts, run.iters, run.warmup)


def run_shape(report: Report, section: dict, run: ShapeRun, seed: int, exact_reference: bool, small: bool) -> None:
    stage = report.stage
    section["shape"] = run.shape.as_dict()
    if stage(section, "inputs", lambda e: stage_inputs(run, seed, e)) is None and run.inputs is None:
        return
    stage(section, "bf16_cudnn_sdpa", lambda e: stage_bf16_reference(run, e))
    if exact_reference:
        stage(section, "exact_reference", lambda e: stage_exact_reference(run, e, self_check=small))
    if run.cudnn is None:
        section["fp8"] = "skipped: the cuDNN frontend did not import"
        return
    stage(section, "fp8_quantize_inputs", lambda e: stage_quantize_inputs(run, e))
    if run.fp8_inputs is None:
        return
    stage(section, "fp8_forward_setup", lambda e: stage_fp8_forward_setup(run, e))
    if run.fwd is not None:
        stage(section, "fp8_forward_timing", lambda e: stage_fp8_forward_timing(run, e))
        stage(section, "fp8_forward_accuracy", lambda e: stage_fp8_forward_accuracy(run, e))
    stage(section, "fp8_backward_setup", lambda e: stage_fp8_backward_setup(run, e))
    if run.bwd is not None:
        stage(section, "fp8_backward_timing", lambda e: stage_fp8_backward_timing(run, e))
        stage(section, "fp8_backward_accuracy", lambda e: stage_fp8_backward_accuracy(run, e))
    stage(section, "fp8_cast_overheads", lambda e: stage_cast_overheads(run, e))


# --------------------------------------------------------------------------------------------------
# Summary, versions, main
# --------------------------------------------------------------------------------------------------


def pick(d: Any, *keys) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def summarize_shape(section: dict) -> dict:
    """The numbers that answer the question, pulled out of the stages (None where a stage did not run)."""
    bf16_fwd = pick(section, "bf16_cudnn_sdpa", "forward", "median_ms")
    bf16_bwd = pick(section, "bf16_cudnn_sdpa", "backward", "median_ms")
    fp8_fwd = pick(section, "fp8_forward_timing", "median_ms")
    fp8_bwd = pick(section, "fp8_backward_timing", "median_ms")
    summary: Dict[str, Any] = dict(
        bf16_forward_ms=bf16_fwd, bf16_backward_ms=bf16_bwd, fp8_forward_ms=fp8_fwd, fp8_backward_ms=fp8_bwd,
        bf16_forward_tflops=pick(section, "bf16_cudnn_sdpa", "forward", "tflops_at_median"),
        bf16_backward_tflops=pick(section, "bf16_cudnn_sdpa", "backward", "tflops_at_median"),
        fp8_forward_tflops=pick(section, "fp8_forward_timing", "tflops_at_median"),
        fp8_backward_tflops=pick(section, "fp8_backward_timing", "tflops_at_median"),
        bf16_sdpa_backend=pick(section, "bf16_cudnn_sdpa", "backend"),
        fp8_forward_variant=pick(section, "fp8_forward_setup", "variant"),
        fp8_backward_variant=pick(section, "fp8_backward_setup", "variant"))
    if bf16_bwd and fp8_bwd:
        summary["backward_speedup_fp8_over_bf16"] = bf16_bwd / fp8_bwd
        summary["backward_saving_per_step_s"] = ATTENTION_CALLS_PER_STEP * (bf16_bwd - fp8_bwd) / 1e3
    if bf16_fwd and fp8_fwd:
        summary["forward_speedup_fp8_over_bf16"] = bf16_fwd / fp8_fwd
        summary["forward_saving_per_step_s"] = ATTENTION_CALLS_PER_STEP * (bf16_fwd - fp8_fwd) / 1e3
    casts_fwd = pick(section, "fp8_cast_overheads", "forward_q_k_v_to_e4m3", "median_ms")
    casts_bwd = pick(section, "fp8_cast_overheads", "backward_dO_to_e4m3_and_grads_to_bf16", "median_ms")
    summary["cast_overhead_ms"] = dict(forward=casts_fwd, backward=casts_bwd)
    errors: Dict[str, Any] = {}
    for ref in ("vs_bf16_sdpa", "vs_exact_reference"):
        row = {"out": pick(section, "fp8_forward_accuracy", "out", ref, "rel_l2")}
        for name in ("dq", "dk", "dv"):
            row[name] = pick(section, "fp8_backward_accuracy", "recipe_scale_s_448", name, ref, "rel_l2")
        errors[f"fp8_rel_l2_{ref}"] = row
        row_p = {name: pick(section, "fp8_backward_accuracy", "recipe_scale_s_from_amax_p", name, ref, "rel_l2")
                 for name in ("dq", "dk", "dv")}
        errors[f"fp8_p_scaled_from_amax_rel_l2_{ref}"] = row_p
    errors["bf16_sdpa_rel_l2_vs_exact_reference"] = {
        name: pick(section, "exact_reference", "bf16_sdpa_vs_exact_reference", name, "rel_l2")
        for name in ("out", "dq", "dk", "dv")}
    summary["errors"] = errors
    summary["failed_stages"] = [name for name, e in section.items() if isinstance(e, dict) and e.get("ok") is False]
    summary["unfinished_stages"] = [name for name, e in section.items() if isinstance(e, dict) and e.get("running")]
    return summary


def stage_versions(entry: dict, cudnn_entry: dict) -> None:
    entry["python"] = sys.version.split()[0]
    entry["torch"] = torch.__version__
    entry["torch_cuda"] = torch.version.cuda
    entry["torch_cudnn"] = torch.backends.cudnn.version()
    entry["device"] = torch.cuda.get_device_name()
    entry["capability"] = list(torch.cuda.get_device_capability())
    entry["cudnn_frontend"] = cudnn_entry.get("frontend_version")
    entry["cudnn_backend_version"] = cudnn_entry.get("backend_version")
    entry["cudnn_backend_version_string"] = cudnn_entry.get("backend_version_string")
    entry["libcudnn"] = cudnn_entry.get("libcudnn_loaded_by_torch")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="where the results go (rewritten after every stage)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--seq", type=int, default=32760)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5, help="timed calls per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-small", action="store_true", help="skip the small-shape correctness run")
    ap.add_argument("--no-exact-reference", action="store_true",
                    help="skip the blocked float64 reference at the big shape (it takes seconds)")
    ap.add_argument("--in-process", action="store_true",
                    help="run both shapes in this process instead of one worker process per shape")
    ap.add_argument("--worker-timeout", type=float, default=900.0, help="seconds before a shape's worker is killed")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run this one shape only
    return ap.parse_args(argv)


def shapes_to_run(args) -> List[tuple]:
    """(name, shape, is_small_correctness_run), in the order they run."""
    shapes = []
    if not args.skip_small:
        shapes.append(("small_correctness", AttentionShape(*SMALL_SHAPE), True))
    shapes.append(("wan_a14b", AttentionShape(args.batch, args.heads, args.seq, args.head_dim), False))
    if args.worker:
        shapes = [entry for entry in shapes if entry[0] == args.worker]
    return shapes


def run_benchmark(args, report: Report, device) -> None:
    """Every stage of every shape of shapes_to_run(args), in this process."""
    data = report.data
    data["args"] = vars(args)
    cudnn = report.stage(data, "cudnn_frontend_import", import_cudnn_frontend)
    report.stage(data, "versions", lambda e: stage_versions(e, data["cudnn_frontend_import"]))
    handle = report.stage(data, "cudnn_handle", lambda e: create_cudnn_handle(cudnn)) if cudnn is not None else None
    if handle is None:
        cudnn = None
    runs = data.setdefault("runs", {})
    summary = data.setdefault("summary", {})
    for name, shape, small in shapes_to_run(args):
        section = runs.setdefault(name, {})
        run = ShapeRun(shape=shape, device=device, cudnn=cudnn, handle=handle, iters=args.iters, warmup=args.warmup)
        run_shape(report, section, run, args.seed, exact_reference=small or not args.no_exact_reference, small=small)
        try:
            summary[name] = summarize_shape(section)
        except Exception as exc:  # noqa: BLE001
            summary[name] = {"error": describe_exception(exc)}
        report.save()
        del run
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def worker_command(args, name: str, json_path: str, seq: int) -> List[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--json", json_path,
           "--batch", str(args.batch), "--heads", str(args.heads), "--seq", str(seq),
           "--head-dim", str(args.head_dim), "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--seed", str(args.seed)]
    return cmd + (["--no-exact-reference"] if args.no_exact_reference else [])


def run_in_workers(args, report: Report) -> None:
    """One process per shape: a crash in cuDNN (a segfault, a sticky CUDA error) ends that shape's worker, not
    the run, and the worker's JSON, rewritten after every stage, still holds what it measured. The workers'
    files sit next to --json (OUT.json.<shape>.worker.json), so they outlive a kill of the whole run."""
    import subprocess
    import tempfile

    data = report.data
    data["args"] = vars(args)
    runs, summary, workers = data.setdefault("runs", {}), data.setdefault("summary", {}), data.setdefault("workers", {})
    folder = None if args.json else tempfile.mkdtemp(prefix="cudnn_fp8_attention_")
    # (key in the JSON, shape the worker runs, sequence length)
    jobs = [(name, name, args.seq) for name, _shape, _small in shapes_to_run(args)]
    while jobs:
        key, name, seq = jobs.pop(0)
        path = f"{args.json}.{key}.worker.json" if args.json else os.path.join(folder, f"{key}.json")
        info: Dict[str, Any] = {"json": path, "seq_argument": seq}
        workers[key] = info
        report.save()
        start = time.perf_counter()
        try:
            info["returncode"] = subprocess.run(worker_command(args, name, path, seq),
                                                timeout=args.worker_timeout).returncode
        except subprocess.TimeoutExpired:
            info["returncode"] = f"killed after --worker-timeout {args.worker_timeout} s"
        except Exception as exc:  # noqa: BLE001
            info["returncode"] = f"could not start: {describe_exception(exc)}"
        info["seconds"] = round(time.perf_counter() - start, 1)
        try:
            with open(path) as f:
                worker_data = json.load(f)
        except Exception as exc:  # noqa: BLE001
            info["json_error"] = f"unreadable: {describe_exception(exc)}"
            report.save()
            continue
        for field_name in ("cudnn_frontend_import", "versions", "cudnn_handle"):
            info[field_name] = worker_data.get(field_name)
            data.setdefault(field_name, worker_data.get(field_name))
        runs[key] = pick(worker_data, "runs", name)
        summary[key] = pick(worker_data, "summary", name)
        if summary[key] is None and isinstance(runs[key], dict):  # the worker died before summarising
            summary[key] = summarize_shape(runs[key])
        report.save()
        if key == "wan_a14b" and seq % 128 and not fp8_graphs_built(summary[key]):
            # cuDNN's Hopper FP8 attention wanted S % 128 == 0 before 9.7 (TransformerEngine's support table):
            # measure the nearest such length rather than nothing.
            rounded = -(-seq // 128) * 128
            jobs.append((f"wan_a14b_seq{rounded}", name, rounded))


def fp8_graphs_built(summary: Optional[dict]) -> bool:
    return bool(summary) and bool(summary.get("fp8_forward_variant")) and bool(summary.get("fp8_backward_variant"))


def main(argv=None) -> int:
    args = parse_args(argv)
    report = Report(args.json)
    if torch is None or not torch.cuda.is_available():
        why = "torch is not installed" if torch is None else f"torch {torch.__version__} sees no CUDA device"
        message = f"bench/cudnn_fp8_attention.py needs a CUDA GPU (Hopper or later) and {why}; nothing measured."
        print(message)
        report.data["skipped"] = message
        report.save()
        return 0
    try:
        if args.worker or args.in_process:
            run_benchmark(args, report, torch.device("cuda"))
        else:
            run_in_workers(args, report)
    finally:
        report.data["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        report.save()
        if not args.worker:
            print(json.dumps(json_safe(report.data), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
