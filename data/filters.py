"""Which clips are kept: score, resolution, duration and duplicates; every drop carries its reason.

Duplicates are found two ways: the sha256 of the file bytes (the same file copied or renamed) and a
64-bit average hash per frame of a few frames (the same footage re-encoded or resized); two clips whose
perceptual hashes differ in at most `PHASH_MAX_BITS` of 64 bits per frame on average are duplicates and
the later one (in scan order) is dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import FilterSettings

PHASH_SIDE = 8  # 8 x 8 grey thumbnail -> 64 bits per frame
PHASH_FRAMES = 4  # frames hashed per clip, spread evenly
PHASH_MAX_BITS = 4  # mean differing bits per frame (of 64) still called a duplicate


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_media(width: int, height: int, duration_s: float | None, kind: str, settings: FilterSettings) -> str | None:
    """The reason a clip's size or length is out of range, or None. Images have no duration check."""
    if width < settings.min_width or height < settings.min_height:
        return (f"{width}x{height} is below the minimum {settings.min_width}x{settings.min_height} "
                f"(filters.min_width / min_height)")
    if kind == "video" and duration_s is not None:
        if duration_s < settings.min_duration_s:
            return f"{duration_s:.2f} s is shorter than filters.min_duration_s = {settings.min_duration_s}"
        if settings.max_duration_s is not None and duration_s > settings.max_duration_s:
            return f"{duration_s:.2f} s is longer than filters.max_duration_s = {settings.max_duration_s}"
    return None


def check_score(score: float | None, settings: FilterSettings) -> str | None:
    """The reason a clip's aesthetic score is too low, or None (no threshold, or no score to compare)."""
    if settings.min_score is None or score is None:
        return None
    if score < settings.min_score:
        return f"aesthetic score {score:.3f} is below filters.min_score = {settings.min_score}"
    return None


def perceptual_hash(frames: torch.Tensor, count: int = PHASH_FRAMES) -> torch.Tensor:
    """Average hash of `count` evenly spread frames.

    frames: uint8 [F, 3, H, W]. Returns bool [count, 64]: bit i = (grey 8x8 thumbnail pixel i > its mean).
    Clips shorter than `count` repeat frames, so every hash has the same shape.
    """
    idx = torch.linspace(0, frames.shape[0] - 1, count).round().long()
    grey = frames[idx].float().mean(dim=1, keepdim=True)  # [count, 1, H, W]
    thumb = F.adaptive_avg_pool2d(grey, PHASH_SIDE).flatten(1)  # [count, 64]
    return thumb > thumb.mean(dim=1, keepdim=True)


@dataclass
class Deduper:
    """Remembers the clips kept so far; `check` returns why a new clip is a duplicate, or None."""

    max_bits: float = PHASH_MAX_BITS
    _by_sha: dict[str, str] = field(default_factory=dict, init=False)
    _hashes: list[torch.Tensor] = field(default_factory=list, init=False)
    _ids: list[str] = field(default_factory=list, init=False)

    def check_bytes(self, clip_id: str, sha256: str) -> str | None:
        first = self._by_sha.setdefault(sha256, clip_id)
        return None if first == clip_id else f"byte-identical to {first} (filters.dedupe)"

    def check_frames(self, clip_id: str, phash: torch.Tensor) -> str | None:
        """phash: bool [count, 64] from perceptual_hash. Kept clips are remembered; duplicates are not."""
        if self._hashes:
            stacked = torch.stack(self._hashes)  # [N, count, 64]
            distance = (stacked != phash).sum(-1).float().mean(-1)  # [N] mean differing bits per frame
            best = int(distance.argmin())
            if distance[best] <= self.max_bits:
                return (f"near-duplicate of {self._ids[best]} ({distance[best]:.1f} of 64 bits differ per "
                        f"frame; filters.dedupe)")
        self._hashes.append(phash)
        self._ids.append(clip_id)
        return None
