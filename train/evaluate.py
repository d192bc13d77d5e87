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
"""

from __future__ import annotations

import argparse
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw

from data.typed_config import ConfigError
from wan_model.files import atomic_write_text

SUITE_KEYS = {"prompt", "seeds", "seed", "size", "frames", "steps", "image", "negative_prompt", "guide", "shift"}


@dataclass
class SuiteEntry:
    prompt: str
    seeds: list[int]
    height: int
    width: int
    frames: int | None = None
    steps: int | None = None
    shift: float | None = None
    guide: tuple[float, float] | None = None
    image: Path | None = None
    negative_prompt: str | None = None
    line: int = 0  # where the entry starts in the suite file, for messages


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
        height, width = _parse_size(merged.get("size", "480x832"), where)
        guide = merged.get("guide")
        if guide is not None:
            guide = tuple(float(g) for g in (guide if isinstance(guide, list) else [guide, guide]))
        for key in ("frames", "steps"):
            if key in merged and (not isinstance(merged[key], int) or merged[key] < 1):
                raise ConfigError(f"{where}: {key} must be a positive whole number, got {merged[key]!r}")
        image = Path(merged["image"]) if merged.get("image") else None
        if image is not None and not image.is_absolute():
            image = path.parent / image
        entries.append(SuiteEntry(prompt=merged["prompt"], seeds=seeds, height=height, width=width,
                                  frames=merged.get("frames"), steps=merged.get("steps"), shift=merged.get("shift"),
                                  guide=guide, image=image, negative_prompt=merged.get("negative_prompt"), line=line))
    return entries


# -- numeric checks -------------------------------------------------------------------------------------
def palette(frames: np.ndarray) -> dict[str, float]:
    """Palette of [F, H, W, 3] uint8 frames: mean R, G, B, brightness (Rec. 601 luma), saturation, warmth."""
    rgb = frames.astype(np.float32)
    maxc, minc = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(maxc > 0, (maxc - minc) / np.maximum(maxc, 1e-6), 0.0)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return {"r": float(rgb[..., 0].mean()), "g": float(rgb[..., 1].mean()), "b": float(rgb[..., 2].mean()),
            "brightness": float(luma.mean()), "saturation": float(saturation.mean() * 255),
            "warmth": float((rgb[..., 0] - rgb[..., 2]).mean())}


def flicker(frames: np.ndarray) -> float:
    """Mean |change| of per-frame mean brightness between consecutive frames (0..255); 0 for one frame."""
    luma = (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean(axis=(1, 2))
    return float(np.abs(np.diff(luma)).mean()) if len(luma) > 1 else 0.0


def palette_distance(a: dict[str, float], b: dict[str, float]) -> float:
    return float(np.sqrt(sum((a[k] - b[k]) ** 2 for k in a)))


def mean_palette(palettes: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([p[k] for p in palettes])) for k in palettes[0]}


# -- pictures -------------------------------------------------------------------------------------------
def contact_sheet(rows: list[tuple[str, np.ndarray]], frames_per_row: int = 5) -> Image.Image:
    """One row per variant: its name, then `frames_per_row` evenly spaced frames. rows: (name, [F,H,W,3])."""
    label_w = 140
    _, h, w, _ = rows[0][1].shape
    zoom = max(1, -(-128 // h))  # small renders (the tiny demo's 64 px) are shown at least 128 px high
    h, w = h * zoom, w * zoom
    sheet = Image.new("RGB", (label_w + frames_per_row * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, frames) in enumerate(rows):
        idx = np.linspace(0, len(frames) - 1, num=min(frames_per_row, len(frames))).round().astype(int)
        for c, i in enumerate(idx):
            frame = Image.fromarray(frames[i])
            if zoom > 1:
                frame = frame.resize((w, h), Image.NEAREST)
            sheet.paste(frame, (label_w + c * w, r * h))
        draw.text((6, r * h + h // 2 - 6), name[:22], fill="black")
    return sheet


def _metrics_rows(metrics_path: Path) -> list[dict]:
    """The JSON lines of metrics.jsonl ([] when the file is absent; broken lines skipped)."""
    if not metrics_path.exists():
        return []
    rows = []
    for line in metrics_path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curves_svg(series: dict[str, list[tuple[float, float]]], mark_best: bool = False, width: int = 640,
               height: int = 200) -> str:
    """An inline SVG line chart, one line per series name (x: step, y: loss); '' when there is no point.
    mark_best: a dot on each series' lowest point, and its value and step in the legend."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = (width - 40) / max(x1 - x0, 1e-9)
    sy = (height - 30) / max(y1 - y0, 1e-9)
    at = lambda x, y: (30 + (x - x0) * sx, height - 20 - (y - y0) * sy)  # noqa: E731
    colours = ["#c0392b", "#2471a3", "#1e8449", "#7d3c98"]
    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
             f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ccc"/>']
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = colours[i % len(colours)]
        path = " ".join("{:.1f},{:.1f}".format(*at(x, y)) for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        label = html.escape(name)
        if mark_best:
            bx, by = min(pts, key=lambda p: p[1])
            parts.append('<circle cx="{:.1f}" cy="{:.1f}" r="4" fill="{}"/>'.format(*at(bx, by), colour))
            label += f": best {by:.4g} at step {bx:.0f}"
        parts.append(f'<text x="{40 + (200 if mark_best else 120) * i}" y="14" fill="{colour}" '
                     f'font-size="12">{label}</text>')
    parts.append(f'<text x="4" y="{height - 4}" font-size="10">step {x0:.0f}..{x1:.0f}, loss {y0:.3g}..{y1:.3g}</text>')
    return "".join(parts) + "</svg>"


def loss_curve_svg(metrics_path: Path) -> str:
    """The training loss per expert from metrics.jsonl ('' when there is none)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in _metrics_rows(metrics_path):
        if "loss" in row and "step" in row:
            series.setdefault(str(row.get("expert", "all")), []).append((float(row["step"]), float(row["loss"])))
    return curves_svg(series)


def validation_curve_svg(metrics_path: Path) -> str:
    """Each expert's validation loss by step from metrics.jsonl, best step marked ('' when there is none)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in _metrics_rows(metrics_path):
        for name, result in (row.get("validation") or {}).items():
            series.setdefault(name, []).append((float(row["steps_done"]), float(result["loss"])))
    return curves_svg(series, mark_best=True)


def write_report(out: Path, sheets: list[Path], videos: dict[str, list[Path]], metrics: dict, run: Path | None) -> Path:
    """report.html next to the renders; paths are relative so the folder can be moved."""
    recipe = ""
    if run is not None and (run / "recipe.yaml").exists():
        recipe = f"<h2>Recipe</h2><pre>{html.escape((run / 'recipe.yaml').read_text())}</pre>"
    curve = loss_curve_svg(run / "metrics.jsonl") if run is not None else ""
    rows = []
    for key, m in metrics["renders"].items():
        dist = m.get("palette_distance_to_training")
        took = f"{m['seconds']:.1f}" + (" (earlier run)" if m.get("reused") else "") if "seconds" in m else ""
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{m['palette']['brightness']:.1f}</td>"
                    f"<td>{m['palette']['saturation']:.1f}</td><td>{m['palette']['warmth']:.1f}</td>"
                    f"<td>{m['flicker']:.2f}</td><td>{'' if dist is None else f'{dist:.1f}'}</td>"
                    f"<td>{took}</td></tr>")
    body = ["<!doctype html><meta charset='utf-8'><title>wanlora evaluation</title>",
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:right}</style>",
            "<h1>Adapter evaluation</h1>"]
    summary = metrics.get("summary", {}).get("variants", {})
    base_name = next(iter(summary), None)
    closed = [(name, v) for name, v in summary.items() if "closed" in v]
    if closed:
        items = "".join(
            f"<li><b>{html.escape(name)}</b>: palette distance to the training clips "
            f"{summary[base_name]['palette_distance']:.1f} (base) &rarr; {v['palette_distance']:.1f}: "
            f"the adapter closes <b>{v['closed']:.0%}</b> of it</li>" for name, v in closed)
        body.append(f"<ul>{items}</ul><p>Palette: mean R, G, B, brightness, saturation and warmth of every frame; "
                    f"distance: Euclidean, in 0..255 units, between a variant's renders and the training clips.</p>")
    body.append("<h2>Contact sheets (rows: base, then each adapter)</h2>")
    body += [f"<p>{html.escape(s.stem)}<br><img src='{s.relative_to(out)}' style='max-width:100%'></p>" for s in sheets]
    body.append("<h2>Palette and flicker</h2><table><tr><th>render</th><th>brightness</th><th>saturation</th>"
                "<th>warmth</th><th>flicker</th><th>palette distance to training clips</th><th>render s</th></tr>")
    body += rows + ["</table>"]
    timing = metrics.get("timing")
    if timing:
        switches = metrics.get("switches", [])
        longest = max((sw["seconds"] for sw in switches), default=0.0)
        body.append(f"<p>{timing['renders']} renders in {timing['render_s_sum']:.1f} s, {timing['reused']} reused from an "
                    f"earlier run; {len(switches)} adapter switches, {timing['switch_s_sum']:.2f} s in all (longest "
                    f"{longest:.2f} s); wall time {timing['wall_s']:.1f} s.</p>")
    if curve:
        body.append(f"<h2>Training loss</h2>{curve}")
    validation = validation_curve_svg(run / "metrics.jsonl") if run is not None else ""
    if validation:
        body.append(f"<h2>Validation loss (held-out clips)</h2>{validation}")
    body.append("<h2>Videos</h2>")
    for key, paths in videos.items():
        body.append(f"<h3>{html.escape(key)}</h3>")
        body += [f"<video src='{p.relative_to(out)}' controls loop muted width='320'></video>" for p in paths]
    body.append(recipe)
    return atomic_write_text(out / "report.html", "\n".join(body))


