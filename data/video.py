"""Decoding media into frame tensors: decord for video (frame-accurate `get_batch`), PIL for images.

An image is a 1-frame clip, so every later step (windows, buckets, labels, VAE encoding) treats both
the same. The pipeline for one clip::

    info = probe(path)                                   # size, frame count, fps (no decoding)
    idx = info.indices_at(16)                            # source frame per 16 fps time step
    win = clip_windows(len(idx), 81, "uniform", 3)[0]    # a 1+4k stretch of the resampled clip
    frames = read_frames(path, [idx[i] for i in win], (480, 832))   # [81, 3, 480, 832] uint8
    video = to_model_range(frames)                       # [3, 81, 480, 832] float in [-1, 1]
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"})
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
# Frames decoded and resized together: bounds memory at 1080p (16 x 6 MB uint8) while keeping batches.
_DECODE_CHUNK = 16
# Relative spread of frame steps above which a file counts as variable-frame-rate.
_VFR_TOLERANCE = 0.01
# Fractions of a frame ignored when counting steps: float32 timestamps (decord) and float fps must not add
# a step exactly at the end (1.45 s + 0.05 s = 1.5000000477 s at 10 fps is 15 steps, not 16).
_STEP_SLACK = 1e-4
_EXIF_ORIENTATION = 0x0112
_EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that rotate by 90 degrees: width and height swap


class VideoError(Exception):
    """A media file cannot be used: missing, empty, unsupported extension, corrupt or unreadable.

    The message starts with the file path and says the cause, e.g.
    ``clips/a.mp4: cannot decode as video (zero bytes); re-export the file``.
    """


@dataclass(frozen=True)
class MediaInfo:
    """What `probe` learns about a file without decoding it.

    fps and duration_s are 0.0 for an image. frame_times holds each frame's start time in seconds for a
    variable-frame-rate video (None when the rate is constant, where frame i starts at i / fps).
    """

    path: Path
    kind: Literal["video", "image"]
    width: int
    height: int
    num_frames: int
    fps: float
    duration_s: float
    frame_times: tuple[float, ...] | None = None

    def indices_at(self, target_fps: float) -> list[int]:
        """Source frame index for each time step of `target_fps` (see `resample_indices`)."""
        return resample_indices(self.num_frames, self.fps, target_fps, self.frame_times)


def _media_kind(path: Path) -> Literal["video", "image"]:
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    known = ", ".join(sorted(VIDEO_EXTENSIONS | IMAGE_EXTENSIONS))
    raise VideoError(f"{path}: unsupported extension {suffix!r}; expected one of {known}")


def _check_file(path: Path) -> Literal["video", "image"]:
    kind = _media_kind(path)
    if not path.is_file():
        raise VideoError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty (zero bytes); re-export or remove it")
    return kind


def _open_video(path: Path):
    """A decord VideoReader, with decord's errors turned into VideoError naming the file."""
    import decord

    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except (decord.DECORDError, RuntimeError) as err:
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VideoError(f"{path}: cannot decode as video ({cause}); is the file complete and a real video?") from None
    if len(reader) == 0:
        raise VideoError(f"{path}: video has no decodable frames; re-export the file")
    return reader


def _frame_times(reader) -> tuple[tuple[float, ...] | None, float]:
    """(start times if the frame rate varies else None, duration in seconds) from decord's timestamps.

    decord gives each frame [start, end] from the stream's pts, but end = start + a fixed nominal frame
    duration, so variable rates show only in the steps between starts.
    """
    stamps = np.asarray(reader.get_frame_timestamp(range(len(reader))), dtype=np.float64)  # [N, 2] start, end
    duration = float(stamps[-1, 1])
    steps = np.diff(stamps[:, 0])
    if len(steps) and steps.mean() > 0 and float(np.abs(steps - steps.mean()).max()) > _VFR_TOLERANCE * steps.mean():
        return tuple(float(t) for t in stamps[:, 0]), duration
    return None, duration


