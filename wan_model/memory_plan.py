"""How many blocks may keep their self-attention outputs through checkpointing, from a memory budget.

Issue 16's `speed.save: auto`, first half: the arithmetic, fitted to measured peaks. Not yet wired into
the trainer (that, and the GPU check of the peak it predicts, is the next step); `bench`/tests use it.

Peak memory of one LoRA training step with every block checkpointed and the block weights resident, in
bytes, for L tokens (x batch), width d, FFN width f, n blocks, H heads, LoRA rank r:

    setup      = block linears (1 byte per weight in fp8, 2 in bf16) + the rest of the model in bf16
                 + LoRA weights in fp32                               (what is allocated before the step)
    lora_state = 3 x 4 x P_lora          gradients and AdamW's two moments, fp32 (P_lora = LoRA parameters)
    inputs     = n x L d x 2             each block's checkpointed input, bf16
    saved      = k x (L d x 2 + H L x 4) k blocks keep self-attention's output and log-sum-exp
    transient  = a x L d x 2 + b x L f x 2   one block's recompute and backward in flight
                 (+ c x L f x 2 with fp8 input gradients, `matmul_dgrad`: the FFN's float32 dy copy)
    peak       = setup + lora_state + inputs + saved + transient

a and b are fitted on two measured runs with no saved attention (A14B expert 1280x720x81, compile + fp8
matmul: 66.37 GiB, H100, 3694217; TI2V-5B 704x1280x121, compile + fp8 storage: 17.01 GiB, H100,
3694217): a = 15.5, b = 5.4. Checked on two runs that save attention in every block, not used in the fit
(A14B 480x832x81, fp8 matmul, H100, 3694217: 49.87 GiB measured, 50.40 predicted; TI2V-5B, fp8 matmul,
H200, 017da45: 21.44 measured, 21.74 predicted): the model errs on the safe side by up to 1.4%. c = 1.5
from the same two shapes with `matmul_dgrad` (H200, 101edab: 51.1 and 22.53 GiB). The figures are
`max_memory_allocated`; a cap limits what the allocator reserves, and MARGIN is the allowance for that
difference (not yet measured). `plan_saved_attention` keeps MARGIN of the budget free.
Block streaming (`offload: blocks`) and host checkpoints change the terms and are not planned here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import TransformerConfig

GIB = 2**30
TRANSIENT_PER_TOKEN_DIM = 15.5   # a: transient memory in units of one L x d bf16 tensor
TRANSIENT_PER_TOKEN_FFN = 5.4    # b: in units of one L x f bf16 tensor
TRANSIENT_DGRAD_PER_TOKEN_FFN = 1.5  # c: fp8 input gradients' extra, in units of one L x f bf16 tensor
MARGIN = 0.04                    # fraction of the budget kept free beyond the prediction


@dataclass(frozen=True)
class ActivationPlan:
    """`saved_attention_blocks` of `blocks` keep their self-attention outputs; the predicted peak and
    its parts in GiB."""

    blocks: int
    saved_attention_blocks: int
    predicted_peak_gib: float
    budget_gib: float
    parts_gib: dict[str, float]

    @property
    def save_attention_every(self) -> int | None:
        """The `save_attention_every` k of SpeedOptions' "every_k" (blocks 0, k, 2k, ... save): the plan's
        count is already one that every_k can give exactly; None when no block saves."""
        if self.saved_attention_blocks == 0:
            return None
        return -(-self.blocks // self.saved_attention_blocks)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts_gib.items())
        return (f"memory plan: {self.saved_attention_blocks} of {self.blocks} blocks keep self-attention; "
                f"predicted peak {self.predicted_peak_gib:.1f} GiB of a {self.budget_gib:.1f} GiB budget "
                f"({MARGIN:.0%} kept free; {parts})")


def lora_parameters(cfg: TransformerConfig, rank: int) -> int:
    """LoRA parameters on the ten block linears: r x (in + out) each."""
    d, f = cfg.dim, cfg.ffn_dim
    return cfg.num_layers * rank * (8 * (d + d) + 2 * (d + f))


def model_bytes(cfg: TransformerConfig, fp8_weights: bool) -> int:
    """The expert's weights as the trainer holds them: block linears in e4m3 or bf16, everything else bf16."""
    d, f = cfg.dim, cfg.ffn_dim
    block_linear = 8 * d * d + 2 * d * f
    block_other = 8 * d + d + f + 6 * d + 4 * d + 2 * d   # biases, modulation, q/k norms, cross-attn norm
    rest = (cfg.in_dim * d * 4 + cfg.text_dim * d + d * d + cfg.freq_dim * d + d * d + d * 6 * d
            + d * cfg.out_dim * 4 + 2 * d)
    per_weight = 1 if fp8_weights else 2
    return cfg.num_layers * (block_linear * per_weight + block_other * 2) + rest * 2


