"""Recipes, expert routing, LoRA attachment, the training loop, checkpoints and export."""