def probe(path: str | Path) -> MediaInfo:
    """Size, frame count and frame rate of a video or image; raises VideoError if it is unusable."""
    path = Path(path)
    kind = _check_file(path)
    if kind == "image":
        from PIL import Image

        try:
            with Image.open(path) as img:
                img.verify()  # catches truncated / corrupt data that open() alone accepts
            with Image.open(path) as img:
                width, height = img.size
                if img.getexif().get(_EXIF_ORIENTATION) in _EXIF_TRANSPOSED:  # phone photo stored sideways
                    width, height = height, width
        except (OSError, ValueError, SyntaxError) as err:
            raise VideoError(f"{path}: cannot read as an image ({err}); is the file complete?") from None
        return MediaInfo(path, "image", width, height, 1, 0.0, 0.0)
    reader = _open_video(path)
    height, width = reader[0].shape[:2]
    fps = float(reader.get_avg_fps())
    if not fps > 0:
        raise VideoError(f"{path}: video reports frame rate {fps}; re-export it with a fixed frame rate")
    frame_times, duration = _frame_times(reader)
    duration = duration or len(reader) / fps
    if frame_times is not None:
        fps = len(reader) / duration  # the container's average is not meaningful for a variable rate
    return MediaInfo(path, "video", int(width), int(height), len(reader), fps, duration, frame_times)


def resample_indices(num_src_frames: int, src_fps: float, target_fps: float,
                     timestamps: Sequence[float] | None = None) -> list[int]:
    """Source frame index shown at each time step of `target_fps`, nearest frame in time.

    Target times are t_k = k / target_fps for every k with t_k < duration, duration = num_src_frames /
    src_fps, so the count is ceil(num_src_frames * target_fps / src_fps): 350 frames at 50 fps -> 112 at
    16 fps; 106 at 30 fps (3.53 s) -> 57 at 16 fps. Constant rate: index_k = floor(t_k * src_fps + 1/2).
    Variable rate: `timestamps` (each frame's start time in seconds, increasing, as decord reports) give
    the frame whose start is nearest t_k, and the last frame lasts as long as the one before it.
    A single frame (an image) gives [0]. target_fps above src_fps repeats frames.
    """
    if num_src_frames < 1:
        raise ValueError(f"num_src_frames must be at least 1, found {num_src_frames}")
    if num_src_frames == 1:
        return [0]
    if not target_fps > 0:
        raise ValueError(f"target_fps must be positive, found {target_fps}")
    if timestamps is None:
        if not src_fps > 0:
            raise ValueError(f"src_fps must be positive, found {src_fps}")
        ratio = src_fps / target_fps
        count = math.ceil(num_src_frames / ratio - _STEP_SLACK)
        return [min(num_src_frames - 1, math.floor(k * ratio + 0.5 + _STEP_SLACK)) for k in range(count)]
    starts = list(timestamps)
    if len(starts) != num_src_frames:
        raise ValueError(f"{len(starts)} timestamps for {num_src_frames} frames; pass one start time per frame")
    duration = starts[-1] + (starts[-1] - starts[-2])  # the last frame lasts as long as the one before
    count = math.ceil((duration - starts[0]) * target_fps - _STEP_SLACK)
    indices = []
    for k in range(count):
        t = starts[0] + k / target_fps
        j = bisect.bisect_left(starts, t)
        if j == num_src_frames or (j > 0 and t - starts[j - 1] <= starts[j] - t):
            j -= 1
        indices.append(j)
    return indices


