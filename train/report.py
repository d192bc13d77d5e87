"""The evaluation report: contact sheets, the training and validation curves, report.html.

`write_report` writes report.html beside the renders of `train/evaluate.py`: the share of the palette
distance each adapter closes, the contact sheets (rows: base, then each adapter), the palette and flicker
table with each render's time, the adapter switches, the training loss and the validation loss (best step
marked) from the run's metrics.jsonl, the videos and the run's recipe. Paths are relative, so the folder
can be moved.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from wan_model.files import atomic_write_text


def contact_sheet(rows: list[tuple[str, np.ndarray]], frames_per_row: int = 5) -> Image.Image:
    """One row per variant: its name, then `frames_per_row` evenly spaced frames. rows: (name, [F,H,W,3]).

    Every frame keeps its own shape (rows may differ: a training clip beside renders of another size): the
    cells are as large as the largest frame, and each frame sits in its cell's top-left corner unstretched."""
    label_w = 140
    zoom = max(1, -(-128 // min(f.shape[1] for _, f in rows)))  # small renders (the tiny demo's) at 128 px or more
    h = max(f.shape[1] for _, f in rows) * zoom
    w = max(f.shape[2] for _, f in rows) * zoom
    sheet = Image.new("RGB", (label_w + frames_per_row * w, len(rows) * h), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, frames) in enumerate(rows):
        idx = np.linspace(0, len(frames) - 1, num=min(frames_per_row, len(frames))).round().astype(int)
        for c, i in enumerate(idx):
            frame = Image.fromarray(frames[i])
            if zoom > 1:
                frame = frame.resize((frame.width * zoom, frame.height * zoom), Image.NEAREST)
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
    series = {name: [(x, y) for x, y in pts if math.isfinite(y)] for name, pts in series.items()}
    series = {name: pts for name, pts in series.items() if pts}  # a skipped step logs loss NaN: not drawn
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
    body.append("<h2>Contact sheets (rows: a training clip when the clips are known, the base model, then each "
                "adapter)</h2>")
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
