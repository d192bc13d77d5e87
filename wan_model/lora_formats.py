"""LoRA files for the Wan 2.2 DiT: one in-memory form, two writers, one reader for the four layouts in the wild.

Canonical form: `LoraWeights = {official module name: LoraModule(down [r, in], up [out, r], alpha)}`, e.g.
`'blocks.0.self_attn.q'`; the module adds `alpha / r * up @ down` to its weight.

Layouts (`save_lora` writes the first two, `load_lora` reads all four, mixed files included):
  * "comfy" (our default; ComfyUI and diffusers both load it): `diffusion_model.blocks.0.self_attn.q.lora_A.weight`,
    `.lora_B.weight`, `.alpha` (scalar float32). diffusers reads `.alpha` only inside `blocks.N`; on the
    embeddings and head it would refuse the file, so there the writer folds alpha / r into `lora_B` and
    writes no alpha (scale 1, the same product).
  * "comfy-original": the same names with `lora_down` / `lora_up`.
  * "peft" (diffusers `WanPipeline.save_lora_weights`): `transformer.blocks.0.attn1.to_q.lora_A.weight`
    (diffusers module names, `keymaps`), and the PEFT `LoraConfig` keywords (`r`, `lora_alpha`,
    `rank_pattern`, `alpha_pattern`, `target_modules`) as JSON under the header key `lora_adapter_metadata`
    with a `transformer.` prefix; without that entry alpha = r.
  * "kohya" (musubi-tuner): `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.lora_up.weight`, `.alpha`;
    the underscored names are resolved against the module list of the model, never by guessing where
    the dots were (`self_attn`, `cross_attn`, `time_projection` contain underscores).
Difference tensors (ComfyUI's `.diff` / `.diff_b` / `.diff_m`, as distilled LoRAs such as lightx2v carry next to
their factors) are full-size additions to one parameter: `<module>.diff` to its weight, `.diff_b` to its bias,
`blocks.N.diff_m` to the block's modulation table. They are returned in `LoraReport.diffs` by parameter name
(the sampler adds strength x difference, as ComfyUI does). Keys that match no module are returned in the
report with the reason; Wan 2.1 I2V image-branch keys
(`k_img`, `v_img`, `img_emb`) name that model, and shapes of another size name the presets they fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .files import atomic_write
from .config import PRESETS, TransformerConfig
from .keymaps import COMFY_PREFIXES, diffusers_key_to_official, official_key_to_diffusers
from .transformer import WanTransformer

FORMATS = ("comfy", "peft")
# Header keys of our exports (train/export.py writes them, samplers read them; all values are strings).
META_BASE_MODEL = "wanlora.base_model"  # preset name, 't2v-A14B'
META_EXPERT = "wanlora.expert"  # 'high_noise' | 'low_noise' | 'dense'
META_TIMESTEPS = "wanlora.timestep_range"  # JSON [lo, hi): train timesteps the expert covers
PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PEFT_PREFIX = "transformer."  # diffusers' WanLoraLoaderMixin.transformer_name
KOHYA_PREFIX = "lora_unet_"
_PEFT_MODEL_PREFIX = "base_model.model."  # a PeftModel's own state dict
# Wan 2.1 I2V-14B has a CLIP image branch Wan 2.2 dropped: per-block k_img / v_img (+ norm_k_img) and img_emb;
# diffusers names them add_k_proj / add_v_proj and condition_embedder.image_embedder.
_WAN21_I2V_MARKERS = ("k_img", "v_img", "img_emb", "add_k_proj", "add_v_proj", "image_embedder")
WAN21_I2V = "Wan 2.1 I2V-14B LoRA"
# Released widths outside PRESETS, so a LoRA for them is named rather than called unknown.
_OTHER_MODELS_BY_DIM = {1536: "Wan 2.1 T2V-1.3B", 5120: "Wan 2.1 T2V/I2V-14B"}
_ROLE_SUFFIXES = {".lora_A.weight": "down", ".lora_down.weight": "down",
                  ".lora_B.weight": "up", ".lora_up.weight": "up", ".alpha": "alpha"}


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update of a Linear: W <- W + (alpha / r) * up @ down.

    down: [r, in] (PEFT lora_A, kohya lora_down); up: [out, r] (lora_B, lora_up); alpha: float."""

    down: Tensor
    up: Tensor
    alpha: float

    def __post_init__(self) -> None:
        if self.down.ndim != 2 or self.up.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LoraModule: expected down [r, in] and up [out, r] with the same r, got down "
                             f"{tuple(self.down.shape)} and up {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """(alpha / r) * up @ down: [out, in] float32 (on `device`, default where the factors are)."""
        up, down = self.up.to(device, torch.float32), self.down.to(device, torch.float32)
        return (up * self.scale) @ down


LoraWeights = dict[str, LoraModule]


@dataclass
class LoraReport:
    """What `load_lora` found besides the weights.

    format: the layouts seen, '+'-joined when mixed ('comfy', 'comfy-original', 'peft', 'kohya');
    unmatched: file key -> why it was not used; foreign_model: e.g. 'Wan 2.1 I2V-14B LoRA' when keys of
    another model were recognised; metadata: the safetensors header (str -> str); diffs: official parameter
    name ('blocks.0.self_attn.q.bias') -> the full-size difference the file adds to it (module docstring)."""

    path: str
    format: str
    unmatched: dict[str, str] = field(default_factory=dict)
    foreign_model: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    diffs: dict[str, Tensor] = field(default_factory=dict)
    diff_keys: dict[str, str] = field(default_factory=dict)  # parameter -> the file key it was read from


# ------------------------------------------------------------------------------------------- module list

@lru_cache(maxsize=16)
def lora_targets(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """Every nn.Linear of `WanTransformer(config)`: official name -> (in_features, out_features).

    Built on the meta device (no memory, milliseconds even for A14B), so the list is the model's own."""
    with torch.device("meta"):
        model = WanTransformer(config)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


