"""Video decoding: resampling counts, windows, 1+4k rounding, resize/crop, decord round trip, decode errors."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data.video import (VideoError, clip_windows, fix_frame_count, probe, read_frames, resample_indices,
                        resize_and_crop, to_model_range)
from wan_model.media import write_mp4


def test_resample_counts_and_nearest_frames():
    idx = resample_indices(350, 50.0, 16.0)  # 7 s
    assert len(idx) == 112
    assert idx[:4] == [0, 3, 6, 9]  # 50/16 = 3.125 source frames per step: 0, 3.1, 6.25, 9.4
    assert idx[-1] == 347  # 111 * 3.125 = 346.9
    idx = resample_indices(106, 30.0, 16.0)  # 3.53 s: t_k = k/16 < 3.53 for k = 0..56
    assert len(idx) == 57 and idx[-1] == 105 and idx[1] == 2  # 30/16 = 1.875 -> 2
    assert resample_indices(81, 16.0, 16.0) == list(range(81))
    assert resample_indices(1, 0.0, 16.0) == [0]  # an image


def test_resample_variable_frame_rate_uses_timestamps():
    # 10 frames at 0.1 s, then 10 at 0.05 s: 1.5 s in all (the last frame lasts 0.05 s).
    starts = [0.1 * i for i in range(10)] + [1.0 + 0.05 * i for i in range(10)]
    idx = resample_indices(20, 13.3, 10.0, starts)
    assert len(idx) == 15
    assert idx[:10] == list(range(10))  # one source frame per 0.1 s step in the slow part
    assert idx[10:] == [10, 12, 14, 16, 18]  # every other frame in the fast part
    with pytest.raises(ValueError, match="timestamps"):
        resample_indices(20, 10.0, 10.0, starts[:5])


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 2000), src=st.sampled_from([23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0, 120.0]),
       target=st.sampled_from([16.0, 24.0]))
def test_resample_properties(n, src, target):
    """Count = ceil(n * target / src); indices non-decreasing, in range, each within half a source frame
    of its target time (nearest frame)."""
    idx = resample_indices(n, src, target)
    assert len(idx) == math.ceil(n * target / src - 1e-4) or n == 1
    assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
    for k, i in enumerate(idx):
        assert abs(i / src - k / target) <= 0.5 / src + 1e-9 or i == n - 1


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(0, 30), mode=st.sampled_from(["head", "center", "uniform", "sliding"]),
       max_windows=st.integers(1, 6), stride=st.none() | st.integers(1, 50))
def test_clip_windows_properties(n, k, mode, max_windows, stride):
    clip_frames = 1 + 4 * k
    windows = clip_windows(n, clip_frames, mode, max_windows, stride)
    assert len(windows) <= max_windows and (windows == []) == (n < clip_frames)
    for w in windows:
        assert len(w) == clip_frames and w.start >= 0 and w.stop <= n
    assert [w.start for w in windows] == sorted({w.start for w in windows})  # distinct, in order


def test_fix_frame_count():
    assert [fix_frame_count(n) for n in (1, 4, 5, 8, 9, 81, 84, 112)] == [1, 1, 5, 5, 9, 81, 81, 109]
    with pytest.raises(ValueError):
        fix_frame_count(0)


def test_clip_windows_modes():
    assert clip_windows(112, 81, "head", 3) == [range(0, 81)]
    assert clip_windows(112, 81, "center", 1) == [range(15, 96)]
    assert clip_windows(112, 81, "uniform", 3) == [range(0, 81), range(16, 97), range(31, 112)]
    assert clip_windows(112, 81, "uniform", 1) == [range(15, 96)]
    assert clip_windows(83, 81, "uniform", 5) == [range(0, 81), range(1, 82), range(2, 83)]  # only 3 starts
    assert clip_windows(100, 33, "sliding", 10) == [range(0, 33), range(33, 66), range(66, 99)]
    assert clip_windows(100, 33, "sliding", 2, stride=8) == [range(0, 33), range(8, 41)]
    assert clip_windows(80, 81, "head", 1) == []
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        clip_windows(100, 80, "head", 1)


def test_resize_and_crop_covers_and_centres():
    frames = torch.zeros(2, 3, 100, 200, dtype=torch.uint8)
    frames[..., :, 50:150] = 200  # a bright middle half
    out = resize_and_crop(frames, (50, 50))  # scale 0.5 -> 50 x 100, crop columns 25..75 = the bright part
    assert out.shape == (2, 3, 50, 50) and out.dtype == torch.uint8
    assert out.float().mean() > 195
    tall = resize_and_crop(frames, (80, 80))  # scale 0.8 -> 80 x 160
    assert tall.shape == (2, 3, 80, 80)


def test_to_model_range():
    frames = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 2, 2)
    video = to_model_range(frames)
    assert video.shape == (3, 2, 2, 2) and video[:, 0].eq(-1).all() and video[:, 1].eq(1).all()


@pytest.fixture(scope="module")
def counter_clip(tmp_path_factory):
    """20 frames at 10 fps whose grey level encodes the frame index (i * 12)."""
    frames = np.stack([np.full((32, 64, 3), i * 12, np.uint8) for i in range(20)])
    return write_mp4(frames, tmp_path_factory.mktemp("v") / "counter.mp4", fps=10, crf=0)


def test_probe_and_frame_accurate_read(counter_clip):
    info = probe(counter_clip)
    assert (info.kind, info.width, info.height, info.num_frames) == ("video", 64, 32, 20)
    assert info.fps == pytest.approx(10.0) and info.duration_s == pytest.approx(2.0, abs=0.01)
    assert info.frame_times is None
    frames = read_frames(counter_clip, [17, 3, 3, 0], size=(16, 16))
    assert frames.shape == (4, 3, 16, 16) and frames.dtype == torch.uint8
    levels = frames.float().mean((1, 2, 3))
    assert torch.allclose(levels, torch.tensor([204.0, 36.0, 36.0, 0.0]), atol=3)
    with pytest.raises(VideoError, match="outside"):
        read_frames(counter_clip, [20])


def test_variable_frame_rate_file_uses_decord_timestamps(tmp_path):
    """10 frames 0.1 s apart then 10 frames 0.05 s apart (pts set by hand through PyAV); grey level i * 12."""
    import av
    from fractions import Fraction

    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=20)
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((32, 64, 3), i * 12, np.uint8), format="rgb24")
            frame.pts, frame.time_base = pts, Fraction(1, 1000)
            pts += 100 if i < 10 else 50
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe(path)
    assert info.frame_times is not None and info.frame_times[10] == pytest.approx(1.0, abs=1e-3)
    assert info.duration_s == pytest.approx(1.5, abs=0.01)
    indices = info.indices_at(10.0)
    assert indices == list(range(10)) + [10, 12, 14, 16, 18]
    levels = read_frames(path, indices).float().mean((1, 2, 3))
    assert torch.allclose(levels, torch.tensor(indices, dtype=torch.float32) * 12, atol=3)


def test_image_is_one_frame_clip(tmp_path):
    path = tmp_path / "still.png"
    Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(path)
    info = probe(path)
    assert (info.kind, info.width, info.height, info.num_frames, info.fps) == ("image", 40, 30, 1, 0.0)
    assert info.indices_at(16) == [0]
    frames = read_frames(path, [0], size=(16, 32))
    assert frames.shape == (1, 3, 16, 32) and int(frames[0, 0, 0, 0]) == 90
    with pytest.raises(VideoError, match="only frame 0"):
        read_frames(path, [1])


def test_exif_rotated_photo_is_upright(tmp_path):
    """A 40 x 30 JPEG with EXIF orientation 6 (rotate 90 degrees clockwise) is a 30 x 40 portrait."""
    path = tmp_path / "phone.jpg"
    pixels = np.zeros((30, 40, 3), np.uint8)
    pixels[:, :20] = 255  # left half white: after the rotation the top half is white
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    info = probe(path)
    assert (info.width, info.height) == (30, 40)
    frame = read_frames(path, [0])[0]
    assert frame.shape == (3, 40, 30)
    assert frame[:, :15].float().mean() > 200 and frame[:, 25:].float().mean() < 50


def _bad_files(tmp_path, counter_clip):
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(counter_clip.read_bytes()[: counter_clip.stat().st_size // 3])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n")
    image_as_video = tmp_path / "photo.mov"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image_as_video, format="PNG")
    broken_jpg = tmp_path / "broken.jpg"
    broken_jpg.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    wrong_ext = tmp_path / "clip.txt"
    wrong_ext.write_bytes(counter_clip.read_bytes())
    return {"zero bytes": (zero, "empty"), "truncated": (truncated, "cannot decode"),
            "text named .mp4": (text, "cannot decode"), "png named .mov": (image_as_video, "cannot decode"),
            "corrupt jpg": (broken_jpg, "cannot read as an image"),
            "wrong extension": (wrong_ext, "unsupported extension")}


def test_bad_files_raise_video_error_naming_file(tmp_path, counter_clip):
    for case, (path, cause) in _bad_files(tmp_path, counter_clip).items():
        with pytest.raises(VideoError, match=cause) as err:
            probe(path)
        assert str(path) in str(err.value), case
        with pytest.raises(VideoError) as err:
            read_frames(path, [0])
        assert str(path) in str(err.value), case
    with pytest.raises(VideoError, match="not found"):
        probe(tmp_path / "missing.mp4")
