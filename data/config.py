"""Typed dataset settings: what `python -m data.prepare CONFIG.yaml` reads.

A prepare config is the `model` and `dataset` sections of a training recipe, so one recipe file serves
both commands::

    model:
      preset: t2v-A14B            # a name from wan_model.config.PRESETS
      release: /models/Wan2.2-T2V-A14B
      dtype: bfloat16
    dataset:
      root: /data/my_clips
      trigger: "mystyle"
      buckets: {base_area: 399360, frame_counts: [81]}

`load_prepare_config` reads only those two sections and ignores every other top-level section
(`experts`, `train`, ...): the trainer validates those when it loads the same file. Unknown keys inside
`model` and `dataset` are errors naming the key and the nearest valid one (data.typed_config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .typed_config import ConfigError, from_dict, load_yaml

# The prompt template; fields {trigger}, {caption}, {labels}. data/prompts.py documents the rendering.
DEFAULT_CAPTION_TEMPLATE = "{trigger}, {caption}. {labels}"


@dataclass(frozen=True)
class BucketSettings:
    """Training sizes. Each aspect ratio w/h gets a (width, height) of about `base_area` pixels, rounded to
    the model's stride (16 px for A14B, 32 px for TI2V-5B); each clip goes to the nearest aspect."""

    base_area: int = 480 * 832  # 399,360 px: the official 480p size
    aspects: tuple[float, ...] = (16 / 9, 4 / 3, 1.0, 3 / 4, 9 / 16)
    # Clip lengths in frames after resampling to the model fps, each 1 + 4k (VAE temporal stride 4).
    # 81 frames at 16 fps = 5 s (A14B); use 121 at 24 fps for TI2V-5B. 1 = still images.
    frame_counts: tuple[int, ...] = (81, 1)


@dataclass(frozen=True)
class WindowSettings:
    """Which stretches of a long clip become training items (data/video.py: clip_windows)."""

    # 'first' (alias 'head'): one window from frame 0; 'center': one in the middle; 'uniform': up to
    # max_windows spread evenly; 'sliding': starts 0, stride, 2*stride, ...
    mode: Literal["first", "head", "center", "uniform", "sliding"] = "first"
    max_windows: int = 1  # windows per clip at most; each window is its own cache entry
    stride: int | None = None  # 'sliding' only: frames between window starts (None: back to back)


@dataclass(frozen=True)
class FilterSettings:
    """Clips dropped before encoding; each drop is recorded in report.json with its reason."""

    min_score: float | None = None  # aesthetic score in [0, 1] (user's, else computed); None: keep all
    min_width: int = 256  # source pixels
    min_height: int = 256
    min_duration_s: float = 0.0
    max_duration_s: float | None = None  # None: no limit (long clips are windowed, not rejected)
    dedupe: bool = True  # drop byte-identical files and near-identical frames (perceptual hash)


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset folder and how it becomes cached training pairs."""

    root: str  # folder of videos / images with .txt sidecars or a metadata file
    # metadata.jsonl or metadata.csv inside root (or a path); None: use it if present, else .txt sidecars
    metadata: str | None = None
    cache_dir: str = "cache"  # where latents and text embeddings go (relative to the working directory)
    trigger: str = ""  # a token put first in every prompt ("mystyle"); empty: none
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    label_dropout: float = 0.1  # each label left out of a prompt variant with this probability
    caption_dropout: float = 0.05  # a prompt variant becomes "" (the unconditional branch of CFG)
    prompt_variants: int = 4  # prompts encoded per clip; training picks one per step
    seed: int = 0  # for dropout, variant choice and latent sampling
    fps: int | None = None  # frames per second clips are resampled to; None: the model's (16 or 24)
    buckets: BucketSettings = field(default_factory=BucketSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    filters: FilterSettings = field(default_factory=FilterSettings)
    # Also cache the image condition (first frame + black frames, VAE-encoded) that I2V-A14B trains with.
    # Always done for an i2v preset; set true to cache it for another preset too.
    i2v_condition: bool = False

    def __post_init__(self) -> None:
        for name in ("label_dropout", "caption_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], found {value}")
        if self.prompt_variants < 1:
            raise ValueError(f"prompt_variants must be at least 1, found {self.prompt_variants}")
        if self.fps is not None and self.fps < 1:  # 0 fell back to the model's rate, silently
            raise ValueError(f"fps must be at least 1, found {self.fps}; leave it out (null) for the model's rate "
                             f"(16 for A14B, 24 for TI2V-5B)")
        if self.windows.max_windows < 1:
            raise ValueError(f"windows.max_windows must be at least 1, found {self.windows.max_windows}")


@dataclass(frozen=True)
class ModelSource:
    """Which model encodes the dataset: the preset fixes the VAE and text encoder shapes."""

    preset: str = "t2v-A14B"
    release: str | None = None  # official release folder; None: random weights (tiny presets only)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # encoder weights and text embeddings


VALIDATION_FOLDER = "validation"  # the held-out clips' cache: <dataset.cache_dir>/validation


@dataclass(frozen=True)
class ValidationSettings:
    """The recipe's `validation:` section: held-out clips and how often the trainer scores them.

    The held-out clips are `root` (a folder, prepared like the dataset) or, when `root` is not set, a
    seeded `fraction` of dataset.root's clips, split off at prepare time and never trained on. Both are
    cached in <dataset.cache_dir>/validation. Every `every` steps (and at the end) the trainer computes,
    without gradients, each expert's flow-matching loss on up to `max_items` held-out entries at
    `timesteps` fixed timesteps (the centres of equal bands of the expert's range) with fixed noise."""

    root: str | None = None
    fraction: float = 0.0
    every: int = 0  # steps between validation passes; 0: none
    timesteps: int = 4  # per expert
    max_items: int = 8  # held-out cache entries scored at most
    seed: int = 0  # held-out split and noise

    @property
    def enabled(self) -> bool:
        return self.root is not None or self.fraction > 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1), found {self.fraction}")
        if self.root is not None and self.fraction:
            raise ValueError("set root (a folder of held-out clips) or fraction (a share of dataset.root), not both")
        for name in ("every", "timesteps", "max_items"):
            if getattr(self, name) < (0 if name == "every" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'every' else 1}, found {getattr(self, name)}")
        if self.every and not self.enabled:
            raise ValueError("every > 0 needs held-out clips: set root (a folder) or fraction (e.g. 0.1)")


@dataclass(frozen=True)
class PrepareConfig:
    model: ModelSource
    dataset: DatasetConfig
    validation: ValidationSettings = field(default_factory=ValidationSettings)


def load_prepare_config(path: str | Path) -> PrepareConfig:
    """Read `model`, `dataset` and `validation` from a prepare config or a full training recipe (other
    sections are the trainer's to validate)."""
    raw = load_yaml(path)
    if "dataset" not in raw:
        raise ConfigError(f"{path}: no 'dataset' section; add one with at least 'root: <folder of clips>'")
    return from_dict(PrepareConfig, {"model": raw.get("model") or {}, "dataset": raw["dataset"],
                                     "validation": raw.get("validation") or {}}, str(path))
