"""Dataset folder -> latent cache: `python -m data.prepare CONFIG.yaml [--release DIR]`.

For each clip (in scan order): probe -> size/duration filter -> byte-duplicate check -> resample to the
model fps -> bucket (nearest aspect, longest frame count that fits) -> windows -> decode the first window
-> labels (user labels win; the rest measured from those pixels, once: labels.json keeps the measured
labels by file hash, bucket, fps and window) -> score filter -> perceptual-duplicate
check -> K prompt variants -> for each window, look up its content key in the cache; encode (VAE
posterior, text embeddings, I2V image condition) and store only what is missing or changed.

CONFIG.yaml is a prepare config or a whole training recipe; only its `model` and `dataset` sections are
read (data/config.py). Writes into dataset.cache_dir: the shards and index.json (data/cache.py),
report.json (every clip used or skipped and why), dataset_card.md and contact_sheet.png (data/card.py).
Re-running is cheap: entries already cached are verified (sha256) and reused; corrupt ones re-encoded;
after a complete run, entries no clip uses any more (changed clips or settings) are deleted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm.auto import tqdm

from wan_model.config import ModelPreset, get_preset

from .buckets import Bucket, assign_bucket, make_buckets
from .cache import JsonTable, LatentCache, atomic_write_bytes, entry_key, trim_context
from .card import CardClip, write_card
from .config import VALIDATION_FOLDER, DatasetConfig, ModelSource, PrepareConfig, load_prepare_config
from .filters import Deduper, check_media, check_score, file_sha256, perceptual_hash
from .labels import LABEL_VALUES, AestheticLabels, LabelError, resolve_labels
from .prompts import check_template, prompt_variants, unit_hash
from .scan import ClipItem, scan_folder
from .typed_config import ConfigError
from .video import MediaInfo, VideoError, clip_windows, probe, read_frames, to_model_range

REPORT_NAME = "report.json"
LABELS_NAME = "labels.json"
THUMB_WIDTH = 160  # contact-sheet thumbnail width in pixels


class VAELike(Protocol):
    """What prepare needs of a VAE (wan_model.vae.WanVAEBase satisfies it)."""

    config: object  # a wan_model.config.VAEConfig; its .kind must be the preset's

    @property
    def stride(self) -> tuple[int, int, int]: ...

    @property
    def z_dim(self) -> int: ...

    def encode_distribution(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video: [B, 3, F, H, W] in [-1, 1] -> (mean, logvar) [B, z, F', H', W'] in normalised latent units."""


class TextEncoderLike(Protocol):
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context [B, 512, D], zero past each length; lengths [B])."""


@dataclass
class ClipReport:
    """One clip's outcome in report.json. status: 'used' | 'skipped'."""

    clip_id: str
    path: str
    status: str
    reason: str | None = None
    bucket: str | None = None
    entries: list[str] = field(default_factory=list)  # cache keys, one per window
    prompts: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)


@dataclass
class PrepareReport:
    clips: list[ClipReport]
    encoded: int  # cache entries written this run
    reused: int  # cache entries found valid and kept
    repaired: list[str]  # problems found in existing shards (those entries were dropped / re-encoded)
    pruned: int  # entries of earlier runs that this run no longer uses (old settings, removed clips)
    seconds: float
    cache_dir: Path

    @property
    def used(self) -> list[ClipReport]:
        return [c for c in self.clips if c.status == "used"]

    @property
    def skipped(self) -> list[ClipReport]:
        return [c for c in self.clips if c.status == "skipped"]


def _module_device_dtype(module: object) -> tuple[torch.device, torch.dtype]:
    params = getattr(module, "parameters", None)
    first = next(params(), None) if callable(params) else None
    return (first.device, first.dtype) if first is not None else (torch.device("cpu"), torch.float32)


def model_identity(source: ModelSource, preset: ModelPreset) -> dict:
    """What identifies the encoders in a cache key: preset (fixes shapes), weights folder, dtype."""
    release = str(Path(source.release).resolve()) if source.release else "random-init"
    return {"preset": preset.name, "vae": preset.vae.kind, "text_encoder": f"umt5:{release}", "dtype": source.dtype,
            "release": release}


