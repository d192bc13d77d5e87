"""UMT5-XXL text encoder of Wan 2.x: the official checkpoint run by transformers' `UMT5EncoderModel`.

The release ships `models_t5_umt5-xxl-enc-bf16.pth`, a state dict of the official `T5Encoder`
(`wan/modules/t5.py`, umt5_xxl: encoder only, shared_pos=False, so every block has its own relative
position bias) and the `google/umt5-xxl` tokenizer folder. We map the official names onto
transformers' `UMT5EncoderModel`, whose maths is the official one term by term (checked against the
source and by `tests/wan_model/test_text_encoder.py`):
  - RMS norm without mean or bias, eps 1e-6, variance in float32, cast back to the weight dtype in bf16;
  - attention without 1/sqrt(d) scaling, per-layer bidirectional relative position bias with 32 buckets
    and max distance 128 (same bucket function), padded keys masked with the dtype's minimum;
  - gated GELU with the tanh approximation: wo(gelu_tanh(wi_0 x) * wi_1 x) = fc2(gate(x) * fc1(x));
  - no dropout (eval, dropout_rate 0), no final scaling.
One difference, bf16 only: the official code rounds q k^T + bias to bf16 before a float32 softmax; we
run SDPA (transformers "sdpa"), whose GPU kernels keep the scores in float32. Closer to exact, not
bit-identical.

Prompts are cleaned as the official `HuggingfaceTokenizer(clean='whitespace')`: ftfy.fix_text (repairs
mojibake such as 'Ã©' -> 'é'), html.unescape twice, whitespace collapsed and stripped; then
padded/truncated to text_len (512) with the EOS token. The encoder runs only on the longest real prompt
of the batch: with relative positions and masked padding, real tokens do not see the padding, so
trimming 512 -> the real length gives the same numbers several times faster.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import ftfy
import torch
from torch import nn
from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

from .config import TEXT_LEN, TextEncoderConfig
from .files import atomic_write

_HF_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")  # one tied tensor


def clean_prompt(text: str) -> str:
    """Official 'whitespace' cleaning: ftfy.fix_text, double html unescape, collapse whitespace."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def umt5_config(config: TextEncoderConfig) -> UMT5Config:
    """transformers config of the same encoder (dropout off, SDPA attention)."""
    if config.dim_attn % config.num_heads:
        raise ValueError(f"dim_attn {config.dim_attn} is not divisible by num_heads {config.num_heads}")
    return UMT5Config(
        vocab_size=config.vocab_size, d_model=config.dim, d_kv=config.dim_attn // config.num_heads,
        d_ff=config.dim_ffn, num_layers=config.num_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.num_buckets, relative_attention_max_distance=config.max_distance,
        layer_norm_epsilon=config.eps, dropout_rate=0.0, feed_forward_proj="gated-gelu",
        attn_implementation="sdpa")


def official_key_map(num_layers: int) -> dict[str, str]:
    """Official `T5Encoder` parameter name -> `UMT5EncoderModel` name (the embedding maps to `shared`)."""
    keys = {"token_embedding.weight": _HF_EMBEDDINGS[0], "norm.weight": "encoder.final_layer_norm.weight"}
    for i in range(num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0", f"encoder.block.{i}.layer.1"
        keys.update({
            f"blocks.{i}.norm1.weight": f"{attn}.layer_norm.weight",
            **{f"blocks.{i}.attn.{p}.weight": f"{attn}.SelfAttention.{p}.weight" for p in "qkvo"},
            f"blocks.{i}.pos_embedding.embedding.weight": f"{attn}.SelfAttention.relative_attention_bias.weight",
            f"blocks.{i}.norm2.weight": f"{ffn}.layer_norm.weight",
            f"blocks.{i}.ffn.gate.0.weight": f"{ffn}.DenseReluDense.wi_0.weight",
            f"blocks.{i}.ffn.fc1.weight": f"{ffn}.DenseReluDense.wi_1.weight",
            f"blocks.{i}.ffn.fc2.weight": f"{ffn}.DenseReluDense.wo.weight",
        })
    return keys


def official_shapes(config: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every official parameter."""
    d, a, f = config.dim, config.dim_attn, config.dim_ffn
    per_block = {"norm1.weight": (d,), "attn.q.weight": (a, d), "attn.k.weight": (a, d), "attn.v.weight": (a, d),
                 "attn.o.weight": (d, a), "pos_embedding.embedding.weight": (config.num_buckets, config.num_heads),
                 "norm2.weight": (d,), "ffn.gate.0.weight": (f, d), "ffn.fc1.weight": (f, d), "ffn.fc2.weight": (d, f)}
    shapes = {"token_embedding.weight": (config.vocab_size, d), "norm.weight": (d,)}
    for i in range(config.num_layers):
        shapes.update({f"blocks.{i}.{k}": v for k, v in per_block.items()})
    return shapes


def load_official_state_dict(path: str | Path, config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """Read an official UMT5 encoder `.pth` and return it under `UMT5EncoderModel` names (CPU, mmap)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: UMT5 checkpoint not found; expected {config.checkpoint} "
                                "in the release folder")
    official = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(official, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(official).__name__}")
    return map_official_state_dict(official, config, source=str(path))


def map_official_state_dict(official: dict[str, torch.Tensor], config: TextEncoderConfig,
                            source: str = "state dict") -> dict[str, torch.Tensor]:
    """Check official names and shapes against `config`, return the tensors under transformers names.

    Every official key must be present with the shape `config` implies; the tied embedding is returned
    under both of its transformers names. `source` names the file in errors.
    """
    shapes = official_shapes(config)
    missing = sorted(set(shapes) - set(official))
    unexpected = sorted(set(official) - set(shapes))
    if missing or unexpected:
        raise ValueError(
            f"{source}: not an official UMT5 encoder state dict for {config.num_layers} layers; "
            f"missing {len(missing)} keys {missing[:5]}, unexpected {len(unexpected)} keys {unexpected[:5]}. "
            "Use the release's models_t5_umt5-xxl-enc-bf16.pth (official wan/modules/t5.py names) and a "
            "TextEncoderConfig matching it")
    bad = [f"{k}: expected {shapes[k]}, found {tuple(official[k].shape)}"
           for k in shapes if tuple(official[k].shape) != shapes[k]]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensors do not match the TextEncoderConfig shape: "
                         + "; ".join(bad[:5]) + ". Check the preset's text_encoder config")
    mapped = {official_key_map(config.num_layers)[k]: v for k, v in official.items()}
    mapped[_HF_EMBEDDINGS[1]] = mapped[_HF_EMBEDDINGS[0]]
    return mapped


