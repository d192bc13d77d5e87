"""Prompt composition: caption + aesthetic labels + trigger, with seeded dropout. Pure functions.

The template (dataset.caption_template) has three fields, default "{trigger}, {caption}. {labels}":

  * {trigger}: dataset.trigger ("mystyle"), or "" when none or when the caption already holds it (any
    case, as a whole phrase: "MyStyle, a fox" stays as it is, with no second trigger);
  * {caption}: one of the clip's captions, its trailing full stops removed;
  * {labels}: the labels kept by dropout, in the fixed order lighting, colour tone, contrast, composition,
    shot size, camera motion, as "Lighting: golden hour; colour tone: warm; contrast: high." (the first
    name capitalised, "; " between, a full stop at the end), or "" when none is kept.

After filling, runs of spaces are collapsed and leading/trailing spaces, commas and semicolons removed, so
an empty trigger or an empty label list leaves no stray punctuation::

    mystyle, a fox runs through snow. Lighting: golden hour; colour tone: cool; shot size: wide shot.

Dropout is decided per (seed, clip id, variant index) by a hash, never by a global RNG, so a prompt
variant is the same on every machine and every re-run:

  * caption dropout: with probability `caption_dropout` the whole variant is "" (the unconditional
    prompt of classifier-free guidance, as the official pipelines encode it);
  * label dropout: each label independently left out with probability `label_dropout`.

Variant k uses caption k mod (number of captions), so K >= captions uses them all.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping

from .labels import LABEL_VALUES

LABEL_ORDER = tuple(LABEL_VALUES)  # lighting, colour_tone, contrast, composition, shot_size, camera_motion
TEMPLATE_FIELDS = ("trigger", "caption", "labels")


def unit_hash(*parts: object) -> float:
    """A uniform number in [0, 1) from the parts: the first 8 bytes of blake2b(repr(parts)) / 2**64."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def check_template(template: str) -> None:
    """Raise ValueError naming any field other than {trigger}, {caption}, {labels}."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    unknown = [f for f in fields if f not in TEMPLATE_FIELDS]
    if unknown:
        raise ValueError(f"dataset.caption_template {template!r} uses unknown field(s) {unknown}; "
                         f"allowed: {', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}")


def render_labels(labels: Mapping[str, str]) -> str:
    """'Lighting: golden hour; colour tone: warm.' from the labels given, in LABEL_ORDER; '' for none."""
    parts = [f"{name.replace('_', ' ')}: {labels[name]}" for name in LABEL_ORDER if labels.get(name)]
    if not parts:
        return ""
    text = "; ".join(parts) + "."
    return text[0].upper() + text[1:]


def holds_trigger(caption: str, trigger: str) -> bool:
    """Whether `caption` already holds `trigger` as a whole phrase, in any case and position."""
    trigger = trigger.strip()
    return bool(trigger) and re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE) is not None


def compose_prompt(caption: str, labels: Mapping[str, str], trigger: str, template: str) -> str:
    """Fill the template (module docstring) and tidy the punctuation left by empty fields.

    A caption that already holds the trigger (captions written for other trainers often do) keeps it where
    it is, and the template's {trigger} stays empty: the trigger appears once."""
    caption = caption.strip().rstrip(". ")
    trigger = "" if holds_trigger(caption, trigger) else trigger.strip()
    text = template.format(trigger=trigger, caption=caption, labels=render_labels(labels))
    return " ".join(text.split()).strip(" ,;")


def prompt_variant(captions: tuple[str, ...] | list[str], labels: Mapping[str, str], *, trigger: str,
                   template: str, label_dropout: float, caption_dropout: float, seed: int, clip_id: str,
                   variant: int) -> str:
    """Prompt variant `variant` of one clip, with dropout decided by unit_hash(seed, clip_id, variant, what)."""
    if not captions:
        raise ValueError(f"{clip_id}: no caption to build a prompt from")
    if unit_hash(seed, clip_id, variant, "caption") < caption_dropout:
        return ""
    kept = {name: value for name, value in labels.items()
            if unit_hash(seed, clip_id, variant, "label", name) >= label_dropout}
    return compose_prompt(captions[variant % len(captions)], kept, trigger, template)


def prompt_variants(captions: tuple[str, ...] | list[str], labels: Mapping[str, str], *, count: int,
                    trigger: str, template: str, label_dropout: float, caption_dropout: float, seed: int,
                    clip_id: str) -> list[str]:
    """The `count` prompt variants of one clip, enumerated at prepare time (variant 0 .. count-1)."""
    return [prompt_variant(captions, labels, trigger=trigger, template=template, label_dropout=label_dropout,
                           caption_dropout=caption_dropout, seed=seed, clip_id=clip_id, variant=k)
            for k in range(count)]