def entry_settings(identity: dict, bucket: Bucket, fps: float, window: range, prompts: list[str],
                   image_cond: bool) -> dict:
    """Everything besides the file bytes that changes a cache entry (hashed by cache.entry_key)."""
    return {**identity, "bucket": bucket.name, "fps": fps, "window": [window.start, window.stop],
            "prompts": prompts, "image_cond": image_cond}


@torch.no_grad()
def encode_text(prompts: list[str], text_encoder: TextEncoderLike) -> dict[str, torch.Tensor]:
    """The K prompt variants -> {'context': [K, L, D] trimmed to the longest real length, 'context_lens': [K]}."""
    context, lengths = text_encoder.encode(prompts)
    return {"context": trim_context(context, lengths).cpu(), "context_lens": lengths.long().cpu()}


@torch.no_grad()
def encode_video(frames: torch.Tensor, vae: VAELike, image_cond: bool) -> dict[str, torch.Tensor]:
    """frames: [F, 3, H, W] uint8 -> latent_mean, latent_logvar [z, F', H', W'] fp32 (+ image_cond).

    image_cond follows the official I2V pipeline (wan/image2video.py): the VAE encodes the first frame
    followed by F - 1 zero frames (mid-grey in [-1, 1] units) and the latent mean is kept."""
    device, dtype = _module_device_dtype(vae)
    # uint8 crosses to the GPU (4x fewer bytes than float32), the scaling runs there.
    video = to_model_range(frames.to(device))[None].to(dtype)  # [1, 3, F, H, W]
    mean, logvar = vae.encode_distribution(video)
    out = {"latent_mean": mean[0].float().cpu(), "latent_logvar": logvar[0].float().cpu()}
    if image_cond:
        first = torch.zeros_like(video)
        first[:, :, 0] = video[:, :, 0]
        out["image_cond"] = vae.encode_distribution(first)[0][0].float().cpu()
    return out


def _thumbnail(frame: torch.Tensor) -> torch.Tensor:
    """[3, H, W] uint8 -> [3, h, THUMB_WIDTH] uint8, aspect kept."""
    h, w = frame.shape[-2:]
    size = (max(1, round(h * THUMB_WIDTH / w)), THUMB_WIDTH)
    return torch.nn.functional.interpolate(frame[None].float(), size=size, mode="area")[0].round().to(torch.uint8)


def training_buckets(ds: DatasetConfig, preset: ModelPreset) -> list[Bucket]:
    """The buckets clips are sized to: dataset.buckets on the preset's grid (sizes multiples of VAE stride x
    patch: 16 px for A14B, 32 for TI2V-5B). An I2V sample is conditioned on its own first frame, so for an
    I2V preset a still would be given the whole answer: frame count 1 is left out (ConfigError if nothing is
    left)."""
    b = ds.buckets
    frame_counts = list(b.frame_counts)
    if preset.task == "i2v":
        frame_counts = [n for n in frame_counts if n > 1]
        if not frame_counts:
            raise ConfigError(f"dataset.buckets.frame_counts {list(b.frame_counts)}: {preset.name} trains on clips "
                              f"(a still is its own image condition, nothing to learn); add a length such as "
                              f"{preset.frame_num}")
    return make_buckets(b.base_area, b.aspects, frame_counts, preset.latent_stride[1])


@dataclass
class FileFacts:
    """What one prepare run has read of each clip file, read once: its probe and its sha256. The validation
    split reads both for every clip before prepare takes the clips (prepare_all)."""

    _probes: dict[str, MediaInfo] = field(default_factory=dict)
    _sha256: dict[str, str] = field(default_factory=dict)

    def probe(self, path: Path) -> MediaInfo:
        """`video.probe` (VideoError when unusable; failures are not kept)."""
        if str(path) not in self._probes:
            self._probes[str(path)] = probe(path)
        return self._probes[str(path)]

    def sha256(self, path: Path) -> str:
        if str(path) not in self._sha256:
            self._sha256[str(path)] = file_sha256(path)
        return self._sha256[str(path)]


