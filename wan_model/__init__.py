"""Wan 2.2 models and their maths: configs, DiT, VAEs, text encoder, schedule, checkpoint IO.

This package imports nothing from `data/` or `train/`: another project can take it alone.
"""
