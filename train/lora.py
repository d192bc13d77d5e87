"""LoRA adapters on a Wan DiT expert, with the expert's own optimizer and LR schedule.

Each adapted linear computes y = W x + (alpha / r) * B(A(dropout(x))), A: [r, in] (Kaiming), B: [out, r]
(zeros, so training starts from the base model). Base weights are frozen in the training precision
(bf16); A and B are float32 so small updates are not rounded away, and autocast runs their matmuls in bf16.
"""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from .recipe import LoraSettings, LRScheduleSettings, OptimizerSettings

ADAPTER = "default"


def attach_lora(model: torch.nn.Module, settings: LoraSettings, seed: int) -> list[torch.nn.Parameter]:
    """Freeze `model` and inject LoRA layers in place; returns the LoRA parameters (float32, trainable).

    A's initialisation draws from a generator seeded by `seed`, so an expert's starting adapter does not
    depend on what was built before it."""
    model.requires_grad_(False)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(settings.target_modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        except ValueError as err:
            raise ValueError(f"LoRA target_modules {list(settings.target_modules)} match no layer of the model "
                             f"({err}); use official names such as 'self_attn.q', 'ffn.0'") from None
    params = []
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            params.append(p)
    return params


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters by their in-model names ('blocks.0.self_attn.q.lora_A.default.weight')."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-format adapter weights ('blocks.0.self_attn.q.lora_A.weight'), detached, on CPU."""
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def make_optimizer(params: list[torch.nn.Parameter], settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over one expert's LoRA weights. Only stepped on that expert's steps, so its moments and
    weight decay never act on a step routed to another expert."""
    return torch.optim.AdamW(params, lr=settings.lr, betas=tuple(settings.betas), eps=settings.eps,
                             weight_decay=settings.weight_decay)


def lr_factor(update: int, settings: LRScheduleSettings, total_updates: int) -> float:
    """Multiplier of the base lr at this expert's `update`-th optimizer step (0-based):
    warm-up (u + 1) / warmup for u < warmup, then with p = (u - warmup) / max(1, total - warmup):
    constant 1, linear 1 - p, cosine 0.5 * (1 + cos(pi * p))."""
    warm = settings.warmup_steps
    if update < warm:
        return (update + 1) / warm
    p = min(1.0, (update - warm) / max(1, total_updates - warm))
    if settings.kind == "constant":
        return 1.0
    if settings.kind == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def make_scheduler(optimizer: torch.optim.Optimizer, settings: LRScheduleSettings,
                   total_updates: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per update of its own expert (so warm-up counts that expert's steps)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: lr_factor(u, settings, total_updates))
