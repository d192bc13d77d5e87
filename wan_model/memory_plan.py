"""How many blocks keep their self-attention outputs through checkpointing, and where the checkpointed
block inputs wait, from a memory budget: the arithmetic behind `speed.save_attention: auto`.

Peak memory of one LoRA training step with every block checkpointed, in bytes, for L tokens (x batch),
width d, FFN width f, n blocks, H heads, LoRA rank r:

    setup      = block linears (1 byte per weight in fp8, 2 in bf16) + the rest of the model in bf16
                 + LoRA weights in fp32                               (what is allocated before the step)
                 (`offload: blocks`: only the STREAMED_BLOCKS in flight hold block linears on the device)
    lora_state = 3 x 4 x P_lora          gradients and AdamW's two moments, fp32 (P_lora = LoRA parameters)
    inputs     = n x L d x 2             each block's checkpointed input, bf16
                 (`host_checkpoints`: they wait in pinned host memory; one is back on the device at a time)
    saved      = k x (L d x 2 + H L x 4) k blocks keep self-attention's output and log-sum-exp
                 (L d x 1 instead of L d x 2 with `attention_backend: cudnn_fp8`: its e4m3 output, from
                 which the bf16 one is recomputed)
    transient  = a x L d x 2 + b x L f x 2   one block's recompute and backward in flight
                 (+ c x L f x 2 with fp8 input gradients, `matmul_dgrad`: the FFN's float32 dy copy)
                 (+ e x L f x 2 where compiled blocks keep self-attention: their checkpoint call is compiled
                 whole, recompute and backward one Inductor graph, which holds more FFN-width buffers at once)
    peak       = setup + lora_state + inputs + saved + transient

a and b are fitted on two measured runs with no saved attention (A14B expert 1280x720x81, compile + fp8
matmul: 66.37 GiB, H100, 3694217; TI2V-5B 704x1280x121, compile + fp8 storage: 17.01 GiB, H100,
3694217): a = 15.5, b = 5.4. Checked on runs not used in the fit (tests/wan_model/test_memory_plan.py):
A14B 480x832x81 saving attention in every block (49.87 GiB measured, 50.40 predicted), TI2V-5B likewise
(21.44 vs 21.74). The 24 GiB mode (block streaming + host checkpoints: 13.82 GiB) fits STREAMED_BLOCKS. c = 1.5 from
the same two shapes with `matmul_dgrad` (H200, 101edab: 51.1 and 22.53 GiB). e = 3.1 from the compiled
checkpoint call's largest measured excess over the rest of the transient (H200, bench/checkpoint_memory.py, 4 A14B
blocks at 480x832x81, matmul_dgrad + cudnn_fp8, every block keeping attention, 681b393: 3.1 L x f; whole steps
with those settings at 168708a: A14B 47.53 GiB, TI2V-5B 22.30 GiB, 2.5 L x f each). The figures are
`max_memory_allocated`; a cap limits what the allocator reserves, and MARGIN is kept free of the budget
for that difference.

When not every block can keep its attention on the device, moving the checkpointed inputs to the host
frees n x L d x 2 bytes for more saved blocks. That trades host copies (2 x L d x 2 bytes per block per
step, on the compute stream) for attention forwards not recomputed (4 L^2 d FLOPs per saved block): the
plan takes it when the second is predicted larger, at the rates below, and the host has the memory.
Likewise the compiled checkpoint call: it saves each keeping block FFN down's replayed forward (2 L d f FLOPs
and its element-wise work), and its e x L f x 2 bytes may cost saved blocks; the plan keeps it when it is
predicted faster.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TransformerConfig

GIB = 2**30
TRANSIENT_PER_TOKEN_DIM = 15.5   # a: transient memory in units of one L x d bf16 tensor
TRANSIENT_PER_TOKEN_FFN = 5.4    # b: in units of one L x f bf16 tensor
TRANSIENT_DGRAD_PER_TOKEN_FFN = 1.5  # c: fp8 input gradients' extra, in units of one L x f bf16 tensor
TRANSIENT_COMPILED_CALL_PER_TOKEN_FFN = 3.1  # e: the compiled checkpoint call's extra, likewise
MARGIN = 0.04                    # fraction of the budget kept free beyond the prediction
# offload: blocks holds the computing block and the one being fetched; the 24 GiB mode's measured peak
# (13.82 GiB, H200, bench/train_step.py) needs two blocks' linears more: fitted, not derived.
STREAMED_BLOCKS = 4
# Rates that weigh host checkpoints against recomputed attention (H200, docs/benchmarks.md): cuDNN's bf16
# attention forward at the A14B shape (563 TFLOP/s, e954e35) and a pinned copy on the compute stream.
ATTENTION_FORWARD_FLOPS_PER_S = 560e12
HOST_COPY_BYTES_PER_S = 25e9
# What the compiled checkpoint call saves a keeping block, as a rate over FFN down's forward FLOPs: 0.24 s for 40
# A14B blocks at 480p (7.587 s at cb1fb14, 7.348 s at 168708a; two machines, which differ by up to 3.5%).
COMPILED_CALL_FLOPS_PER_S = 770e12
HOST_SHARE = 0.5                 # at most this share of the host's available memory is pinned for inputs


@dataclass(frozen=True)
class ActivationPlan:
    """`saved_attention_blocks` of `blocks` keep their self-attention outputs; `host_checkpoints`: the
    checkpointed block inputs wait in host memory. The predicted peak and its parts in GiB."""

    blocks: int
    saved_attention_blocks: int
    host_checkpoints: bool
    predicted_peak_gib: float
    budget_gib: float
    parts_gib: dict[str, float]
    compiled_checkpoint: bool = False  # the saving blocks run the compiled checkpoint call

    @property
    def save_attention_every(self) -> int | None:
        """The `save_attention_every` k of SpeedOptions' "every_k" (blocks 0, k, 2k, ... save): the plan's
        count is already one that every_k can give exactly; None when no block saves."""
        if self.saved_attention_blocks == 0:
            return None
        return -(-self.blocks // self.saved_attention_blocks)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts_gib.items())
        where = "host memory" if self.host_checkpoints else "device memory"
        call = " (compiled checkpoint call)" if self.compiled_checkpoint else ""
        return (f"memory plan: {self.saved_attention_blocks} of {self.blocks} blocks keep self-attention{call}, "
                f"checkpointed block inputs in {where}; predicted peak {self.predicted_peak_gib:.1f} GiB of a "
                f"{self.budget_gib:.1f} GiB budget ({MARGIN:.0%} kept free; GiB: {parts})")


def lora_parameters(cfg: TransformerConfig, rank: int) -> int:
    """LoRA parameters on the ten block linears: r x (in + out) each."""
    d, f = cfg.dim, cfg.ffn_dim
    return cfg.num_layers * rank * (8 * (d + d) + 2 * (d + f))


def model_bytes(cfg: TransformerConfig, fp8_weights: bool, streamed_blocks: bool = False) -> int:
    """The expert's weights on the device as the trainer holds them: block linears in e4m3 or bf16 (with
    streaming, only STREAMED_BLOCKS blocks' worth), everything else bf16."""
    d, f = cfg.dim, cfg.ffn_dim
    block_linear = 8 * d * d + 2 * d * f
    block_other = 8 * d + d + f + 6 * d + 4 * d + 2 * d   # biases, modulation, q/k norms, cross-attn norm
    rest = (cfg.in_dim * d * 4 + cfg.text_dim * d + d * d + cfg.freq_dim * d + d * d + d * 6 * d
            + d * cfg.out_dim * 4 + 2 * d)
    per_weight = 1 if fp8_weights else 2
    resident = min(STREAMED_BLOCKS, cfg.num_layers) if streamed_blocks else cfg.num_layers
    return resident * block_linear * per_weight + cfg.num_layers * block_other * 2 + rest * 2