def training_palette(clips_dir: Path, max_clips: int = 16) -> dict[str, float] | None:
    """Mean palette over up to 16 training clips (a few frames each), or None when no clip can be read."""
    from data.video import VideoError, probe, read_frames

    palettes = []
    for path in sorted(p for p in clips_dir.rglob("*") if p.suffix.lower() in {".mp4", ".mov", ".webm", ".mkv"}):
        try:
            info = probe(path)
            idx = np.linspace(0, info.num_frames - 1, num=min(5, info.num_frames)).round().astype(int).tolist()
            frames = read_frames(path, idx, None).permute(0, 2, 3, 1).numpy()
        except VideoError:
            continue
        palettes.append(palette(frames))
        if len(palettes) >= max_clips:
            break
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


def render_settings(pipe, entry: SuiteEntry, seed: int, variant: Variant) -> dict:
    """Everything a render depends on; a render on disk with the same settings is reused."""
    image = None
    if entry.image is not None:
        st = Path(entry.image).stat()
        image = [str(Path(entry.image).resolve()), st.st_size, st.st_mtime_ns]
    return {"preset": pipe.preset.name, "prompt": entry.prompt, "negative_prompt": entry.negative_prompt,
            "seed": seed, "size": [entry.height, entry.width], "frames": entry.frames, "steps": entry.steps,
            "shift": entry.shift, "guide": list(entry.guide) if entry.guide else None, "image": image,
            "adapters": adapter_fingerprint(variant.adapters), "strength": variant.strength,
            "dtype": str(pipe.dtype)}


