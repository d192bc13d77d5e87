"""Test helpers shared across rooms (tiny tokenizer, ...)."""
