"""The sampler's FP8 block-linear GEMMs at T2V-A14B 480x832x81 (CFG batch of 2, 65,520 token rows), with
cuBLAS's promoted accumulation (training's) and with fast accumulation (the sampler's, `fp8_fast_accum`).

    python bench/fp8_gemm.py [--json out.json]          # a CUDA GPU with FP8 tensor cores

Per linear of a block: milliseconds per call each way (CUDA events, median), TFLOP/s, and each way's error
against the float32 product of the same e4m3 operands (the first 4,096 rows), so the accumulation's own
rounding is seen apart from e4m3's; then the sum over a CFG step (40 blocks; cross-attention's k / v act on
the 512 text tokens and are left out: 0.27% of the FLOPs).

Prediction written before the run: cuBLAS without fast accumulation adds float32 promotions every few k-blocks
on the CUDA cores; on Hopper that costs ~5-10% of an FP8 GEMM, so ~50-100 ms of the ~1,084 ms of FP8 GEMMs in
a 480p A14B CFG step; error against the exact product ~1e-3 relative with fast accumulation (the tensor cores'
accumulator keeps ~14 mantissa bits per k-block sum), ~1e-5 without; e4m3 itself costs ~3.5% against bf16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.attention_kernels import rel, time_ms  # noqa: E402
from bench.report import emit  # noqa: E402
from bench.report import git_commit  # noqa: E402
from wan_model.fp8 import quantize_rows  # noqa: E402

ROWS = 2 * 32_760
DIM, FFN_DIM, BLOCKS = 5_120, 13_824, 40
# (name, in, out, calls per block): self-attention q, k, v, o and cross-attention q, o act on the video tokens.
LINEARS = [("attention q/k/v/o, cross q/o", DIM, DIM, 6), ("ffn up", DIM, FFN_DIM, 1), ("ffn down", FFN_DIM, DIM, 1)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_gemm.py times FP8 GEMMs: run it on a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, step_ms = [], {False: 0.0, True: 0.0}
    for name, k, n, per_block in LINEARS:
        x = torch.randn(ROWS, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) / k**0.5
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w)
        head = slice(0, 4096)
        exact = (xq[head].float() * xs[head, None]) @ (wq.float() * ws[:, None]).t()
        row = dict(linear=name, in_features=k, out_features=n, calls_per_block=per_block)
        for fast in (False, True):
            def gemm(fast=fast):
                return torch._scaled_mm(xq, wq.t(), scale_a=xs[:, None], scale_b=ws[None, :], out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            ms = time_ms(gemm)
            key = "fast" if fast else "promoted"
            row[f"{key}_ms"] = round(ms, 3)
            row[f"{key}_tflops"] = round(2 * ROWS * k * n / ms / 1e9, 1)
            row[f"{key}_rel_err_vs_exact_product"] = float(f"{rel(gemm()[head], exact):.3e}")
            step_ms[fast] += ms * per_block * BLOCKS
        row["bf16_product_rel_err_vs_exact"] = float(f"{rel((x[head] @ w.t()), exact):.3e}")  # e4m3's own error
        rows.append(row)
        print(row, flush=True)
        del x, w, xq, wq, exact
    emit(dict(commit=git_commit(), device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows,
              cfg_step_ms_promoted=round(step_ms[False], 1), cfg_step_ms_fast=round(step_ms[True], 1)), args.json)


if __name__ == "__main__":
    main()
