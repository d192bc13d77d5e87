"""Bad media never stops `prepare`: truncated, zero-byte, wrong-extension, huge-resolution and
variable-frame-rate files are used or skipped with a reason in report.json, and the good clip is encoded."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from data.demo_clips import render_demo_dataset
from data.prepare import prepare
from data.video import probe

from tests.data.test_prepare import StandInText, StandInVAE, make_config


def _write_vfr(path: Path, times_s: list[float], size=(64, 96)) -> None:
    """H.264 mp4 whose frames start at `times_s` (explicit pts in ms: a variable frame rate)."""
    import av

    h, w = size
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_s):
            pixels = np.random.default_rng(i).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(pixels.repeat(8, 0).repeat(8, 1), format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_gradient(path: Path, frames: int, size: tuple[int, int]) -> None:
    """A horizontal-gradient H.264 clip: a huge frame size in a few kB."""
    from wan_model.media import write_mp4

    ramp = np.linspace(0, 255, size[1]).astype(np.uint8)[None, :, None]
    write_mp4(np.broadcast_to(ramp, (frames, *size, 3)).copy(), path, fps=16, crf=51)


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    root = render_demo_dataset(tmp_path_factory.mktemp("media") / "clips", num_clips=1, frames=9)
    good = next(root.glob("*.mp4"))
    data = good.read_bytes()
    faults = {
        "zero.mp4": b"",
        "header_only.mp4": data[:64],
        "half.mp4": data[: len(data) // 2],
        "tail_cut.mp4": data[:-200],
        "noise.mp4": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "video_named.png": data,  # an mp4 under an image extension
        "text_named.mov": b"this is not a video\n" * 10,
    }
    for name, body in faults.items():
        (root / name).write_bytes(body)
    (root / "video_as.webm").write_bytes(data)  # container and extension disagree: decoders sniff content
    _write_gradient(root / "huge.mp4", frames=9, size=(4096, 4096))  # decoded at full size: ~1.7 GB peak RSS
    _write_vfr(root / "vfr.mp4", [0, 0.03, 0.05, 0.2, 0.21, 0.4, 0.45, 0.5, 0.62, 0.7, 0.8, 0.95, 1.0])
    for path in root.iterdir():
        if path.suffix != ".txt" and not path.with_suffix(".txt").exists():
            path.with_suffix(".txt").write_text(f"a clip named {path.stem}")
    return root, good


def test_bad_media_are_used_or_skipped_with_a_reason_and_prepare_finishes(bad_media, tmp_path):
    root, good = bad_media
    assert probe(root / "vfr.mp4").frame_times is not None  # the file really is variable-frame-rate
    assert (root / "huge.mp4").stat().st_size < 200_000
    report = prepare(make_config(root, tmp_path / "cache"), StandInVAE(), StandInText(), progress=False)
    saved = json.loads((tmp_path / "cache" / "report.json").read_text())
    status = {c["clip_id"]: (c["status"], c["reason"]) for c in saved["clips"]}
    media = sorted(p.name for p in root.iterdir() if p.suffix != ".txt")
    assert sorted(status) == media, "every file is accounted for in report.json"
    for name in (good.name, "vfr.mp4", "huge.mp4"):
        assert status[name][0] == "used", (name, status[name])
    assert "byte-identical" in status["video_as.webm"][1]  # decodable whatever its extension; a duplicate here
    for name in ("zero.mp4", "header_only.mp4", "half.mp4", "tail_cut.mp4", "noise.mp4", "video_named.png",
                 "text_named.mov"):
        assert status[name][0] == "skipped" and status[name][1], (name, status[name])
        assert "cannot" in status[name][1] or "empty" in status[name][1], (name, status[name])
    assert len(report.used) == 3 and report.encoded == 3