def predicted_peak(cfg: TransformerConfig, tokens: int, saved_blocks: int, *, rank: int = 32,
                   fp8_weights: bool = True, fp8_dgrad: bool = False, streamed_blocks: bool = False,
                   host_inputs: bool = False, fp8_attention: bool = False,
                   compiled_checkpoint: bool = False) -> dict[str, float]:
    """The peak's parts in GiB (module docstring) with `saved_blocks` blocks keeping self-attention.

    compiled_checkpoint: those blocks run the compiled checkpoint call (`WanTransformer.compile_blocks`: compiled
    blocks, neither block streaming nor sequence parallel)."""
    d, f, n, h = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads
    lora = lora_parameters(cfg, rank)
    ffn_units = TRANSIENT_PER_TOKEN_FFN + TRANSIENT_DGRAD_PER_TOKEN_FFN * fp8_dgrad
    parts = {
        "setup": (model_bytes(cfg, fp8_weights, streamed_blocks) + 4 * lora) / GIB,
        "lora_state": 12 * lora / GIB,
        "inputs": (1 if host_inputs else n) * tokens * d * 2 / GIB,
        "saved_attention": saved_blocks * (tokens * d * (1 if fp8_attention else 2) + h * tokens * 4) / GIB,
        "transient": (TRANSIENT_PER_TOKEN_DIM * tokens * d * 2 + ffn_units * tokens * f * 2) / GIB
                     + (compiled_call_gib(cfg, tokens, fp8_attention) if compiled_checkpoint and saved_blocks > 0
                        else 0.0),
    }
    parts["total"] = sum(parts.values())
    return parts


