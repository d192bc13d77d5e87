"""Aesthetic labels on clips built to have a known property (data.demo_clips.render_clip), the sign
convention of camera motion, and user-label validation."""

import dataclasses

import pytest
import torch

from data.demo_clips import ClipSpec, render_clip
from data.labels import (LABEL_EVIDENCE, AestheticLabels, LabelError, Measurements, labels_from_measurements,
                         measure, resolve_labels, validate_user_labels)

SIZE, FRAMES = (64, 96), 17


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny FFTs: one thread is fastest, and on a shared CPU two threads spin against each other (20x).
    Also imported by the other media test modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip(**kwargs) -> torch.Tensor:
    return render_clip(ClipSpec("test", "", **kwargs), SIZE, FRAMES, seed=1)


@pytest.mark.parametrize("grade, field, expected", [
    ("warm", "colour_tone", "warm"),
    ("cool", "colour_tone", "cool"),
    ("dark", "lighting", "low-key"),
    ("bright", "lighting", "high-key"),
])
def test_graded_clip_reads_its_grade(grade, field, expected):
    labels = resolve_labels({}, clip(grade=grade))
    assert getattr(labels, field) == expected
    assert labels.source[field] == "computed"


def test_ungraded_clip_is_neither_key_nor_warm_or_cool():
    labels = resolve_labels({}, clip())
    assert labels.lighting is None
    assert labels.colour_tone not in ("warm", "cool")


@pytest.mark.parametrize("motion, expected", [
    # Convention: the label names the camera's move. Camera panning right = content moving left.
    (dict(pan=0.01), "pan right"),
    (dict(pan=-0.01), "pan left"),
    (dict(tilt=0.01), "tilt up"),
    (dict(tilt=-0.01), "tilt down"),
    (dict(zoom=1.012), "zoom in"),
    (dict(zoom=1 / 1.012), "zoom out"),
    (dict(), "static"),
    (dict(shape=True), "static"),  # a small moving subject is not camera motion
])
def test_camera_motion(motion, expected):
    m = measure(clip(**motion))
    assert labels_from_measurements(m)["camera_motion"] == expected, m


def test_pan_sign_convention_on_content_translation():
    """Content translating right by 1 px per frame (np.roll of a fixed texture) reads 'pan left'."""
    base = clip()[0]
    frames = torch.stack([torch.roll(base, shifts=i, dims=-1) for i in range(FRAMES)])
    m = measure(frames)
    assert m.camera_dx == pytest.approx(-1 / SIZE[1], rel=0.15)  # 1 px of 96 per frame, camera to the left
    assert labels_from_measurements(m)["camera_motion"] == "pan left"
    down = torch.stack([torch.roll(base, shifts=i, dims=-2) for i in range(FRAMES)])  # content down
    assert labels_from_measurements(measure(down))["camera_motion"] == "tilt up"


def test_pan_speed_measured_in_width_fractions():
    m = measure(clip(pan=0.01))
    assert m.camera_dx == pytest.approx(0.01, rel=0.1) and abs(m.camera_dy) < 0.001


def test_handheld_from_jitter():
    base = clip()[0]
    gen = torch.Generator().manual_seed(0)
    offsets = torch.randint(-3, 4, (FRAMES, 2), generator=gen)
    frames = torch.stack([torch.roll(base, shifts=(int(dy), int(dx)), dims=(-2, -1)) for dy, dx in offsets])
    m = measure(frames)
    assert m.jitter > 0.01
    assert labels_from_measurements(m)["camera_motion"] == "handheld"


def test_measurements_stored_with_each_computed_label():
    labels = resolve_labels({}, clip(grade="warm", pan=0.01))
    assert labels.measurements.keys() == {f.name for f in dataclasses.fields(Measurements)}
    computed = [name for name, source in labels.source.items() if source == "computed"]
    assert set(computed) >= {"colour_tone", "contrast", "camera_motion"}
    for name in computed:
        assert all(key in labels.measurements for key in LABEL_EVIDENCE[name])
    assert labels.measurements["warmth"] > 0.06


def test_user_labels_win_and_are_canonicalised():
    labels = resolve_labels({"lighting": "Golden_Hour", "camera_motion": "tracking", "shot_size": "close up",
                             "color_tone": "muted", "score": 7}, clip(grade="dark", pan=0.01))
    assert labels.lighting == "golden hour" and labels.source["lighting"] == "user"
    assert labels.camera_motion == "tracking" and labels.colour_tone == "muted"
    assert labels.shot_size == "close-up" and labels.score == 7.0 and labels.source["score"] == "user"
    assert labels.contrast is not None and labels.source["contrast"] == "computed"
    assert labels.composition is None and "composition" not in labels.source  # never computed


def test_without_frames_only_user_labels():
    labels = resolve_labels({"composition": "rule of thirds"}, None)
    assert labels.labels() == {"composition": "rule of thirds"} and labels.measurements == {}


def test_image_gets_no_motion_label():
    labels = resolve_labels({}, clip()[:1])
    assert labels.camera_motion is None and labels.contrast is not None
    assert labels.measurements["zoom"] == 1.0


def test_unknown_label_value_names_field_value_and_suggests():
    with pytest.raises(LabelError, match=r"'lighting' has unknown value 'low key light'.*did you mean 'low-key'.*"
                                         r"valid values: high-key, low-key"):
        resolve_labels({"lighting": "low key light"}, None)
    with pytest.raises(LabelError, match=r"unknown label 'camera_motoin'.*did you mean 'camera_motion'"):
        resolve_labels({"camera_motoin": "static"}, None)
    with pytest.raises(LabelError, match="score"):
        resolve_labels({"score": "high"}, None)


def test_as_dict_is_json_ready():
    import json

    labels = resolve_labels({"score": 0.5}, clip())
    restored = json.loads(json.dumps(labels.as_dict()))
    assert restored["score"] == 0.5 and restored["source"]["camera_motion"] == "computed"
    assert AestheticLabels(**restored) == labels


def test_label_names_are_matched_ignoring_case_and_separators():
    """validate_user_labels promises names as forgiving as values: a metadata 'labels' mapping written as
    {"Shot Size": ..., "Colour-Tone": ...} is the user's shot_size and colour_tone, not a skipped clip."""
    labels = validate_user_labels({"Shot Size": "wide", "Colour-Tone": "warm", "COLOR_TONE": "warm", "Score": 0.5})
    assert labels == {"shot_size": "wide", "colour_tone": "warm", "score": 0.5}
