"""Adapter evaluation: render a prompt suite with the base model and with each adapter, same seeds.

    python sample.py evaluate --release DIR --suite SUITE.yaml --adapters A [B ...] [--strengths 0.5 1.0]
        [--run RUN_DIR] [--out DIR]

A grid: every adapter at every strength, every prompt, every seed, plus the base model. The release's
experts, VAE and text encoder are loaded once; adapters are switched by attaching hooks (no reload or
re-cast of the base weights), once per variant. Renders already on disk with the same settings are
reused (a stopped evaluation resumes); a progress bar shows the ETA; the report gives each render's time.

Writes, under --out (default RUN_DIR/eval or outputs/eval):
  videos/<prompt>-<seed>-<variant>.mp4   every render, with a PNG frame strip, its settings and numbers (.json)
                                        and its contact-sheet frames (.sheet.npy) beside it
  sheet-<prompt>-<seed>.png             contact sheet: one row per variant (base first), same frames
  report.html                           videos, sheets, palette and flicker checks, the recipe and the loss curve
  metrics.json                          the numbers in the report

Numeric checks that need no extra model: each render's palette (mean R, G, B, brightness, saturation,
warmth = mean(R - B)) compared with the training clips' palette (distance in that 6-number space: does the
adapter move the palette toward the style?) and temporal flicker (mean |difference| of consecutive frames'
mean brightness, in 0..255 units).

Suite file (YAML):
    defaults: {size: 480x832, frames: 81, steps: 40}
    prompts:
      - prompt: "a red fox in snow, golden hour"
        seeds: [0, 1]
      - prompt: "..."
        size: 832x480
Keys: prompt, seeds (or seed), size (default: the model's, 480x832 for A14B and 704x1280 for TI2V-5B; with
an image, the area, the image's aspect ratio giving the shape as in sample.py), frames, steps, shift,
guide (G or [LOW, HIGH]), solver (unipc, dpm++, euler), image (relative to the suite file), negative_prompt.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass, field, replace
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from data.typed_config import ConfigError
from wan_model.files import atomic_write_text
from wan_model.solvers import SOLVERS

from .report import contact_sheet, write_report

SUITE_KEYS = {"prompt", "seeds", "seed", "size", "frames", "steps", "image", "negative_prompt", "guide", "shift",
              "solver"}


@dataclass
class SuiteEntry:
    prompt: str
    seeds: list[int]
    height: int | None  # None: the model's sample_size (evaluate fills it in)
    width: int | None
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide: tuple[float, float] | None = None
    image: Path | None = None
    negative_prompt: str | None = None
    line: int = 0  # where the entry starts in the suite file, for messages
    solver: str = "unipc"


@dataclass
class Variant:
    """One column of the comparison: the base model (no adapters) or one adapter set at a strength."""

    name: str
    adapters: list[Path] = field(default_factory=list)
    strength: float = 1.0


def _parse_size(value, where: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in str(value).lower().split("x"))
        return h, w
    except ValueError:
        raise ConfigError(f"{where}: size must be HEIGHTxWIDTH, e.g. 480x832; got {value!r}") from None


def load_suite(path: str | Path) -> list[SuiteEntry]:
    """Read a prompt suite; a bad entry is named by its line in the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the suite ({err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise ConfigError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("prompts"), list) or not raw["prompts"]:
        raise ConfigError(f"{path}: a suite is a mapping with a non-empty 'prompts' list (and optional 'defaults')")
    unknown = set(raw) - {"defaults", "prompts"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level keys {sorted(unknown)}; valid: defaults, prompts")
    defaults = raw.get("defaults") or {}
    prompt_nodes = next(v for k, v in root.value if k.value == "prompts").value
    entries = []
    for item, node in zip(raw["prompts"], prompt_nodes):
        line = node.start_mark.line + 1
        where = f"{path}:{line}"
        if isinstance(item, str):
            item = {"prompt": item}
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
            raise ConfigError(f"{where}: each entry needs a non-empty 'prompt' text")
        merged = {**defaults, **item}
        bad = set(merged) - SUITE_KEYS
        if bad:
            raise ConfigError(f"{where}: unknown keys {sorted(bad)}; valid: {sorted(SUITE_KEYS)}")
        seeds = merged.get("seeds", [merged.get("seed", 0)])
        if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ConfigError(f"{where}: seeds must be a list of whole numbers, got {seeds!r}")
        height, width = _parse_size(merged["size"], where) if "size" in merged else (None, None)
        solver = merged.get("solver", "unipc")
        if solver not in SOLVERS:
            raise ConfigError(f"{where}: solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        guide = merged.get("guide")
        if guide is not None:
            values = guide if isinstance(guide, list) else [guide, guide]
            if len(values) != 2 or not all(isinstance(g, (int, float)) and not isinstance(g, bool) for g in values):
                raise ConfigError(f"{where}: guide must be a number or a list [LOW, HIGH] of two numbers, "
                                  f"got {guide!r}")
            guide = tuple(float(g) for g in values)
        for key in ("frames", "steps"):
            if key in merged and (not isinstance(merged[key], int) or merged[key] < 1):
                raise ConfigError(f"{where}: {key} must be a positive whole number, got {merged[key]!r}")
        image = Path(merged["image"]) if merged.get("image") else None
        if image is not None and not image.is_absolute():
            image = path.parent / image
        entries.append(SuiteEntry(prompt=merged["prompt"], seeds=seeds, height=height, width=width,
                                  frames=merged.get("frames"), steps=merged.get("steps"), shift=merged.get("shift"),
                                  guide=guide, image=image, negative_prompt=merged.get("negative_prompt"), line=line,
                                  solver=solver))
    return entries


# -- numeric checks -------------------------------------------------------------------------------------
def palette(frames: np.ndarray) -> dict[str, float]:
    """Palette of [F, H, W, 3] uint8 frames: mean R, G, B, brightness (Rec. 601 luma), saturation, warmth."""
    # channel planes in uint8, element-wise: numpy's float reductions over a last axis of size 3 took 1.9 s
    # for one 17-frame 480x832 render on a 2-core machine (6.5 s at 81 frames); this takes 0.06 s (0.22 s)
    r, g, b = (np.ascontiguousarray(frames[..., c]) for c in range(3))
    maxc, minc = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    # where a pixel's max is 0 so is its spread: dividing by max(maxc, 1) gives the 0 saturation of black
    saturation = (maxc - minc).astype(np.float32) / np.maximum(maxc, 1).astype(np.float32)
    means = {name: float(plane.mean(dtype=np.float64)) for name, plane in (("r", r), ("g", g), ("b", b))}
    return {**means, "brightness": 0.299 * means["r"] + 0.587 * means["g"] + 0.114 * means["b"],
            "saturation": float(saturation.mean(dtype=np.float64) * 255), "warmth": means["r"] - means["b"]}


def flicker(frames: np.ndarray) -> float:
    """Mean |change| of per-frame mean brightness between consecutive frames (0..255); 0 for one frame."""
    # per-frame channel means, then luma: the mean is linear, and a float copy of every pixel took 2.2 s
    # at 81 frames of 480x832 on a 2-core CPU (this: 0.08 s)
    means = np.stack([frames[..., c].mean(axis=(1, 2), dtype=np.float64) for c in range(3)], axis=1)
    luma = means @ np.array([0.299, 0.587, 0.114])
    return float(np.abs(np.diff(luma)).mean()) if len(luma) > 1 else 0.0


def palette_distance(a: dict[str, float], b: dict[str, float]) -> float:
    return float(np.sqrt(sum((a[k] - b[k]) ** 2 for k in a)))


def mean_palette(palettes: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([p[k] for p in palettes])) for k in palettes[0]}


def training_clip_frames(clips_dir: Path, size: tuple[int, int] | None = None, max_clips: int = 16,
                         count: int = 5) -> Iterator[np.ndarray]:
    """`count` evenly spaced frames ([count, H, W, 3] uint8; resized and centre-cropped to `size` when given)
    of each readable training clip, at most `max_clips` of them; unreadable files are passed over."""
    from data.video import VideoError, probe, read_frames

    yielded = 0
    for path in sorted(p for p in clips_dir.rglob("*") if p.suffix.lower() in {".mp4", ".mov", ".webm", ".mkv"}):
        if yielded >= max_clips:
            return
        try:
            info = probe(path)
            idx = np.linspace(0, info.num_frames - 1, num=min(count, info.num_frames)).round().astype(int).tolist()
            frames = read_frames(path, idx, size).permute(0, 2, 3, 1).numpy()
        except VideoError:
            continue
        yielded += 1
        yield frames


def training_palette(clips_dir: Path, max_clips: int = 16) -> dict[str, float] | None:
    """Mean palette over up to 16 training clips (a few frames each), or None when no clip can be read."""
    palettes = [palette(frames) for frames in training_clip_frames(clips_dir, max_clips=max_clips)]
    return mean_palette(palettes) if palettes else None


def adapter_fingerprint(paths: list[Path]) -> list[list]:
    """What identifies an adapter set on disk: each .safetensors file's path, size and modification time."""
    files = []
    for path in paths:
        path = Path(path)
        for f in (sorted(path.glob("*.safetensors")) if path.is_dir() else [path]):
            st = f.stat()
            files.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return files


def render_settings(pipe, entry: SuiteEntry, seed: int, variant: Variant, identity: dict | None = None) -> dict:
    """Everything a render depends on; a render on disk with the same settings is reused. identity: what
    names the model (the release folder, the device), so renders of another release are not reused."""
    image = None
    if entry.image is not None:
        st = Path(entry.image).stat()
        # "fit": the video takes the image's aspect ratio within the size's area (renders made before are
        # stretched to the size, so they are not reused).
        image = [str(Path(entry.image).resolve()), st.st_size, st.st_mtime_ns, "fit"]
    return {"preset": pipe.preset.name, "prompt": entry.prompt, "negative_prompt": entry.negative_prompt,
            "seed": seed, "size": [entry.height, entry.width], "frames": entry.frames, "steps": entry.steps,
            "shift": entry.shift, "guide": list(entry.guide) if entry.guide else None, "image": image,
            **({"solver": entry.solver} if entry.solver != "unipc" else {}),  # unipc: as renders made before
            "adapters": adapter_fingerprint(variant.adapters), "strength": variant.strength,
            "dtype": str(pipe.dtype), "device": str(pipe.device), **_numerics(pipe), **_float32_parameters(pipe),
            **(identity or {})}


def _float32_parameters(pipe) -> dict:
    """A bf16 pipeline whose float32-read parameters stay float32 (load_pipeline since 9ca32d9) renders other
    numbers than one with every parameter rounded: renders made before are not reused."""
    expert = next(iter(pipe.experts.values()))
    kept = pipe.dtype != torch.float32 and expert.blocks[0].modulation.dtype == torch.float32
    return {"float32_parameters": True} if kept else {}


def _numerics(pipe) -> dict:
    """The speed options that change numbers (fp8 weights, fp8 attention) when any is on; compile does
    not count. Empty for the default path, so renders made before these options existed are reused.
    FP8 matmuls also name their accumulation and, since 069788e, the FFN's row scale taken before GELU:
    renders made before either are not reused for the numbers of today."""
    speed = pipe.speed
    if speed.fp8_weights == "none" and not speed.fp8_attention:
        return {}
    numerics = {"fp8_weights": speed.fp8_weights, "fp8_attention": speed.fp8_attention}
    if speed.fp8_weights == "matmul":
        numerics.update(fp8_accumulation="fast" if speed.fp8_fast_accum else "promoted", fp8_ffn_scale="before_gelu")
    return {"numerics": numerics}


def render_file_name(key: str, variant: str) -> str:
    """File stem of one render, '<key>-<variant>', safe as a stem: '.' written 'p' ('step-2@0.5' ->
    'step-2@0p5'; a dot would be read as a suffix and two strengths would share files), anything but
    letters, digits, '-', '_' and '@' written '_'."""
    return re.sub(r"[^A-Za-z0-9_@-]", "_", f"{key}-{variant}".replace(".", "p"))


def _sync(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def evaluate(pipe, suite: list[SuiteEntry], variants: list[Variant], out: Path, run: Path | None = None,
             clips_dir: Path | None = None, progress: bool = True, identity: dict | None = None) -> Path:
    """Render every (entry, seed) for every variant, then write sheets, metrics.json and report.html.

    The grid runs variant by variant, so adapters are switched once per variant (hooks detached and
    attached; the base weights are never reloaded or re-cast; each switch is timed). A render whose
    sidecar (videos/<name>.json) holds the same settings (render_settings) is reused, so an evaluation
    that stopped resumes where it was. A progress bar shows the renders left and the ETA."""
    from tqdm.auto import tqdm

    from wan_model.media import save_frames, save_png, to_uint8_frames
    from wan_model.pipeline import GenerationRequest

    started = time.perf_counter()
    stems = [render_file_name("", v.name) for v in variants]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"variants {[v.name for v in variants]} would share render files; give them distinct names")
    suite = [replace(e, height=e.height or pipe.preset.sample_size[0], width=e.width or pipe.preset.sample_size[1])
             for e in suite]
    if not pipe.preset.is_moe:
        two = next((e for e in suite if e.guide and e.guide[0] != e.guide[1]), None)
        if two is not None:
            raise ConfigError(f"suite entry at line {two.line}: guide {list(two.guide)}: {pipe.preset.name} is one "
                              f"model (no experts); give one number")
    check_adapters(pipe, variants)
    images = suite_images(pipe, suite)
    reference = training_palette(clips_dir) if clips_dir is not None else None
    metrics: dict = {"training_palette": reference, "renders": {}, "switches": []}
    jobs = [(f"p{p_index}-s{seed}", entry, seed) for p_index, entry in enumerate(suite) for seed in entry.seeds]
    sheet_rows: dict[str, list] = {key: [] for key, _, _ in jobs}
    videos: dict[str, list[Path]] = {key: [] for key, _, _ in jobs}
    bar = tqdm(total=len(jobs) * len(variants), desc="evaluate", unit="render", disable=not progress,
               dynamic_ncols=True)
    try:
        for variant in variants:
            switched = False
            for key, entry, seed in jobs:
                name = f"{key}-{variant.name}"
                stem = out / "videos" / render_file_name(key, variant.name)
                file = lambda suffix: stem.parent / (stem.name + suffix)  # noqa: E731
                settings = render_settings(pipe, entry, seed, variant, identity)
                sidecar = file(".json")
                cached = json.loads(sidecar.read_text()) if sidecar.is_file() else None
                if cached and cached.get("settings") == settings and file(".mp4").is_file() \
                        and file(".sheet.npy").is_file():
                    m = dict(cached["metrics"], reused=True)
                    frames = np.load(file(".sheet.npy"))
                else:
                    if not switched:
                        _sync(pipe)
                        t0 = time.perf_counter()
                        pipe.set_adapters(variant.adapters, variant.strength)
                        _sync(pipe)
                        metrics["switches"].append({"variant": variant.name, "seconds": time.perf_counter() - t0})
                        switched = True
                    request = GenerationRequest(prompt=entry.prompt, seed=seed, height=entry.height,
                                                width=entry.width, frames=entry.frames, steps=entry.steps,
                                                solver=entry.solver,
                                                shift=entry.shift, guide_scale=entry.guide,
                                                image=images.get(id(entry)), negative_prompt=entry.negative_prompt)
                    t0 = time.perf_counter()
                    video = pipe.generate(request).video
                    seconds = time.perf_counter() - t0
                    all_frames = to_uint8_frames(video)
                    # The old sidecar goes first: stopped while the new files are written, a later run must
                    # not take them for the renders the old sidecar describes.
                    sidecar.unlink(missing_ok=True)
                    save_frames(all_frames, stem, fps=pipe.preset.sample_fps)
                    idx = np.linspace(0, len(all_frames) - 1, num=min(5, len(all_frames))).round().astype(int)
                    frames = all_frames[idx]
                    np.save(file(".sheet.npy"), frames)
                    m = {"prompt": entry.prompt, "seed": seed, "variant": variant.name, "strength": variant.strength,
                         "palette": palette(all_frames), "flicker": flicker(all_frames), "seconds": seconds}
                    if reference is not None:
                        m["palette_distance_to_training"] = palette_distance(m["palette"], reference)
                    atomic_write_text(sidecar, json.dumps({"settings": settings, "metrics": m}))
                    m = dict(m, reused=False)
                metrics["renders"][name] = m
                sheet_rows[key].append((variant.name, frames))
                videos[key].append(file(".mp4"))
                bar.update(1)
                bar.set_postfix(variant=variant.name)
    finally:
        bar.close()
    pipe.set_adapters([], 1.0)
    sheets, targets = [], {}
    for key, entry, _ in jobs:  # a training clip first, at the renders' size: the look the adapters aim for
        size = tuple(sheet_rows[key][0][1].shape[1:3])  # an image sets the render's shape (image_output_size)
        if clips_dir is not None and size not in targets:
            targets[size] = next(training_clip_frames(clips_dir, size, max_clips=1), None)
        target = targets.get(size)
        rows = ([("training clip", target)] if target is not None else []) + sheet_rows[key]
        sheets.append(save_png(contact_sheet(rows), out / f"sheet-{key}.png"))
    rendered = [m["seconds"] for m in metrics["renders"].values() if not m["reused"]]
    metrics["timing"] = {"wall_s": time.perf_counter() - started, "renders": len(rendered),
                         "reused": len(metrics["renders"]) - len(rendered), "render_s_sum": float(sum(rendered)),
                         "switch_s_sum": float(sum(sw["seconds"] for sw in metrics["switches"]))}
    metrics["summary"] = summarise(metrics["renders"], [v.name for v in variants])
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return write_report(out, sheets, videos, metrics, run)


def check_adapters(pipe, variants: list[Variant]) -> None:
    """Read every adapter file of the grid once before the first render: a missing, damaged or empty one, or
    one made for another model or expert, is a ConfigError naming the file (not a traceback after the base
    renders)."""
    from wan_model.lora_apply import difference_target
    from wan_model.lora_formats import META_EXPERT, load_lora

    seen = set()
    for variant in variants:
        for path in map(Path, variant.adapters):
            if path in seen:
                continue
            seen.add(path)
            files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
            if not files:
                raise ConfigError(f"adapter {path}: no .safetensors LoRA files in this folder; give an adapters "
                                  f"step folder (high_noise/low_noise/dense.safetensors) or a LoRA file")
            for f in files:
                try:
                    _, report = load_lora(f, config=pipe.preset.transformer)
                except Exception as err:  # safetensors' own error type for a damaged file, ValueError, ...
                    if isinstance(err, (MemoryError, KeyboardInterrupt, torch.OutOfMemoryError)):
                        raise
                    message = str(err).splitlines()[0] if str(err) else type(err).__name__
                    hint = "" if isinstance(err, (ValueError, FileNotFoundError)) else \
                        "; not a readable .safetensors file: re-export or re-download it"
                    raise ConfigError(f"adapter {f}: {message}{hint}") from None
                expert = report.metadata.get(META_EXPERT)
                if expert and expert not in pipe.experts:
                    raise ConfigError(f"adapter {f}: LoRA is for expert {expert!r}, but {pipe.preset.name} has "
                                      f"experts {sorted(pipe.experts)}; is it an adapter of another model?")
                for model in ([pipe.experts[expert]] if expert else pipe.experts.values()):
                    for parameter in report.diffs:  # e.g. a weight difference on fp8-stored weights
                        try:
                            difference_target(model, parameter, f)
                        except ValueError as err:
                            raise ConfigError(f"adapter {err}") from None


def suite_images(pipe, suite: list[SuiteEntry]) -> dict[int, torch.Tensor]:
    """The first frames of the suite's entries, by id(entry); an I2V suite entry without one, or an image
    that cannot be read, is a ConfigError naming the entry's line and the fix."""
    from wan_model.media import read_image

    images = {}
    for entry in suite:
        where = f"suite entry at line {entry.line} ({entry.prompt!r})"
        if entry.image is None:
            if pipe.preset.task == "i2v":
                raise ConfigError(f"{where}: {pipe.preset.name} is image-to-video; give the first frame with "
                                  f"'image: FILE' (a PNG or JPEG, relative to the suite file) in the entry or "
                                  f"in defaults")
            continue
        try:
            images[id(entry)] = read_image(entry.image)
        except ValueError as err:
            raise ConfigError(f"{where}: image: {err}; give a PNG or JPEG file (a relative path is read from "
                              f"the suite file's folder)") from None
    return images


def grid_variants(adapters: list[Path], strengths: list[float]) -> list[Variant]:
    """Each adapter at each strength: named by the adapter ('step-00002000' or a file's stem), plus
    '@<strength>' when there are several strengths."""
    out = []
    for path in adapters:
        name = path.name if path.is_dir() else path.stem
        for strength in strengths:
            out.append(Variant(name if len(strengths) == 1 else f"{name}@{strength:g}", [path], strength))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--adapters: two adapters share the name {[n for n in names if names.count(n) > 1][0]!r} "
                          f"(renders would overwrite each other); pass folders or files with distinct names")
    return out


def summarise(renders: dict[str, dict], variants: list[str]) -> dict:
    """Per variant: mean palette distance to the training clips over its renders, and for each adapter
    variant the share of the base renders' distance it closes, 1 - d_adapter / d_base (1: the renders'
    palette is the clips'; 0: no change; < 0: further away)."""
    out: dict = {"variants": {}}
    for name in variants:
        d = [m["palette_distance_to_training"] for m in renders.values()
             if m["variant"] == name and "palette_distance_to_training" in m]
        if d:
            out["variants"][name] = {"palette_distance": float(np.mean(d))}
    base = out["variants"].get(variants[0]) if variants else None
    if base and base["palette_distance"] > 0:
        for name in variants[1:]:
            if name in out["variants"]:
                v = out["variants"][name]
                v["closed"] = 1.0 - v["palette_distance"] / base["palette_distance"]
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from wan_model.pipeline import load_pipeline

    from .cli import add_speed_arguments, speed_from_args

    ap = argparse.ArgumentParser(prog="sample.py evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", required=True, type=Path)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--suite", required=True, type=Path)
    ap.add_argument("--adapters", nargs="*", type=Path, default=[],
                    help="adapter folders (a checkpoint step's adapters/) or files; each is one variant")
    ap.add_argument("--strength", type=float, default=None, help="one strength for every adapter (default 1.0)")
    ap.add_argument("--strengths", type=float, nargs="+", default=None,
                    help="render each adapter at each of these strengths (a grid: adapters x strengths)")
    ap.add_argument("--run", type=Path, default=None, help="training run folder (recipe, loss curve)")
    ap.add_argument("--clips", type=Path, default=None, help="training clips folder, for the palette check")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--offload-experts", action="store_true")
    add_speed_arguments(ap)
    args = ap.parse_args(argv)
    from .cli import UsageError

    suite = load_suite(args.suite)
    missing = [str(p) for p in args.adapters if not p.exists()]
    if missing:
        raise UsageError(f"--adapters: {', '.join(missing)} not found; give adapter step folders or LoRA files")
    if not args.release.is_dir():
        raise UsageError(f"--release {args.release}: no such folder; point it at the model's release folder")
    out = args.out or ((args.run / "eval") if args.run else Path("outputs/eval"))
    try:
        pipe = load_pipeline(args.release, args.preset, device=args.device, dtype=getattr(torch, args.dtype),
                             offload_experts=args.offload_experts, speed=speed_from_args(args))
    except (ValueError, KeyError) as err:
        raise UsageError(f"--release {args.release}: {str(err).splitlines()[0]}") from None
    strengths = args.strengths or [1.0 if args.strength is None else args.strength]
    variants = [Variant("base")] + grid_variants(args.adapters, strengths)
    report = evaluate(pipe, suite, variants, out, run=args.run, clips_dir=args.clips,
                      identity={"release": str(args.release.resolve())})
    print(f"wrote {report}")
    return 0