def resident_gib(cfg: TransformerConfig, rank: int = 32, *, fp8_weights: bool = True,
                 streamed_blocks: bool = False) -> float:
    """What an expert keeps on the device between its steps: weights (with streaming, the part that is not
    streamed, counted with the blocks in flight: an upper bound), LoRA weights, gradients and moments."""
    parts = predicted_peak(cfg, 1, 0, rank=rank, fp8_weights=fp8_weights, streamed_blocks=streamed_blocks)
    return parts["setup"] + parts["lora_state"]


def pinned_input_bytes(cfg: TransformerConfig, tokens: int) -> int:
    """Host memory the checkpointed inputs take: PyTorch's pinned allocator rounds each up to a power of two."""
    one = tokens * cfg.dim * 2
    return cfg.num_layers * (1 << (one - 1).bit_length())


def host_copy_seconds(cfg: TransformerConfig, tokens: int) -> float:
    """Predicted cost of host checkpoints per step: every block's input out in forward, back in backward."""
    return cfg.num_layers * 2 * tokens * cfg.dim * 2 / HOST_COPY_BYTES_PER_S


def attention_forward_seconds(cfg: TransformerConfig, tokens: int, samples: int = 1, shards: int = 1) -> float:
    """Predicted time of one block's self-attention forward (what a saved block does not recompute) for
    `tokens` on this process: `samples` sequences of L = tokens x shards / samples tokens each, each
    process doing 1/shards of their attention (sequence parallelism: a share of the heads over all L)."""
    length = tokens * shards / samples
    return samples * 4 * length * length * cfg.dim / shards / ATTENTION_FORWARD_FLOPS_PER_S


def compiled_call_gib(cfg: TransformerConfig, tokens: int, fp8_attention: bool) -> float:
    """The compiled checkpoint call's extra transient (e x L f x 2 bytes), in GiB. Measured with `cudnn_fp8`
    attention only: with bf16 attention outputs saved there is none (4 A14B blocks on an H200 at b8c33da:
    -3.04 L f against the plan with e, i.e. e ~ 0; docs/benchmarks.md, 2026-12-05)."""
    return TRANSIENT_COMPILED_CALL_PER_TOKEN_FFN * tokens * cfg.ffn_dim * 2 / GIB if fp8_attention else 0.0


def ffn_down_replay_seconds(cfg: TransformerConfig, tokens: int) -> float:
    """Predicted time of one block's replayed FFN down forward, which the compiled checkpoint call skips."""
    return 2 * tokens * cfg.dim * cfg.ffn_dim / COMPILED_CALL_FLOPS_PER_S


def recompute_seconds(cfg: TransformerConfig, tokens: int, plan: ActivationPlan, samples: int = 1,
                      shards: int = 1) -> float:
    """Predicted time a plan spends where the ideal (every block keeping attention under the compiled call, no
    host copies) spends none: attention forwards recomputed, host copies, and FFN down replayed, in every
    block without the compiled call, in the blocks that recompute attention with it."""
    seconds = (plan.blocks - plan.saved_attention_blocks) * attention_forward_seconds(cfg, tokens, samples, shards)
    if plan.host_checkpoints:
        seconds += host_copy_seconds(cfg, tokens)
    replaying = plan.blocks - plan.saved_attention_blocks if plan.compiled_checkpoint else plan.blocks
    return seconds + replaying * ffn_down_replay_seconds(cfg, tokens)


