"""Why the 8-bit attention forward fed to the bf16 backward moves real-shape LoRA gradients: one block's
self-attention inputs, its gradients against bf16 SDPA's, and what the rows look like.

    python bench/fp8_attention_grads.py --preset t2v-A14B --size 480x832 --frames 81 --json OUT.json   # GPU
    python bench/fp8_attention_grads.py --preset tiny-t2v --size 64x64 --frames 9       # CPU: the script only

The model is bench/fp8_gradients.py's (official init, random head, random LoRA B); its forward at timestep
--t runs up to block --block's self-attention, whose q, k, v (after norms and RoPE) are taken. Then, on
those inputs and one random output gradient: bf16 SDPA's output and gradients (the reference) against the
"fp8" backend's (`wan_model/fp8_attention.py`: int8 / e4m3 forward writing the LSE, cuDNN's bf16 backward):
relative error of out, dq, dk, dv (over all heads, and the worst head). And the rows' shape, which the CPU
tests say decides the error (sharp rows turn the forward's small LSE / output errors into large dS errors):
per head, the size of the component every token shares (|mean_tokens x| / rms_tokens |x - mean|) for q, k,
v, and on sampled query rows the largest softmax probability, the effective number of keys 1 / sum P^2, and
the kernel's LSE error against float32's. With --truth-heads, on that many heads, everything against float32
math too (bf16 SDPA is not a ground truth where values share a large component: its bf16 output carries the
rounding of that component into D = rowsum(dO O)), the flash backward fed the exact output and LSE (is the
backward kernel's dv right?), and sum_tokens dv against sum_tokens dO (an identity when P's rows sum to one).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import wan_model.transformer as transformer_module  # noqa: E402
from bench.fp8_gradients import (BENCH_PRESETS, build, device_and_dtype, latent_shape_of, loss_of,  # noqa: E402
                                 sample)
from bench.report import emit  # noqa: E402
from bench.report import git_commit  # noqa: E402
from wan_model.attention import attention, set_attention_backend  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.cudnn_fp8_attention import new_scaling_state  # noqa: E402


class _Captured(Exception):
    """Stops the model's forward once the block's self-attention inputs are taken."""


def block_attention_inputs(model, batch, device, dtype, block: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, L, H, D] of block `block`'s self-attention on `batch` (the forward stops there)."""
    seen = []
    inner = transformer_module.attention

    def spy(q, k, v, self_attention=False, **kwargs):
        if self_attention:
            if len(seen) == block:
                raise _Captured((q.detach().clone(), k.detach().clone(), v.detach().clone()))
            seen.append(1)
        return inner(q, k, v, self_attention=self_attention, **kwargs)

    transformer_module.attention = spy
    try:
        with torch.no_grad():
            loss_of(model, batch, device, dtype)
    except _Captured as taken:
        return taken.args[0]
    finally:
        transformer_module.attention = inner
    raise RuntimeError(f"the model has no block {block}")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def per_head_rel(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """[B, L, H, D] -> the relative error of each head."""
    diff = (a.double() - b.double()).pow(2).sum(dim=(0, 1, 3)).sqrt()
    return (diff / b.double().pow(2).sum(dim=(0, 1, 3)).sqrt()).tolist()


def gradients(q, k, v, grad_out, backend: str) -> list[torch.Tensor]:
    """out, dq, dk, dv of `attention` with `backend` ("cudnn_fp8": the second call on one scaling state, as
    in training after the first step's calibration)."""
    set_attention_backend(backend)
    state = new_scaling_state(q.device) if backend == "cudnn_fp8" else None
    for _ in range(2 if backend == "cudnn_fp8" else 1):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, self_attention=True, scaling_state=state)
        out.backward(grad_out)
    set_attention_backend("auto")
    return [out.detach()] + [t.grad for t in leaves]


def shared_component(x: torch.Tensor) -> list[float]:
    """Per head: |mean over tokens| / rms over tokens of |x - mean| (0: no shared part)."""
    x = x.float()
    mean = x.mean(dim=1, keepdim=True)
    spread = (x - mean).pow(2).sum(-1).mean(1).sqrt()                       # [B, H]
    return (mean.squeeze(1).norm(dim=-1) / spread).flatten().tolist()