class TextEncoder(nn.Module):
    """Tokenizer + UMT5 encoder: prompts -> zero-padded text context for the DiT's cross-attention."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, config: TextEncoderConfig, text_len: int = TEXT_LEN):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.config = config
        self.text_len = text_len
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the encoder's vocab_size is "
                             f"{config.vocab_size}; use the tokenizer folder of the same release")

    @classmethod
    def from_release(cls, t5_path: str | Path, tokenizer_dir: str | Path, config: TextEncoderConfig,
                     dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                     text_len: int = TEXT_LEN) -> "TextEncoder":
        """Load the release's `models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl` tokenizer folder."""
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"{tokenizer_dir}: tokenizer folder not found; expected the release's "
                                    f"{config.tokenizer} folder (spiece.model / tokenizer.json)")
        state = load_official_state_dict(t5_path, config)
        return cls._from_mapped(state, AutoTokenizer.from_pretrained(tokenizer_dir), config, dtype, device, text_len)

    @classmethod
    def from_official(cls, official: dict[str, torch.Tensor], tokenizer, config: TextEncoderConfig,
                      dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                      text_len: int = TEXT_LEN) -> "TextEncoder":
        """Build from an in-memory state dict with official names (tests, GPU checks at real shapes)."""
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        state = map_official_state_dict(official, config)
        return cls._from_mapped(state, tokenizer, config, dtype, device, text_len)

    @classmethod
    def _from_mapped(cls, state: dict[str, torch.Tensor], tokenizer, config: TextEncoderConfig,
                     dtype: torch.dtype, device: str | torch.device, text_len: int) -> "TextEncoder":
        """Model built on the meta device (no random init of 5.7B weights), weights assigned in place."""
        with torch.device("meta"):
            model = UMT5EncoderModel(umt5_config(config))
        # copy the tied embedding once (1 GB at XXL size), then give it both names again
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k != _HF_EMBEDDINGS[1]}
        state[_HF_EMBEDDINGS[1]] = state[_HF_EMBEDDINGS[0]]
        model.load_state_dict(state, strict=True, assign=True)
        return cls(model, tokenizer, config, text_len)

    @classmethod
    def from_config(cls, config: TextEncoderConfig, tokenizer, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", text_len: int = TEXT_LEN) -> "TextEncoder":
        """Random weights (tests, the demo's tiny release); `tokenizer` is a tokenizer or its folder."""
        if isinstance(tokenizer, (str, Path)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        model = UMT5EncoderModel(umt5_config(config)).to(device=device, dtype=dtype)
        return cls(model, tokenizer, config, text_len)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleaned prompts -> (ids [B, text_len] int64, mask [B, text_len] int64), EOS included."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        enc = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                             max_length=self.text_len, add_special_tokens=True, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (context [B, text_len, dim] in the model dtype, zero past each length; lengths [B])."""
        ids, mask = self.tokenize(prompts)
        device = self.model.shared.weight.device
        lengths = mask.sum(dim=1)
        longest = int(lengths.max())
        ids, mask = ids[:, :longest].to(device), mask[:, :longest].to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = hidden.masked_fill(~mask.bool()[..., None], 0.0)
        context = hidden.new_zeros(len(prompts), self.text_len, hidden.shape[-1])
        context[:, :longest] = hidden
        return context, lengths.to(device)

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the official `T5Encoder` names (CPU, contiguous)."""
        hf = self.model.state_dict()
        return {k: hf[v].detach().to("cpu").contiguous() for k, v in official_key_map(self.config.num_layers).items()}

    def save_official(self, path: str | Path) -> None:
        """Write the official-format `.pth` atomically (wan_model.files.atomic_write)."""
        state = self.official_state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