def usable_media(item: ClipItem, ds: DatasetConfig, preset: ModelPreset, buckets: list[Bucket],
                 files: FileFacts | None = None) -> bool:
    """Whether the clip passes the media checks prepare makes first (decodable, size, duration, a bucket it
    fills), from its probe alone: what a validation split is drawn among. files: this run's, which keep the
    probe for prepare."""
    try:
        info = (files or FileFacts()).probe(item.path)
    except VideoError:
        return False
    if check_media(info.width, info.height, info.duration_s, info.kind, ds.filters):
        return False
    if check_score(item.score, ds.filters):  # a metadata score (one computed from pixels is not known yet)
        return False
    frames = len(info.indices_at(ds.fps or preset.sample_fps))
    return assign_bucket(info.width, info.height, frames, buckets) is not None


class _Preparer:
    """The per-clip steps of `prepare`, sharing the run's settings, cache and duplicate memory."""

    def __init__(self, config: PrepareConfig, vae: VAELike, text_encoder: TextEncoderLike,
                 files: FileFacts | None = None):
        self.ds: DatasetConfig = config.dataset
        self.preset = get_preset(config.model.preset)
        self.fps = self.ds.fps or self.preset.sample_fps
        self.identity = model_identity(config.model, self.preset)
        self.image_cond = self.ds.i2v_condition or self.preset.task == "i2v"
        kind = getattr(getattr(vae, "config", None), "kind", None)
        if kind != self.preset.vae.kind:
            raise ValueError(f"model.preset {self.preset.name!r} trains on {self.preset.vae.kind} VAE latents, but the "
                             f"VAE given is {kind!r}; build it from the same preset (build_encoders)")
        self.vae, self.text_encoder = vae, text_encoder
        self.files = files or FileFacts()
        self.cache = LatentCache(self.ds.cache_dir)
        self.measured = JsonTable(Path(self.ds.cache_dir) / LABELS_NAME)
        self.dedupe = Deduper()
        self.buckets = training_buckets(self.ds, self.preset)
        self.encoded = self.reused = 0
        self.used_keys: set[str] = set()
        self.cards: list[CardClip] = []

    def repair(self) -> list[str]:
        """Drop entries whose shard is missing or corrupt (they are re-encoded if still wanted)."""
        problems = []
        for key in list(self.cache.entries):
            problem = self.cache.verify(key)
            if problem:
                problems.append(problem)
                self.cache.remove(key)
        if problems:
            self.cache.flush(force=True)
        return problems

    def prune(self) -> int:
        """After a complete run: delete entries no clip used (stale settings or clips), so the cache holds
        exactly this dataset. An interrupted run never gets here and keeps everything."""
        stale = [key for key in self.cache.entries if key not in self.used_keys]
        for key in stale:
            self.cache.remove(key)
        self.cache.flush(force=True)
        return len(stale)

    def _labels(self, user: dict, frames: torch.Tensor, key: str) -> AestheticLabels:
        """resolve_labels(user, frames), with the measured part looked up in labels.json by `key` (file hash,
        bucket, fps, window) so a re-run does not measure again; user labels still win."""
        computed = self.measured.get(key)
        if computed is None:
            computed = resolve_labels({}, frames).as_dict()
            self.measured.put(key, computed)
            self.measured.flush()
        labels = resolve_labels(user, None)
        labels.measurements = dict(computed["measurements"])
        for name in LABEL_VALUES:
            if getattr(labels, name) is None and computed.get(name) is not None:
                setattr(labels, name, computed[name])
                labels.source[name] = "computed"
        return labels

    def run(self, item: ClipItem) -> ClipReport:
        report = ClipReport(item.clip_id, str(item.path), "used")
        try:
            reason = self._process(item, report)
        except (VideoError, LabelError) as err:
            reason = str(err)
        if reason:
            report.status, report.reason = "skipped", reason
        return report

    def _process(self, item: ClipItem, report: ClipReport) -> str | None:
        info = self.files.probe(item.path)
        filters = self.ds.filters
        reason = check_media(info.width, info.height, info.duration_s, info.kind, filters)
        if reason:
            return reason
        sha = self.files.sha256(item.path)
        if filters.dedupe and (reason := self.dedupe.check_bytes(item.clip_id, sha)):
            return reason
        indices = info.indices_at(self.fps)
        bucket = assign_bucket(info.width, info.height, len(indices), self.buckets)
        if bucket is None:
            shortest = min(b.frames for b in self.buckets)
            if self.preset.task == "i2v":  # frame count 1 is never a bucket here (training_buckets)
                return (f"{len(indices)} frame(s) at {self.fps} fps, shorter than the shortest bucket ({shortest} "
                        f"frames): an I2V model trains on clips of 5 frames or more, not stills; add a length "
                        f"1 + 4k of at most {len(indices)} to dataset.buckets.frame_counts, or drop the clip"
                        if len(indices) >= 5 else f"{len(indices)} frame(s): an I2V model trains on clips of 5 "
                        f"frames or more, not stills; drop it")
            return (f"{len(indices)} frames at {self.fps} fps is shorter than the shortest bucket ({shortest} "
                    f"frames); add a shorter length to dataset.buckets.frame_counts or drop the clip")
        report.bucket = bucket.name
        windows = clip_windows(len(indices), bucket.frames, self.ds.windows.mode, self.ds.windows.max_windows,
                               self.ds.windows.stride)
        size = (bucket.height, bucket.width)
        frames = read_frames(item.path, [indices[i] for i in windows[0]], size)  # [F, 3, H, W] uint8
        thumb = _thumbnail(frames[0])
        user = dict(item.labels) | ({"score": item.score} if item.score is not None else {})
        labels = self._labels(user, frames, f"{sha}:{bucket.name}:{self.fps}:{windows[0].start}")
        report.labels = labels.as_dict()
        if reason := check_score(labels.score, filters):
            return reason
        if filters.dedupe and (reason := self.dedupe.check_frames(item.clip_id, perceptual_hash(frames))):
            return reason
        ds = self.ds
        report.prompts = prompt_variants(item.captions, labels.labels(), count=ds.prompt_variants,
                                         trigger=ds.trigger, template=ds.caption_template,
                                         label_dropout=ds.label_dropout, caption_dropout=ds.caption_dropout,
                                         seed=ds.seed, clip_id=item.clip_id)
        text: dict[str, torch.Tensor] | None = None  # the clip's prompts, encoded once for all its windows
        for number, window in enumerate(windows):
            settings = entry_settings(self.identity, bucket, self.fps, window, report.prompts, self.image_cond)
            key = entry_key(sha, settings)
            report.entries.append(key)
            self.used_keys.add(key)
            if self.cache.has(key):
                self.reused += 1
                continue
            if number:
                frames = read_frames(item.path, [indices[i] for i in window], size)
            text = text or encode_text(report.prompts, self.text_encoder)
            tensors = {**encode_video(frames, self.vae, self.image_cond), **text}
            meta = {"clip_id": item.clip_id, "path": str(item.path), "bucket": bucket.name,
                    "window": number, "frames": [window.start, window.stop], "fps": self.fps,
                    "prompts": report.prompts, "labels": report.labels, "settings": settings}
            self.cache.put(key, tensors, meta)
            self.encoded += 1
        self.cards.append(CardClip(item.clip_id, report.bucket, labels.labels(), thumb))
        return None


