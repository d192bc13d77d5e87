"""Key names of the Wan 2.2 DiT in the three file formats found in the wild, and maps between them.

  * "official": the released checkpoints (`wan/modules/model.py` names: `blocks.0.self_attn.q.weight`);
    the names `WanTransformer` uses.
  * "diffusers": `WanTransformer3DModel` (`blocks.0.attn1.to_q.weight`), as written by diffusers'
    `scripts/convert_wan_to_diffusers.py`.
  * "comfy": official names behind a `model.diffusion_model.` or `diffusion_model.` prefix.

The maps rename module paths and keep whatever follows (`.weight`, `.bias`, `.lora_A.weight`, ...),
so they also serve LoRA files. Tensors pass through untouched: a round trip is exact. Note the swap:
the official affine cross-attention norm is `norm3`, diffusers calls it `norm2`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (official module path, diffusers module path); "{i}" stands for a block index.
_MODULE_PAIRS = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    *[(f"blocks.{{i}}.{ours}.{a}", f"blocks.{{i}}.{theirs}.{b}")
      for ours, theirs in (("self_attn", "attn1"), ("cross_attn", "attn2"))
      for a, b in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"),
                   ("norm_q", "norm_q"), ("norm_k", "norm_k"))],
    ("blocks.{i}.norm3", "blocks.{i}.norm2"),
    ("blocks.{i}.ffn.0", "blocks.{i}.ffn.net.0.proj"),
    ("blocks.{i}.ffn.2", "blocks.{i}.ffn.net.2"),
    ("blocks.{i}.modulation", "blocks.{i}.scale_shift_table"),
    ("head.head", "proj_out"),
    ("head.modulation", "scale_shift_table"),
]


def _compile(pattern: str) -> re.Pattern:
    """Module path -> regex matching the path itself or the path followed by '.<anything>'."""
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + r"(?P<rest>\..+)?$")


_OFFICIAL_TO_DIFFUSERS = [(_compile(a), b) for a, b in _MODULE_PAIRS]
_DIFFUSERS_TO_OFFICIAL = [(_compile(b), a) for a, b in _MODULE_PAIRS]


def _rename(key: str, table, source: str, target: str) -> str:
    for regex, template in table:
        m = regex.match(key)
        if m:
            name = template.replace("{i}", m.group("i")) if "{i}" in template else template
            return name + (m.group("rest") or "")
    raise KeyError(f"{source} Wan 2.2 transformer key {key!r} has no {target} name; expected keys of a "
                   f"Wan 2.2 DiT (Wan 2.1 I2V image-embedding keys such as img_emb / k_img are not used by 2.2). "
                   f"Check the file is a Wan 2.2 transformer in {source} format (detect_transformer_format)")


def official_key_to_diffusers(key: str) -> str:
    """'blocks.3.self_attn.q.weight' -> 'blocks.3.attn1.to_q.weight'; KeyError naming an unknown key."""
    return _rename(key, _OFFICIAL_TO_DIFFUSERS, "official", "diffusers")


def diffusers_key_to_official(key: str) -> str:
    """'blocks.3.attn1.to_q.weight' -> 'blocks.3.self_attn.q.weight'; KeyError naming an unknown key."""
    return _rename(key, _DIFFUSERS_TO_OFFICIAL, "diffusers", "official")


def official_to_diffusers(state_dict: Mapping) -> dict:
    """Official-named state dict -> diffusers `WanTransformer3DModel` names (same tensors)."""
    return {official_key_to_diffusers(k): v for k, v in state_dict.items()}


def diffusers_to_official(state_dict: Mapping) -> dict:
    """Diffusers `WanTransformer3DModel` state dict -> official names (same tensors)."""
    return {diffusers_key_to_official(k): v for k, v in state_dict.items()}


def strip_comfy_prefix(state_dict: Mapping) -> dict:
    """Drop the `model.diffusion_model.` / `diffusion_model.` prefix of ComfyUI files (keys without it kept)."""
    out = {}
    for k, v in state_dict.items():
        prefix = next((p for p in COMFY_PREFIXES if k.startswith(p)), "")
        out[k[len(prefix):]] = v
    return out


_DIFFUSERS_MARKERS = ("condition_embedder.", "proj_out.", "scale_shift_table")
_OFFICIAL_MARKERS = ("time_embedding.", "text_embedding.", "head.head.", "head.modulation")


def detect_transformer_format(keys: Iterable[str]) -> str:
    """'official' | 'diffusers' | 'comfy' from a state dict's keys; ValueError when none fits.

    comfy: any key behind a ComfyUI prefix; diffusers: condition_embedder / proj_out / scale_shift_table
    or attn1/attn2 blocks; official: time_embedding / text_embedding / head or self_attn/cross_attn blocks.
    """
    keys = list(keys)
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfy"
    if any(k.startswith(_DIFFUSERS_MARKERS) or ".attn1." in k or ".attn2." in k for k in keys):
        return "diffusers"
    if any(k.startswith(_OFFICIAL_MARKERS) or ".self_attn." in k or ".cross_attn." in k for k in keys):
        return "official"
    raise ValueError(f"cannot tell the format of this Wan transformer state dict from its keys "
                     f"(first ones: {keys[:5]}); expected official (blocks.N.self_attn.q.weight), diffusers "
                     f"(blocks.N.attn1.to_q.weight) or ComfyUI (model.diffusion_model.blocks...) names")


def to_official(state_dict: Mapping) -> dict:
    """Any of the three formats -> official names, ready for `WanTransformer.load_state_dict(strict=True)`."""
    fmt = detect_transformer_format(state_dict.keys())
    if fmt == "comfy":
        return to_official(strip_comfy_prefix(state_dict))
    if fmt == "diffusers":
        return diffusers_to_official(state_dict)
    return dict(state_dict)
