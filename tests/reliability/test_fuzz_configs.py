"""Hypothesis fuzzing of what users write: recipes (mutated copies of recipes/quickstart.yaml, random
bytes, random text) and dataset metadata (metadata.jsonl / .csv with random columns, values and bytes).
Loading either succeeds or raises our named error, a ValueError subclass (ConfigError, ScanError) whose
message names the file: never a traceback of another type."""

from __future__ import annotations

import copy
import csv
import io
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data.scan import METADATA_COLUMNS, ScanError, scan_folder
from data.typed_config import ConfigError
from train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["", "nan", "inf", "-1", "1e309", "fp16", "zero3"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def _paths(tree, prefix=()):
    """Every key path of a nested mapping, e.g. ('experts', 'high_noise', 'lora', 'rank')."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


PATHS = sorted(_paths(BASE))


@st.composite
def mutated_recipes(draw):
    """The quickstart recipe with 1-4 edits: a value replaced, a key deleted, renamed with a typo, or added."""
    recipe = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        parent = recipe
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            continue
        action = draw(st.sampled_from(["value", "delete", "typo", "add"]))
        if action == "value":
            parent[path[-1]] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        elif action == "typo":
            key = path[-1]
            cut = draw(st.integers(0, max(0, len(key) - 1)))
            parent[key[:cut] + draw(st.sampled_from(["", "x", "_", key[cut:cut + 1]])) + key[cut + 1:]] = \
                parent.pop(key)
        else:
            parent[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return recipe


@FUZZ
@given(mutated_recipes())
def test_mutated_recipes_load_or_raise_a_config_error_naming_the_file(recipe):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
        try:
            load_recipe(path, check_release=False)
        except ConfigError as err:
            assert str(path) in str(err), err


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8"))))
def test_random_bytes_as_a_recipe_raise_a_config_error_naming_the_file(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_bytes(data)
        try:
            load_recipe(path, check_release=False)
        except ConfigError as err:
            assert str(path) in str(err), err


columns = st.one_of(st.sampled_from(METADATA_COLUMNS), st.text(min_size=1, max_size=8))
cells = st.one_of(scalars, st.sampled_from(["clip.mp4", "../clip.mp4", "/etc/hostname", "missing.mp4", "clip.txt",
                                            "a\0b.mp4", "x" * 300 + ".mp4", "sub/", "."]),
                  st.lists(st.text(max_size=6), max_size=2), st.fixed_dictionaries({"shot_size": scalars}))
# Half the rows are well formed in shape (file_name + caption), so the fuzzer reaches the per-row checks.
shaped = st.fixed_dictionaries({"file_name": cells, "caption": cells},
                               optional={"captions": cells, "labels": cells, "score": cells, "lighting": cells})
rows = st.lists(st.one_of(st.dictionaries(columns, cells, min_size=1, max_size=4), shaped), min_size=1, max_size=4)


def _clip_folder(tmp: str) -> Path:
    root = Path(tmp)
    (root / "clip.mp4").write_bytes(b"not really a video")  # scanning reads no pixels
    (root / "clip.txt").write_text("a caption")
    return root


def _write_csv(records: list[dict]) -> str:
    names = sorted({k for r in records for k in r})
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=names)
    writer.writeheader()
    writer.writerows({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in records)
    return out.getvalue()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows, st.sampled_from(["jsonl", "csv"]))
def test_random_metadata_tables_scan_or_raise_a_scan_error_naming_the_file(records, kind):
    with tempfile.TemporaryDirectory() as tmp:
        root = _clip_folder(tmp)
        path = root / f"metadata.{kind}"
        if kind == "jsonl":
            path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
        else:
            path.write_text(_write_csv(records))
        _scan_check(root, path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120), st.sampled_from(["jsonl", "csv"]))
def test_random_bytes_as_metadata_scan_or_raise_a_scan_error_naming_the_file(data, kind):
    with tempfile.TemporaryDirectory() as tmp:
        root = _clip_folder(tmp)
        path = root / f"metadata.{kind}"
        path.write_bytes(data)
        _scan_check(root, path)


def _scan_check(root: Path, path: Path) -> None:
    try:
        result = scan_folder(root)
    except ScanError as err:
        assert str(path) in str(err), err
        return
    for item in result.items:
        assert item.path.is_file() and root in item.path.parents, item  # nothing outside the dataset folder


def test_metadata_names_outside_the_folder_or_unusable_are_skipped_with_a_reason(tmp_path):
    """Found by the fuzzer: '/abs' and '../' names escaped the dataset folder (a ValueError from relative_to),
    a 300-character name raised OSError(ENAMETOOLONG)."""
    root = tmp_path / "ds"
    root.mkdir()
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (root / "clip.mp4").write_bytes(b"x")
    names = [str(tmp_path / "outside.mp4"), "../outside.mp4", "x" * 300 + ".mp4", "sub/../clip.mp4"]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "caption": "c"}) + "\n" for n in names))
    result = scan_folder(root)
    assert [i.clip_id for i in result.items] == ["clip.mp4"]
    reasons = [s.reason for s in result.skipped]
    assert sum("points outside" in r for r in reasons) == 2 and any("not usable" in r for r in reasons), reasons