def predicted_peak(cfg: TransformerConfig, tokens: int, saved_blocks: int, *, rank: int = 32,
                   fp8_weights: bool = True, fp8_dgrad: bool = False) -> dict[str, float]:
    """The peak's parts in GiB (module docstring) with `saved_blocks` blocks keeping self-attention."""
    d, f, n, h = cfg.dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads
    lora = lora_parameters(cfg, rank)
    parts = {
        "setup": (model_bytes(cfg, fp8_weights) + 4 * lora) / GIB,
        "lora_state": 12 * lora / GIB,
        "inputs": n * tokens * d * 2 / GIB,
        "saved_attention": saved_blocks * (tokens * d * 2 + h * tokens * 4) / GIB,
        "transient": (TRANSIENT_PER_TOKEN_DIM * tokens * d * 2
                      + (TRANSIENT_PER_TOKEN_FFN + TRANSIENT_DGRAD_PER_TOKEN_FFN * fp8_dgrad) * tokens * f * 2) / GIB,
    }
    parts["total"] = sum(parts.values())
    return parts


def plan_saved_attention(cfg: TransformerConfig, tokens: int, budget_gib: float, *, rank: int = 32,
                         fp8_weights: bool = True, fp8_dgrad: bool = False) -> ActivationPlan:
    """The most blocks that may keep self-attention with the predicted peak within (1 - MARGIN) x budget.

    tokens: video tokens of the largest bucket times the batch size. Raises ValueError when even no saved
    block fits, naming what would (fp8 weights, block streaming, host checkpoints)."""
    if tokens <= 0:
        raise ValueError(f"plan_saved_attention: tokens must be positive, got {tokens}")
    usable = budget_gib * (1 - MARGIN)
    n = cfg.num_layers
    options = dict(rank=rank, fp8_weights=fp8_weights, fp8_dgrad=fp8_dgrad)
    base = predicted_peak(cfg, tokens, 0, **options)
    if base["total"] > usable:
        raise ValueError(f"a step at {tokens} tokens is predicted at {base['total']:.1f} GiB without saving any "
                         f"attention, over {usable:.1f} GiB ({budget_gib:.1f} GiB less {MARGIN:.0%}); "
                         f"{'set fp8_base: storage, ' if not fp8_weights else ''}use offload: blocks with "
                         "host_checkpoints: true, or a smaller bucket")
    per_block = predicted_peak(cfg, tokens, 1, **options)["total"] - base["total"]
    fits = min(n, int((usable - base["total"]) // per_block))
    # Saving follows "every_k" (blocks 0, k, 2k, ...), which gives ceil(n / k) blocks: the most of those
    # counts that fits (for 40 blocks a fit of 21-39 saves 20, of 15-19 saves 14).
    saved = len(range(0, n, -(-n // fits))) if fits else 0
    parts = predicted_peak(cfg, tokens, saved, **options)
    total = parts.pop("total")
    return ActivationPlan(blocks=n, saved_attention_blocks=saved, predicted_peak_gib=total, budget_gib=budget_gib,
                          parts_gib={k: round(v, 2) for k, v in parts.items()})
