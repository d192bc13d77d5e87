"""Speed and memory options of LoRA training on the Wan DiT, as one typed record applied in one call.

    options = SpeedOptions(compile=True, save_attention="all", fp8_base="storage")
    attach LoRA (PEFT) ... then: apply_speed_options(model, options)

Levers (numbers: A14B expert, 480x832x81 = 32,760 tokens, LoRA rank 32, H100; docs/benchmarks.md):
  * compile: `torch.compile` each block (fuses the float32 norm / modulation / RoPE element-wise work).
  * compiled_checkpoint: with compile, blocks that keep self-attention also compile their checkpointed call, so
    the recompute is part of the compiled backward and skips FFN down's forward (WanTransformer.compile_blocks;
    about 0.24 s an A14B step at 480p, two machines). Its backward holds 3.1 L x f bf16 more at once, which
    the memory plan counts; under save_attention: auto the plan turns it off where that memory buys more.
    Not where the flash-attention package serves self-attention (flash-attn 3 installed under "auto", or
    "flash"): the save policy cannot see its kernel in every release, and a block that recomputes attention
    inside the compiled call held ten L x f buffers on the GPU. (Such blocks keep no attention output
    either, whatever save_attention says: the plan's count is then an upper bound on memory.)
  * save_attention: selective activation checkpointing. Blocks are still recomputed in backward, but
    the self-attention kernel's outputs (out [B, heads, L, head_dim] bf16 and its log-sum-exp) are kept
    from the first forward, so the recomputation skips the most expensive op. Costs L * dim * 2 bytes
    per saved block (335 MB at the A14B 480p shape: 12.5 GiB for 40 blocks; 1 byte an element, the e4m3 output,
    with attention_backend cudnn_fp8); "every_k" saves every k-th.
  * fp8_base: e4m3 storage of the frozen block linears (`fp8.py`): 28.1 -> 14.0 GB on A14B, which pays
    for saving attention; "matmul" also runs their forward on FP8 tensor cores, "matmul_dgrad" their
    input gradient in backward too (predicted ~0.4 s less per A14B step; not yet measured).
  * fp8_fast_accum: with fp8_base matmul / matmul_dgrad, the forward FP8 GEMMs accumulate in the tensor
    cores' own precision, as the sampler's, instead of cuBLAS's float32 promotion (-0.13 s an A14B step in a
    bench at 9265f72); off until the FP8 table measures what it does to the LoRA gradients.
  * attention_backend: `attention.py`'s kernel choice ("auto" falls back from cuDNN to FlashAttention-2
    at lengths where cuDNN fails). "cudnn_fp8": self-attention forward and backward on cuDNN's FP8 graphs
    (`cudnn_fp8_attention.py`; Hopper, `pip install nvidia-cudnn-frontend`): 7.77 s instead of 8.80 s per A14B
    step (47fa9ab); its attention outputs are 6-7% from float32, and the LoRA gradients it gives are 5.9-6.3%
    from bf16's against matmul_dgrad's 5.8-6.2% (table at 62971b8 in docs/benchmarks.md), so it is an
    opt-in, not the default. Each self-attention gets a float32 scaling state (`attach_scaling_states`, done here); not with
    offload: blocks. Not "fp8": the 8-bit forward with cuDNN's bf16 backward (`fp8_attention.py`) runs, and
    `save_attention` keeps its outputs, but its gradients were only ever compared with a bf16 reference the
    cuDNN probe bug had broken (docs/benchmarks.md), so it is a bench lever (`set_attention_backend`).
  * offload: "blocks" streams base weights from pinned host memory one block ahead (`offload.py`).
  * host_checkpoints: the block inputs checkpointing keeps (12.5 GiB at 480p) wait in pinned host memory
    (`offload.HostCheckpointInputs`); with offload: blocks, the 24 GiB mode of an A14B expert.
  * save_attention / host_checkpoints "auto": `plan_speed` chooses both from the memory budget
    (`memory_gib`, else the device's free memory) and the largest micro-batch (`memory_plan.py`).
Order inside `apply_speed_options`: fp8 (needs frozen weights; works on PEFT-wrapped linears), attention
backend, checkpoint policy, offload (moves weights to the host), compile last.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, replace
from typing import Callable, ContextManager, Literal

import torch
import torch.nn as nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from .attention import self_attention_on_flash_package, set_attention_backend
from .config import TransformerConfig
from .cudnn_fp8_attention import attach_scaling_states
from .fp8 import FP8_MODES, quantize_linears_
from .memory_plan import ActivationPlan, plan_activations
from .offload import BlockOffloader, HostCheckpointInputs

BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")

# The kernels `torch.nn.functional.scaled_dot_product_attention` dispatches to, plus the FA2 fallback.
_ATTENTION_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name))
# Registered by fp8_attention.py and cudnn_fp8_attention.py (imported through attention.py): self-attention only.
_FP8_ATTENTION_OPS = frozenset((torch.ops.wanlora.fp8_attention_train.default,
                                torch.ops.wanlora.cudnn_fp8_attention.default))


@dataclass
class SpeedOptions:
    """The `speed:` section of a training recipe. Defaults run on any CUDA GPU (and on the CPU, compile
    aside): A14B 480x832x81 on an H100 10.26 s / 50.3 GiB (diffusers + PEFT: 14.75 s / 54.8 GiB). On
    Hopper set fp8_base: matmul for 9.69 s / 49.9 GiB (1.52x diffusers); offload: blocks for small GPUs."""

    compile: bool = True                                   # torch.compile each block (first step +~1 min)
    # with compile: blocks keeping self-attention compile their checkpointed call (skips FFN down's replay;
    # more transient memory, which save_attention: auto weighs and may turn it off for)
    compiled_checkpoint: bool = True
    # keep self-attention outputs in checkpoints; "auto": as many blocks as the memory budget allows
    save_attention: Literal["none", "all", "every_k", "auto"] = "all"
    save_attention_every: int = 2                          # k of "every_k": blocks 0, k, 2k, ... keep theirs
    fp8_base: Literal["none", "storage", "matmul", "matmul_dgrad"] = "storage"  # frozen block linears in e4m3
    # with fp8_base matmul / matmul_dgrad: the forward FP8 GEMMs accumulate as the sampler's do (tensor-core
    # precision, no float32 promotion; wan_model/fp8.py); faster, and other numbers (docs/benchmarks.md)
    fp8_fast_accum: bool = False
    attention_backend: Literal["auto", "sdpa", "flash", "cudnn_fp8"] = "auto"  # see wan_model/attention.py
    offload: Literal["none", "blocks"] = "none"            # "blocks": base weights in host memory (small GPUs)
    # checkpointed block inputs in host memory (small GPUs); "auto" (with save_attention: auto): when that
    # lets more blocks keep attention and is predicted faster
    host_checkpoints: bool | Literal["auto"] = False
    memory_gib: float | None = None                        # GPU memory cap of this process; the auto plan's budget

    def __post_init__(self):
        choices = {"save_attention": ("none", "all", "every_k", "auto"),
                   "fp8_base": ("none", *FP8_MODES),
                   "attention_backend": ("auto", "sdpa", "flash", "cudnn_fp8"), "offload": ("none", "blocks"),
                   "host_checkpoints": (False, True, "auto")}
        if self.attention_backend == "fp8":
            raise ValueError("speed.attention_backend: fp8 is the sampler's 8-bit attention (--fp8-attention); in "
                             "training its gradients are not yet measured against a correct bf16 reference "
                             "(docs/benchmarks.md, issue 16): use auto")
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"speed.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.attention_backend == "cudnn_fp8" and self.offload == "blocks":
            raise ValueError("speed.attention_backend: cudnn_fp8 keeps a scaling state on each block, which offload: "
                             "blocks does not stream: use attention_backend: auto with offload: blocks")
        if not isinstance(self.compiled_checkpoint, bool):
            raise ValueError(f"speed.compiled_checkpoint: expected true or false, got {self.compiled_checkpoint!r}")
        if not isinstance(self.fp8_fast_accum, bool):
            raise ValueError(f"speed.fp8_fast_accum: expected true or false, got {self.fp8_fast_accum!r}")
        if self.fp8_fast_accum and self.fp8_base not in ("matmul", "matmul_dgrad"):
            raise ValueError(f"speed.fp8_fast_accum: accumulates FP8 GEMMs, which fp8_base: {self.fp8_base} does not "
                             "run: set fp8_base: matmul_dgrad (or matmul), or leave fp8_fast_accum false")
        if self.save_attention_every < 1:
            raise ValueError(f"speed.save_attention_every: expected an integer >= 1, got {self.save_attention_every}")
        if self.host_checkpoints == "auto" and self.save_attention != "auto":
            raise ValueError("speed.host_checkpoints: auto is chosen by the memory plan; set save_attention: auto "
                             "too, or host_checkpoints: true / false")
        if self.memory_gib is not None and not (math.isfinite(self.memory_gib) and self.memory_gib > 0):
            raise ValueError(f"speed.memory_gib: expected a positive number of GiB, got {self.memory_gib}")

    @property
    def planned(self) -> bool:
        """Whether `plan_speed` must resolve these options before `apply_speed_options` takes them."""
        return self.save_attention == "auto"


def compiled_call(options: SpeedOptions) -> bool:
    """Whether the blocks that keep self-attention run the compiled checkpoint call (module docstring; the model
    also leaves it to the checkpoint around the compiled block under offload hooks and sequence parallel)."""
    return (options.compile and options.compiled_checkpoint
            and not self_attention_on_flash_package(options.attention_backend))


def plan_speed(options: SpeedOptions, cfg: TransformerConfig, tokens: int, budget_gib: float, *, rank: int,
               host_available_gib: float, samples: int = 1, shards: int = 1) -> tuple[SpeedOptions, ActivationPlan | None]:
    """Resolve save_attention / host_checkpoints "auto" into settings `apply_speed_options` takes, from
    the memory plan for `tokens` (the largest micro-batch) within `budget_gib`; other options pass through
    (plan None). samples / shards: the micro-batch size and sequence-parallel degree that `tokens` (this
    process's) comes from. Raises ValueError (naming the fixes) when no setting is predicted to fit."""
    if not options.planned:
        return options, None
    plan = plan_activations(cfg, tokens, budget_gib, rank=rank, fp8_weights=options.fp8_base != "none",
                            fp8_dgrad=options.fp8_base == "matmul_dgrad", streamed_blocks=options.offload == "blocks",
                            fp8_attention=options.attention_backend == "cudnn_fp8",
                            # where the compiled checkpoint call can run (WanTransformer.forward)
                            compiled_checkpoint=(compiled_call(options) and options.offload == "none"
                                                 and shards == 1),
                            host_inputs=None if options.host_checkpoints == "auto" else options.host_checkpoints,
                            host_available_gib=host_available_gib, samples=samples, shards=shards)
    k = plan.saved_attention_blocks
    save = "none" if k == 0 else "all" if k == plan.blocks else "every_k"
    resolved = replace(options, save_attention=save, host_checkpoints=plan.host_checkpoints,
                       save_attention_every=plan.save_attention_every or options.save_attention_every,
                       compiled_checkpoint=options.compiled_checkpoint and plan.compiled_checkpoint)
    return resolved, plan


def _save_self_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the outputs of self-attention kernels (q and k of equal length; the 8-bit kernel serves
    self-attention only); recompute everything else.

    Cross-attention (k over the 512 text rows) is cheap to recompute and not kept."""
    if op in _ATTENTION_OPS and args[0].shape[-2] == args[1].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    if op in _FP8_ATTENTION_OPS:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _self_attention_kept() -> tuple[ContextManager, ContextManager]:
    return create_selective_checkpoint_contexts(_save_self_attention)


# The checkpoint context_fn of every block that keeps its self-attention outputs: one object, since compiled
# checkpointing guards on the context_fn it is given (a partial over the block index compiled every block
# again); a partial, as dynamo traces one.
keep_self_attention = functools.partial(_self_attention_kept)


def self_attention_saver(every: int = 1) -> Callable[[int], Callable[[], tuple[ContextManager, ContextManager]] | None]:
    """A `WanTransformer.checkpoint_context_fn`: blocks i with i % every == 0 keep their self-attention
    outputs through checkpointing (context_fn `keep_self_attention`), the others recompute everything (None)."""
    def context_fn_for(block_index: int) -> Callable[[], tuple[ContextManager, ContextManager]] | None:
        return None if block_index % every else keep_self_attention
    return context_fn_for


def block_linear_names(model: nn.Module) -> list[str]:
    """Dotted names of the frozen linears of every block ('blocks.0.self_attn.q', ...)."""
    return [f"blocks.{i}.{name}" for i in range(len(model.blocks)) for name in BLOCK_LINEARS]


def place_for_block_offload(model: nn.Module, device: torch.device) -> None:
    """Move everything but the blocks' frozen weights and buffers to `device` (the embeddings, the head,
    the LoRA weights): the part of a model that `offload: blocks` keeps on the device. A 14B expert
    loaded on the host thus never needs its 28.6 GB on a small GPU at once."""
    for name, child in model.named_children():
        if name != "blocks":
            child.to(device)
    for name, buf in list(model._buffers.items()):
        if buf is not None:
            model._buffers[name] = buf.to(device)
    for module in model.blocks.modules():  # LoRA A / B linears: trainable weights, nothing frozen
        own = list(module.parameters(recurse=False))
        if own and all(p.requires_grad for p in own):
            module.to(device)  # host -> CUDA keeps the Parameter objects the optimizer holds


def apply_speed_options(model: nn.Module, options: SpeedOptions,
                        device: torch.device | None = None) -> BlockOffloader | None:
    """Apply `options` to a WanTransformer in place, after LoRA is attached and the model is on its device
    (with offload == "blocks" it may be on the host: `device` is then where it computes; the non-block
    part and the LoRA weights move there, the blocks' frozen weights to pinned host memory).

    Returns the `BlockOffloader` when offload == "blocks" (it owns the host copies), else None."""
    if options.planned:
        raise ValueError("speed.save_attention: auto must be resolved into a setting first (plan_speed)")
    if options.fp8_base != "none":
        quantize_linears_(model, block_linear_names(model), options.fp8_base, fast_accum=options.fp8_fast_accum)
    set_attention_backend(options.attention_backend)
    if options.attention_backend == "cudnn_fp8":
        attach_scaling_states(model, device)  # after the dtype casts and moves above: float32 on the device
    if options.save_attention != "none" and self_attention_on_flash_package(options.attention_backend):
        warnings.warn(f"speed.save_attention: {options.save_attention}, but the flash-attention package serves "
                      f"self-attention (attention_backend: {options.attention_backend}"
                      f"{', flash-attn 3 installed' if options.attention_backend == 'auto' else ''}), and "
                      "checkpointing keeps only aten's and wanlora's attention kernels: every block recomputes its "
                      "attention; attention_backend: sdpa keeps them", stacklevel=2)
    if options.save_attention == "none":
        model.checkpoint_context_fn = None
    else:
        model.checkpoint_context_fn = self_attention_saver(
            1 if options.save_attention == "all" else options.save_attention_every)
    model.host_checkpoints = HostCheckpointInputs() if options.host_checkpoints else None
    offloader = None
    if options.offload == "blocks":
        device = device or next(model.parameters()).device
        place_for_block_offload(model, device)
        offloader = BlockOffloader(model.blocks, device)
    if options.compile:
        model.compile_blocks(checkpoint_call=compiled_call(options))
    return offloader
