"""Apply LoRAs (`lora_formats.LoraWeights`) to a WanTransformer: merged into the weights, or attached as hooks.

Merged (`merge_loras`): for each targeted Linear, once, in float32 then cast to the weight's dtype:
    W <- W + sum_j strength_j * (alpha_j / r_j) * up_j @ down_j
Inference then costs nothing extra. The touched weights are first copied (to the CPU by default), so
`unmerge()` restores them bit for bit; subtracting the delta again would not (bf16 rounding).

Attached (`LoraSet.attach`): forward hooks add the update to each targeted block Linear's output,
    y <- y + ((x @ D^T) * c) @ U^T,   D = [down_1; down_2; ...]: [R, in], U = [up_1, up_2, ...]: [out, R],
    c: [R] float32 = strength_j * alpha_j / r_j on the rank columns of LoRA j,
so several LoRAs on one Linear cost two matmuls, and `set_strength` only rewrites c in place: switching
or weighting adapters needs no re-merge and, under torch.compile, no recompilation. Outside the blocks
(text / time embeddings, time projection, head) WanTransformer runs its Linears through `linear_fp32`,
which reads `.weight` and never calls forward, so there a weight parametrization adds U diag(c) D to the
weight instead (recomputed per forward; those modules are about 2% of the weights). While attached,
their state-dict keys read `...parametrizations.weight.original`.

Difference tensors (`lora_formats.LoraReport.diffs`: full-size additions to one parameter, as distilled LoRAs
carry them) are added in place by `add_differences` (the sampler keeps the originals to take them off).

Both accept a model with PEFT layers (the Linear inside `base_layer` is used) or a PeftModel.
Modules named by a LoRA but absent from the model are reported (returned and logged), never skipped silently.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parametrize

from .fp8 import FP8Linear
from .lora_formats import LoraModule, LoraWeights, describe_fit

log = logging.getLogger(__name__)


def _linears(model: nn.Module, names: set[str]) -> tuple[dict[str, nn.Linear], list[str]]:
    """Official module names -> the model's nn.Linear (inside PEFT wrappers); and the names it lacks."""
    if hasattr(model, "get_base_model"):  # PeftModel: names sit under base_model.model
        model = model.get_base_model()
    modules = dict(model.named_modules())
    found, missing = {}, []
    for name in sorted(names):
        module = modules.get(name)
        module = getattr(module, "base_layer", module)
        if isinstance(module, nn.Linear):
            found[name] = module
        else:
            missing.append(name)
    if missing:
        log.warning("LoRA targets missing from the model (not applied): %s", ", ".join(missing))
    return found, missing


def _check_shape(name: str, linear: nn.Linear, mod: LoraModule, weights: LoraWeights) -> None:
    got = (mod.down.shape[1], mod.up.shape[0])
    if got != (linear.in_features, linear.out_features):
        raise ValueError(f"LoRA module {name}: in {got[0]} -> out {got[1]}, but the model's Linear is in "
                         f"{linear.in_features} -> out {linear.out_features}. {describe_fit(weights)}")


