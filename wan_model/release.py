"""An official Wan 2.2 release folder: find every part, detect the preset, load nothing.

Layouts (Hugging Face Wan-AI/Wan2.2-*):
  Wan2.2-T2V-A14B/, Wan2.2-I2V-A14B/          Wan2.2-TI2V-5B/
    high_noise_model/  config.json + shards      config.json + shards (the root is the model folder)
    low_noise_model/   config.json + shards      Wan2.2_VAE.pth
    Wan2.1_VAE.pth                               models_t5_umt5-xxl-enc-bf16.pth
    models_t5_umt5-xxl-enc-bf16.pth              google/umt5-xxl/  (tokenizer)
    google/umt5-xxl/  (tokenizer)
`load_release` returns paths only, so a trainer can load one 14B expert at a time
(`checkpoint.load_transformer(release.expert_paths['high_noise'])`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CONFIG_NAME, checkpoint_files, config_from_json, matching_preset, read_json, save_transformer
from .config import PRESETS, ModelPreset, TransformerConfig, get_preset
from .transformer import WanTransformer

# Expert names used across wanlora, by release sub-folder ('' is the root of the dense TI2V-5B).
EXPERT_NAMES = {"high_noise_model": "high_noise", "low_noise_model": "low_noise", "": "dense"}


@dataclass(frozen=True)
class Release:
    """Paths of every part of a release; weights stay on disk until someone loads them.

    expert_paths: 'high_noise', 'low_noise' (A14B) or 'dense' (TI2V-5B) -> transformer folder."""

    root: Path
    preset: ModelPreset
    expert_paths: dict[str, Path]
    vae_path: Path
    t5_path: Path
    tokenizer_path: Path


def detect_preset(config: TransformerConfig) -> str | None:
    """Preset name for a transformer config: an exact match first (tiny presets), else model_type + dim
    among the released presets (config.json files may omit fields that keep their defaults)."""
    exact = matching_preset(config)
    if exact:
        return exact
    loose = [name for name, p in PRESETS.items() if not name.startswith("tiny-")
             and (p.transformer.model_type, p.transformer.dim) == (config.model_type, config.dim)]
    return loose[0] if loose else None


def _expert_config(folder: Path, looking_for: str) -> TransformerConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} not found in {folder} (looking for {looking_for}); "
                                f"the transformer folder must hold its config.json, index and shards")
    return config_from_json(read_json(path), str(path))


def load_release(root: str | os.PathLike, preset: str | None = None) -> Release:
    """Find the parts of a release folder and check them against the preset (named, or detected from the
    transformer config.json). Missing files name the file, the folder and the preset; a config that does
    not fit a named preset names both."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"release folder {root} does not exist; download e.g. Wan-AI/Wan2.2-T2V-A14B "
                                f"there and pass its path")
    named = get_preset(preset) if preset is not None else None
    if named is not None:
        folders = named.expert_folders
    elif (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        folders = ("high_noise_model", "low_noise_model")
    else:
        folders = ("",)
    # Name the preset in a missing-config error: the one asked for, else the one another expert's config shows.
    present = [f for f in folders if (root / f / CONFIG_NAME).is_file()]
    guess = named.name if named else detect_preset(_expert_config(root / present[0], "")) if present else None
    looking_for = (f"preset {guess!r}" if guess else
                   "an A14B (MoE) preset" if len(folders) == 2 else "the TI2V-5B (dense) preset")
    configs = {folder: _expert_config(root / folder, looking_for) for folder in folders}
    first_folder, first = next(iter(configs.items()))
    found = detect_preset(first)
    where = root / first_folder / CONFIG_NAME
    if named is not None and found != named.name:
        raise ValueError(f"{where}: the transformer config (model_type {first.model_type!r}, dim {first.dim}, "
                         f"{first.num_layers} layers) is preset {found!r}, but preset {named.name!r} was asked for; "
                         f"pass preset={found!r} or point at a {named.name} release")
    if found is None:
        raise ValueError(f"{where}: transformer config (model_type {first.model_type!r}, dim {first.dim}) matches "
                         f"no preset ({', '.join(PRESETS)}); is this a Wan 2.2 release?")
    chosen = PRESETS[found]
    if chosen.expert_folders != folders:
        raise ValueError(f"{root}: preset {found!r} keeps its experts in {list(chosen.expert_folders)} "
                         f"('' = root), but this folder has {list(folders)}; check the download")
    for folder, cfg in configs.items():
        if cfg != first:
            raise ValueError(f"{root / folder / CONFIG_NAME}: config differs from {where} ({cfg} vs {first}); "
                             f"both experts of {found!r} must have the same shape")
        checkpoint_files(root / folder)  # every shard present (names the missing one)

    def need(name: str, is_dir: bool = False) -> Path:
        path = root / name
        if not (path.is_dir() if is_dir else path.is_file()):
            raise FileNotFoundError(f"{name} not found in release folder {root} (preset {found!r} needs it); "
                                    f"download the complete release")
        return path

    return Release(root=root, preset=chosen,
                   expert_paths={EXPERT_NAMES[f]: root / f for f in folders},
                   vae_path=need(chosen.vae.checkpoint), t5_path=need(chosen.text_encoder.checkpoint),
                   tokenizer_path=need(chosen.text_encoder.tokenizer, is_dir=True))


@torch.no_grad()
def random_weights_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Fill every parameter with random values of a trained-like scale: matrices N(0, 1/fan_in), norm
    weights 1 + N(0, 0.1^2), modulation tables N(0, 0.5^2), biases N(0, 0.1^2). No output is zero."""
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        if "modulation" in name:
            p.copy_(0.5 * noise)
        elif p.ndim >= 2:
            p.copy_(noise / p[0].numel() ** 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise)


def write_transformer_release(root: str | os.PathLike, preset: str | ModelPreset, seed: int,
                              dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write random transformer weights for every expert folder of `preset` under `root`, in the official
    layout split into at least 2 shards. Expert i draws from seed + i. Returns expert name -> folder.

    For tests and the demo (tiny presets); the VAE, T5 and tokenizer parts are written elsewhere."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(root)
    out = {}
    for i, folder in enumerate(preset.expert_folders):
        model = WanTransformer(preset.transformer).to(dtype)
        random_weights_(model, torch.Generator().manual_seed(seed + i))
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        # Half the total per shard: the greedy split then makes 2 or 3 shards, exercising the index.
        out[EXPERT_NAMES[folder]] = save_transformer(model, root / folder, preset.transformer,
                                                     max_shard_bytes=total // 2)
    return out
