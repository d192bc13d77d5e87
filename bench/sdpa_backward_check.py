"""Are SDPA's bf16 attention gradients right at Wan's shapes? Each kernel against float32 math.

    PYTHONPATH=$PWD python3 bench/sdpa_backward_check.py --json OUT.json      # one CUDA GPU

Why: on a real A14B block's inputs (bench/fp8_attention_grads.py, f715d35) SDPA's bf16 gradients came out
141-145% off float32 math on two heads, while cuDNN's backward fed those two heads alone was 0.2% off. This
separates the kernel from the inputs (and `--captured` takes a real block's inputs, the truth computed before
any other side, and checks that no later side writes over an earlier one's results): random q, k (RMS-normed over the full width, as Wan's norms leave
them), v Gaussian, dO Gaussian / sqrt(L), per shape [B, H, L, D] laid out as the DiT hands them ([B, L, H, D]
memory). For each SDPA kernel (cuDNN, FlashAttention-2, memory-efficient; forced with `sdpa_kernel`) and for
`attention_backend: cudnn_fp8`: relative error of dq, dk, dv against float32 math on the first --truth-heads
heads, and on every head the identity sum_tokens dv = sum_tokens dO (P's rows sum to one), which a correct
backward meets to rounding.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fp8_attention_grads import block_attention_inputs, float32_attention_grads, gradients, rel  # noqa: E402
from bench.fp8_gradients import build, latent_shape_of, sample  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.report import git_commit  # noqa: E402

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(batch: int, heads: int, length: int, head_dim: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rms_normed():
        x = torch.randn(batch, length, heads * head_dim, device="cuda", generator=g)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).unflatten(-1, (heads, head_dim))

    q, k = rms_normed(), rms_normed()
    v = torch.randn(batch, length, heads, head_dim, device="cuda", generator=g)
    grad_out = torch.randn(batch, length, heads, head_dim, device="cuda", generator=g) / math.sqrt(length)
    return tuple(t.to(torch.bfloat16) for t in (q, k, v, grad_out))


def sdpa_grads(q, k, v, grad_out, kernel):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with sdpa_kernel(kernel):
        out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in leaves)).transpose(1, 2)
    out.backward(grad_out)
    return [t.grad for t in leaves]


def check(q, k, v, grad_out, truth_heads: int, with_fp8: bool) -> dict:
    """Each side's gradients against float32 math on the first heads (computed first, compared at once)."""
    truth = float32_attention_grads(*(t[:, :, :truth_heads] for t in (q, k, v, grad_out)))[2:]
    do_sum = grad_out.float().sum(1)                                   # [B, H, D]
    sides = {"attention_default": gradients(q, k, v, grad_out, "auto")[1:]}
    kept = [g.clone() for g in sides["attention_default"]]   # was anything written over them later?
    for name, kernel in KERNELS.items():
        try:
            sides[name] = sdpa_grads(q, k, v, grad_out, kernel)
        except RuntimeError as exc:
            sides[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    few = [t[:, :, :truth_heads].contiguous() for t in (q, k, v, grad_out)]
    sides["cudnn_first_heads_only"] = sdpa_grads(*few, KERNELS["cudnn"])
    if with_fp8:
        sides["fp8_lever"] = gradients(q, k, v, grad_out, "fp8")[1:]
        sides["cudnn_fp8"] = gradients(q, k, v, grad_out, "cudnn_fp8")[1:]
    result = {"attention_default_changed_by_later_sides": [
        float((g.float() - c.float()).abs().max()) for g, c in zip(sides["attention_default"], kept)]}
    for name, grads in sides.items():
        if isinstance(grads, str):
            result[name] = grads
            continue
        row = {f"{g}_rel_err_vs_float32": round(rel(a[:, :, :truth_heads], b), 5)
               for g, a, b in zip(("dq", "dk", "dv"), grads, truth)}
        heads = grads[2].shape[2]
        per_head = ((grads[2].float().sum(1) - do_sum[:, :heads]).norm(dim=-1)
                    / do_sum[:, :heads].norm(dim=-1)).flatten()
        row["dv_token_sum_identity_worst_head"] = round(float(per_head.max()), 5)
        row["dv_token_sum_identity_heads_over_1pct"] = int((per_head > 0.01).sum())
        result[name] = row
    return result


def random_inputs(shapes):
    for text in shapes:
        yield text, inputs(*(int(x) for x in text.split("x")))


def captured_inputs(blocks):
    """(name, (q, k, v, dO)) of real blocks' self-attention, as bench/fp8_attention_grads.py takes them."""
    from wan_model.config import PRESETS

    preset = PRESETS["t2v-A14B"]
    model, _ = build(preset.transformer, torch.device("cuda"), torch.bfloat16, "none", rank=32)
    batch = sample(preset.transformer, latent_shape_of(preset, "480x832", 81), torch.device("cuda"), torch.bfloat16,
                   990.0, seed=2)
    for block in blocks:
        q, k, v = block_attention_inputs(model, batch, torch.device("cuda"), torch.bfloat16, block)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(7)).to("cuda", q.dtype)
        yield f"a14b_block{block}", (q, k, v, grad_out / math.sqrt(q.shape[1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["1x40x32760x128", "1x2x32760x128", "1x40x4096x128",
                                                     "1x24x27280x128", "1x2x80x128", "1x2x1024x128"],
                    help="BxHxLxD (A14B 480x832x81: 40 heads, 32,760 tokens; TI2V-5B 704x1280x121: 24 x 27,280; 80 tokens: the tiny GPU test)")
    ap.add_argument("--truth-heads", type=int, default=2)
    ap.add_argument("--no-fp8", action="store_true", help="leave out attention_backend cudnn_fp8")
    ap.add_argument("--captured", type=int, nargs="*", default=None, metavar="BLOCK",
                    help="instead of random inputs: these blocks' self-attention inputs in the A14B expert at "
                         "480x832x81, t=990 (bench/fp8_attention_grads.py's model and capture), dO random")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("sdpa_backward_check: needs a CUDA GPU")
        return
    summary = dict(commit=git_commit(), device=torch.cuda.get_device_name(), torch=torch.__version__,
                   cudnn=torch.backends.cudnn.version(), shapes={})
    for name, tensors in captured_inputs(args.captured) if args.captured is not None else random_inputs(args.shapes):
        summary["shapes"][name] = check(*tensors, args.truth_heads, not args.no_fp8)
        print(name, summary["shapes"][name], flush=True)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
