"""Clips, captions and aesthetic labels in; cached latent/text-embedding pairs out."""
