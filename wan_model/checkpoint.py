"""Wan 2.2 transformer checkpoints: load any released layout straight into `WanTransformer`, write the official one.

Accepted inputs of `load_transformer`:
  * an official model folder (`high_noise_model/`, `low_noise_model/`, the TI2V-5B root): `config.json`
    (`_class_name: WanModel`), shards `diffusion_pytorch_model-0000N-of-0000M.safetensors` and
    `diffusion_pytorch_model.safetensors.index.json` (`weight_map`: key -> shard);
  * a diffusers `WanTransformer3DModel` folder (`config.json` with `_class_name: WanTransformer3DModel`,
    keys renamed through `keymaps`), sharded or not;
  * a single `.safetensors` or `.pth` / `.pt` file with official, diffusers or ComfyUI
    (`model.diffusion_model.`) names; its config comes from the caller, a `config.json` beside the
    file, or the tensor shapes.
The model is built on the meta device and its parameters are the tensors read from the files (cast
to the asked dtype one by one, `load_state_dict(assign=True)`), so a 14B expert in bf16 (28 GB) loads
with peak host memory near 28 GB instead of the 56 GB fp32 model plus a state-dict copy.

Measured on an H100 machine (random bf16 T2V-A14B expert, 14.29 B params in 6 shards, files in the page
cache): to CPU in bf16 6.5 s with peak RSS 0.7 GB (safetensors hands out memory-mapped tensors when no
cast is needed: pages come in on first use, copy-on-write, the files stay untouched); to CUDA in bf16
13.3 s, 28.7 GB on the GPU, peak host RSS 6.5 GB (about one open shard).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .config import PRESETS, TransformerConfig
from .files import atomic_write
from .keymaps import COMFY_PREFIXES, detect_transformer_format, diffusers_key_to_official
from .transformer import WanTransformer, float32_parameter

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"^diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors$")
PTH_SUFFIXES = (".pth", ".pt")
# Released Wan 2.2 DiTs all use 128-wide attention heads (5120 = 40 x 128, 3072 = 24 x 128).
RELEASED_HEAD_DIM = 128
# `in_dim` -> model_type: 16 video latents (t2v), 16 + 4 mask + 16 image (i2v), 48 Wan 2.2 VAE latents (ti2v).
MODEL_TYPE_BY_IN_DIM = {16: "t2v", 36: "i2v", 48: "ti2v"}
DEFAULT_MAX_SHARD_BYTES = 5_000_000_000


def shard_name(index: int, count: int) -> str:
    """Official shard file name: shard_name(1, 6) = 'diffusion_pytorch_model-00001-of-00006.safetensors'."""
    return f"diffusion_pytorch_model-{index:05d}-of-{count:05d}.safetensors"


# ----------------------------------------------------------------------------------------------- presets

def matching_preset(config: TransformerConfig) -> str | None:
    """Name of the preset whose transformer config equals `config` exactly, else None."""
    return next((name for name, p in PRESETS.items() if p.transformer == config), None)


def describe_shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """'looks like preset t2v-A14B (in_dim 16, dim 5120, 40 layers)' from official-named tensor shapes.

    Compares in_dim, dim, ffn_dim and num_layers with every preset; names the nearest when none is equal."""
    found = _shape_facts(shapes)
    if not found:
        return "has no patch_embedding.weight, so it does not look like any Wan 2.2 transformer preset"
    facts = ", ".join(f"{k} {v}" for k, v in found.items())
    scores = {name: sum(getattr(p.transformer, k) == v for k, v in found.items()) for name, p in PRESETS.items()}
    best = max(scores, key=scores.get)
    if scores[best] == len(found):
        return f"looks like preset {best!r} ({facts})"
    want = PRESETS[best].transformer
    return (f"matches no preset ({facts}); nearest is {best!r} (in_dim {want.in_dim}, dim {want.dim}, "
            f"ffn_dim {want.ffn_dim}, num_layers {want.num_layers})")


def _shape_facts(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """in_dim, dim, ffn_dim, num_layers readable from official-named shapes (only those present)."""
    if "patch_embedding.weight" not in shapes or len(shapes["patch_embedding.weight"]) != 5:
        return {}
    dim, in_dim = shapes["patch_embedding.weight"][:2]
    facts = {"in_dim": in_dim, "dim": dim}
    if "blocks.0.ffn.0.weight" in shapes:
        facts["ffn_dim"] = shapes["blocks.0.ffn.0.weight"][0]
    facts["num_layers"] = _num_layers(shapes)
    return facts


def _num_layers(keys) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(r"^blocks\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


# ------------------------------------------------------------------------------------------------ config

def config_from_json(raw: dict, where: str) -> TransformerConfig:
    """TransformerConfig from an official (`WanModel`) or diffusers (`WanTransformer3DModel`) config.json."""
    try:
        if raw.get("_class_name") == "WanTransformer3DModel":
            in_dim = raw["in_channels"]
            if in_dim not in MODEL_TYPE_BY_IN_DIM:
                raise ValueError(f"in_channels {in_dim} is not one of {sorted(MODEL_TYPE_BY_IN_DIM)} (t2v, i2v, ti2v)")
            if raw.get("image_dim") or raw.get("added_kv_proj_dim"):
                raise ValueError("it has a CLIP image branch (image_dim / added_kv_proj_dim): a Wan 2.1 I2V "
                                 "model, not Wan 2.2")
            return TransformerConfig(
                model_type=MODEL_TYPE_BY_IN_DIM[in_dim], in_dim=in_dim, out_dim=raw["out_channels"],
                dim=raw["num_attention_heads"] * raw["attention_head_dim"], ffn_dim=raw["ffn_dim"],
                num_heads=raw["num_attention_heads"], num_layers=raw["num_layers"], freq_dim=raw["freq_dim"],
                text_dim=raw["text_dim"], patch_size=tuple(raw["patch_size"]), eps=raw["eps"],
                qk_norm=bool(raw.get("qk_norm")), cross_attn_norm=bool(raw.get("cross_attn_norm")))
        if "model_type" not in raw and raw.get("in_dim") in MODEL_TYPE_BY_IN_DIM:
            # Some re-packaged official configs leave model_type out; in_dim tells it.
            raw = {**raw, "model_type": MODEL_TYPE_BY_IN_DIM[raw["in_dim"]]}
        return TransformerConfig.from_json_dict(raw)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: not a valid Wan 2.2 transformer config ({type(err).__name__}: {err}); "
                         f"expected an official WanModel config.json (model_type, in_dim, dim, ...) or a "
                         f"diffusers WanTransformer3DModel one") from None


def infer_config(shapes: Mapping[str, tuple[int, ...]], where: str) -> TransformerConfig:
    """TransformerConfig from official-named tensor shapes.

    dim, in_dim, patch = patch_embedding.weight [dim, in_dim, pt, ph, pw]; out_dim = head.head rows / prod(patch);
    ffn_dim from blocks.0.ffn.0; text_dim, freq_dim from text/time embeddings; num_layers from block
    indices; num_heads: a preset with these exact shapes gives it, else dim / 128 (released head size).
    """
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]
        cfg = dict(in_dim=in_dim, dim=dim, patch_size=tuple(patch),
                   out_dim=shapes["head.head.weight"][0] // math.prod(patch),
                   ffn_dim=shapes["blocks.0.ffn.0.weight"][0], text_dim=shapes["text_embedding.0.weight"][1],
                   freq_dim=shapes["time_embedding.0.weight"][1], num_layers=_num_layers(shapes),
                   qk_norm="blocks.0.self_attn.norm_q.weight" in shapes,
                   cross_attn_norm="blocks.0.norm3.weight" in shapes)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{where}: cannot infer the transformer config from the tensor shapes (missing or "
                         f"odd {err}); pass config= or put the model's config.json beside the file") from None
    if in_dim not in MODEL_TYPE_BY_IN_DIM:
        raise ValueError(f"{where}: patch_embedding in_dim {in_dim} is not one of {sorted(MODEL_TYPE_BY_IN_DIM)} "
                         f"(t2v, i2v, ti2v); pass config= for another model")
    cfg["model_type"] = MODEL_TYPE_BY_IN_DIM[in_dim]
    for preset in PRESETS.values():
        t = preset.transformer
        if all(getattr(t, k) == v for k, v in cfg.items()):
            return t
    if dim % RELEASED_HEAD_DIM:
        raise ValueError(f"{where}: dim {dim} is not a multiple of the released head size {RELEASED_HEAD_DIM} and "
                         f"matches no preset, so num_heads is unknown; pass config= or put a config.json beside "
                         f"the file")
    return TransformerConfig(num_heads=dim // RELEASED_HEAD_DIM, **cfg)


# ------------------------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class CheckpointFiles:
    """Where a transformer's tensors are: official name -> (file, name in that file); config.json if any."""

    origin: Path
    locations: dict[str, tuple[Path, str]]
    shapes: dict[str, tuple[int, ...]]
    config_json: dict | None
    config_path: Path | None