@dataclass
class MergedLoras:
    """Handle returned by `merge_loras`: which modules changed, which targets were missing, and the originals."""

    model: nn.Module
    merged: list[str]
    missing: list[str]
    kept_originals: bool = True  # False: merged with backup_device=None, cannot unmerge
    _originals: dict[str, tuple[nn.Linear, Tensor]] = field(repr=False, default_factory=dict)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Put the original weights back, bit for bit; a second call does nothing."""
        if not self.kept_originals:
            raise RuntimeError("merge_loras(..., backup_device=None) kept no originals, so it cannot unmerge; "
                               "reload the model, or merge with backup_device='cpu'")
        for linear, original in self._originals.values():
            linear.weight.copy_(original.to(linear.weight.device, non_blocking=True))
        self._originals.clear()


@torch.no_grad()
def merge_loras(model: nn.Module, loras: Sequence[tuple[LoraWeights, float]],
                backup_device: torch.device | str | None = "cpu") -> MergedLoras:
    """Merge `[(weights, strength), ...]` into the model's Linear weights (formula in the module docstring).

    Each weight is rounded once, whatever the number of LoRAs. Modules whose strengths are all 0 are not
    touched. The original of every touched weight is kept on `backup_device` for `unmerge()` (LoRA on every
    block Linear of an A14B expert: 40 x 351M weights = 28 GB in bf16); None keeps nothing (merge for good)."""
    names = {n for weights, s in loras if s != 0 for n in weights}
    linears, missing = _linears(model, names)
    for weights, _ in loras:
        for name, mod in weights.items():
            if name in linears:
                _check_shape(name, linears[name], mod, weights)
    quantised = [n for n, linear in linears.items() if isinstance(linear, FP8Linear)]
    if quantised:  # its `weight` is a dequantised copy: writing into it would change nothing
        raise ValueError(f"cannot merge a LoRA into {quantised[0]}: its weight is stored in fp8; attach the LoRA "
                         "instead (LoraSet) or load the model in bf16")
    computed = [n for n, linear in linears.items() if parametrize.is_parametrized(linear, "weight")]
    if computed:  # an attached set's parametrization computes `weight`: a merge would write into a copy
        raise ValueError(f"cannot merge a LoRA into {computed[0]} while a LoraSet is attached to it; merge "
                         "before attaching, or detach first")
    handle = MergedLoras(model=model, merged=sorted(linears), missing=missing,
                         kept_originals=backup_device is not None)
    for name, linear in linears.items():
        weight = linear.weight
        delta = sum(s * weights[name].delta(weight.device) for weights, s in loras if s != 0 and name in weights)
        if backup_device is not None:
            handle._originals[name] = (linear, weight.detach().to(backup_device, copy=True))
        weight.copy_((weight.float() + delta).to(weight.dtype))
    return handle


@dataclass
class _Target:
    """Stacked factors of the LoRAs on one Linear: down [R, in], up [out, R], coef [R] float32."""

    down: Tensor
    up: Tensor
    coef: Tensor
    columns: dict[str, slice]  # LoRA name -> its rank columns in down / up / coef
    active: bool = True


class _LoraSlot:
    """What a block Linear's LoRA hook adds now: a `_Target`, or None. One slot and one hook per Linear
    for the module's life; attaching and detaching only fill and empty the slot. Why: torch.compile does
    not guard on module hooks, so a hook added after a block was compiled would be ignored silently,
    while a changed slot is seen (its contents are guarded: None or not, `active`, the factor shapes)."""

    def __init__(self):
        self.target: _Target | None = None

    def __deepcopy__(self, memo) -> "_LoraSlot":
        # A copied model gets an empty slot: the attached set belongs to the original (detach before
        # copying to copy a model without LoRA; attach a set to the copy to give it one).
        return _LoraSlot()


def install_lora_slots(model: nn.Module) -> int:
    """Give every block Linear of `model` its LoRA slot and hook now (before compiling its blocks);
    returns how many were added. Idempotent."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    count = 0
    for name, module in model.named_modules():
        module = getattr(module, "base_layer", module)
        if name.startswith("blocks.") and isinstance(module, nn.Linear) and not hasattr(module, "_lora_slot"):
            _slot(module)
            count += 1
    return count


def _slot(linear: nn.Linear) -> _LoraSlot:
    slot = linear.__dict__.get("_lora_slot")
    if slot is None:
        slot = linear.__dict__["_lora_slot"] = _LoraSlot()
        linear.register_forward_hook(_add_lora)
    return slot


