"""The sampler's int8/FP8 attention kernel compiled for Hopper (sm_90a) on a machine without a GPU, and
what its inner loop issues: instruction counts per thread per key block, and where the tensor-core waits
sit. For kernel work between device sessions: a change's structure can be checked here for free.

    python bench/kernel_sass.py                                   # the autotuner's configs
    python bench/kernel_sass.py --block-m 64 --block-n 128 --warps 4 --stages 3 --sequence

Needs the `triton` package (any machine: Triton compiles to PTX and runs its bundled ptxas and nvdisasm on
the CPU; `pip install triton==<the GPU machine's version>`). Integer arguments get the divisibility-by-16
hints the JIT would give them at the A14B shape (strides of contiguous [B, L, 40, 128] tensors; the
lengths 32,760 and the head count 40 get none), since without them loads compile to single bytes.

What the loop line means: `MUFU.EX2` is the exponential unit (16 per clock per SM), `F2FP` the packing of
P to e4m3, `IGMMA`/`QGMMA` the int8/FP8 tensor-core instructions, and `WARPGROUP.DEPBAR.LE gsb0, 0x0` a
wait for every outstanding tensor-core group: a wait of 0 right after each matmul means the warp group's
exponentials and its matmuls never overlap (measured at e9d303a's code: docs/benchmarks.md, "Sampling speed").
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POINTERS = ["*i8", "*i8", "*fp8e4nv", "*fp32", "*fp32", "*fp32", "*bf16"]
DIVISIBLE = {"Q", "K", "VT", "QS", "KS", "VS", "O", "sq_b", "sq_l", "sq_h", "sk_b", "sk_l", "sk_h", "sv_b", "sv_h",
             "sv_d", "sqs_b", "so_b", "so_l", "so_h"}
KEY_OPS = ("GMMA", "MUFU", "F2FP", "SHFL", "LDGSTS", "BAR")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);")


@dataclass
class HopperBuild:
    """A kernel compiled for sm_90a: its SASS, registers per thread, shared memory and ptxas's spill stores
    in bytes."""
    sass: str
    registers: int | None
    shared_bytes: int
    spill_store_bytes: int = 0


def compile_for_hopper(fn, constexprs: dict, num_warps: int, num_stages: int = 3, gluon: bool = False,
                       pointers: list[str] = POINTERS, scalar_types: dict | None = None,
                       maxnreg: int | None = None, divisible: set[str] = DIVISIBLE) -> HopperBuild:
    """Compile `fn` (a @triton.jit function, or @gluon.jit with gluon=True) for sm_90a, and read its SASS and
    ptxas's register count with the bundled tools. Its first arguments are pointers of the types in
    `pointers` (default: the shipped attention kernel's), the other non-constexpr ones i32 unless
    `scalar_types` names them (e.g. {"eps": "fp32"}); the arguments named in `divisible` get the
    divisibility-by-16 hint the JIT gives aligned pointers and multiples of 16 (default: the attention
    kernel's; without them loads are not vectorised and the counts mislead)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: F811

    names = fn.arg_names
    scalar_types = scalar_types or {}
    signature = {n: "constexpr" if n in constexprs else (pointers[i] if i < len(pointers)
                                                          else scalar_types.get(n, "i32"))
                 for i, n in enumerate(names)}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible if n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 128),
                            options=dict(num_warps=num_warps, num_stages=num_stages,
                                         **({"maxnreg": maxnreg} if maxnreg else {})))
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    stem = Path("/tmp") / f"wanlora_{fn.__name__}_{num_warps}_{num_stages}"
    stem.with_suffix(".cubin").write_bytes(kernel.asm["cubin"])
    stem.with_suffix(".ptx").write_text(kernel.asm["ptx"])
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(stem.with_suffix(".cubin"))], capture_output=True,
                          text=True, check=True).stdout
    report = subprocess.run([str(tools / "ptxas"), "--gpu-name", "sm_90a", "-v", str(stem.with_suffix(".ptx")),
                             "-o", "/dev/null"], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spilled = re.search(r"(\d+) bytes spill stores", report)
    return HopperBuild(sass, int(registers.group(1)) if registers else None, kernel.metadata.shared,
                       int(spilled.group(1)) if spilled else 0)


def describe(build: HopperBuild, scores_per_thread: int) -> str:
    """One line: the main loop's length, waits, spills and commonest instructions."""
    loop = main_loop(build.sass)
    counts = collections.Counter(op for op, _ in loop)
    waits = [operands for op, operands in loop if op == "WARPGROUP.DEPBAR.LE"]
    return (f"{build.registers} registers, {build.shared_bytes} bytes of shared memory; main loop {len(loop)} "
            f"instructions per thread per key block ({len(loop) / scores_per_thread:.1f} per score); spill "
            f"stores {build.spill_store_bytes} bytes, local loads/stores in the loop "
            f"{sum(op.startswith(('LDL', 'STL')) for op, _ in loop)}; tensor-core waits {waits}; "
            + ", ".join(f"{op} {n}" for op, n in counts.most_common(8)))


def print_build(label: str, build: HopperBuild, scores_per_thread: int, show_sequence: bool = False) -> None:
    """`describe` under a label, and with show_sequence the loop's instruction sequence below it."""
    print(f"{label}: " + describe(build, scores_per_thread))
    if show_sequence:
        print("  " + sequence(main_loop(build.sass)))


def main_loop(sass: str) -> list[tuple[str, str]]:
    """(opcode, operands) of the longest loop: from a label to the backward branch that returns to it."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    best = (0, -1)
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > best[1] - best[0]:
            best = (labels[m.group(1)], i)
    return [(m.group(1), m.group(2).strip()) for line in lines[best[0]:best[1] + 1]
            if (m := INSTRUCTION.match(line))]


def sequence(loop: list[tuple[str, str]]) -> str:
    """The loop in order, run-length coded: key units by name, the rest as `other`."""
    out: list[list] = []
    for op, operands in loop:
        tag = op + " " + operands if op.startswith("WARPGROUP") else next((k for k in KEY_OPS if k in op), "other")
        if out and out[-1][0] == tag:
            out[-1][1] += 1
        else:
            out.append([tag, 1])
    return " ".join(f"{t} x{n}" if n > 1 else t for t, n in out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block-m", type=int, default=None)
    ap.add_argument("--block-n", type=int, default=None)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--stages", type=int, default=None)
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread (ptxas spills past it)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--sequence", action="store_true", help="print the loop's instruction sequence")
    args = ap.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("error: bench/kernel_sass.py needs the triton package (pip install triton)")
    from wan_model.fp8_attention import _CONFIGS, _fp8_attention_kernel

    configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in _CONFIGS]
    if args.block_m:
        configs = [(args.block_m, args.block_n or 128, args.warps or 4, args.stages or 3)]
    for block_m, block_n, warps, stages in configs:
        build = compile_for_hopper(_fp8_attention_kernel.fn, dict(HEAD_DIM=args.head_dim, EXP_F16=False,
                                                                  BLOCK_M=block_m, BLOCK_N=block_n), warps, stages,
                                   maxnreg=args.maxnreg)
        print(f"BLOCK_M={block_m} BLOCK_N={block_n} warps={warps} stages={stages}"
              f"{f' maxnreg={args.maxnreg}' if args.maxnreg else ''}: "
              + describe(build, block_m * block_n // (32 * warps)))
        if args.sequence:
            print("  " + sequence(main_loop(build.sass)))


if __name__ == "__main__":
    main()
