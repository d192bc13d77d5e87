"""Tests build the tiny tokenizer the demo ships (wan_model.tiny_release)."""

from wan_model.tiny_release import make_tiny_tokenizer  # noqa: F401
