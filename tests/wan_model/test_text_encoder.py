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

from wan_model.tiny_release import make_tiny_tokenizer
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
    """T5LayerNorm: float32 statistics, back to the weight dtype when it is half precision."""
    return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(w.dtype)


def _gelu(x):
    """The official GELU module, written out (so bf16 rounds where the official code rounds)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _official_forward(sd, cfg: TextEncoderConfig, ids, mask):
    """Official T5Encoder.forward(ids, mask) in the state dict's dtype -> [B, L, dim]."""
    b, length = ids.shape
    n, c = cfg.num_heads, cfg.dim_attn // cfg.num_heads
    x = F.embedding(ids, sd["token_embedding.weight"])
    rel = torch.arange(length, device=ids.device)[None, :] - torch.arange(length, device=ids.device)[:, None]
    buckets = _bucket(rel, cfg.num_buckets, cfg.max_distance)
    for i in range(cfg.num_layers):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        h = _rms(x, p("norm1.weight"), cfg.eps)
        q, k, v = (F.linear(h, p(f"attn.{m}.weight")).view(b, -1, n, c) for m in "qkv")
        bias = F.embedding(buckets, p("pos_embedding.embedding.weight")).permute(2, 0, 1)[None]
        bias = bias.repeat(b, 1, 1, 1).masked_fill(mask.view(b, 1, 1, -1) == 0, torch.finfo(x.dtype).min)
        attn = torch.einsum("binc,bjnc->bnij", q, k) + bias  # no 1/sqrt(c)
        attn = F.softmax(attn.float(), dim=-1).type_as(attn)
        x = x + F.linear(torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, -1, n * c), p("attn.o.weight"))
        h = _rms(x, p("norm2.weight"), cfg.eps)
        gate = _gelu(F.linear(h, p("ffn.gate.0.weight")))
        x = x + F.linear(F.linear(h, p("ffn.fc1.weight")) * gate, p("ffn.fc2.weight"))
    return _rms(x, sd["norm.weight"], cfg.eps)


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _official_random_state(cfg: TextEncoderConfig, device) -> dict[str, torch.Tensor]:
    """Random float32 weights with the official `init_weights` standard deviations (wan/modules/t5.py)."""
    stds = {"attn.q.weight": (cfg.dim * cfg.dim_attn) ** -0.5, "attn.k.weight": cfg.dim ** -0.5,
            "attn.v.weight": cfg.dim ** -0.5, "attn.o.weight": (cfg.num_heads * cfg.dim_attn) ** -0.5,
            "ffn.gate.0.weight": cfg.dim ** -0.5, "ffn.fc1.weight": cfg.dim ** -0.5,
            "ffn.fc2.weight": cfg.dim_ffn ** -0.5, "token_embedding.weight": 1.0,
            "pos_embedding.embedding.weight": (2 * cfg.num_buckets * cfg.num_heads) ** -0.5}
    out = {}
    for name, shape in official_shapes(cfg).items():
        std = next((v for k, v in stds.items() if name.endswith(k)), None)
        out[name] = (torch.ones(shape, device=device) if std is None  # norms
                     else torch.randn(shape, device=device) * std)
    return out


def test_tiny_tokenizer_fits_the_tiny_encoder(tokenizer_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) <= TINY_UMT5.vocab_size
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert (tokenizer_dir / "spiece.model").is_file() and (tokenizer_dir / "tokenizer.json").is_file()


def test_clean_prompt_matches_official_whitespace_cleaning():
    assert clean_prompt("  a&amp;amp;b \n\t c  ") == "a&b c"
    assert clean_prompt("一只猫\u3000 在花园") == "一只猫 在花园"


def test_clean_prompt_fixes_mojibake_with_ftfy():
    # UTF-8 read as Windows-1252 (once, and twice for the curly quote), repaired as the official
    # tokenizer's ftfy.fix_text does; ftfy also straightens the quote to an ASCII apostrophe.
    assert clean_prompt("cafÃ©") == "café"
    assert clean_prompt("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.") == "The Mona Lisa doesn't have eyebrows."


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


@pytest.mark.gpu
def test_xxl_bf16_against_official_maths_on_gpu(tokenizer_dir):
    """Real UMT5-XXL shapes, random official-init weights, bf16 on the GPU (the official pipeline's dtype).

    Ours (transformers UMT5 + SDPA) and the official maths in bf16 are both compared with the official
    maths in float32; SDPA keeps attention scores in float32, so ours must be no further from it.
    """
    import time

    from wan_model.config import UMT5_XXL
    torch.manual_seed(0)
    sd = _official_random_state(UMT5_XXL, "cuda")
    enc = TextEncoder.from_official(sd, tokenizer_dir, UMT5_XXL, dtype=torch.bfloat16, device="cuda")
    prompts = PROMPTS + [p.upper() for p in PROMPTS[:2]] + ["A red car drives along a winding mountain road."] * 3
    context, lengths = enc.encode(prompts)
    ids, mask = (t.cuda() for t in enc.tokenize(prompts))
    with torch.no_grad():
        ref32 = _official_forward(sd, UMT5_XXL, ids, mask)
        ref16 = _official_forward({k: v.bfloat16() for k, v in sd.items()}, UMT5_XXL, ids, mask)
    keep = mask.bool()[..., None]
    ours_err = _rel_err(context * keep, ref32 * keep)
    official_bf16_err = _rel_err(ref16 * keep, ref32 * keep)
    print(f"\nUMT5-XXL bf16 rel err vs fp32 official maths: ours {ours_err:.2e}, "
          f"official bf16 {official_bf16_err:.2e}, ours vs official bf16 {_rel_err(context * keep, ref16 * keep):.2e}")
    assert ours_err <= 1.2 * official_bf16_err
    assert torch.all(context[~mask.bool()] == 0)

    # time on 8 short prompts: our trimmed batch vs the official full 512-token run (both bf16, same model)
    short = PROMPTS[:2] * 4
    short_ids, short_mask = (t.cuda() for t in enc.tokenize(short))

    def timed(fn):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5
    with torch.no_grad():
        full = timed(lambda: enc.model(input_ids=short_ids, attention_mask=short_mask).last_hidden_state)
    trimmed = timed(lambda: enc.encode(short))
    print(f"encode 8 prompts (longest {int(short_mask.sum(1).max())} tokens): {trimmed * 1e3:.1f} ms; "
          f"full 512-token run {full * 1e3:.1f} ms; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