def held_out_ids(clip_ids: list[str], fraction: float, seed: int) -> set[str]:
    """The clips of a seeded validation split: round(fraction * n) of them (at least one when fraction > 0,
    never all), those with the lowest unit_hash(seed, clip id). Given the clips, a clip's membership depends
    only on its id and the seed, so re-running prepare (or resuming training) keeps the same held-out clips.
    prepare_all draws among the clips it can use (usable_media): a dataset with unusable clips prepared by
    code before 2026-12-05 may get another split when prepared again."""
    if fraction <= 0 or len(clip_ids) < 2:
        return set()
    count = min(len(clip_ids) - 1, max(1, round(fraction * len(clip_ids))))
    return set(sorted(clip_ids, key=lambda c: unit_hash(seed, c, "validation"))[:count])


def validation_config(config: PrepareConfig) -> PrepareConfig:
    """The prepare config of the held-out clips: their folder (validation.root, else dataset.root) into
    <cache_dir>/validation, every other setting as the dataset's."""
    ds, val = config.dataset, config.validation
    return replace(config, dataset=replace(ds, root=val.root or ds.root,
                                           cache_dir=str(Path(ds.cache_dir) / VALIDATION_FOLDER)))


def prepare_all(config: PrepareConfig, vae: VAELike, text_encoder: TextEncoderLike, *,
                progress: bool = True) -> tuple[PrepareReport, PrepareReport | None]:
    """The training set, then the held-out set when the config has a validation section (ValidationSettings):
    returns (training report, validation report or None). A fraction split keeps the held-out clips out
    of the training cache; it is drawn over contents (sha256), so copies of one file stay on one side."""
    val = config.validation
    if not val.enabled:
        return prepare(config, vae, text_encoder, progress=progress), None
    held: set[str] | None = None
    files = FileFacts()
    if val.root is not None:
        held_root, train_root = Path(val.root).resolve(), Path(config.dataset.root).resolve()
        if held_root == train_root or held_root.is_relative_to(train_root) or train_root.is_relative_to(held_root):
            raise ValueError(f"validation.root {val.root} and dataset.root {config.dataset.root} overlap (folders are "
                             f"scanned recursively): held-out clips would be trained on; give a folder of other clips "
                             f"outside dataset.root, or validation.fraction to hold some of dataset.root out")
    if val.root is None:
        scan = scan_folder(config.dataset.root, config.dataset.metadata)
        preset = get_preset(config.model.preset)
        buckets = training_buckets(config.dataset, preset)
        # Byte-identical files (one clip under two names) go to the same side: the split is drawn over one
        # name per content, then every name of a held-out content is held out. Only clips prepare can size
        # are drawn (an I2V still, a clip shorter than every bucket would leave the held-out set empty).
        by_content: dict[str, list[str]] = {}
        for item in scan.items:
            if usable_media(item, config.dataset, preset, buckets, files):
                by_content.setdefault(files.sha256(item.path), []).append(item.clip_id)
        drawn = held_out_ids([min(ids) for ids in by_content.values()], val.fraction, val.seed)
        held = {clip for ids in by_content.values() if min(ids) in drawn for clip in ids}
        if not held:
            raise ConfigError(f"validation.fraction {val.fraction}: {config.dataset.root} has {len(by_content)} "
                              f"usable clip(s), too few to hold one out; add clips or set validation.root")
    train = prepare(config, vae, text_encoder, progress=progress, files=files,
                    select=None if held is None else (lambda item: item.clip_id not in held))
    held_report = prepare(validation_config(config), vae, text_encoder, progress=progress, files=files,
                          select=None if held is None else (lambda item: item.clip_id in held))
    if not held_report.used:
        reasons = "; ".join(f"{c.clip_id}: {c.reason}" for c in held_report.clips if c.status == "skipped")[:400]
        raise ConfigError(f"validation: no held-out clip could be used ({reasons}; {held_report.cache_dir / REPORT_NAME})"
                          f"; set validation.seed to draw other clips, or validation.root to a folder of clips")
    return train, held_report