def _add_lora(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    """Forward hook: y + ((x @ D^T) * c) @ U^T; the base output itself when the module's slot is empty or
    every strength is 0. The slot is read from the module, so a copied model uses its own."""
    target = module._lora_slot.target
    if target is None or not target.active:
        return out
    h = (F.linear(args[0].to(target.down.dtype), target.down).float() * target.coef).to(target.up.dtype)
    if out.dtype != target.up.dtype:
        return out + F.linear(h, target.up).to(out.dtype)
    # addmm adds y in the GEMM epilogue: one pass over the [*, out] output instead of two.
    return torch.addmm(out.reshape(-1, out.shape[-1]), h.reshape(-1, h.shape[-1]), target.up.t()).view_as(out)


class _WeightDelta(nn.Module):
    """Parametrization W -> W + (U * c) @ D, in float32 then cast to W's dtype; W itself when all strengths are 0."""

    def __init__(self, target: _Target):
        super().__init__()
        self.target = target

    def forward(self, weight: Tensor) -> Tensor:
        t = self.target
        if not t.active:
            return weight
        return (weight.float() + (t.up.float() * t.coef) @ t.down.float()).to(weight.dtype)


class LoraSet:
    """Named LoRAs with a strength each, attached to a model as forward hooks (unmerged). One set per model
    at a time: LoRAs that should act together stack inside one set (two matmuls per Linear for all).

        lora_set = LoraSet({"style": (style_weights, 1.0), "motion": (motion_weights, 0.6)})
        missing = lora_set.attach(model)
        lora_set.set_strength("style", 0.0)
        lora_set.detach()
    """

    def __init__(self, loras: Mapping[str, tuple[LoraWeights, float]]):
        self.loras = {name: weights for name, (weights, _) in loras.items()}
        self.strengths = {name: float(s) for name, (_, s) in loras.items()}
        self._targets: dict[str, _Target] = {}
        self._undo: list[Callable[[], object]] = []  # removes one hook or parametrization each

    def attach(self, model: nn.Module) -> list[str]:
        """Hook every targeted Linear of `model`; the factors are copied to its dtype and device.

        Returns the targets the model does not have (also logged). Attach once; `detach()` before re-attaching."""
        if self._undo:
            raise RuntimeError("LoraSet is already attached; call detach() first")
        linears, missing = _linears(model, {n for weights in self.loras.values() for n in weights})
        taken = [n for n, linear in linears.items()
                 if (getattr(linear.__dict__.get("_lora_slot"), "target", None) is not None if n.startswith("blocks.")
                     else parametrize.is_parametrized(linear, "weight"))]
        if taken:  # checked before anything is attached, so a refusal leaves the model as it was
            raise RuntimeError(f"{taken[0]} already has a LoraSet attached: one set per model (stack LoRAs "
                               "inside one LoraSet); detach the other first")
        try:
            self._attach(linears)
        except BaseException:
            self.detach()
            raise
        self._refresh()
        return missing

    def _attach(self, linears: dict[str, nn.Linear]) -> None:
        for name, linear in linears.items():
            target = self._targets[name] = self._stack(name, linear)
            if name.startswith("blocks."):
                slot = _slot(linear)
                slot.target = target
                self._undo.append(lambda slot=slot: setattr(slot, "target", None))
            else:  # called through linear_fp32 (reads .weight, skips forward hooks): see the module docstring
                parametrize.register_parametrization(linear, "weight", _WeightDelta(target))
                self._undo.append(lambda linear=linear: parametrize.remove_parametrizations(
                    linear, "weight", leave_parametrized=False))

    def _stack(self, name: str, linear: nn.Linear) -> _Target:
        # An fp8 Linear's `weight` dequantises a copy: read its compute dtype and device instead.
        dtype = getattr(linear, "compute_dtype", None) or linear.weight.dtype
        device = linear.bias.device if linear.bias is not None else next(linear.buffers(), linear.weight).device
        downs, ups, columns, start = [], [], {}, 0
        for lora, weights in self.loras.items():
            if name in weights:
                mod = weights[name]
                _check_shape(name, linear, mod, weights)
                downs.append(mod.down.to(device, dtype))
                ups.append(mod.up.to(device, dtype))
                columns[lora] = slice(start, start + mod.rank)
                start += mod.rank
        coef = torch.zeros(start, dtype=torch.float32, device=device)
        return _Target(torch.cat(downs), torch.cat(ups, dim=1), coef, columns)

    def set_strength(self, name: str, strength: float) -> None:
        """Change one LoRA's strength (in place; 0 removes its contribution exactly)."""
        if name not in self.loras:
            raise KeyError(f"LoraSet has no LoRA named {name!r}; it has {sorted(self.loras)}")
        self.strengths[name] = float(strength)
        self._refresh()

    @torch.no_grad()
    def _refresh(self) -> None:
        """Write strength * alpha / r into every target's coefficient columns; a target whose
        coefficients are all 0 is skipped in forward, so its output is the base output bit for bit."""
        for name, target in self._targets.items():
            for lora, cols in target.columns.items():
                target.coef[cols] = self.strengths[lora] * self.loras[lora][name].scale
            target.active = any(self.strengths[lora] != 0 for lora in target.columns)

    def detach(self) -> None:
        """Remove every hook and parametrization (the original weights are back untouched); free the factors."""
        for undo in self._undo:
            undo()
        self._undo.clear()
        self._targets.clear()


def _is_path(spec: str) -> bool:
    """The spec, or the spec less a ':STRENGTH' suffix, names an existing file or folder."""
    head, _, tail = spec.rpartition(":")
    return Path(spec).exists() or (bool(head) and re.fullmatch(r"[-+0-9.eE]+", tail) is not None and Path(head).exists())


def parse_lora_spec(spec: str) -> tuple[Path, float, str | None]:
    """Command-line LoRA 'PATH[:STRENGTH][@EXPERT]' -> (path, strength, expert or None).

    'out/adapters/step-00002000:0.8@high_noise' -> (Path('out/adapters/step-00002000'), 0.8, 'high_noise');
    an '@' that is part of an existing path ('style@v2.safetensors') is not an expert suffix;
    strength defaults to 1.0; a ':' not followed by a number stays part of the path, unless the part before
    it exists and the whole does not (then the strength is malformed: ValueError)."""
    rest, expert = spec, None
    if "@" in rest and not _is_path(spec):  # a file may have '@' in its name: then it is no expert suffix
        rest, expert = rest.rsplit("@", 1)
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", expert):
            raise ValueError(f"LoRA spec {spec!r}: expert {expert!r} after '@' must be a name such as high_noise")
    strength = 1.0
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        try:
            strength, rest = float(tail), head
        except ValueError:
            if Path(head).exists() and not Path(rest).exists():
                raise ValueError(f"LoRA spec {spec!r}: strength {tail!r} after ':' is not a number; "
                                 f"write e.g. {head}:0.8") from None
    if not rest:
        raise ValueError(f"LoRA spec {spec!r} has no path; expected PATH[:STRENGTH][@EXPERT]")
    return Path(rest), strength, expert


# ------------------------------------------------------------------ difference tensors (.diff / .diff_b)

def difference_target(model: nn.Module, parameter: str, path: Path | None = None) -> torch.Tensor:
    """The tensor a LoRA file's difference for `parameter` is added to: under a PEFT wrapper its base layer's,
    under an attached weight parametrization the stored original. ValueError when it cannot take one."""
    module_name, _, attr = parameter.rpartition(".")
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    module = getattr(model.get_submodule(module_name), "base_layer", model.get_submodule(module_name))
    if isinstance(module, FP8Linear) and attr == "weight":
        raise ValueError(f"{path}: the difference for {parameter} needs its weight in bf16, but it is stored in fp8; "
                         f"drop the fp8 weights option to apply this LoRA")
    if parametrize.is_parametrized(module, attr):
        return getattr(module.parametrizations, attr).original
    return getattr(module, attr)


@torch.no_grad()
def add_differences(model: nn.Module, loras: list[tuple[dict[str, torch.Tensor], float]]) -> None:
    """Add sum_j strength_j x difference_j to each named parameter, in float32, rounded once (as ComfyUI adds
    `.diff` / `.diff_b`)."""
    for parameter in {p for diffs, _ in loras for p in diffs}:
        target = difference_target(model, parameter)
        total = sum(s * diffs[parameter].float() for diffs, s in loras if parameter in diffs and s != 0)
        if isinstance(total, torch.Tensor):
            target.copy_((target.float() + total.to(target.device)).to(target.dtype))
