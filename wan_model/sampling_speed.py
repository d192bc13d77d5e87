"""Speed options of the sampler, as one typed record applied to each expert once, when a pipeline is built.

    speed = SamplingSpeed(compile=True, fp8_weights="matmul", fp8_attention=True)   # sample.py --fast
    pipe = WanPipeline(preset, experts, vae, text_encoder, device="cuda", speed=speed)

Levers (measured one by one in docs/benchmarks.md, "Sampling speed"):
  * compile: `torch.compile` each block (fuses the float32 norm / modulation / RoPE work). The same
    maths; fused kernels round bf16 intermediates in another order, so not bit for bit. The first step
    of each new clip shape compiles (about 55-85 s at A14B: Inductor also tunes the block sizes of its
    fused kernels by coordinate descent, SAMPLER_COMPILE_OPTIONS, about 70 ms of a 4.1 s 480p A14B CFG
    step; a render runs the same shape 40 to 100 times, so the extra seconds are repaid).
  * fp8_weights: the frozen block linears in e4m3 with per-output-channel scales (`fp8.py`): "storage"
    halves their memory, "matmul" also runs them on FP8 tensor cores (inputs quantised per token).
    Changes the numbers.
  * fp8_fast_accum (with fp8_weights="matmul"; on by default): the FP8 GEMMs accumulate in the tensor
    cores' own precision, as TransformerEngine's and torchao's forward GEMMs do, rather than cuBLAS
    promoting partial sums to float32. Changes the numbers, far less than e4m3 itself (docs/benchmarks.md).
  * fp8_attention: self-attention with q k^T in int8 and P v in e4m3 (`fp8_attention.py`). Changes
    the numbers.
Which of them may be on by default is decided by the fidelity table at the real shapes in
docs/benchmarks.md ("Sampling fidelity of the number-changing levers"): none meets its bound (final latent within 1%, decoded frames at
least 40 dB), so both fp8 levers are opt-in (`sample.py --fast`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from .fp8 import quantize_linears_
from .lora_apply import install_lora_slots
from .speed import block_linear_names

FP8_WEIGHT_MODES = ("none", "storage", "matmul")
# Inductor options for the sampler's compiled blocks: coordinate descent over each fused kernel's block
# sizes (the norm / modulation / quantisation reductions): Inductor's kernels 609 -> ~537 ms per 480p A14B
# CFG step (docs/benchmarks.md, "Sampling speed, fifth session"). Not for training: its graphs are larger
# and were not measured.
SAMPLER_COMPILE_OPTIONS = {"coordinate_descent_tuning": True}


@dataclass(frozen=True)
class SamplingSpeed:
    compile: bool = False
    fp8_weights: Literal["none", "storage", "matmul"] = "none"
    fp8_attention: bool = False
    fp8_fast_accum: bool = True

    def __post_init__(self):
        if self.fp8_weights not in FP8_WEIGHT_MODES:
            raise ValueError(f"fp8_weights: expected one of {FP8_WEIGHT_MODES}, got {self.fp8_weights!r}")

    @classmethod
    def fast(cls) -> "SamplingSpeed":
        """Every lever on (sample.py --fast)."""
        return cls(compile=True, fp8_weights="matmul", fp8_attention=True)

    @property
    def attention_backend(self) -> str:
        return "fp8" if self.fp8_attention else "auto"

    def describe(self) -> str:
        accumulation = " (fast accumulation)" if self.fp8_weights == "matmul" and self.fp8_fast_accum else ""
        return (f"compile {'on' if self.compile else 'off'}, fp8 weights {self.fp8_weights}{accumulation}, "
                f"fp8 attention {'on' if self.fp8_attention else 'off'}")


def prepare_expert(model: nn.Module, speed: SamplingSpeed) -> nn.Module:
    """Apply the weight-side levers to one expert in place: fp8 block linears, then compiled blocks.

    The expert's parameters are frozen first (sampling never trains them); LoRA attaches afterwards as
    forward hooks, which read the fp8 linear's output like any other."""
    if not speed.compile and speed.fp8_weights == "none":  # fp8 attention is chosen per forward, not here
        return model
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise ValueError("sampling speed options apply to frozen release experts, not to one carrying trainable "
                         "LoRA layers (a training run's): they would freeze and quantise it")
    if speed.fp8_weights != "none":
        model.requires_grad_(False)
        quantize_linears_(model, block_linear_names(model), speed.fp8_weights, fast_accum=speed.fp8_fast_accum)
    if speed.compile:
        install_lora_slots(model)  # LoRA hooks must exist before compiling (lora_apply._LoraSlot says why)
        model.compile_blocks(options=SAMPLER_COMPILE_OPTIONS)
    return model
