"""UMT5 text encoder: official-key loading, parity with the official T5Encoder maths, padding, truncation.

Reference: `_official_forward` below re-writes the forward of the official `T5Encoder`
(Wan-Video/Wan2.2 wan/modules/t5.py: T5LayerNorm, T5Attention without scaling, T5RelativeEmbedding
bucket function, T5FeedForward with tanh GELU, shared_pos=False) directly on the official state dict,
and `T5EncoderModel.__call__`'s slicing of each context to its real length.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.tiny_tokenizer import make_tiny_tokenizer
from wan_model.config import TINY_UMT5, TextEncoderConfig
from wan_model.text_encoder import TextEncoder, clean_prompt, load_official_state_dict, official_shapes

PROMPTS = [
    "A cat walks across a sunny garden.",
    "  一只猫在花园里散步。  Close-up of rain &amp;amp; fog\n\n on a window ",
    # > 128 tokens apart: exercises the logarithmic and the clamped relative-position buckets
    " ".join(["The camera pans slowly over the ocean at dusk while waves break on the rocks."] * 12),
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("umt5_tok"))


@pytest.fixture(scope="module")
def encoder(tokenizer_dir):
    torch.manual_seed(0)
    enc = TextEncoder.from_config(TINY_UMT5, tokenizer_dir)
    with torch.no_grad():  # make the position bias and norms matter more than the small default init
        for name, p in enc.model.named_parameters():
            if "relative_attention_bias" in name or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return enc


def _bucket(rel_pos, num_buckets, max_dist):
    """T5RelativeEmbedding._relative_position_bucket, bidirectional."""
    num_buckets //= 2
    buckets = (rel_pos > 0).long() * num_buckets
    rel_pos = rel_pos.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact)
                         * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def _official_forward(sd, cfg: TextEncoderConfig, ids, mask):
    """Official T5Encoder.forward(ids, mask) in float32 -> [B, L, dim]."""
    b, length = ids.shape
    n, c = cfg.num_heads, cfg.dim_attn // cfg.num_heads
    x = F.embedding(ids, sd["token_embedding.weight"])
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    buckets = _bucket(rel, cfg.num_buckets, cfg.max_distance)
    for i in range(cfg.num_layers):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = _rms(x, p("norm1.weight"), cfg.eps)
        q, k, v = (F.linear(h, p(f"attn.{m}.weight")).view(b, -1, n, c) for m in "qkv")
        bias = F.embedding(buckets, p("pos_embedding.embedding.weight")).permute(2, 0, 1)[None]
        bias = bias.repeat(b, 1, 1, 1).masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(c)
        attn = F.softmax(attn.float(), dim=-1)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c), p("attn.o.weight"))
        h = _rms(x, p("norm2.weight"), cfg.eps)
        gate = F.gelu(F.linear(h, p("ffn.gate.0.weight")), approximate="tanh")
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return _rms(x, sd["norm.weight"], cfg.eps)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_tiny_tokenizer_fits_the_tiny_encoder(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) <= TINY_UMT5.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tokenizer_dir / "spiece.model").is_file() and (tokenizer_dir / "tokenizer.json").is_file()


def test_clean_prompt_matches_official_whitespace_cleaning():
    assert clean_prompt("  a&amp;amp;b \n\t c  ") == "a&b c"
    assert clean_prompt("一只猫\u3000 在花园") == "一只猫 在花园"


def test_parity_with_official_forward(encoder):
    context, lengths = encoder.encode(PROMPTS)
    ids, mask = encoder.tokenize(PROMPTS)
    assert context.shape == (3, 512, TINY_UMT5.dim) and lengths.tolist() == mask.sum(1).tolist()
    assert lengths[2] > 140  # the long prompt reaches the far buckets
    ref = _official_forward(encoder.official_state_dict(), TINY_UMT5, ids, mask)
    for row, n in enumerate(lengths.tolist()):
        err = _rel_err(context[row, :n], ref[row, :n])  # official: context[row][:n]
        assert err < 1e-5, f"prompt {row}: rel err {err:.2e}"
        assert torch.all(context[row, n:] == 0)


def test_trimmed_batch_equals_full_length_run(encoder):
    """Running only to the longest real prompt gives what the official 512-token run gives."""
    ids, mask = encoder.tokenize(PROMPTS[:2])
    full = encoder.model(input_ids=ids, attention_mask=mask).last_hidden_state
    context, lengths = encoder.encode(PROMPTS[:2])
    for row, n in enumerate(lengths.tolist()):
        assert _rel_err(context[row, :n], full[row, :n]) < 1e-6


def test_truncates_at_text_len_with_eos(encoder):
    long = " ".join(["Two dancers spin on a wooden stage under warm spotlights."] * 80)
    ids, mask = encoder.tokenize([long])
    assert ids.shape == (1, 512) and mask.sum() == 512 and ids[0, -1] == encoder.tokenizer.eos_token_id
    context, lengths = encoder.encode([long])
    assert lengths.tolist() == [512] and context.abs().sum(-1).gt(0).all()


def test_save_and_load_official_round_trip(encoder, tokenizer_dir, tmp_path):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    encoder.save_official(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(official_shapes(TINY_UMT5))
    assert "blocks.1.pos_embedding.embedding.weight" in raw and "blocks.0.ffn.gate.0.weight" in raw
    loaded = TextEncoder.from_release(path, tokenizer_dir, TINY_UMT5, dtype=torch.float32)
    a, _ = encoder.encode(PROMPTS[:2])
    b, _ = loaded.encode(PROMPTS[:2])
    assert torch.equal(a, b)
    bf16 = TextEncoder.from_release(path, tokenizer_dir, TINY_UMT5, dtype=torch.bfloat16)
    c, _ = bf16.encode(PROMPTS[:2])
    assert c.dtype == torch.bfloat16 and _rel_err(c.float(), a) < 0.05


def test_load_errors_name_the_file_and_the_key(encoder, tmp_path):
    sd = encoder.official_state_dict()
    path = tmp_path / "t5.pth"
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.attn.q.weight"}, path)
    with pytest.raises(ValueError, match=r"t5.pth: .*missing 1 keys \['blocks.1.attn.q.weight'\]"):
        load_official_state_dict(path, TINY_UMT5)
    torch.save({**sd, "norm.weight": torch.ones(7)}, path)
    with pytest.raises(ValueError, match=r"norm.weight: expected \(32,\), found \(7,\)"):
        load_official_state_dict(path, TINY_UMT5)
    with pytest.raises(FileNotFoundError, match="UMT5 checkpoint not found"):
        load_official_state_dict(tmp_path / "nope.pth", TINY_UMT5)
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode("a single string")
