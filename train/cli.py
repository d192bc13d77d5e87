"""Command-line entry: a user's mistake (bad recipe, busy or full output folder, damaged checkpoint, a run
stopped on non-finite losses) prints one `error: ...` line that says what and how to fix it, exit code 2;
a traceback is kept for real bugs."""

from __future__ import annotations

import sys
from typing import Callable


class UsageError(Exception):
    """A command-line mistake (a bad argument, a missing or unreadable input file); the message names the fix."""


def user_errors() -> tuple[type[BaseException], ...]:
    from data.cache import CacheError
    from data.typed_config import ConfigError

    from .checkpoints import CheckpointError
    from .loop import NonFiniteError
    from .run_guard import OutputNotWritableError, RunLockedError

    return (ConfigError, CacheError, CheckpointError, NonFiniteError, OutputNotWritableError, RunLockedError,
            FileNotFoundError, FileExistsError, UsageError)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run `main(argv)`; our named errors become `error: <message>` on stderr and exit code 2. Then end the
    process group, if the run formed one (`end_process_group`)."""
    try:
        code = main(argv)
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    end_process_group()
    return code


def end_process_group() -> None:
    """Destroy the default process group, if one was formed, once `main` has returned and its trainer with the
    DDP wrappers holding the group is gone. Left to the interpreter's exit, a gloo group was torn down by
    static destructors and a finished two-process run aborted now and then ("terminate called without an
    active exception": 2 of 50 runs under load, and a CI run twice in a row); destroyed while a DDP wrapper
    still held it, as often. Freed first and then destroyed: none in 140. Not on an unexpected exception,
    whose traceback keeps the trainer alive and whose peers may still wait in a collective."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


SPEED_HELP = """Speed (docs/benchmarks.md, "Sampling speed"): --compile keeps the maths (fused kernels round in
another order); --fp8-weights and --fp8-attention change the numbers and are opt-in; --fast turns all three on."""


def add_speed_arguments(ap) -> None:
    """The sampler's speed flags (wan_model/sampling_speed.py), shared by `sample.py` and `sample.py evaluate`."""
    group = ap.add_argument_group("speed", SPEED_HELP)
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the DiT blocks (same maths; the first step compiles, ~1 min at A14B)")
    group.add_argument("--fp8-weights", default="none", choices=["none", "storage", "matmul"],
                       help="block linears in e4m3: storage halves their memory, matmul also runs them on FP8 "
                            "tensor cores with fast accumulation (Hopper/Ada). Changes numbers")
    group.add_argument("--fp8-attention", action="store_true",
                       help="self-attention with int8 q k^T and FP8 P v (Hopper/Ada, Triton). Changes numbers")
    group.add_argument("--fast", action="store_true", help="--compile --fp8-weights matmul --fp8-attention")


def speed_from_args(args):
    """The SamplingSpeed of the flags; refuses, before anything loads, what cannot run: --merge with fp8
    weights, --fp8-attention on a device without the kernel."""
    import torch

    from wan_model.fp8_attention import kernel_available
    from wan_model.sampling_speed import SamplingSpeed

    speed = SamplingSpeed.fast() if args.fast else SamplingSpeed(
        compile=args.compile, fp8_weights=args.fp8_weights, fp8_attention=args.fp8_attention)
    if getattr(args, "merge", False) and speed.fp8_weights != "none":
        raise UsageError("--merge needs the base weights in bf16; drop --merge (attached LoRAs cost ~1%) or "
                         "--fp8-weights / --fast")
    device = torch.device(getattr(args, "device", "cpu"))
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {device}: no such CUDA device here ({torch.cuda.device_count()} visible); "
                         "pick another or use --device cpu")
    if speed.fp8_attention and device.type == "cuda" and not kernel_available(device):
        raise UsageError(f"--fp8-attention needs Triton and a GPU with FP8 tensor cores (sm_89+), not "
                         f"{torch.cuda.get_device_name(device)}; drop --fp8-attention (or --fast)")
    return speed