@lru_cache(maxsize=16)
def parameter_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of `WanTransformer(config)`: official name -> shape (built on the meta device)."""
    with torch.device("meta"):
        model = WanTransformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _names_for_layers(num_layers: int) -> frozenset[str]:
    """Module names of a DiT with `num_layers` blocks (names do not depend on widths)."""
    template = PRESETS["tiny-t2v"].transformer
    return frozenset(lora_targets(dataclasses.replace(template, num_layers=max(num_layers, 1))))


def kohya_name(module: str) -> str:
    """'blocks.0.self_attn.q' -> 'lora_unet_blocks_0_self_attn_q' (kohya / musubi-tuner)."""
    return KOHYA_PREFIX + module.replace(".", "_")


# ------------------------------------------------------------------------------------------------ writers

def save_lora(weights: Mapping[str, LoraModule], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
              format: str = "comfy") -> Path:
    """Write `weights` to one .safetensors file (atomically) with `metadata` in its header; returns the path.

    format 'comfy': diffusion_model.<official>.lora_A/.lora_B/.alpha; 'peft': diffusers names plus the
    LoraConfig JSON (see the module docstring)."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"save_lora: format must be one of {FORMATS}, got {format!r}")
    header = _check_metadata(metadata or {}, path)
    if not weights:
        raise ValueError(f"save_lora {path}: no LoRA modules to write")
    if format == "comfy":
        tensors = _comfy_tensors(weights)
    else:
        tensors = _peft_tensors(weights)
        header[PEFT_METADATA_KEY] = json.dumps(_peft_config(weights), indent=2, sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Copies: safetensors refuses tensors sharing memory (one LoraModule reused for two names).
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", **header}))
    return path


def _check_metadata(metadata: Mapping[str, str], path: Path) -> dict[str, str]:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"save_lora {path}: safetensors metadata must map str to str; not strings: {bad} "
                        f"(json.dumps numbers and lists first)")
    if PEFT_METADATA_KEY in metadata:
        raise ValueError(f"save_lora {path}: metadata key {PEFT_METADATA_KEY!r} is reserved (diffusers reads it "
                         f"as a LoraConfig); the peft writer fills it")
    return dict(metadata)


