"""Self-attention kernels at the released models' shapes: bf16 SDPA against the int8/FP8 kernel.

    python bench/attention_kernels.py            # A14B 480p (2 x 32,760 tokens, 40 heads) and 5B 720p
    python bench/attention_kernels.py --shapes a14b-480p --config 64,128,4,2,168 --config 64,128,4,3
                                                 # + the shipped kernel under configs outside its autotuner's list

`--config BLOCK_M,BLOCK_N,WARPS,STAGES[,MAXNREG]`: why MAXNREG. The autotuner's usual pick (64, 128, 4 warps,
3 stages) takes 215 registers and 104 KiB of shared memory, so two programs (8 warps) share an SM, and with
both its softmax and its matmuls waiting on each other that is little to hide latency with (docs/benchmarks.md,
"Sampling speed, fifth session"). At 2 stages (72 KiB) and `maxnreg` 168 three programs fit, but ptxas spills
196 bytes, the loop grows 600 -> 639 instructions with 20 local loads and stores, and the one wait for the
tensor cores per key block becomes eight (`bench/kernel_sass.py --block-m 64 --block-n 128 --warps 4 --stages 2
--maxnreg 168`, Triton 3.6, CPU). Prediction written before timing it: slower than the shipped config; the
timing settles whether 12 warps per SM outweigh that.

Per shape: milliseconds per call (CUDA events, median of 10 after warm-up and Triton's autotuning; the
kernel alone and with its eager quantisation passes, which torch.compile fuses into the ops before it),
TFLOP/s (4 L^2 d per batch item), and the kernel's error on RMS-normed random q, k (as Wan's are) and
random v: relative error against bf16 SDPA, and against `reference_fp8_attention` (the same quantisation
emulated in float32; a kernel bug shows here, quantisation error in the first figure).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import emit  # noqa: E402
from bench.report import git_commit  # noqa: E402
import wan_model.fp8_attention as fp8_attention_module  # noqa: E402
from wan_model.fp8_attention import (_fp8_attention_kernel, _fp8_attention_kernel_op, fp8_attention,  # noqa: E402
                                     quantize_qkv, reference_fp8_attention)

SHAPES = {"a14b-480p": (2, 32760, 40, 128), "5b-720p": (2, 27280, 24, 128), "small-odd": (1, 1000, 2, 128),
          "tiny-d32": (2, 300, 2, 32)}


def time_ms(fn, reps: int = 10, calls: int = 1) -> float:
    """Median milliseconds per call of `fn` over `reps` samples of `calls` back-to-back calls each (several
    calls per sample hide the Python launch cost behind kernels shorter than ~1 ms)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def rms_normed(shape, gen, device) -> torch.Tensor:
    x = torch.randn(shape, generator=gen, device=device)
    x = x / x.flatten(2).pow(2).mean(-1).sqrt()[..., None, None]  # RMSNorm over all heads, as Wan's q/k norm
    return x.to(torch.bfloat16)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def config_variant(spec: str):
    """'BLOCK_M,BLOCK_N,WARPS,STAGES[,MAXNREG]' -> the shipped kernel's code autotuned over that one config."""
    import triton

    block_m, block_n, warps, stages, *maxnreg = (int(v) for v in spec.split(","))
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages,
                           maxnreg=maxnreg[0] if maxnreg else None)
    return triton.autotune(configs=[config], key=["Lq", "Lk", "HEAD_DIM", "EXP_F16"])(_fp8_attention_kernel.fn)


def run_with_kernel(kernel, operands, kv_len: int) -> torch.Tensor:
    """`_fp8_attention_kernel_op` with another kernel object: the op reads the module global at each call,
    so swapping it reuses the op's launch arguments instead of copying them here."""
    saved = fp8_attention_module._fp8_attention_kernel
    fp8_attention_module._fp8_attention_kernel = kernel
    try:
        return _fp8_attention_kernel_op(*operands, kv_len)
    finally:
        fp8_attention_module._fp8_attention_kernel = saved


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--config", action="append", default=[], metavar="BLOCK_M,BLOCK_N,WARPS,STAGES[,MAXNREG]",
                    help="also time the kernel under this config (repeatable; module docstring)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    variants = {spec: config_variant(spec) for spec in args.config}
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in args.shapes:
        b, n, h, d = SHAPES[name]
        q, k = rms_normed((b, n, h, d), gen, device), rms_normed((b, n, h, d), gen, device)
        v = torch.randn((b, n, h, d), generator=gen, device=device, dtype=torch.bfloat16)
        flops = 4 * b * n * n * h * d

        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

        def fp8():
            return fp8_attention(q, k, v)

        with torch.no_grad():
            exact, out = sdpa(), fp8()
            row = dict(shape=name, b_l_h_d=[b, n, h, d], err_vs_bf16=round(rel(out, exact), 5))
            if n <= 4096:
                row["err_vs_emulation"] = round(rel(out, reference_fp8_attention(q, k, v)), 5)
                row["emulation_err_vs_bf16"] = round(rel(reference_fp8_attention(q, k, v), exact), 5)
            sdpa_ms, fp8_ms = time_ms(sdpa), time_ms(fp8)
            quantised = quantize_qkv(q, k, v)
            kernel_ms = time_ms(lambda: _fp8_attention_kernel_op(*quantised, n))
            row["best_config"] = str(getattr(_fp8_attention_kernel, "best_config", None))
            try:
                f16 = _fp8_attention_kernel_op(*quantised, n, True)
                kernel_f16_ms = time_ms(lambda: _fp8_attention_kernel_op(*quantised, n, True))
                row.update(kernel_exp_f16_ms=round(kernel_f16_ms, 2), exp_f16_err_vs_bf16=round(rel(f16, exact), 5),
                           kernel_exp_f16_tflops=round(flops / kernel_f16_ms / 1e9, 1),
                           best_config_exp_f16=str(getattr(_fp8_attention_kernel, "best_config", None)))
            except Exception as err:  # noqa: BLE001 - the row records why the variant did not run
                row["exp_f16_error"] = str(err).splitlines()[-1][:300]
            shipped = _fp8_attention_kernel_op(*quantised, n)
            for spec, kernel in variants.items():
                try:
                    other = run_with_kernel(kernel, quantised, n)
                    other_ms = time_ms(lambda: run_with_kernel(kernel, quantised, n))
                    row[f"config {spec}"] = dict(ms=round(other_ms, 2), tflops=round(flops / other_ms / 1e9, 1),
                                                 rel_diff_vs_shipped=float(f"{rel(other, shipped):.2e}"))
                except Exception as err:  # noqa: BLE001 - the row records why the config did not run
                    row[f"config {spec}"] = dict(error=str(err).splitlines()[-1][:300])
        row.update(sdpa_ms=round(sdpa_ms, 2), fp8_ms=round(fp8_ms, 2), kernel_only_ms=round(kernel_ms, 2),
                   kernel_tflops=round(flops / kernel_ms / 1e9, 1), sdpa_tflops=round(flops / sdpa_ms / 1e9, 1),
                   fp8_tflops=round(flops / fp8_ms / 1e9, 1), speedup=round(sdpa_ms / fp8_ms, 3))
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = dict(commit=git_commit(), device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    emit(summary, args.json)


if __name__ == "__main__":
    main()