def prepare(config: PrepareConfig, vae: VAELike, text_encoder: TextEncoderLike, *, progress: bool = True,
            select: Callable[[ClipItem], bool] | None = None, files: FileFacts | None = None) -> PrepareReport:
    """Scan, filter, label, prompt, encode and cache a dataset (module docstring); returns what happened.

    select: which scanned clips this run takes (None: all); the validation split passes one.
    files: the probes and sha256s this run already made (FileFacts; each file is read for them once).
    Writes report.json, dataset_card.md and contact_sheet.png into dataset.cache_dir."""
    start = time.perf_counter()
    check_template(config.dataset.caption_template)
    runner = _Preparer(config, vae, text_encoder, files)
    repaired = runner.repair()
    scan = scan_folder(config.dataset.root, config.dataset.metadata)
    root = Path(config.dataset.root)
    clips = [ClipReport(s.path.relative_to(root).as_posix() if s.path.is_relative_to(root) else str(s.path),
                        str(s.path), "skipped", s.reason) for s in scan.skipped]
    items = [item for item in scan.items if select is None or select(item)]
    try:
        for item in tqdm(items, desc="prepare", unit="clip", disable=not progress, dynamic_ncols=True):
            clips.append(runner.run(item))
    finally:  # Ctrl-C or an error: keep what was done (a hard kill is covered by LatentCache's adoption)
        runner.cache.flush(force=True)
        runner.measured.flush(force=True)
    pruned = runner.prune()
    report = PrepareReport(clips, runner.encoded, runner.reused, repaired, pruned, time.perf_counter() - start,
                           Path(config.dataset.cache_dir))
    _write_report(report)
    write_card(report.cache_dir, runner.cards, [c for c in clips if c.status == "skipped"])
    return report