def _comfy_tensors(weights: Mapping[str, LoraModule]) -> dict[str, Tensor]:
    out = {}
    for name, mod in weights.items():
        key = f"diffusion_model.{name}"
        up = mod.up
        if name.startswith("blocks."):
            out[f"{key}.alpha"] = torch.tensor(mod.alpha, dtype=torch.float32)
        elif mod.alpha != mod.rank:  # outside the blocks diffusers has no alpha: fold it into up
            up = (up.float() * mod.scale).to(up.dtype)
        out[f"{key}.lora_A.weight"] = mod.down
        out[f"{key}.lora_B.weight"] = up
    return out


def _peft_tensors(weights: Mapping[str, LoraModule]) -> dict[str, Tensor]:
    out = {}
    for name, mod in weights.items():
        key = PEFT_PREFIX + official_key_to_diffusers(name)
        out[f"{key}.lora_A.weight"] = mod.down
        out[f"{key}.lora_B.weight"] = mod.up
    return out


def _peft_config(weights: Mapping[str, LoraModule]) -> dict:
    """LoraConfig keywords, `transformer.`-prefixed: the most common rank / alpha, exact-name patterns for the rest."""
    names = {name: official_key_to_diffusers(name) for name in weights}
    r = Counter(m.rank for m in weights.values()).most_common(1)[0][0]
    alpha = Counter(m.alpha for m in weights.values()).most_common(1)[0][0]
    # PEFT matches a pattern p against a module name n as re.match(rf"(.*\.)?({p})$", n); '^' pins the start.
    rank_pattern = {"^" + re.escape(names[k]): m.rank for k, m in weights.items() if m.rank != r}
    alpha_pattern = {"^" + re.escape(names[k]): m.alpha for k, m in weights.items() if m.alpha != alpha}
    config = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
              "target_modules": sorted(names.values()), "use_dora": False, "use_rslora": False, "lora_bias": False}
    return {PEFT_PREFIX + k: v for k, v in config.items()}


# ------------------------------------------------------------------------------------------------ reader