def read_json(path: Path) -> dict:
    """A JSON file as a dict; a broken or unreadable file fails naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON ({err}); re-download or re-save the file") from None


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """Weight files of a transformer checkpoint (folder or single file), each checked to exist.

    A folder with an index lists its shards from `weight_map`; a missing shard is named."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in (".safetensors", *PTH_SUFFIXES):
            raise ValueError(f"{path}: expected a .safetensors, .pth or .pt file, or a model folder")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such transformer checkpoint (file or folder)")
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: has no 'weight_map' (tensor name -> shard file); re-save the folder")
        shards = [path / name for name in sorted(set(weight_map.values()))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) {', '.join(missing)} listed in {INDEX_NAME} are missing; "
                                    f"finish the download of this folder")
        return shards
    if (path / WEIGHTS_NAME).is_file():
        return [path / WEIGHTS_NAME]
    stray = sorted(p.name for p in path.iterdir() if SHARD_PATTERN.match(p.name))
    raise FileNotFoundError(f"{path}: no {INDEX_NAME} and no {WEIGHTS_NAME}"
                            + (f" (found shards {', '.join(stray)} without their index; re-download it)" if stray
                               else "; expected an official or diffusers transformer folder"))


def _raw_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header or the mmapped .pth without loading data."""
    if file.suffix == ".safetensors":
        with safe_open(file, framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_pth(file).items()}


def _load_pth(file: Path) -> dict[str, Tensor]:
    """A .pth state dict, memory-mapped (tensor data stays in the page cache until used)."""
    sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{file}: expected a state dict (tensor name -> tensor), found {type(sd).__name__}")
    return sd


def _official_key(key: str, diffusers: bool) -> str:
    """Stored key (official, diffusers or ComfyUI form) -> official name; an unknown key is kept as it is,
    so the strict check reports it as unexpected instead of failing here."""
    key = next((key[len(p):] for p in COMFY_PREFIXES if key.startswith(p)), key)
    try:
        return diffusers_key_to_official(key) if diffusers else key
    except KeyError:
        return key


def locate(path: str | os.PathLike) -> CheckpointFiles:
    """Index a checkpoint: official name -> (file, stored name) and shapes, with its config.json if any.

    Keys in diffusers or ComfyUI form are renamed to the official names (`keymaps`)."""
    path = Path(path)
    files = checkpoint_files(path)
    config_path = (path if path.is_dir() else path.parent) / CONFIG_NAME
    config_path = config_path if config_path.is_file() else None
    raw: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        for key, shape in _raw_shapes(file).items():
            raw[key] = (file, shape)
    # The format is a property of the whole file: single keys such as patch_embedding.weight carry no mark.
    # ComfyUI files put official (or, from some converters, diffusers) names behind their prefix.
    fmt = detect_transformer_format(raw)
    if fmt == "comfy":
        fmt = detect_transformer_format(_official_key(k, False) for k in raw)
    official = {k: _official_key(k, fmt == "diffusers") for k in raw}
    locations = {official[k]: (file, k) for k, (file, _) in raw.items()}
    shapes = {official[k]: shape for k, (_, shape) in raw.items()}
    config_json = read_json(config_path) if config_path else None
    return CheckpointFiles(path, locations, shapes, config_json, config_path)


def _iter_tensors(ckpt: CheckpointFiles, dtype: torch.dtype, device: torch.device,
                  float32: Callable[[str], bool] = lambda name: False) -> Iterator[tuple[str, Tensor]]:
    """(official name, tensor in `dtype` on `device`, or float32 where `float32(name)`), one file open at a
    time, one tensor read at a time."""
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (file, stored) in ckpt.locations.items():
        by_file.setdefault(file, []).append((name, stored))
    for file, names in by_file.items():
        if file.suffix == ".safetensors":
            # safe_open memory-maps the file; device= reads each tensor straight to the GPU when asked.
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name, stored in names:
                    yield name, f.get_tensor(stored).to(torch.float32 if float32(name) else dtype)
        else:
            sd = _load_pth(file)
            for name, stored in names:
                yield name, sd[stored].to(device=device, dtype=torch.float32 if float32(name) else dtype)
            del sd


# ------------------------------------------------------------------------------------------------ loading

def check_state_shapes(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                       where: str, config: TransformerConfig, limit: int = 8) -> None:
    """Strict key and shape check; ValueError listing missing, unexpected and misshaped keys (first `limit`)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    misshaped = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or misshaped):
        return
    lines = []
    if missing:
        lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:limit])}")
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:limit])}")
    for k in misshaped[:limit]:
        lines.append(f"{k}: expected shape {tuple(expected[k])}, found {tuple(found[k])}")
    preset = matching_preset(config)
    model = f"preset {preset!r}" if preset else f"config {config}"
    raise ValueError(f"{where}: does not fit the Wan transformer of {model}:\n  " + "\n  ".join(lines)
                     + f"\nThe checkpoint {describe_shapes(found)}. Load it with the matching preset/config, or "
                       f"re-download a complete checkpoint")