def _write_report(report: PrepareReport) -> None:
    data = {"encoded": report.encoded, "reused": report.reused, "repaired": report.repaired, "pruned": report.pruned,
            "seconds": round(report.seconds, 3), "used": len(report.used), "skipped": len(report.skipped),
            "clips": [asdict(c) for c in report.clips]}
    atomic_write_bytes(report.cache_dir / REPORT_NAME, json.dumps(data, indent=1, ensure_ascii=False).encode("utf-8"))


def build_encoders(source: ModelSource, seed: int = 0, device: str | None = None) -> tuple[VAELike, TextEncoderLike]:
    """The VAE and text encoder of `source`: from source.release when set, else random weights seeded by
    `seed` with a tiny trained tokenizer (tiny presets only)."""
    from wan_model.text_encoder import TextEncoder
    from wan_model.vae_io import build_vae, load_vae

    preset = get_preset(source.preset)
    dtype = getattr(torch, source.dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    release = source.release
    if release:
        from wan_model.release import load_release

        parts = load_release(release, preset.name)
        vae = load_vae(parts.vae_path, preset.vae, dtype=dtype, device=device)
        text = TextEncoder.from_release(parts.t5_path, parts.tokenizer_path, preset.text_encoder, dtype, device)
        return vae, text
    if not preset.name.startswith("tiny-"):
        raise ValueError(f"model.preset {preset.name!r} needs its weights: set model.release (or --release) to "
                         f"the downloaded release folder; random weights are only for tiny-* presets")
    import tempfile

    from wan_model.tiny_release import make_tiny_tokenizer

    torch.manual_seed(seed)
    vae = build_vae(preset.vae).to(device=device, dtype=dtype).eval().requires_grad_(False)
    with tempfile.TemporaryDirectory(prefix="wanlora-tokenizer-") as folder:
        text = TextEncoder.from_config(preset.text_encoder, make_tiny_tokenizer(folder), dtype=dtype, device=device)
    return vae, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.prepare",
                                     description="Encode a dataset folder into the latent cache (data/prepare.py).")
    parser.add_argument("config", help="prepare config or training recipe YAML (its model and dataset sections)")
    parser.add_argument("--release", help="official release folder (overrides model.release)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    config = load_prepare_config(args.config)
    if args.release:  # into the config, so the cache key names the weights actually used
        config = replace(config, model=replace(config.model, release=args.release))
    vae, text_encoder = build_encoders(config.model, seed=config.dataset.seed)
    for what, report in zip(("training", "held-out"), prepare_all(config, vae, text_encoder, progress=not args.no_progress)):
        if report is not None:
            print(f"{what}: {len(report.used)} clips used, {len(report.skipped)} skipped; {report.encoded} entries "
                  f"encoded, {report.reused} reused, {len(report.repaired)} repaired, {report.pruned} pruned in "
                  f"{report.seconds:.1f} s; see {report.cache_dir / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