def load_lora(path: str | os.PathLike, config: TransformerConfig | None = None) -> tuple[LoraWeights, LoraReport]:
    """Read a LoRA .safetensors in any of the four layouts -> (canonical weights, report).

    With `config`, the result is checked against that model (`check_lora`): a Wan 2.1 I2V file, a module the
    model lacks or a shape of another model size raise ValueError naming what the file fits."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata() or {})
    weights, report = parse_lora_state_dict(tensors, header, where=str(path))
    if config is not None:
        check_lora(weights, report, config)
    return weights, report


def parse_lora_state_dict(tensors: Mapping[str, Tensor], header: Mapping[str, str] | None = None,
                          where: str = "<state dict>") -> tuple[LoraWeights, LoraReport]:
    """`load_lora` on tensors already in memory (header: the safetensors metadata, if any)."""
    header = dict(header or {})
    names = _names_for_layers(_num_layers(tensors))
    kohya = {kohya_name(n): n for n in names}
    report = LoraReport(path=where, format="")
    parts: dict[str, dict[str, tuple[str, Tensor]]] = {}
    layouts: set[str] = set()
    for key, value in tensors.items():
        parameter = _difference_parameter(key)
        if parameter is not None:
            report.diffs[parameter] = value
            report.diff_keys[parameter] = key
            continue
        found = _resolve(key, names, kohya)
        if isinstance(found, str):
            report.unmatched[key] = found
            if found.startswith(WAN21_I2V):
                report.foreign_model = WAN21_I2V
            continue
        module, role, layout = found
        if role != "alpha":  # an alpha key looks the same in the comfy and comfy-original layouts
            layouts.add(layout)
        parts.setdefault(module, {})[role] = (key, value)
    alphas = _peft_alphas(header, where) if "peft" in layouts else None
    weights: LoraWeights = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "lora_B / lora_up" if "up" not in roles else "lora_A / lora_down"
            for key, _ in roles.values():
                report.unmatched[key] = f"module {module} has no {missing} factor in the file"
            continue
        down, up = roles["down"][1], roles["up"][1]
        alpha = float(roles["alpha"][1].item()) if "alpha" in roles else None
        if alpha is None and alphas is not None:
            alpha = alphas(official_key_to_diffusers(module), down.shape[0])
        weights[module] = LoraModule(down=down, up=up, alpha=float(down.shape[0]) if alpha is None else alpha)
    report.format = "+".join(sorted(layouts)) or ("differences" if report.diffs else "unknown")
    report.metadata = {k: v for k, v in header.items() if k != "format"}
    return weights, report


def _num_layers(keys: Iterable[str]) -> int:
    """1 + the highest block index in any key ('blocks.7.' or kohya 'blocks_7_')."""
    found = [int(m.group(1)) for k in keys for m in [re.search(r"blocks[._](\d+)[._]", k)] if m]
    return max(found, default=-1) + 1


_DIFF_SUFFIXES = {".diff": "weight", ".diff_b": "bias"}


def _difference_parameter(key: str) -> str | None:
    """The official parameter a difference key adds to ('diffusion_model.blocks.0.self_attn.q.diff_b' ->
    'blocks.0.self_attn.q.bias'; 'blocks.3.diff_m' -> 'blocks.3.modulation'), or None for other keys.
    Whether the model has that parameter is checked where it is applied."""
    stem = next((key[len(p):] for p in COMFY_PREFIXES if key.startswith(p)), key)
    if stem.endswith(".diff_m"):
        return stem[: -len(".diff_m")] + ".modulation"
    suffix = next((x for x in _DIFF_SUFFIXES if stem.endswith(x)), None)
    if suffix is None or any(marker in stem for marker in _WAN21_I2V_MARKERS):
        return None  # Wan 2.1 image-branch differences are reported with that model's other keys
    owner = stem[: -len(suffix)]
    if owner.endswith("modulation") and suffix == ".diff":
        return owner  # a modulation table is a parameter itself ('blocks.0.modulation.diff', ComfyUI's name)
    return owner + "." + _DIFF_SUFFIXES[suffix]


def _resolve(key: str, names: frozenset[str], kohya: Mapping[str, str]) -> tuple[str, str, str] | str:
    """File key -> (official module, 'down'|'up'|'alpha', layout), or the reason it matches nothing."""
    if any(marker in key for marker in _WAN21_I2V_MARKERS):
        return (f"{WAN21_I2V}: image-branch module (k_img / v_img / img_emb) of Wan 2.1 I2V-14B; "
                f"Wan 2.2 has no CLIP image branch")
    suffix = next((s for s in _ROLE_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return "not a LoRA factor (expected .lora_A/.lora_B/.lora_down/.lora_up .weight, .alpha or .diff/.diff_b)"
    role, stem = _ROLE_SUFFIXES[suffix], key[: -len(suffix)]
    original = suffix in (".lora_down.weight", ".lora_up.weight")
    if stem.startswith(KOHYA_PREFIX):
        module = kohya.get(stem)
        return (module, role, "kohya") if module else f"kohya name {stem!r} is no Linear of the Wan 2.2 DiT"
    comfy = next((p for p in COMFY_PREFIXES if stem.startswith(p)), None)
    if comfy:
        stem = stem[len(comfy):]
    elif stem.startswith(PEFT_PREFIX):
        stem = stem[len(PEFT_PREFIX):]
    elif stem.startswith(_PEFT_MODEL_PREFIX):
        stem = stem[len(_PEFT_MODEL_PREFIX):]
    if stem in names:
        return stem, role, "comfy-original" if original else "comfy"
    try:
        official = diffusers_key_to_official(stem)
    except KeyError:
        official = None
    if official in names and official != stem:
        return official, role, "peft"
    return f"module {stem!r} is no Linear of the Wan 2.2 DiT (official or diffusers names)"


def _peft_alphas(header: Mapping[str, str], where: str):
    """(diffusers module, rank) -> alpha from the header's LoraConfig JSON; None when the file has none."""
    raw = header.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        cfg = {k.removeprefix(PEFT_PREFIX): v for k, v in json.loads(raw).items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA file {where}: header {PEFT_METADATA_KEY!r} is not valid JSON ({e})") from None
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise ValueError(f"LoRA file {where}: {flag}=True adapters are not plain LoRA; not supported")

    def alpha(module: str, rank: int) -> float:
        a = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank)))
        # rsLoRA scales by alpha / sqrt(r); as a plain LoRA that is alpha' = alpha * sqrt(r).
        return a * math.sqrt(rank) if cfg.get("use_rslora") else a

    return alpha


