"""Find the clips of a dataset folder and their captions and user labels.

Two layouts, as in diffusers' and HF `datasets`' image/video folders:

  * sidecars: `clip.mp4` + `clip.txt`; each non-empty line of the .txt is one caption.
  * metadata: `metadata.jsonl` or `metadata.csv` (read with HF `datasets`) with a `file_name` column
    relative to the folder, `caption` (text) or `captions` (list, jsonl only), optional label columns
    (lighting, colour_tone, contrast, composition, shot_size, camera_motion) and `score` in [0, 1], or
    the same names inside one `labels` mapping column ({"shot_size": "wide", "score": 0.4}; jsonl).
    A file may appear on several rows; its captions are merged and its labels taken from the first row
    that sets them. Media files the metadata does not list fall back to their .txt sidecar, so both
    layouts can be mixed in one folder.

A problem with one clip (missing file, empty or non-UTF-8 caption file, no caption) becomes a
`Skipped(path, reason)` and the scan goes on; a problem with the metadata file itself (unknown column,
no file_name column) raises, naming the file, the column and the valid ones.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .labels import FIELD_ALIASES, LABEL_VALUES
from .video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

# Label columns are the label vocabulary's names (data/labels.py), 'color_tone' accepted for 'colour_tone'.
LABEL_COLUMNS = (*LABEL_VALUES, *FIELD_ALIASES)
METADATA_COLUMNS = ("file_name", "caption", "captions", *LABEL_COLUMNS, "score", "labels")
METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


class ScanError(ValueError):
    """The dataset folder or its metadata file cannot be read at all."""


@dataclass(frozen=True)
class ClipItem:
    """One video or image with everything the user said about it.

    clip_id: path relative to the dataset root with '/' separators (stable across machines).
    labels: user-given label values by LABEL_COLUMNS name (only those given), as given: data.labels checks them.
    score: a number, or the value given when it is not one (data.labels rejects it by name)."""

    path: Path
    clip_id: str
    kind: str  # 'video' | 'image'
    captions: tuple[str, ...]
    labels: dict[str, object] = field(default_factory=dict)
    score: object = None


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


@dataclass
class ScanResult:
    items: list[ClipItem]
    skipped: list[Skipped]


def media_kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return None


def scan_folder(root: str | Path, metadata: str | None = None) -> ScanResult:
    """Scan `root`; `metadata` names the metadata file (relative to root or absolute), None: use
    metadata.jsonl / metadata.csv when present, else .txt sidecars."""
    root = Path(root)
    if not root.is_dir():
        raise ScanError(f"dataset root {root} is not a folder; set dataset.root to the folder of your clips")
    if metadata is None:
        found = [root / name for name in METADATA_NAMES if (root / name).is_file()]
        if len(found) > 1:
            raise ScanError(f"{root} holds both {found[0].name} and {found[1].name}; keep one or name it "
                            f"with dataset.metadata")
        meta_path = found[0] if found else None
    else:
        meta_path = Path(metadata) if Path(metadata).is_absolute() else root / metadata
        if not meta_path.is_file():
            raise ScanError(f"metadata file {meta_path} not found (dataset.metadata = {metadata!r})")
    if meta_path is None:
        return ScanResult(*_sidecar_items(root, _media_files(root), "a metadata.jsonl row"))
    return _scan_metadata(root, meta_path)


def read_caption_file(path: Path) -> tuple[list[str], str | None]:
    """Captions of a .txt sidecar, one per non-empty line; (captions, None) or ([], reason)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        return [], f"caption file {path.name} is not UTF-8 (byte {err.start}); re-save it as UTF-8"
    captions = [line.strip() for line in text.lstrip("\ufeff").splitlines() if line.strip()]
    if not captions:
        return [], f"caption file {path.name} is empty; write one caption per line"
    return captions, None


def _media_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and media_kind(p) and not p.name.startswith("."))


