"""Export a trained expert's PEFT adapter as a LoRA file that ComfyUI, diffusers and our sampler load.

Layout (one file per expert and format; experts of one step share a folder, padded like checkpoints):

    <output_dir>/adapters/step-00002000/high_noise.safetensors             'comfy' (default)
    <output_dir>/adapters/step-00002000/low_noise.safetensors
    <output_dir>/adapters/step-00002000/diffusers/high_noise.safetensors   'peft' (diffusers names)

The diffusers files sit in their own sub-folder so a tool that applies every *.safetensors of a step
folder (sample.py --lora DIR) never applies one adapter twice. Header (all strings; keys in
`wan_model.lora_formats`): wanlora.base_model (preset), wanlora.expert, wanlora.timestep_range (JSON
[lo, hi)), wanlora.rank, wanlora.alpha, wanlora.trigger, wanlora.recipe_hash, wanlora.step, plus kohya's
ss_network_dim / ss_network_alpha, which LoRA managers display.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from wan_model.config import NUM_TRAIN_TIMESTEPS, PRESETS
from wan_model.lora_formats import (FORMATS, META_BASE_MODEL, META_EXPERT, META_TIMESTEPS, LoraModule,
                                    LoraWeights, check_lora, save_lora)

ADAPTERS_DIR = "adapters"
DIFFUSERS_SUBDIR = "diffusers"  # where format 'peft' files go inside a step folder
# PEFT names: '<prefix?><module>.lora_A[.<adapter>].weight', prefix 'base_model.model.' on a PeftModel.
_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def adapter_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """<output_dir>/adapters/step-<step, 8 digits> (the same padding as checkpoints/, so names sort by step)."""
    return Path(output_dir) / ADAPTERS_DIR / f"step-{step:08d}"


def adapter_path(output_dir: str | os.PathLike, step: int, expert: str, format: str = "comfy") -> Path:
    """File of one expert's adapter in one format; see the module docstring."""
    folder = adapter_dir(output_dir, step)
    return (folder / DIFFUSERS_SUBDIR if format == "peft" else folder) / f"{expert}.safetensors"


def lora_weights_from_peft(source: torch.nn.Module | Mapping[str, Tensor], alpha: float,
                           adapter_name: str = "default", dtype: torch.dtype | None = None) -> LoraWeights:
    """PEFT adapter on our WanTransformer -> canonical `LoraWeights` with one `alpha` for every module.

    source: the model carrying the adapter (its LoRA parameters are read, other weights ignored), or a
    state dict with keys 'blocks.0.self_attn.q.lora_A.weight' (`get_peft_model_state_dict`),
    '...lora_A.default.weight' (in-model names) or 'base_model.model....' (a PeftModel's state dict).
    dtype: cast the factors (None keeps theirs)."""
    if isinstance(source, torch.nn.Module):
        state = {k: v for k, v in source.state_dict().items() if ".lora_" in k}
    else:
        state = dict(source)
    factors: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"export: adapter key {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' "
                             f"or '<module>.lora_B.weight'); DoRA / bias / embedding adapters are not exported")
        if m.group("adapter") not in (None, adapter_name):
            continue
        factors.setdefault(m.group("module"), {})[m.group("ab")] = value.detach()
    if not factors:
        raise ValueError(f"export: no LoRA factors of adapter {adapter_name!r} found "
                         f"({len(state)} LoRA keys given, e.g. {list(state)[:2]})")
    out = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"export: module {module} has only lora_{''.join(ab)}; both lora_A and lora_B are needed")
        down, up = (ab["A"], ab["B"]) if dtype is None else (ab["A"].to(dtype), ab["B"].to(dtype))
        try:
            out[module] = LoraModule(down=down.cpu(), up=up.cpu(), alpha=float(alpha))
        except ValueError as err:
            raise ValueError(f"export: module {module}: lora_A must be [r, in] and lora_B [out, r] (PEFT layout); "
                             f"{err}") from None
    return out


def adapter_metadata(*, base_model: str, expert: str, timestep_range: tuple[int, int], rank: int, alpha: float,
                     trigger: str, recipe_hash: str, step: int) -> dict[str, str]:
    """The header of an exported adapter (all values strings)."""
    return {
        META_BASE_MODEL: base_model, META_EXPERT: expert, META_TIMESTEPS: json.dumps(list(timestep_range)),
        "wanlora.rank": str(rank), "wanlora.alpha": repr(float(alpha)), "wanlora.trigger": trigger,
        "wanlora.recipe_hash": recipe_hash, "wanlora.step": str(step),
        "ss_network_dim": str(rank), "ss_network_alpha": repr(float(alpha)),
    }


def export_expert_adapter(peft_model_or_lora_state_dict: torch.nn.Module | Mapping[str, Tensor],
                          path: str | os.PathLike, *, base_model: str, expert: str, timestep_range: tuple[int, int],
                          rank: int, alpha: float, trigger: str, recipe_hash: str, step: int,
                          formats: Sequence[str] = ("comfy",), adapter_name: str = "default",
                          dtype: torch.dtype | None = torch.bfloat16) -> list[Path]:
    """Write one expert's adapter under the run folder `path` (layout in the module docstring); returns the files.

    base_model: a preset name (shapes are checked against it); timestep_range: [lo, hi) train timesteps,
    0 <= lo < hi <= 1000; every module must have rank `rank`; dtype: of the written factors (bf16 halves
    the file; None keeps the training dtype)."""
    if base_model not in PRESETS:
        raise ValueError(f"export: base_model {base_model!r} is not a preset; choose one of {', '.join(PRESETS)}")
    if not _SAFE_NAME.match(expert):
        raise ValueError(f"export: expert name {expert!r} must be a plain file name (letters, digits, _ . -)")
    lo, hi = timestep_range
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo < hi <= NUM_TRAIN_TIMESTEPS):
        raise ValueError(f"export: timestep_range {tuple(timestep_range)} for {expert} must be integers "
                         f"0 <= lo < hi <= {NUM_TRAIN_TIMESTEPS}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"export: formats {list(formats)} must be a non-empty list of {FORMATS}")
    try:
        weights = lora_weights_from_peft(peft_model_or_lora_state_dict, alpha, adapter_name, dtype)
    except ValueError as err:
        raise ValueError(f"{err}. {adapter_path(path, step, expert, formats[0])} not written. Fix: pass the "
                         f"{expert} expert's PEFT LoRA adapter as trained (lora_A [r, in], lora_B [out, r], "
                         f"adapter {adapter_name!r}).") from None
    wrong = {n: m.rank for n, m in weights.items() if m.rank != rank}
    if wrong:
        raise ValueError(f"export: expert {expert} was declared rank {rank} but modules have other ranks: "
                         f"{dict(list(wrong.items())[:3])}; pass the rank the adapter was trained with")
    try:
        check_lora(weights, None, PRESETS[base_model].transformer)
    except ValueError as err:
        raise ValueError(f"export: {adapter_path(path, step, expert, formats[0])} not written: the {expert} adapter "
                         f"does not fit base_model {base_model!r}. {err} Fix: pass as base_model the preset the "
                         f"adapter was trained on, and an adapter of wanlora's WanTransformer (official module "
                         f"names such as 'blocks.0.self_attn.q', not diffusers' 'blocks.0.attn1.to_q').") from None
    metadata = adapter_metadata(base_model=base_model, expert=expert, timestep_range=(lo, hi), rank=rank,
                                alpha=alpha, trigger=trigger, recipe_hash=recipe_hash, step=step)
    return [save_lora(weights, adapter_path(path, step, expert, fmt), metadata, format=fmt) for fmt in formats]