def _pattern_value(patterns: Mapping[str, object], module: str, default):
    """PEFT `get_pattern_key`: the first pattern p with re.match(rf'(.*\\.)?({p})$', module) wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


# ------------------------------------------------------------------------------------------------ checks

def check_lora(weights: Mapping[str, LoraModule], report: LoraReport | None, config: TransformerConfig) -> None:
    """Raise ValueError when `weights` (and the file behind `report`) do not fit a model of `config`.

    Checks: no Wan 2.1 I2V keys; every module exists in the model; every (in, out) shape is the model's."""
    where = f"LoRA file {report.path}" if report else "LoRA"
    if report is not None and report.foreign_model:
        keys = [k for k, why in report.unmatched.items() if why.startswith(report.foreign_model)]
        raise ValueError(f"{where} is a {report.foreign_model} (keys such as {keys[:3]}), not a Wan 2.2 "
                         f"LoRA; it cannot be applied to a Wan 2.2 {config.model_type} model. Use a LoRA trained "
                         f"on Wan 2.2 (or on Wan 2.1 T2V, whose blocks match the A14B experts)")
    targets = lora_targets(config)
    absent = sorted(n for n in weights if n not in targets)
    if absent:
        raise ValueError(f"{where}: modules {absent[:4]}{' ...' if len(absent) > 4 else ''} do not exist in "
                         f"this model ({config.num_layers} blocks); the file has {_num_layers(weights)} blocks. "
                         f"{describe_fit(weights)}")
    wrong = [(n, targets[n], (m.down.shape[1], m.up.shape[0])) for n, m in weights.items()
             if (m.down.shape[1], m.up.shape[0]) != targets[n]]
    if wrong:
        name, want, got = wrong[0]
        raise ValueError(f"{where}: {len(wrong)} modules have shapes of another model, e.g. {name} is "
                         f"in {got[0]} -> out {got[1]} in the file but in {want[0]} -> out {want[1]} in this model "
                         f"(dim {config.dim}). {describe_fit(weights)}")
    if report is not None and report.diffs:
        shapes = parameter_shapes(config)
        for name in [n for n in report.diffs if n not in shapes]:  # reported, as keys that match no module
            report.unmatched[report.diff_keys.get(name, name)] = f"difference for {name}, which this model lacks"
            del report.diffs[name]
        misshaped = [(n, tuple(d.shape), shapes[n]) for n, d in report.diffs.items() if tuple(d.shape) != shapes[n]]
        if misshaped:
            name, got, want = misshaped[0]
            raise ValueError(f"{where}: the difference for {name} has shape {got}, but this model's is {want} "
                             f"(dim {config.dim}); is it a LoRA of another model size? {describe_fit(weights)}")


def describe_fit(weights: Mapping[str, LoraModule]) -> str:
    """Which released models the LoRA's shapes fit, read from the attention width: 'The shapes fit dim 5120:
    presets t2v-A14B, i2v-A14B; Wan 2.1 T2V/I2V-14B.'"""
    dims = {m.down.shape[1] for n, m in weights.items() if re.search(r"\.(self_attn|cross_attn)\.[qkvo]$", n)}
    if len(dims) != 1:
        return "Its attention width could not be read (no attention modules)."
    dim = dims.pop()
    presets = [name for name, p in PRESETS.items() if p.transformer.dim == dim]
    other = _OTHER_MODELS_BY_DIM.get(dim)
    fits = "; ".join(filter(None, [f"presets {', '.join(presets)}" if presets else "", other or ""]))
    return f"The shapes fit dim {dim}: {fits or 'no known Wan model'}."