def resolve_config(ckpt: CheckpointFiles, config: TransformerConfig | None) -> TransformerConfig:
    """Caller's config, else the checkpoint's config.json, else one inferred from the tensor shapes."""
    if config is not None:
        return config
    if ckpt.config_json is not None:
        return config_from_json(ckpt.config_json, str(ckpt.config_path))
    return infer_config(ckpt.shapes, str(ckpt.origin))


def load_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                     config: TransformerConfig | None = None, keep_float32: bool = False) -> WanTransformer:
    """Load a Wan 2.2 DiT from an official/diffusers folder or a single .safetensors/.pth/.pt file.

    Strict: every parameter must be present with the model's shape, and nothing else. Parameters end up
    in `dtype` on `device`; keep_float32: the ones the forward reads in float32 stay float32
    (`transformer.float32_parameter`; the sampler's choice, as the official generator and diffusers run).
    The model is returned in train mode with requires_grad as built (callers freeze).
    """
    ckpt = locate(path)
    config = resolve_config(ckpt, config)
    with torch.device("meta"):
        model = WanTransformer(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_shapes(expected, ckpt.shapes, str(ckpt.origin), config)
    device = torch.device(device)
    tensors = (_iter_tensors(ckpt, dtype, device, float32_parameter) if keep_float32
               else _iter_tensors(ckpt, dtype, device))
    model.load_state_dict(dict(tensors), strict=True, assign=True)
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        # Non-persistent buffers are not in any checkpoint; WanTransformer computes RoPE per forward so it has
        # none. A new one must be computed in the model from its config, not left on the meta device.
        raise RuntimeError(f"{path}: WanTransformer tensors {left} are not in the checkpoint and stayed on the "
                           f"meta device; give them a persistent home or compute them in forward")
    return model


# ------------------------------------------------------------------------------------------------ writing

def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    """Split names (in order) into consecutive groups of at most `max_shard_bytes` (a larger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def save_transformer(model_or_state_dict: torch.nn.Module | Mapping[str, Tensor], folder: str | os.PathLike,
                     config: TransformerConfig, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write the official release layout: config.json, `diffusion_pytorch_model-0000N-of-0000M.safetensors`
    shards and `diffusion_pytorch_model.safetensors.index.json` ({"metadata": {"total_size"}, "weight_map"}).

    Official names are required (convert diffusers state dicts with `keymaps.to_official` first). Every file
    is written under a temporary name in `folder` and renamed into place, the index last; shards of an
    earlier save with another shard count are removed after. Returns the folder."""
    sd = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, torch.nn.Module)
          else dict(model_or_state_dict))
    fmt = detect_transformer_format(sd)
    if fmt != "official":
        raise ValueError(f"save_transformer({folder}): state dict has {fmt} key names; convert it with "
                         f"keymaps.to_official first (the release layout uses official names)")
    if max_shard_bytes < 1:
        raise ValueError(f"save_transformer: max_shard_bytes must be >= 1, got {max_shard_bytes}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {k: v.numel() * v.element_size() for k, v in sd.items()}
    groups = plan_shards(sizes, max_shard_bytes)
    names = [shard_name(i + 1, len(groups)) for i in range(len(groups))]
    index = {"metadata": {"total_size": sum(sizes.values())},
             "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
    for name, group in zip(names, groups):
        atomic_write(folder / name, lambda tmp, g=group: save_file(
            {k: sd[k].detach().to("cpu").contiguous() for k in g}, tmp, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config.to_json_dict(), indent=2)))
    atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2, sort_keys=True)))
    for stale in folder.iterdir():
        if SHARD_PATTERN.match(stale.name) and stale.name not in names:
            stale.unlink()
    return folder


