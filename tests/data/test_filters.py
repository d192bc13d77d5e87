"""data/filters.py: size/duration/score checks with reasons; exact and perceptual duplicates."""

import torch

from data.config import FilterSettings
from data.filters import Deduper, check_media, check_score, file_sha256, perceptual_hash


def test_size_duration_score_reasons():
    s = FilterSettings(min_score=0.5, min_width=320, min_height=240, min_duration_s=1.0, max_duration_s=10.0)
    assert check_media(640, 480, 5.0, "video", s) is None
    assert "below the minimum 320x240" in check_media(300, 480, 5.0, "video", s)
    assert "shorter than filters.min_duration_s" in check_media(640, 480, 0.5, "video", s)
    assert "longer than filters.max_duration_s" in check_media(640, 480, 11.0, "video", s)
    assert check_media(640, 480, 0.0, "image", s) is None  # images have no duration
    assert "below filters.min_score" in check_score(0.4, s)
    assert check_score(0.6, s) is None and check_score(None, s) is None
    assert check_score(0.0, FilterSettings()) is None


def test_exact_duplicates_by_bytes(tmp_path):
    (tmp_path / "a").write_bytes(b"same")
    (tmp_path / "b").write_bytes(b"same")
    (tmp_path / "c").write_bytes(b"other")
    d = Deduper()
    assert d.check_bytes("a", file_sha256(tmp_path / "a")) is None
    assert "byte-identical to a" in d.check_bytes("b", file_sha256(tmp_path / "b"))
    assert d.check_bytes("c", file_sha256(tmp_path / "c")) is None
    assert d.check_bytes("a", file_sha256(tmp_path / "a")) is None  # the same clip again is not a duplicate


def test_perceptual_duplicates_survive_noise_and_brightness():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 256, (6, 3, 8, 8), generator=g).float()
    clip = torch.nn.functional.interpolate(base, size=(64, 64), mode="bilinear").to(torch.uint8)
    noisy = (clip.float() * 0.9 + 10 + torch.randn(clip.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    other = torch.flip(clip, dims=[-1])
    assert perceptual_hash(clip).shape == (4, 64)
    d = Deduper()
    assert d.check_frames("a", perceptual_hash(clip)) is None
    assert "near-duplicate of a" in d.check_frames("b", perceptual_hash(noisy))
    assert d.check_frames("c", perceptual_hash(other)) is None
    assert perceptual_hash(clip[:1]).shape == (4, 64)  # a single frame (image) still hashes
