"""Training recipes: YAML -> typed dataclasses, checked before any model loads.

A recipe is one YAML file with four sections (see recipes/quickstart.yaml)::

    model:    {preset: t2v-A14B, release: /models/Wan2.2-T2V-A14B, dtype: bfloat16}
    dataset:  {root: /data/clips, trigger: mystyle, ...}          # data.config.DatasetConfig
    experts:  {high_noise: {...}, low_noise: {...}}               # ExpertRecipe per expert
    training: {steps: 2000, batch_size: 1, ...}                   # TrainingSettings

Unknown keys are errors naming the nearest valid key and wrong types name what was expected
(data.typed_config). `load_recipe` then checks what no single field can: expert names against the
preset, timestep ranges that overlap or leave gaps, that at least one expert trains, and (optionally)
that the release folder holds every file the preset needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data.config import DatasetConfig, ModelSource, ValidationSettings
from data.typed_config import ConfigError, from_dict, load_yaml
from wan_model.config import ModelPreset, get_preset
from wan_model.release import EXPERT_NAMES, load_release
from wan_model.speed import SpeedOptions
from wan_model.transformer import FLOAT32_LINEARS

# Self- and cross-attention q, k, v, o and both FFN linears of every block (official module names;
# PEFT matches them as name suffixes, so 'self_attn.q' hits 'blocks.<i>.self_attn.q').
DEFAULT_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                   "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


@dataclass(frozen=True)
class SamplerSettings:
    """Training timestep distribution inside an expert's range (wan_model.schedule.sample_timesteps)."""

    kind: Literal["uniform", "shift", "logit_normal"] = "uniform"
    shift: float = 1.0  # 'shift' only: sigma' = shift*s / (1 + (shift-1)*s); > 1 favours high noise
    logit_mean: float = 0.0  # 'logit_normal' only: sigma = sigmoid(N(mean, std))
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift must be > 0, found {self.shift}")
        if not (self.logit_std > 0 and math.isfinite(self.logit_std)):
            raise ValueError(f"logit_std must be > 0, found {self.logit_std}")
        if not math.isfinite(self.logit_mean):
            raise ValueError(f"logit_mean must be a finite number, found {self.logit_mean}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA on the targeted linears: W x + (alpha / rank) * B A x, A: [rank, in], B: [out, rank] (B starts at 0)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, found {self.rank}; a rank-0 adapter has no weights (use 4..64)")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be > 0, found {self.alpha}; the adapter's output is scaled by alpha / rank, "
                             f"so alpha 0 trains nothing (alpha = rank is the usual choice)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), found {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; list module names such as 'self_attn.q'")
        # PEFT takes a target for every module whose name is it or ends in "." + it.
        untrainable = [t for t in self.target_modules
                       if any(m == t or m.endswith("." + t) for m in FLOAT32_LINEARS)]
        if untrainable:
            raise ValueError(f"target_modules {untrainable} reach {', '.join(FLOAT32_LINEARS)}, which the DiT computes "
                             "in float32 from their weights, so LoRA there would not train; target block linears "
                             "by their full names, such as 'ffn.0' or 'self_attn.q'")


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW on the LoRA weights (fp32 moments)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be > 0 and finite, found {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, found {self.weight_decay} (0: none)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be > 0, found {self.eps}; Adam divides by sqrt(v) + eps, and LoRA A's first "
                             f"gradients are 0 (B starts at 0), so eps 0 gives 0/0 = nan (use 1.0e-8)")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), found {self.betas}")


@dataclass(frozen=True)
class LRScheduleSettings:
    """Linear warm-up over `warmup_steps` of this expert's own updates, then constant / linear / cosine to 0."""

    kind: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, found {self.warmup_steps}")


