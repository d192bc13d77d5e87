"""The official Wan2.2 example media (/work/shared/data/real_clips, see SOURCES.md there) through the
whole media path: probe, resample to 16 fps, a 1+4k window, read at a bucket size, measure, label.

Run with -s to see the labels and measurements. Skipped where the folder is absent.
"""

from pathlib import Path

import pytest
import torch

from data.buckets import assign_bucket, make_buckets
from data.labels import resolve_labels
from data.video import clip_windows, fix_frame_count, probe, read_frames, to_model_range
from tests.data.test_labels import one_thread  # noqa: F401  (autouse fixture)

REAL = Path("/work/shared/data/real_clips")
pytestmark = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")

# A small bucket set (area 256 x 448 = 114,688 px, stride 16) keeps decoding + resizing cheap on CPU.
BUCKETS = make_buckets(256 * 448, [448 / 256, 1.0, 256 / 448, 3 / 4], [33, 1], multiple=16)


def _load(name: str, fps: float = 16.0):
    info = probe(REAL / name)
    indices = info.indices_at(fps)
    bucket = assign_bucket(info.width, info.height, len(indices), BUCKETS)
    window = clip_windows(len(indices), bucket.frames, "uniform", 1)[0]
    frames = read_frames(REAL / name, [indices[i] for i in window], (bucket.height, bucket.width))
    labels = resolve_labels({}, frames)
    print(f"\n{name}: {info.width}x{info.height} {info.num_frames} frames at {info.fps} fps -> "
          f"{len(indices)} at {fps} fps; bucket {bucket.name}; labels {labels.labels()}; "
          f"measurements { {k: round(v, 4) for k, v in labels.measurements.items()} }")
    return info, indices, bucket, frames, labels


def test_pose_clip_is_dark_and_still_framed():
    info, indices, bucket, frames, labels = _load("pose.mp4")
    assert (info.kind, info.width, info.height, info.num_frames) == ("video", 960, 540, 350)
    assert info.fps == pytest.approx(50.0) and info.duration_s == pytest.approx(7.0, abs=0.05)
    assert len(indices) == 112 and fix_frame_count(len(indices)) == 109
    assert (bucket.width, bucket.height, bucket.frames) == (448, 256, 33)
    assert frames.shape == (33, 3, 256, 448) and frames.dtype == torch.uint8
    # Mostly black background with a thin skeleton: very dark, so low-key.
    assert labels.measurements["brightness_mean"] < 0.05
    assert labels.lighting == "low-key" and labels.source["lighting"] == "computed"
    # Only the skeleton can be tracked on the black background: camera motion is left unlabelled.
    assert labels.measurements["motion_support"] < 0.5 and labels.camera_motion is None
    video = to_model_range(frames)
    assert video.shape == (3, 33, 256, 448) and video.min() >= -1 and video.max() <= 1


def test_animate_clip_resamples_30_to_16_fps():
    info, indices, bucket, frames, labels = _load("animate.mp4")
    assert (info.width, info.height, info.num_frames) == (1920, 1080, 106)
    assert info.fps == pytest.approx(30.0)
    assert len(indices) == 57  # 106 / 30 = 3.53 s -> t = k / 16 for k = 0..56
    assert indices[:3] == [0, 2, 4] and indices[-1] == 105
    assert bucket.name == "448x256x33" and frames.shape == (33, 3, 256, 448)
    assert 0.05 < labels.measurements["brightness_mean"] < 0.95
    assert labels.contrast in ("medium", "high")
    assert labels.measurements["motion_support"] > 0.9 and labels.camera_motion is not None


def test_i2v_image_is_a_one_frame_clip():
    info, indices, bucket, frames, labels = _load("i2v_input.jpg")
    assert (info.kind, info.num_frames, info.width, info.height) == ("image", 1, 832, 1104)
    assert indices == [0] and bucket.frames == 1 and bucket.aspect == pytest.approx(3 / 4, rel=0.05)
    assert frames.shape == (1, 3, bucket.height, bucket.width)
    assert labels.camera_motion is None and labels.lighting is None  # mid-key beach daylight
    assert labels.colour_tone is not None and labels.measurements["saturation_mean"] > 0.15
