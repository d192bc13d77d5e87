"""data/scan.py: sidecars, metadata.jsonl / .csv through HF datasets, several captions, bad inputs skipped."""

import json

import pytest

from data.scan import ScanError, scan_folder


def _touch(path, data=b"\x00fake"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_sidecars_several_captions_and_bad_captions(tmp_path):
    _touch(tmp_path / "a.mp4")
    (tmp_path / "a.txt").write_text("a fox runs\n\n  a red fox in snow  \n", encoding="utf-8")
    _touch(tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "b.txt").write_text("a still lake", encoding="utf-8")
    _touch(tmp_path / "empty.mp4")
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    _touch(tmp_path / "latin.mov")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    _touch(tmp_path / "nocap.webm")
    _touch(tmp_path / "notes.md")  # not media: ignored

    result = scan_folder(tmp_path)
    items = {i.clip_id: i for i in result.items}
    assert set(items) == {"a.mp4", "sub/b.png"}
    assert items["a.mp4"].captions == ("a fox runs", "a red fox in snow") and items["a.mp4"].kind == "video"
    assert items["sub/b.png"].kind == "image"
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert "empty" in reasons["empty.mp4"]
    assert "not UTF-8" in reasons["latin.mov"]
    assert "no caption" in reasons["nocap.webm"]
    assert len(result.skipped) == 3


def test_metadata_jsonl_merges_rows_lists_labels_and_skips_missing(tmp_path):
    _touch(tmp_path / "a.mp4")
    _touch(tmp_path / "b.mp4")
    _touch(tmp_path / "c.mp4")  # present but not listed, no sidecar
    _touch(tmp_path / "e.mp4")  # not listed: its sidecar captions it
    (tmp_path / "e.txt").write_text("from the sidecar\n", encoding="utf-8")
    _touch(tmp_path / "d.mp4")  # listed with an empty caption
    rows = [
        {"file_name": "a.mp4", "caption": "first", "lighting": "golden hour", "score": 0.7},
        {"file_name": "a.mp4", "caption": "second", "lighting": "night"},
        {"file_name": "b.mp4", "captions": ["one", "two"], "camera_motion": "pan left"},
        {"file_name": "gone.mp4", "caption": "lost"},
        {"file_name": "d.mp4", "caption": "  "},
        {"file_name": "b.mp4", "caption": "three", "labels": {"shot_size": "wide", "score": 0.4}},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    result = scan_folder(tmp_path)
    items = {i.clip_id: i for i in result.items}
    assert items["a.mp4"].captions == ("first", "second")
    assert items["a.mp4"].labels == {"lighting": "golden hour"} and items["a.mp4"].score == 0.7
    assert items["b.mp4"].captions == ("one", "two", "three")
    assert items["b.mp4"].labels == {"camera_motion": "pan left", "shot_size": "wide"}
    assert items["b.mp4"].score == 0.4  # from the nested labels mapping of a later row
    assert items["e.mp4"].captions == ("from the sidecar",)
    reasons = {s.path.name: s.reason for s in result.skipped}
    assert "does not exist" in reasons["gone.mp4"] and "row 4" in reasons["gone.mp4"]
    assert "no caption" in reasons["c.mp4"]
    assert "no caption" in reasons["d.mp4"]


def test_metadata_csv_several_rows(tmp_path):
    _touch(tmp_path / "x.mp4")
    (tmp_path / "metadata.csv").write_text('file_name,caption,shot_size\nx.mp4,"a, b",close-up\nx.mp4,c,\n',
                                           encoding="utf-8")
    (item,) = scan_folder(tmp_path).items
    assert item.captions == ("a, b", "c") and item.labels == {"shot_size": "close-up"}


def test_unknown_metadata_column_names_it_and_valid_ones(tmp_path):
    _touch(tmp_path / "x.mp4")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "x.mp4", "caption": "c", "mood": "sad"}))
    with pytest.raises(ScanError, match=r"unknown column\(s\) mood; valid columns are file_name, caption"):
        scan_folder(tmp_path)


def test_missing_root_and_named_metadata(tmp_path):
    with pytest.raises(ScanError, match="not a folder"):
        scan_folder(tmp_path / "nope")
    with pytest.raises(ScanError, match="not found"):
        scan_folder(tmp_path, metadata="meta.jsonl")


def test_metadata_label_values_of_the_wrong_type_reach_validation(tmp_path):
    """A score written as text ('0.2') or a label that is not text was dropped without a word, so a
    min_score filter kept the clip; they must reach data.labels, which rejects them naming label and value."""
    from data.labels import LabelError, validate_user_labels

    flat, nested = tmp_path / "flat", tmp_path / "nested"
    _touch(flat / "a.mp4")
    (flat / "metadata.jsonl").write_text(json.dumps({"file_name": "a.mp4", "caption": "c", "score": "0.2",
                                                     "lighting": 3}), encoding="utf-8")
    _touch(nested / "b.mp4")
    (nested / "metadata.jsonl").write_text(json.dumps({"file_name": "b.mp4", "caption": "c",
                                                       "labels": {"contrast": ["high"], "score": True}}),
                                           encoding="utf-8")
    (a,) = scan_folder(flat).items
    (b,) = scan_folder(nested).items
    assert a.score == "0.2" and a.labels == {"lighting": 3}
    assert b.score is True and b.labels == {"contrast": ["high"]}
    with pytest.raises(LabelError, match="'score' must be a finite number, found '0.2'"):
        validate_user_labels({"score": a.score})
    with pytest.raises(LabelError, match="'lighting' has unknown value 3"):
        validate_user_labels(a.labels)
    with pytest.raises(LabelError, match="'contrast' has unknown value \\['high'\\]"):
        validate_user_labels(b.labels)


def test_metadata_first_row_wins_for_a_label_under_either_spelling(tmp_path):
    _touch(tmp_path / "a.mp4")
    rows = [{"file_name": "a.mp4", "caption": "c", "colour_tone": "warm"},
            {"file_name": "a.mp4", "caption": "d", "color_tone": "cool"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (item,) = scan_folder(tmp_path).items
    assert item.labels == {"colour_tone": "warm"}