@dataclass(frozen=True)
class ExpertRecipe:
    """One expert's training: its timestep range, sampler, loss weighting, LoRA and optimizer."""

    train: bool = True
    # [lo, hi) in train timesteps (0..1000); None: the preset's default (boundary split, see default_range)
    timesteps: tuple[int, int] | None = None
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"
    lora: LoraSettings = field(default_factory=LoraSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    lr_schedule: LRScheduleSettings = field(default_factory=LRScheduleSettings)


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 1000  # optimizer steps in total, over all experts
    batch_size: int = 1  # clips per micro-batch per process (one bucket per batch)
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch_size * grad_accum * processes
    seed: int = 0
    precision: Literal["bf16", "fp32"] = "bf16"  # base weights and autocast; LoRA weights and Adam stay fp32
    gradient_checkpointing: bool = True
    max_grad_norm: float = 1.0  # 0: no clipping
    routing: Literal["random", "phased"] = "random"  # random: each step draws an expert, weighted by range width
    phase_steps: int = 100  # 'phased': this many steps on one expert, then the next
    offload_inactive_expert: Literal["auto", "always", "never"] = "auto"  # keep the idle expert in host memory
    ti2v_image_prob: float = 0.5  # ti2v only: share of samples trained image-to-video (clean first frame)
    output_dir: str = "outputs/run"
    save_every: int = 250  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept on disk
    log_every: int = 10
    # Preview videos of sample_prompts with the adapters as they train (train/previews.py), into
    # <output_dir>/samples/step-N/; 0 or no prompts: none. Same seed every time, so steps compare.
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    # height, width, frames of the previews; with a first frame (sample_image, or I2V's held-out clip) height x
    # width is the area and the image's aspect ratio gives the shape, as the sampler sizes it
    sample_size: tuple[int, int, int] = (480, 832, 81)
    sample_steps: int = 20  # solver steps per preview (the preset's own count is 40 / 50)
    # First frame of image-conditioned previews (I2V; TI2V's image mode). None: I2V takes the first frame of
    # the first held-out clip (validation section); TI2V previews text-to-video.
    sample_image: str | None = None
    deepspeed: Literal["zero2", "zero3"] | None = None  # None: plain DDP / single device
    # > 1: every process works on the same sample, each on 1/N of its video tokens (Ulysses, for long
    # clips: wan_model/sequence_parallel.py); must equal the number of processes. 1: data parallel.
    sequence_parallel: int = 1
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses or gradients in a row

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "phase_steps", "keep_last", "log_every",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, found {getattr(self, name)}")
        for name in ("save_every", "sample_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, found {getattr(self, name)}")
        if bool(self.sample_every) != bool(self.sample_prompts):
            raise ValueError("sample_every and sample_prompts go together: set both for previews, or neither")
        if self.sample_every and self.deepspeed == "zero3":
            raise ValueError("previews during training need whole weights, which ZeRO-3 shards; use zero2, or "
                             "render the exported adapters with `python sample.py evaluate`")
        if self.sequence_parallel < 1:
            raise ValueError(f"sequence_parallel must be >= 1, found {self.sequence_parallel}")
        if self.sequence_parallel > 1 and self.deepspeed is not None:
            raise ValueError("sequence_parallel > 1 is not combined with DeepSpeed yet; use plain DDP "
                             "(training.deepspeed: null)")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, found {self.sample_steps}")
        if not (self.max_grad_norm >= 0):  # also nan
            raise ValueError(f"max_grad_norm must be >= 0, found {self.max_grad_norm} (0: no clipping)")
        if not 0.0 <= self.ti2v_image_prob <= 1.0:
            raise ValueError(f"ti2v_image_prob must be in [0, 1], found {self.ti2v_image_prob}")


PLAIN_SPEED = SpeedOptions(compile=False, save_attention="none", fp8_base="none")


@dataclass(frozen=True)
class Recipe:
    model: ModelSource
    dataset: DatasetConfig
    experts: dict[str, ExpertRecipe] = field(default_factory=dict)  # empty: every expert of the preset, defaults
    training: TrainingSettings = field(default_factory=TrainingSettings)
    # Speed levers (wan_model/speed.py). Left out, a recipe runs the plain path: exact, any device, no
    # compile wait. The shipped GPU recipes turn the fast path on (A14B 480p on an H100: 15.5 -> 9.7 s/step).
    speed: SpeedOptions = field(default_factory=lambda: PLAIN_SPEED)
    # Held-out clips scored every validation.every steps (data/config.py ValidationSettings).
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    @property
    def preset(self) -> ModelPreset:
        return get_preset(self.model.preset)


def expert_names(preset: ModelPreset) -> list[str]:
    """The preset's experts, highest noise first: ['high_noise', 'low_noise'] (A14B) or ['dense'] (5B)."""
    return [EXPERT_NAMES[folder] for folder in preset.expert_folders]


def default_range(preset: ModelPreset, expert: str) -> tuple[int, int]:
    """Official split: high_noise [boundary*1000, 1000), low_noise [0, boundary*1000); dense [0, 1000).
    t2v-A14B: 875; i2v-A14B: 900 (wan/configs/wan_*_A14B.py: boundary)."""
    n = preset.num_train_timesteps
    if expert == "dense":
        return (0, n)
    b = preset.boundary_timestep
    return (b, n) if expert == "high_noise" else (0, b)


def expert_ranges(recipe: Recipe) -> dict[str, tuple[int, int]]:
    """Every expert of the preset -> its [lo, hi) (the recipe's, else the default), highest noise first."""
    preset = recipe.preset
    out = {}
    for name in expert_names(preset):
        given = recipe.experts.get(name)
        out[name] = given.timesteps if given and given.timesteps is not None else default_range(preset, name)
    return out


def check_recipe(recipe: Recipe, where: str, check_release: bool = True) -> None:
    """Checks across fields; each error names the key and the fix. Loads no weights."""
    try:
        preset = recipe.preset
    except KeyError as err:
        raise ConfigError(f"{where}: model.preset: {err.args[0]}") from None
    speed, plain = recipe.speed, PLAIN_SPEED
    if recipe.training.deepspeed and (speed.compile, speed.fp8_base, speed.offload, speed.host_checkpoints) != (
            plain.compile, plain.fp8_base, plain.offload, plain.host_checkpoints):
        raise ConfigError(f"{where}: speed: compile, fp8_base, offload and host_checkpoints are not combined with "
                          f"DeepSpeed yet; "
                          f"keep only speed.save_attention (and memory_gib) under training.deepspeed")
    if recipe.training.deepspeed and speed.attention_backend == "cudnn_fp8":
        raise ConfigError(f"{where}: speed.attention_backend: cudnn_fp8 keeps float32 scaling states on the blocks, "
                          f"which DeepSpeed's bf16 cast would convert; under training.deepspeed use auto")
    if speed.planned and recipe.training.deepspeed:
        raise ConfigError(f"{where}: speed.save_attention: auto plans one GPU's memory and does not yet count what "
                          f"ZeRO partitions; under training.deepspeed set save_attention: all, every_k or none "
                          f"(and host_checkpoints: false)")
    if (speed.planned or speed.host_checkpoints) and not recipe.training.gradient_checkpointing:
        raise ConfigError(f"{where}: speed.save_attention: auto and host_checkpoints plan what gradient checkpointing "
                          f"keeps; set training.gradient_checkpointing: true, or save_attention: none and "
                          f"host_checkpoints: false")
    valid = list(expert_names(preset))
    for name in recipe.experts:
        if name not in valid:
            raise ConfigError(f"{where}: experts.{name} is not an expert of preset {preset.name!r}; "
                              f"its experts are {', '.join(valid)}")
    ranges = expert_ranges(recipe)
    n = preset.num_train_timesteps
    for name, (lo, hi) in ranges.items():
        if not 0 <= lo < hi <= n:
            raise ConfigError(f"{where}: experts.{name}.timesteps [{lo}, {hi}) must satisfy 0 <= lo < hi <= {n}")
    ordered = sorted(ranges.items(), key=lambda kv: kv[1])
    if ordered[0][1][0] != 0:
        name, (lo, hi) = ordered[0]
        raise ConfigError(f"{where}: experts.{name}.timesteps [{lo}, {hi}) leaves [0, {lo}) to no expert; "
                          f"ranges must cover [0, {n}) without gaps")
    if ordered[-1][1][1] != n:
        name, (lo, hi) = ordered[-1]
        raise ConfigError(f"{where}: experts.{name}.timesteps [{lo}, {hi}) leaves [{hi}, {n}) to no expert; "
                          f"ranges must cover [0, {n}) without gaps")
    for (a, (alo, ahi)), (b, (blo, bhi)) in zip(ordered, ordered[1:]):
        if blo < ahi:
            raise ConfigError(f"{where}: experts.{a}.timesteps [{alo}, {ahi}) overlaps {b} [{blo}, {bhi}); "
                              f"ranges must not overlap (e.g. end {a} at {blo})")
        if blo > ahi:
            raise ConfigError(f"{where}: experts.{a}.timesteps [{alo}, {ahi}) and {b} [{blo}, {bhi}) leave "
                              f"[{ahi}, {blo}) to no expert; make one range reach the other")
    if not any(trains(recipe, name) for name in valid):
        raise ConfigError(f"{where}: experts: no expert has train: true; set it on at least one of "
                          f"{', '.join(valid)}")
    s = recipe.training
    if speed.attention_backend == "cudnn_fp8" and s.sequence_parallel > 1:
        raise ConfigError(f"{where}: speed.attention_backend: cudnn_fp8 does not reach the sequence-parallel "
                          f"attention path yet; with training.sequence_parallel > 1 use attention_backend: auto")
    if s.sample_every and preset.task == "i2v" and s.sample_image is None and not recipe.validation.enabled:
        raise ConfigError(f"{where}: training.sample_every: {preset.name} is image-to-video, so previews need a "
                          f"first frame: set training.sample_image to an image file, or add a validation: section "
                          f"(root or fraction) whose first held-out clip gives it")
    if s.sample_every and s.sample_image is not None and not Path(s.sample_image).is_file():
        raise ConfigError(f"{where}: training.sample_image: {s.sample_image} is not a file (looked for "
                          f"{Path(s.sample_image).resolve()}: a relative path is taken from the working folder, as the "
                          f"recipe's other paths; give it from there or as an absolute path)")
    if check_release:
        if recipe.model.release is None:
            raise ConfigError(f"{where}: model.release is not set; point it at the downloaded release folder")
        try:
            load_release(recipe.model.release, preset.name)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{where}: model.release: {err}") from None


def trains(recipe: Recipe, name: str) -> bool:
    """An expert trains unless the recipe lists it with train: false (unlisted experts train with defaults
    when `experts` is empty, and stay frozen when other experts are listed)."""
    if not recipe.experts:
        return True
    return name in recipe.experts and recipe.experts[name].train


def expert_recipe(recipe: Recipe, name: str) -> ExpertRecipe:
    return recipe.experts.get(name, ExpertRecipe(train=trains(recipe, name)))


def load_recipe(path: str | Path, check_release: bool = True) -> Recipe:
    """Read and check a recipe file; ConfigError (naming `path` and the key) on any problem."""
    where = str(path)
    raw = load_yaml(path)
    if "dataset" not in raw:
        raise ConfigError(f"{where}: no 'dataset' section; add one with at least 'root: <folder of clips>'")
    recipe = from_dict(Recipe, raw, where)
    check_recipe(recipe, where, check_release)
    return recipe


# Keys that may change between a run and its resume without changing what is trained.
_RESUME_FREE = ("steps", "save_every", "keep_last", "log_every", "sample_every", "sample_prompts", "sample_size",
                "sample_steps", "sample_image", "output_dir")


def recipe_hash(recipe: Recipe) -> str:
    """16 hex digits of sha256 over everything that defines the training trajectory (not the step count,
    logging or output settings), so a resume can refuse a checkpoint of a different recipe."""
    raw = dataclasses.asdict(recipe)
    for key in _RESUME_FREE:
        raw["training"].pop(key)
    # The memory cap belongs to the machine, not the trajectory (a resume may move to another card); and
    # popped, hashes of recipes from before the key existed stay what they were.
    raw["speed"].pop("memory_gib")
    if not recipe.speed.fp8_fast_accum:  # off: the hash of recipes from before the key existed
        raw["speed"].pop("fp8_fast_accum")
    # The compiled checkpoint call changes where the recompute runs, not the maths (float sums aside): a run
    # that ran out of memory with it may resume without it.
    raw["speed"].pop("compiled_checkpoint")
    # Of the validation section only the held-out split changes what is trained on (the training set);
    # how often and how it is scored may change on a resume. No split: no key, as before the section existed.
    validation = raw.pop("validation")
    if recipe.validation.enabled:
        raw["validation_split"] = {k: validation[k] for k in ("root", "fraction", "seed")}
    text = json.dumps(raw, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