def fix_frame_count(n: int) -> int:
    """Largest 1 + 4k <= n: the frame counts the VAE encodes (4x temporal stride plus the first frame)."""
    if n < 1:
        raise ValueError(f"need at least 1 frame, found {n}")
    return 1 + 4 * ((n - 1) // 4)


WindowMode = Literal["head", "first", "center", "uniform", "sliding"]


def clip_windows(num_resampled: int, clip_frames: int, mode: WindowMode = "head", max_windows: int = 1,
                 stride: int | None = None) -> list[range]:
    """Stretches of `clip_frames` consecutive (resampled) frames to train on; [] if the clip is shorter.

    head (alias first): one window from frame 0. center: one window in the middle.
    uniform: min(max_windows, possible starts) windows with starts spread evenly over [0, n - clip_frames],
      first and last included (one window: the middle one).
    sliding: starts 0, stride, 2 * stride, ... (stride None: clip_frames, back to back), at most max_windows.
    """
    if clip_frames < 1 or (clip_frames - 1) % 4:
        raise ValueError(f"clip_frames must be 1 + 4k (1, 5, ..., 81), found {clip_frames}; "
                         f"use fix_frame_count({clip_frames}) = {fix_frame_count(max(clip_frames, 1))}")
    if max_windows < 1:
        raise ValueError(f"max_windows must be at least 1, found {max_windows}")
    last = num_resampled - clip_frames  # last valid start
    if last < 0:
        return []
    if mode in ("head", "first"):
        starts = [0]
    elif mode == "center":
        starts = [last // 2]
    elif mode == "uniform":
        n = min(max_windows, last + 1)
        starts = [last // 2] if n == 1 else [round(i * last / (n - 1)) for i in range(n)]
    elif mode == "sliding":
        step = clip_frames if stride is None else stride
        if step < 1:
            raise ValueError(f"stride must be at least 1, found {step}")
        starts = list(range(0, last + 1, step))[:max_windows]
    else:
        raise ValueError(f"window mode {mode!r} is not one of 'head', 'first', 'center', 'uniform', 'sliding'")
    return [range(s, s + clip_frames) for s in starts]


def resize_and_crop(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Scale frames to cover size = (H, W) keeping the aspect ratio, then crop the centre.

    frames: [F, 3, h, w] uint8 -> [F, 3, H, W] uint8. scale = max(H / h, W / w); bilinear with antialias
    (a box-like prefilter when shrinking, so 1080p -> 480p does not alias).
    """
    out_h, out_w = size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive (H, W), found {size}")
    h, w = frames.shape[-2:]
    if (h, w) == (out_h, out_w):
        return frames
    scale = max(out_h / h, out_w / w)
    # max(): rounding must never leave the scaled frame smaller than the crop.
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = F.interpolate(frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return frames[..., top:top + out_h, left:left + out_w].contiguous()


def read_frames(path: str | Path, indices: list[int], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode source frames `indices` (any order, repeats allowed) as [F, 3, H, W] uint8 RGB.

    size = (H, W) resizes and centre-crops (`resize_and_crop`); None keeps the source size. An image
    accepts only index 0 (repeated indices repeat the image).
    """
    path = Path(path)
    kind = _check_file(path)
    if not indices:
        raise ValueError(f"{path}: no frame indices given")
    if kind == "image":
        return _read_image(path, indices, size)
    reader = _open_video(path)
    bad = [i for i in indices if not 0 <= i < len(reader)]
    if bad:
        raise VideoError(f"{path}: frame indices {bad[:5]} outside [0, {len(reader)}); probe the file again")
    chunks = []
    for start in range(0, len(indices), _DECODE_CHUNK):
        try:
            batch = reader.get_batch(indices[start:start + _DECODE_CHUNK]).asnumpy()  # [f, h, w, 3]
        except Exception as err:  # decord raises its own error types from C++ for damaged streams
            raise VideoError(f"{path}: decoding frames failed ({err}); the file may be truncated") from None
        frames = torch.from_numpy(batch).permute(0, 3, 1, 2)
        chunks.append(frames.contiguous() if size is None else resize_and_crop(frames, size))
    return torch.cat(chunks)


def _read_image(path: Path, indices: list[int], size: tuple[int, int] | None) -> torch.Tensor:
    from PIL import Image, ImageOps

    if any(i != 0 for i in indices):
        raise VideoError(f"{path}: an image has only frame 0, asked for {sorted(set(indices))}")
    try:
        with Image.open(path) as img:
            array = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))  # upright, as viewers show it
    except (OSError, ValueError) as err:
        raise VideoError(f"{path}: cannot read as an image ({err}); is the file complete?") from None
    frame = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    if size is not None:
        frame = resize_and_crop(frame, size)
    return frame.expand(len(indices), -1, -1, -1).contiguous()


def to_model_range(frames_uint8: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W] uint8 -> [3, F, H, W] float32 in [-1, 1] (x / 127.5 - 1), the VAE's input layout."""
    if frames_uint8.dtype != torch.uint8 or frames_uint8.dim() != 4 or frames_uint8.shape[1] != 3:
        raise ValueError(f"expected [F, 3, H, W] uint8 frames, found {tuple(frames_uint8.shape)} {frames_uint8.dtype}")
    return frames_uint8.permute(1, 0, 2, 3).float().div_(127.5).sub_(1.0)
