import numpy as np
import pytest
import torch

decord = pytest.importorskip("decord")  # absent from the GPU image unless carried (bench/gpu_tests.sh)

from wan_model.media import frame_strip, save_video, to_uint8_frames


def test_mp4_round_trip_through_decord(tmp_path):
    # A horizontal gradient that moves: decoded frames must keep frame count, size and rough colours.
    f, h, w = 9, 32, 64
    video = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(3, f, h, w).clone()
    video[0] = 0.8  # strong red channel
    mp4, png = save_video(video, tmp_path / "clip", fps=16)
    reader = decord.VideoReader(str(mp4))
    assert len(reader) == f
    frames = reader.get_batch(list(range(f))).asnumpy()
    assert frames.shape == (f, h, w, 3)
    expected = to_uint8_frames(video)
    assert np.abs(frames.astype(int) - expected.astype(int)).mean() < 6
    assert abs(reader.get_avg_fps() - 16) < 1e-3
    assert png.exists()


def test_uint8_frames_map_the_range_and_leave_the_input_alone():
    video = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 7).expand(3, 2, 1, 7).contiguous()
    before = video.clone()
    frames = to_uint8_frames(video)
    assert frames.shape == (2, 1, 7, 3) and frames.dtype == np.uint8 and frames.flags["C_CONTIGUOUS"]
    # (x + 1) * 127.5 rounded half to even, clamped to [-1, 1] first
    assert frames[0, 0, :, 0].tolist() == [0, 0, 64, 128, 191, 255, 255]
    assert torch.equal(video, before)
    assert np.array_equal(to_uint8_frames(video.bfloat16()), frames)


def test_odd_sizes_are_padded_and_strip_has_five_frames(tmp_path):
    video = torch.zeros(3, 5, 15, 17)
    mp4, _ = save_video(video, tmp_path / "odd.mp4", fps=24)
    reader = decord.VideoReader(str(mp4))
    assert reader[0].shape == (16, 18, 3)
    strip = frame_strip(to_uint8_frames(video), count=5)
    assert strip.size == (17 * 5, 15)


def test_read_image_range_and_errors(tmp_path):
    import pytest
    from PIL import Image

    from wan_model.media import read_image

    Image.new("RGB", (6, 4), (255, 0, 128)).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.shape == (3, 4, 6)
    assert torch.allclose(img[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg: cannot read as an image"):
        read_image(tmp_path / "bad.jpg")