def _sync(pipe) -> None:
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def evaluate(pipe, suite: list[SuiteEntry], variants: list[Variant], out: Path, run: Path | None = None,
             clips_dir: Path | None = None, progress: bool = True) -> Path:
    """Render every (entry, seed) for every variant, then write sheets, metrics.json and report.html.

    The grid runs variant by variant, so adapters are switched once per variant (hooks detached and
    attached; the base weights are never reloaded or re-cast; each switch is timed). A render whose
    sidecar (videos/<name>.json) holds the same settings (render_settings) is reused, so an evaluation
    that stopped resumes where it was. A progress bar shows the renders left and the ETA."""
    from tqdm.auto import tqdm

    from wan_model.media import read_image, save_png, save_video, to_uint8_frames
    from wan_model.pipeline import GenerationRequest

    started = time.perf_counter()
    reference = training_palette(clips_dir) if clips_dir is not None else None
    metrics: dict = {"training_palette": reference, "renders": {}, "switches": []}
    jobs = [(f"p{p_index}-s{seed}", entry, seed) for p_index, entry in enumerate(suite) for seed in entry.seeds]
    images = {id(entry): read_image(entry.image) for _, entry, _ in jobs if entry.image}
    sheet_rows: dict[str, list] = {key: [] for key, _, _ in jobs}
    videos: dict[str, list[Path]] = {key: [] for key, _, _ in jobs}
    bar = tqdm(total=len(jobs) * len(variants), desc="evaluate", unit="render", disable=not progress,
               dynamic_ncols=True)
    try:
        for variant in variants:
            switched = False
            for key, entry, seed in jobs:
                name = f"{key}-{variant.name}"
                stem = out / "videos" / name
                settings = render_settings(pipe, entry, seed, variant)
                sidecar = stem.with_suffix(".json")
                cached = json.loads(sidecar.read_text()) if sidecar.is_file() else None
                if cached and cached.get("settings") == settings and stem.with_suffix(".mp4").is_file() \
                        and stem.with_suffix(".sheet.npy").is_file():
                    m = dict(cached["metrics"], reused=True)
                    frames = np.load(stem.with_suffix(".sheet.npy"))
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
                                                shift=entry.shift, guide_scale=entry.guide,
                                                image=images.get(id(entry)), negative_prompt=entry.negative_prompt)
                    t0 = time.perf_counter()
                    video = pipe.generate(request).video
                    seconds = time.perf_counter() - t0
                    save_video(video, stem, fps=pipe.preset.sample_fps)
                    all_frames = to_uint8_frames(video)
                    idx = np.linspace(0, len(all_frames) - 1, num=min(5, len(all_frames))).round().astype(int)
                    frames = all_frames[idx]
                    np.save(stem.with_suffix(".sheet.npy"), frames)
                    m = {"prompt": entry.prompt, "seed": seed, "variant": variant.name, "strength": variant.strength,
                         "palette": palette(all_frames), "flicker": flicker(all_frames), "seconds": seconds}
                    if reference is not None:
                        m["palette_distance_to_training"] = palette_distance(m["palette"], reference)
                    atomic_write_text(sidecar, json.dumps({"settings": settings, "metrics": m}))
                    m = dict(m, reused=False)
                metrics["renders"][name] = m
                sheet_rows[key].append((variant.name, frames))
                videos[key].append(stem.with_suffix(".mp4"))
                bar.update(1)
                bar.set_postfix(variant=variant.name)
    finally:
        bar.close()
    pipe.set_adapters([], 1.0)
    sheets = [save_png(contact_sheet(rows), out / f"sheet-{key}.png") for key, rows in sheet_rows.items()]
    rendered = [m["seconds"] for m in metrics["renders"].values() if not m["reused"]]
    metrics["timing"] = {"wall_s": time.perf_counter() - started, "renders": len(rendered),
                         "reused": len(metrics["renders"]) - len(rendered), "render_s_sum": float(sum(rendered)),
                         "switch_s_sum": float(sum(sw["seconds"] for sw in metrics["switches"]))}
    metrics["summary"] = summarise(metrics["renders"], [v.name for v in variants])
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return write_report(out, sheets, videos, metrics, run)


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
    ap.add_argument("--offload-experts", action="store_true")
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
        pipe = load_pipeline(args.release, args.preset, device=args.device, offload_experts=args.offload_experts)
    except (ValueError, KeyError) as err:
        raise UsageError(f"--release {args.release}: {str(err).splitlines()[0]}") from None
    variants = [Variant("base")] + grid_variants(args.adapters, args.strengths or [args.strength or 1.0])
    report = evaluate(pipe, suite, variants, out, run=args.run, clips_dir=args.clips)
    print(f"wrote {report}")
    return 0