def row_statistics(q, k, v, rows: int, seed: int) -> dict:
    """On `rows` sampled query rows per head: the largest P, 1 / sum P^2, and the kernel's LSE error."""
    from wan_model.fp8_attention import _fp8_attention_train_op, _training_operands

    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(q.shape[1], generator=gen)[:rows].to(q.device)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q[:, index].float(), k.float()) * scale
    p = scores.softmax(-1)
    exact_lse = torch.logsumexp(scores, -1)                                  # [B, H, rows]
    ks = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype)     # as fp8_attention smooths them
    vs = (v.float() - v.float().mean(dim=1, keepdim=True)).to(v.dtype)
    _, lse = _fp8_attention_train_op(q, ks, vs, *_training_operands(q, ks, vs), k.shape[1], True)
    smoothed_lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q[:, index].float(), ks.float()) * scale, -1)
    lse_error = (lse.squeeze(-1)[:, :, index] - smoothed_lse).abs()
    max_p, effective = p.amax(-1), 1.0 / p.pow(2).sum(-1)
    return dict(rows_per_head=rows,
                max_p_mean=round(float(max_p.mean()), 4), max_p_p99=round(float(max_p.flatten().quantile(0.99)), 4),
                max_p_per_head=[round(x, 4) for x in max_p.mean(-1).flatten().tolist()],
                effective_keys_median=round(float(effective.flatten().median()), 1),
                exact_lse_mean=round(float(exact_lse.mean()), 3),
                kernel_lse_error_mean=round(float(lse_error.mean()), 5),
                kernel_lse_error_max=round(float(lse_error.max()), 5))


def float32_attention_grads(q, k, v, grad_out) -> tuple[torch.Tensor, ...]:
    """out, lse [B, H, L, 1], dq, dk, dv of attention in float32 math (the ground truth; a few heads only:
    the score matrix is materialised, 4.3 GB a head at the A14B shape)."""
    q32, k32, v32 = (t.detach().float().clone().requires_grad_(True) for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q32, k32) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(scores, -1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.exp(scores - lse), v32)
    out.backward(grad_out.float())
    return out.detach(), lse.detach(), q32.grad, k32.grad, v32.grad