def plan_saved_attention(cfg: TransformerConfig, tokens: int, budget_gib: float, *, rank: int = 32,
                         fp8_weights: bool = True, fp8_dgrad: bool = False, streamed_blocks: bool = False,
                         host_inputs: bool = False, fp8_attention: bool = False,
                         compiled_checkpoint: bool = False) -> ActivationPlan:
    """The most blocks that may keep self-attention with the predicted peak within (1 - MARGIN) x budget,
    the block inputs on the device or (host_inputs) in host memory.

    tokens: video tokens of the largest bucket times the batch size. Raises ValueError when even no saved
    block fits, naming what would (fp8 weights, block streaming, host checkpoints)."""
    if tokens <= 0:
        raise ValueError(f"plan_saved_attention: tokens must be positive, got {tokens}")
    usable = budget_gib * (1 - MARGIN)
    n = cfg.num_layers
    options = dict(rank=rank, fp8_weights=fp8_weights, fp8_dgrad=fp8_dgrad, streamed_blocks=streamed_blocks,
                   host_inputs=host_inputs, fp8_attention=fp8_attention, compiled_checkpoint=compiled_checkpoint)
    base = predicted_peak(cfg, tokens, 0, **options)
    if base["total"] > usable:
        fixes = [fix for fix, on in (("fp8_base: storage", fp8_weights), ("offload: blocks", streamed_blocks),
                                     ("host_checkpoints: true", host_inputs)) if not on]
        raise ValueError(f"a step at {tokens} tokens is predicted at {base['total']:.1f} GiB without saving any "
                         f"attention, over {usable:.1f} GiB ({budget_gib:.1f} GiB less {MARGIN:.0%}); "
                         f"use {', '.join(fixes) + ' or ' if fixes else ''}a smaller bucket or batch")
    per_block = predicted_peak(cfg, tokens, 1, **{**options, "compiled_checkpoint": False})["total"] - base["total"]
    first = compiled_call_gib(cfg, tokens, options["fp8_attention"]) if compiled_checkpoint else 0.0  # once
    fits = min(n, max(0, int((usable - base["total"] - first) // per_block)))
    # Saving follows "every_k" (blocks 0, k, 2k, ...), which gives ceil(n / k) blocks: the most of those
    # counts that fits (for 40 blocks a fit of 21-39 saves 20, of 15-19 saves 14).
    saved = len(range(0, n, -(-n // fits))) if fits else 0
    parts = predicted_peak(cfg, tokens, saved, **options)
    total = parts.pop("total")
    return ActivationPlan(blocks=n, saved_attention_blocks=saved, host_checkpoints=host_inputs,
                          predicted_peak_gib=total, budget_gib=budget_gib,
                          parts_gib={k: round(v, 2) for k, v in parts.items()},
                          compiled_checkpoint=compiled_checkpoint and saved > 0)


def plan_activations(cfg: TransformerConfig, tokens: int, budget_gib: float, *, rank: int = 32,
                     fp8_weights: bool = True, fp8_dgrad: bool = False, streamed_blocks: bool = False,
                     host_inputs: bool | None = False, host_available_gib: float = 0.0, samples: int = 1,
                     shards: int = 1, fp8_attention: bool = False, compiled_checkpoint: bool = False) -> ActivationPlan:
    """`plan_saved_attention`, choosing also where the block inputs wait when host_inputs is None: on the
    device while that saves every block; else in host memory when that is predicted faster (module
    docstring) and HOST_SHARE of `host_available_gib` (this process's share of the host) holds them.
    compiled_checkpoint: whether the keeping blocks may run the compiled checkpoint call; the plan keeps it
    where it is predicted faster (`recompute_seconds`). samples, shards: how `tokens` is made
    (`attention_forward_seconds`)."""
    options = dict(rank=rank, fp8_weights=fp8_weights, fp8_dgrad=fp8_dgrad, streamed_blocks=streamed_blocks,
                   host_inputs=host_inputs, host_available_gib=host_available_gib, samples=samples, shards=shards,
                   fp8_attention=fp8_attention)
    plans = [_place_inputs(cfg, tokens, budget_gib, compiled_checkpoint=call, **options)
             for call in ((True, False) if compiled_checkpoint else (False,))]
    return min(plans, key=lambda plan: recompute_seconds(cfg, tokens, plan, samples, shards))  # ties: the first


def _place_inputs(cfg: TransformerConfig, tokens: int, budget_gib: float, *, rank: int, fp8_weights: bool,
                  fp8_dgrad: bool, streamed_blocks: bool, host_inputs: bool | None, host_available_gib: float,
                  samples: int, shards: int, fp8_attention: bool, compiled_checkpoint: bool) -> ActivationPlan:
    """`plan_activations` for one setting of compiled_checkpoint."""
    options = dict(rank=rank, fp8_weights=fp8_weights, fp8_dgrad=fp8_dgrad, streamed_blocks=streamed_blocks,
                   fp8_attention=fp8_attention, compiled_checkpoint=compiled_checkpoint)
    if host_inputs is not None:
        return plan_saved_attention(cfg, tokens, budget_gib, host_inputs=host_inputs, **options)
    host_fits = pinned_input_bytes(cfg, tokens) <= HOST_SHARE * host_available_gib * GIB
    try:
        on_device = plan_saved_attention(cfg, tokens, budget_gib, **options)
    except ValueError:
        if not host_fits:
            raise
        return plan_saved_attention(cfg, tokens, budget_gib, host_inputs=True, **options)
    if on_device.saved_attention_blocks == cfg.num_layers or not host_fits:
        return on_device
    on_host = plan_saved_attention(cfg, tokens, budget_gib, host_inputs=True, **options)
    faster = recompute_seconds(cfg, tokens, on_host, samples, shards) < recompute_seconds(cfg, tokens, on_device,
                                                                                          samples, shards)
    return on_host if faster else on_device
