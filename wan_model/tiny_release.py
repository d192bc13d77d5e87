"""A complete tiny Wan release folder with random weights: the embedded default of the demo and the tests.

`write_tiny_release(root, preset)` writes what an official release holds, in its layout and file names
(transformer expert folders with config.json, sharded safetensors and index; `Wan2.1_VAE.pth` or
`Wan2.2_VAE.pth`; `models_t5_umt5-xxl-enc-bf16.pth`; the `google/umt5-xxl` tokenizer folder), at the
`tiny-*` preset sizes, so every loader runs exactly as it would on real weights. Nothing is downloaded.
The transformers and the text encoder are random; the Wan 2.1 VAE (tiny-t2v, tiny-i2v) is a colour
autoencoder (`colour_vae.py`: a random VAE keeps no colour, so nothing learned would show in renders).
The Wan 2.2 VAE of tiny-ti2v is random: its renders are noise and its latents' posterior spread is wide
(training samples them, validation scores the mean, so the two losses differ in scale), so a tiny-ti2v
run shows that every path runs, not that anything is learned.

`make_tiny_tokenizer(dir)` trains a SentencePiece unigram model on a few multilingual captions with
the T5 special ids (pad 0, eos 1, unk 2), loads it through `transformers.AutoTokenizer` as the
T5Tokenizer the release's `google/umt5-xxl` folder holds, and saves the folder the same way
(`spiece.model`, `tokenizer.json`, `tokenizer_config.json`). Its ids stay below 384, the vocab of the
`tiny-*` presets' text encoder (TINY_UMT5).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoTokenizer

from .config import ModelPreset, get_preset

# Piece budget: <= 250 SentencePiece pieces + 100 sentinel <extra_id_N> tokens = at most 350 ids < 384.
SP_VOCAB = 250
EXTRA_IDS = 100

_CORPUS = [
    "A cat walks across a sunny garden, its tail held high.",
    "The camera pans slowly over the ocean at dusk while waves break on the rocks.",
    "Close-up of rain drops on a window, cinematic lighting, shallow depth of field.",
    "A red car drives along a winding mountain road as fog rolls in from the valley.",
    "Two dancers spin on a wooden stage under warm spotlights.",
    "Time-lapse of clouds moving over a city skyline at night, neon signs flicker.",
    "An old man reads a newspaper in a quiet cafe; steam rises from his coffee.",
    "Ein Hund läuft durch den Park und jagt einen Ball.",
    "Un enfant construit un château de sable sur la plage.",
    "一只猫在花园里散步。镜头缓缓推进，阳光明媚。",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，最差质量，低质量。",
]


def make_tiny_tokenizer(directory: str | Path) -> Path:
    """Write a tiny T5/UMT5 tokenizer folder into `directory` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4), model_writer=model, vocab_size=SP_VOCAB, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, character_coverage=1.0,
        num_threads=1, minloglevel=2)
    (directory / "spiece.model").write_bytes(model.getvalue())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": EXTRA_IDS}))
    # Loading converts spiece.model into the fast tokenizer; saving adds tokenizer.json as the release has.
    AutoTokenizer.from_pretrained(directory).save_pretrained(directory)
    return directory


def write_tiny_release(root: str | Path, preset: str | ModelPreset = "tiny-t2v", seed: int = 0) -> Path:
    """Write a random-weight release of a tiny preset under `root` (official layout); returns `root`."""
    from .release import write_transformer_release
    from .colour_vae import make_colour_autoencoder_
    from .text_encoder import TextEncoder
    from .vae_io import build_vae, save_vae_official

    preset = get_preset(preset) if isinstance(preset, str) else preset
    root = Path(root)
    write_transformer_release(root, preset, seed)
    torch.manual_seed(seed)
    vae = build_vae(preset.vae)
    if preset.vae.kind == "wan2.1":  # random VAE weights keep no colour: make it a colour autoencoder
        make_colour_autoencoder_(vae, seed)
    save_vae_official(vae, root / preset.vae.checkpoint)
    tokenizer = make_tiny_tokenizer(root / preset.text_encoder.tokenizer)
    TextEncoder.from_config(preset.text_encoder, tokenizer).save_official(root / preset.text_encoder.checkpoint)
    return root