def _clip_id(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _sidecar_items(root: Path, paths: list[Path], alternative: str) -> tuple[list[ClipItem], list[Skipped]]:
    """Clips captioned by .txt sidecars; a clip without one is skipped, the reason naming `alternative`."""
    items, skipped = [], []
    for path in paths:
        sidecar = path.with_suffix(".txt")
        if not sidecar.is_file():
            skipped.append(Skipped(path, f"no caption: add {sidecar.name} next to it or {alternative}"))
            continue
        captions, problem = read_caption_file(sidecar)
        if problem:
            skipped.append(Skipped(path, problem))
            continue
        items.append(ClipItem(path, _clip_id(root, path), media_kind(path), tuple(captions)))
    return items, skipped


def _read_table(meta_path: Path) -> list[dict]:
    """Rows of metadata.jsonl / .csv through HF datasets (its caches go to a throwaway folder)."""
    import datasets

    kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(meta_path.suffix.lower())
    if kind is None:
        raise ScanError(f"{meta_path}: metadata must be .jsonl or .csv, found {meta_path.suffix!r}")
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="wanlora-meta-") as tmp:
        try:
            table = datasets.load_dataset(kind, data_files=str(meta_path), split="train", cache_dir=tmp,
                                          keep_in_memory=True)
        except Exception as err:  # datasets wraps parser errors in several types; all mean "unreadable"
            raise ScanError(f"{meta_path}: cannot be read as {kind}: {err}") from None
    unknown = [c for c in table.column_names if c not in METADATA_COLUMNS]
    if unknown:
        raise ScanError(f"{meta_path}: unknown column(s) {', '.join(unknown)}; valid columns are "
                        f"{', '.join(METADATA_COLUMNS)}")
    if "file_name" not in table.column_names:
        raise ScanError(f"{meta_path}: no 'file_name' column; each row must name its clip relative to "
                        f"{meta_path.parent}")
    if "caption" not in table.column_names and "captions" not in table.column_names:
        raise ScanError(f"{meta_path}: no 'caption' or 'captions' column")
    return table.to_list()


def _row_captions(row: dict) -> list[str]:
    found = []
    if isinstance(row.get("caption"), str):
        found.append(row["caption"])
    captions = row.get("captions")
    if isinstance(captions, str):
        found.append(captions)
    elif isinstance(captions, list):
        found.extend(c for c in captions if isinstance(c, str))
    return [c.strip() for c in found if c.strip()]


def _scan_metadata(root: Path, meta_path: Path) -> ScanResult:
    rows = _read_table(meta_path)
    merged: dict[str, dict] = {}
    skipped: list[Skipped] = []
    inside = Path(os.path.normpath(root))
    for line, row in enumerate(rows, start=2 if meta_path.suffix.lower() == ".csv" else 1):
        name = row.get("file_name")
        where = f"{meta_path.name} row {line}"
        if not isinstance(name, str) or not name.strip():
            skipped.append(Skipped(meta_path, f"{where}: empty file_name"))
            continue
        # Normalised so that 'a/../b.mp4' and 'b.mp4' are one clip, and '../x' or '/x' is caught.
        path = Path(os.path.normpath(root / name))
        if inside not in path.parents:
            skipped.append(Skipped(meta_path, f"{where}: file_name {name!r} points outside {root}; name each clip "
                                              f"by its path relative to the dataset folder"))
            continue
        try:
            exists = path.is_file()
        except OSError as err:  # a name too long for the file system, or otherwise unusable
            skipped.append(Skipped(meta_path, f"{where}: file_name {name[:80]!r} is not usable ({err.strerror})"))
            continue
        if not exists:
            skipped.append(Skipped(path, f"{where} names {name}, which does not exist under {root}"))
            continue
        if media_kind(path) is None:
            skipped.append(Skipped(path, f"{where}: {path.suffix} is not a supported video "
                                         f"({', '.join(sorted(VIDEO_EXTENSIONS))}) or image "
                                         f"({', '.join(sorted(IMAGE_EXTENSIONS))})"))
            continue
        entry = merged.setdefault(_clip_id(root, path), {"path": path, "captions": [], "labels": {},
                                                          "score": None})
        entry["captions"].extend(c for c in _row_captions(row) if c not in entry["captions"])
        nested = row.get("labels") if isinstance(row.get("labels"), dict) else {}
        flat = {c: row[c] for c in (*LABEL_COLUMNS, "score") if row.get(c) is not None}
        for column, value in {**nested, **flat}.items():
            if value is None or (isinstance(value, float) and math.isnan(value)) or \
                    (isinstance(value, str) and not value.strip()):
                continue  # an empty cell: not given
            # Names and values are checked against the vocabulary by data.labels (a bad one skips the clip), so
            # a value of the wrong type ('0.2' as text, a number for a label) is kept as given, never dropped.
            if column == "score":
                if entry["score"] is None:
                    number = isinstance(value, (int, float)) and not isinstance(value, bool)
                    entry["score"] = float(value) if number else value
            elif (name := FIELD_ALIASES.get(column, column)) not in entry["labels"]:
                entry["labels"][name] = value.strip() if isinstance(value, str) else value
    items = []
    for clip_id, entry in merged.items():
        if not entry["captions"]:
            skipped.append(Skipped(entry["path"], f"no caption in {meta_path.name}; fill its caption column"))
            continue
        items.append(ClipItem(entry["path"], clip_id, media_kind(entry["path"]), tuple(entry["captions"]),
                              entry["labels"], entry["score"]))
    listed = {item.path for item in items} | {s.path for s in skipped}
    unlisted = [path for path in _media_files(root) if path not in listed]
    sidecar_items, sidecar_skipped = _sidecar_items(root, unlisted, f"a row in {meta_path.name}")
    return ScanResult(sorted(items + sidecar_items, key=lambda i: i.clip_id), skipped + sidecar_skipped)
