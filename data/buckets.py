"""Training buckets (width x height x frames) and a batch sampler that never mixes them.

A batch must be one tensor [B, C, F, H, W], so clips are grouped by size: each clip goes to the bucket
of the nearest aspect ratio and the longest frame count it has; batches are drawn within one bucket.

    buckets = make_buckets(480 * 832, [832 / 480, 1.0, 480 / 832], [81, 1], multiple=16)
    bucket = assign_bucket(1920, 1080, available_frames=112, buckets=buckets)   # 832x480x81
    # a 40-frame clip gets 832x480x1 (its first frame as an image); with frame_counts [81] alone, None
    sampler = BucketBatchSampler([b.name for b in item_buckets], batch_size=2, seed=0)
    DataLoader(dataset, batch_sampler=sampler)
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Sampler


@dataclass(frozen=True)
class Bucket:
    """One training size: width x height pixels, `frames` frames (1 + 4k; 1 for images)."""

    width: int
    height: int
    frames: int

    @property
    def aspect(self) -> float:
        """width / height."""
        return self.width / self.height

    @property
    def name(self) -> str:
        """'832x480x81': width x height x frames, the key used in caches and the sampler."""
        return f"{self.width}x{self.height}x{self.frames}"


def bucket_size(name: str) -> tuple[int, int, int]:
    """(width, height, frames) of a bucket name such as '832x480x81' (`Bucket.name`)."""
    try:
        width, height, frames = (int(v) for v in name.split("x"))
    except ValueError:
        raise ValueError(f"bucket name {name!r} is not WIDTHxHEIGHTxFRAMES (e.g. '832x480x81')") from None
    return width, height, frames


def make_buckets(base_area: int, aspects: list[float], frame_counts: list[int], multiple: int) -> list[Bucket]:
    """One bucket per (aspect, frame count), each about `base_area` pixels.

    For aspect a = w / h: h = sqrt(area / a), w = a h, each rounded to the nearest multiple of `multiple`
    (VAE stride x patch size: 8 x 2 = 16 for A14B, 16 x 2 = 32 for TI2V-5B) and at least one multiple.
    480 * 832 with aspect 832 / 480 gives 832 x 480 exactly. Duplicates (aspects that round to the same
    size) are merged; sorted by aspect, then frames.
    """
    if base_area <= 0 or multiple <= 0:
        raise ValueError(f"base_area and multiple must be positive, found {base_area} and {multiple}")
    if not aspects or not frame_counts:
        raise ValueError("need at least one aspect ratio and one frame count")
    bad_aspects = [a for a in aspects if not a > 0]
    if bad_aspects:
        raise ValueError(f"aspect ratios must be positive (width / height), found {bad_aspects}")
    bad_frames = [n for n in frame_counts if n < 1 or (n - 1) % 4]
    if bad_frames:
        raise ValueError(f"frame counts must be 1 + 4k (1, 5, ..., 81), found {bad_frames}; "
                         f"the VAE compresses time by 4 after the first frame")
    buckets = set()
    for aspect in aspects:
        height = math.sqrt(base_area / aspect)
        w = max(multiple, round(aspect * height / multiple) * multiple)
        h = max(multiple, round(height / multiple) * multiple)
        buckets.update(Bucket(w, h, n) for n in frame_counts)
    return sorted(buckets, key=lambda b: (b.aspect, b.frames, b.width))


def assign_bucket(width: int, height: int, available_frames: int, buckets: list[Bucket]) -> Bucket | None:
    """The bucket for a clip of width x height with `available_frames` frames (after resampling).

    Nearest aspect by |log(w / h) - log(bucket aspect)| (so 2:1 and 1:2 are equally far from 1:1); among
    those sizes, the nearest area; then the longest frame count <= available_frames. None when the clip is
    shorter than every frame count of that size (the caller records the skip).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"clip size must be positive, found {width}x{height}")
    if not buckets:
        raise ValueError("no buckets given; build them with make_buckets")
    log_aspect = math.log(width / height)
    sizes = {(b.width, b.height) for b in buckets}
    size = min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - log_aspect), 9),
                                     abs(math.log(s[0] * s[1] / (width * height)))))
    fitting = [b for b in buckets if (b.width, b.height) == size and b.frames <= available_frames]
    return max(fitting, key=lambda b: b.frames) if fitting else None


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of item indices, each from one bucket; deterministic per (seed, epoch); resumable.

    bucket_of_item[i] is item i's bucket name. Each epoch: with shuffle, items of each bucket are permuted
    by a generator seeded with (seed, epoch), cut into batches (a short last batch per bucket is dropped
    when drop_last), and the batches of all buckets are shuffled together; without shuffle, buckets in
    name order, items in index order.

    Resuming: `state_dict()` is {'seed', 'epoch', 'position', 'fingerprint'}, position = batches handed
    out so far this epoch. A DataLoader with workers prefetches, so the trainer should store the number
    of batches it has consumed as 'position' rather than trust the sampler's count. After
    `load_state_dict`, the next iteration skips exactly `position` batches of that epoch; `set_epoch`
    with a different epoch starts that epoch from its first batch. len() is the batches in a full epoch.
    """

    def __init__(self, bucket_of_item: list[str], batch_size: int, seed: int = 0, drop_last: bool = False,
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, found {batch_size}")
        self.bucket_of_item = list(bucket_of_item)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.epoch = 0
        self._position = 0  # batches handed out in the current epoch
        self._skip = 0  # batches to skip at the start of the next iteration (after load_state_dict)
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(self.bucket_of_item):
            groups.setdefault(name, []).append(index)
        self._groups = dict(sorted(groups.items()))
        digest = hashlib.sha256("\n".join(self.bucket_of_item).encode()).hexdigest()[:16]
        self._fingerprint = f"{len(self.bucket_of_item)}:{batch_size}:{int(drop_last)}:{digest}"

    def _batches(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # distinct stream per (seed, epoch)
        batches = []
        for items in self._groups.values():
            order = torch.tensor(items)
            if self.shuffle:
                order = order[torch.randperm(len(items), generator=gen)]
            for start in range(0, len(items), self.batch_size):
                batch = order[start:start + self.batch_size].tolist()
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        start, self._skip = self._skip, 0
        for position in range(start, len(batches)):
            self._position = position + 1
            yield batches[position]

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(items) / self.batch_size) for items in self._groups.values())

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a different epoch than the loaded one drops the resume skip."""
        if epoch != self.epoch:
            self._skip = 0
            self._position = 0
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self._position,
                "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration of epoch state['epoch'] starts after state['position'] batches.

        Raises ValueError when the seed or the dataset (items, batch size, drop_last) differ from the
        checkpoint's, since the batch order would not be the same.
        """
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler {self.seed}; "
                             f"resume with the same seed or start a new run")
        if state.get("fingerprint", self._fingerprint) != self._fingerprint:
            raise ValueError("sampler state was saved for a different dataset (items, buckets, batch size or "
                             "drop_last changed); re-prepare the same data or start a new run")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"sampler position {position} is outside [0, {len(self)}]")
        self.epoch = int(state["epoch"])
        self._position = self._skip = position
