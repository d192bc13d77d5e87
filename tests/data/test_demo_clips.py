"""The procedural demo dataset: files, captions, metadata, determinism, size, speed, and labels that
match what each clip was built to show (after an H.264 round trip through decord)."""

import json
import time

import pytest
import torch

from data.demo_clips import DEMO_CLIPS, render_clip, render_demo_dataset
from data.labels import resolve_labels
from data.video import probe, read_frames
from tests.data.test_labels import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    start = time.perf_counter()
    folder = render_demo_dataset(tmp_path_factory.mktemp("demo") / "clips")
    return folder, time.perf_counter() - start


def test_files_captions_and_metadata(demo):
    folder, seconds = demo
    clips = sorted(folder.glob("*.mp4"))
    assert len(clips) == 6
    sidecars = sorted(p.stem for p in folder.glob("*.txt"))
    assert sidecars == [p.stem for p in clips[:3]]
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in clips[3:]]
    assert all(r["caption"] and 0 <= r["labels"]["score"] <= 1 for r in rows)
    assert not list(folder.glob(".*"))  # no temp files left behind
    sizes = [p.stat().st_size for p in clips]
    assert all(1_000 < s < 60_000 for s in sizes), sizes
    assert seconds < 2.0 * 3  # < 2 s on an idle core; slack for a shared CI machine


def test_clips_decode_with_requested_shape(demo):
    folder, _ = demo
    info = probe(next(folder.glob("*.mp4")))
    assert (info.width, info.height, info.num_frames, info.fps) == (96, 64, 33, 16.0)


def test_deterministic_for_a_seed(tmp_path):
    """Rendered frames, captions and metadata are exact for a seed. The mp4 bytes are not: libx264 in
    this PyAV build makes slightly different rate-control choices from run to run (seen with threads=1
    too), so decoded frames are compared with a tolerance."""
    for spec in DEMO_CLIPS:
        assert torch.equal(render_clip(spec, seed=4), render_clip(spec, seed=4))
    assert not torch.equal(render_clip(DEMO_CLIPS[0], seed=4), render_clip(DEMO_CLIPS[0], seed=5))
    a = render_demo_dataset(tmp_path / "a", num_clips=4, frames=9)
    b = render_demo_dataset(tmp_path / "b", num_clips=4, frames=9)
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for text in [*a.glob("*.txt"), a / "metadata.jsonl"]:
        assert text.read_bytes() == (b / text.name).read_bytes()
    for clip in a.glob("*.mp4"):
        diff = read_frames(clip, list(range(9))).float() - read_frames(b / clip.name, list(range(9))).float()
        assert diff.abs().mean() < 2.0, clip.name


EXPECTED = {  # what each demo clip was built to show
    "pan_right": {"camera_motion": "pan right"},
    "zoom_in": {"camera_motion": "zoom in", "colour_tone": "warm"},
    "shapes_cool": {"camera_motion": "static", "colour_tone": "cool"},
    "dark": {"lighting": "low-key"},
    "bright": {"lighting": "high-key", "camera_motion": "tilt up"},
    "pan_left": {"camera_motion": "pan left", "colour_tone": "saturated"},
}


def test_decoded_demo_clips_read_as_built(demo):
    folder, _ = demo
    assert set(EXPECTED) == {spec.name for spec in DEMO_CLIPS}
    for path in sorted(folder.glob("*.mp4")):
        frames = read_frames(path, list(range(33)))
        labels = resolve_labels({}, frames).labels()
        name = path.stem.split("_", 2)[2]
        for field, value in EXPECTED[name].items():
            assert labels.get(field) == value, (path.name, labels)
