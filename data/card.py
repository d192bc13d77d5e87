"""The dataset card a user reads after `prepare`: dataset_card.md and contact_sheet.png in the cache folder.

dataset_card.md: clips used and skipped, clips per bucket, a histogram of each label's values, and the
skip reasons. contact_sheet.png: the first frame of each used clip in a grid, its id, bucket and labels
written under it.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .cache import atomic_write_bytes
from .prompts import LABEL_ORDER

CARD_NAME = "dataset_card.md"
SHEET_NAME = "contact_sheet.png"
SHEET_COLUMNS = 6
LINE_PX = 12  # height of one text line under a thumbnail (PIL's default bitmap font is ~11 px)


@dataclass(frozen=True)
class CardClip:
    """One used clip on the card. thumb: [3, h, w] uint8 (its first frame, shrunk)."""

    clip_id: str
    bucket: str
    labels: dict[str, str]
    thumb: torch.Tensor


def render_markdown(clips: list[CardClip], skipped: list) -> str:
    """The card text. skipped: records with .clip_id and .reason (prepare.ClipReport)."""
    lines = ["# Dataset card", "", f"- clips used: {len(clips)}", f"- clips skipped: {len(skipped)}", "",
             "## Clips per bucket (width x height x frames)", "", "| bucket | clips |", "| --- | --- |"]
    for bucket, count in sorted(Counter(c.bucket for c in clips).items()):
        lines.append(f"| {bucket} | {count} |")
    lines += ["", "## Labels", ""]
    for name in LABEL_ORDER:
        counts = Counter(c.labels.get(name, "(none)") for c in clips)
        lines += [f"### {name.replace('_', ' ')}", "", "| value | clips | |", "| --- | --- | --- |"]
        for value, count in counts.most_common():
            lines.append(f"| {value} | {count} | {'#' * count} |")
        lines.append("")
    if skipped:
        lines += ["## Skipped", "", "| clip | reason |", "| --- | --- |"]
        lines += [f"| {s.clip_id} | {str(s.reason).replace('|', '/')} |" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def contact_sheet(clips: list[CardClip], columns: int = SHEET_COLUMNS) -> Image.Image:
    """Grid of thumbnails, each with id, bucket and one line per label under it."""
    font = ImageFont.load_default()
    cell_w = max([int(c.thumb.shape[-1]) for c in clips] + [1])
    thumb_h = max([int(c.thumb.shape[-2]) for c in clips] + [1])
    text_lines = 2 + len(LABEL_ORDER)
    cell_h = thumb_h + text_lines * LINE_PX + 6
    rows = max(1, math.ceil(len(clips) / columns))
    sheet = Image.new("RGB", (cell_w * min(columns, max(1, len(clips))), cell_h * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for i, clip in enumerate(clips):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        sheet.paste(Image.fromarray(clip.thumb.permute(1, 2, 0).numpy().astype(np.uint8)), (x, y))
        text = [clip.clip_id, clip.bucket] + [f"{n.replace('_', ' ')}: {clip.labels[n]}" for n in LABEL_ORDER
                                              if n in clip.labels]
        for j, line in enumerate(text):
            draw.text((x + 2, y + thumb_h + 2 + j * LINE_PX), line[:40], fill="black", font=font)
    return sheet


def write_card(folder: Path, clips: list[CardClip], skipped: list) -> tuple[Path, Path]:
    """Write dataset_card.md and contact_sheet.png into `folder` (atomically); returns both paths."""
    import io

    folder.mkdir(parents=True, exist_ok=True)
    card, sheet = folder / CARD_NAME, folder / SHEET_NAME
    atomic_write_bytes(card, render_markdown(clips, skipped).encode("utf-8"))
    buffer = io.BytesIO()
    contact_sheet(clips).save(buffer, format="PNG")
    atomic_write_bytes(sheet, buffer.getvalue())
    return card, sheet