def ground_truth_checks(q, k, v, grad_out, reference, eight_bit, heads: int, cudnn_fp8=None,
                        others: dict | None = None) -> dict:
    """On the first `heads` heads, against float32 math: bf16 SDPA's gradients, the lever's, and the flash
    backward (`fp8_attention_backward`, cuDNN's and FlashAttention-2's) fed the exact output and LSE of the
    smoothed keys and values, which splits the backward kernel's dv from the forward's and the autograd's;
    and sum_tokens dv against sum_tokens dO, equal when P's rows sum to one (the dv discrepancy, issue 16)."""
    from wan_model.fp8_attention import fp8_attention_backward

    def part(t):
        return t[:, :, :heads].contiguous()

    q, k, v, grad_out = (part(t) for t in (q, k, v, grad_out))
    _, _, *truth = float32_attention_grads(q, k, v, grad_out)
    ks = (k.float() - k.float().mean(dim=1, keepdim=True)).to(k.dtype)
    vs = (v.float() - v.float().mean(dim=1, keepdim=True)).to(v.dtype)
    out_s, lse_s = float32_attention_grads(q, ks, vs, grad_out)[:2]
    sides = {"bf16_sdpa": [part(t) for t in reference[1:]], "fp8_lever": [part(t) for t in eight_bit[1:]],
             "flash_backward_exact_out_lse": fp8_attention_backward(grad_out, q, ks, vs, out_s.to(q.dtype), lse_s)}
    if cudnn_fp8 is not None:
        sides["cudnn_fp8"] = [part(t) for t in cudnn_fp8[1:]]
    for name, grads in (others or {}).items():
        sides[name] = [part(t) for t in grads[1:]]
    if q.is_cuda:
        sides["flash2_backward_exact_out_lse"] = fp8_attention_backward(grad_out, q, ks, vs, out_s.to(q.dtype), lse_s,
                                                                        cudnn=False)
    do_sum = grad_out.float().sum(1)
    result = {}
    for name, grads in sides.items():
        result[name] = {f"{g}_rel_err_vs_float32": round(rel(a, b), 5)
                        for g, a, b in zip(("dq", "dk", "dv"), grads, truth)}
        result[name]["dv_token_sum_vs_dO_token_sum"] = round(rel(grads[2].float().sum(1), do_sum), 6)
    result["float32"] = {"dv_token_sum_vs_dO_token_sum": round(rel(truth[2].sum(1), do_sum), 6)}
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=BENCH_PRESETS)
    ap.add_argument("--size", default="480x832")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--t", type=float, default=990.0, help="timestep of the sample")
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 20], help="blocks whose self-attention is taken")
    ap.add_argument("--rows", type=int, default=256, help="query rows per head for the row statistics")
    ap.add_argument("--truth-heads", type=int, default=2, help="heads checked against float32 math (0: none)")
    ap.add_argument("--cudnn-fp8", action="store_true", help="also cuDNN's FP8 attention (attention_backend cudnn_fp8)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    device, dtype = device_and_dtype()
    preset = PRESETS[args.preset]
    cfg = preset.transformer
    model, _ = build(cfg, device, dtype, "none", rank=32)
    batch = sample(cfg, latent_shape_of(preset, args.size, args.frames), device, dtype, args.t, seed=2)
    summary = dict(preset=args.preset, size=args.size, frames=args.frames, t=args.t, commit=git_commit(),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", blocks={})
    for block in args.blocks:
        q, k, v = block_attention_inputs(model, batch, device, dtype, block)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to(device, q.dtype)
        grad_out = grad_out / math.sqrt(q.shape[1])
        reference = gradients(q, k, v, grad_out, "auto")
        eight_bit = gradients(q, k, v, grad_out, "fp8")
        names = ("out", "dq", "dk", "dv")
        row = {f"{n}_rel_err": round(rel(a, b), 5) for n, a, b in zip(names, eight_bit, reference)}
        row.update({f"{n}_worst_head_rel_err": round(max(per_head_rel(a, b)), 5)
                    for n, a, b in zip(names, eight_bit, reference)})
        row.update({f"{n}_cosine": round(float(F.cosine_similarity(a.double().flatten(), b.double().flatten(), 0)), 6)
                    for n, a, b in zip(names, eight_bit, reference)})
        row["shared_component"] = {n: [round(x, 3) for x in shared_component(t)] for n, t in zip("qkv", (q, k, v))}
        row["rows"] = row_statistics(q, k, v, min(args.rows, q.shape[1]), seed=block) if device.type == "cuda" else None
        cudnn_fp8 = gradients(q, k, v, grad_out, "cudnn_fp8") if args.cudnn_fp8 else None
        if cudnn_fp8 is not None:
            row["cudnn_fp8_vs_bf16_sdpa"] = {f"{n}_rel_err": round(rel(a, b), 5)
                                             for n, a, b in zip(names, cudnn_fp8, reference)}
        row["input_layout"] = {n: [str(t.dtype), list(t.stride()), t.is_contiguous()]
                               for n, t in zip(("q", "k", "v", "grad_out"), (q, k, v, grad_out))}
        # the same SDPA call on contiguous bf16 copies: does the inputs' layout or dtype decide the error?
        others = {"bf16_sdpa_on_contiguous_bf16_copies": gradients(
            *(t.to(torch.bfloat16).contiguous() for t in (q, k, v, grad_out)), "auto")}
        if args.truth_heads:
            row["float32_truth"] = ground_truth_checks(q, k, v, grad_out, reference, eight_bit, args.truth_heads,
                                                       cudnn_fp8, others)
        summary["blocks"][block] = row
        print(block, {key: val for key, val in row.items() if key not in ("shared_component", "rows", "float32_truth")},
              row["shared_component"]["v"][:4],
              row.get("float32_truth"), flush=True)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
