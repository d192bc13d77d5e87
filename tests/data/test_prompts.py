"""data/prompts.py: the documented template, tidy punctuation, seeded per-(seed, clip, variant) dropout."""

import pytest

from data.config import DEFAULT_CAPTION_TEMPLATE
from data.prompts import check_template, compose_prompt, prompt_variants, render_labels, unit_hash

LABELS = {"shot_size": "wide shot", "lighting": "golden hour", "colour_tone": "warm"}


def test_template_exact_text():
    assert render_labels(LABELS) == "Lighting: golden hour; colour tone: warm; shot size: wide shot."
    assert compose_prompt("A fox runs.", LABELS, "mystyle", DEFAULT_CAPTION_TEMPLATE) == (
        "mystyle, A fox runs. Lighting: golden hour; colour tone: warm; shot size: wide shot.")
    # Empty trigger and no labels leave no stray punctuation.
    assert compose_prompt("A fox runs", {}, "", DEFAULT_CAPTION_TEMPLATE) == "A fox runs."
    assert compose_prompt("a fox", {"contrast": "high"}, "", "{labels} {caption} ({trigger})") == (
        "Contrast: high. a fox ()")


def test_template_unknown_field_rejected():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['mood'\]"):
        check_template("{caption} {mood}")


def _variants(seed, clip="a.mp4", count=64, label_dropout=0.3, caption_dropout=0.1):
    return prompt_variants(("cap one", "cap two"), LABELS, count=count, trigger="t", template=DEFAULT_CAPTION_TEMPLATE,
                           label_dropout=label_dropout, caption_dropout=caption_dropout, seed=seed, clip_id=clip)


def test_dropout_is_deterministic_and_seeded():
    first = _variants(0)
    assert first == _variants(0)  # same (seed, clip, variant) -> same prompt, no global RNG involved
    assert first != _variants(1) and first != _variants(0, clip="b.mp4")
    empty = sum(p == "" for p in first)
    assert 1 <= empty <= 16  # ~10% of 64 caption-dropped
    full = [p for p in first if p and "shot size" in p and "Lighting" in p and "colour tone" in p]
    assert 0 < len(full) < 64 - empty  # some keep every label, some lose one
    assert any("cap one" in p for p in first) and any("cap two" in p for p in first)


def test_no_dropout_keeps_everything_and_cycles_captions():
    out = _variants(3, count=4, label_dropout=0.0, caption_dropout=0.0)
    assert [p.split(". ")[0] for p in out] == ["t, cap one", "t, cap two", "t, cap one", "t, cap two"]
    assert all(p.endswith("shot size: wide shot.") for p in out)


def test_unit_hash_range_and_uniformity():
    values = [unit_hash(0, "clip", k) for k in range(2000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert abs(sum(values) / len(values) - 0.5) < 0.03


@pytest.mark.parametrize("caption", ["mystyle, a person in a scene", "A person in a scene, MyStyle.",
                                     "a person in MYSTYLE light"])
def test_trigger_already_in_the_caption_appears_once(caption):
    prompt = compose_prompt(caption, {"lighting": "low-key"}, "mystyle", DEFAULT_CAPTION_TEMPLATE)
    assert prompt.lower().count("mystyle") == 1, prompt
    assert prompt.startswith(caption.rstrip(". ")), prompt  # kept where the caption has it
    assert prompt.endswith("Lighting: low-key.")


def test_trigger_added_when_only_part_of_a_word():
    # "mystyles" is another word: the caption does not hold the trigger, so it is added.
    assert compose_prompt("two mystyles of dance", {}, "mystyle", DEFAULT_CAPTION_TEMPLATE) == "mystyle, two mystyles of dance."
