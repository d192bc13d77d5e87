"""WanTransformer: parity with diffusers' WanTransformer3DModel, RoPE against the official complex formula,
checkpointing, bf16 float32 islands, input checks; a GPU test at the real A14B expert shape."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wan_model import attention as attn_mod
from wan_model.config import PRESETS, TransformerConfig
from wan_model.keymaps import official_to_diffusers
from wan_model.rope import apply_rope, axis_channels, rope_tables
from wan_model.transformer import WanTransformer

GRID_LATENTS = (3, 4, 6)  # F, H, W latents -> 3 x 2 x 3 tokens with patch (1, 2, 2): every RoPE axis > 1
TEXT_LENS = (5, 9)


def randomize_(model: torch.nn.Module) -> None:
    """Random values everywhere (norm weights around 1, modulation tables not small) so no term hides."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modulation" in name or "scale_shift_table" in name:
                p.normal_(0.0, 0.5)
            elif p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)


def tiny_model(preset: str) -> WanTransformer:
    model = WanTransformer(PRESETS[preset].transformer)
    randomize_(model)
    return model


def inputs(cfg: TransformerConfig, per_token: bool = False, batch: int = 2):
    """latents [B, in_dim, 3, 4, 6], timestep [B] or [B, L] (first-frame tokens t=0), context, context_lens."""
    latents = torch.randn(batch, cfg.in_dim, *GRID_LATENTS)
    timestep = torch.tensor([311.0, 874.0])[:batch]
    if per_token:
        grid = [n // p for n, p in zip(GRID_LATENTS, cfg.patch_size)]
        timestep = timestep[:, None].repeat(1, math.prod(grid))
        timestep[:, : grid[1] * grid[2]] = 0.0
    lens = torch.tensor(TEXT_LENS)[:batch]
    context = torch.randn(batch, max(TEXT_LENS), cfg.text_dim)
    return latents, timestep, context, lens


def diffusers_twin(model: WanTransformer):
    """diffusers.WanTransformer3DModel of the same shape holding `model`'s weights (through keymaps)."""
    diffusers = pytest.importorskip("diffusers")
    cfg = model.config
    twin = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
        qk_norm="rms_norm_across_heads", eps=cfg.eps)
    twin.load_state_dict(official_to_diffusers(model.state_dict()), strict=True)
    return twin


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("preset,per_token", [("tiny-t2v", False), ("tiny-i2v", False), ("tiny-ti2v", True)])
def test_matches_diffusers_wan_transformer_3d_model(preset, per_token):
    """Reference: diffusers 0.42 WanTransformer3DModel, fp32, batch 2, text lengths 5 and 9."""
    model = tiny_model(preset)
    twin = diffusers_twin(model)
    latents, timestep, context, lens = inputs(model.config, per_token)
    # The diffusers pipeline hands the model prompts cut to their length and zero-padded to text_len.
    padded = context.masked_fill(torch.arange(context.shape[1])[None, :, None] >= lens[:, None, None], 0)
    padded = F.pad(padded, (0, 0, 0, model.config.text_len - context.shape[1]))
    with torch.no_grad():
        ours = model(latents, timestep, context, lens)
        ref = twin(hidden_states=latents, timestep=timestep, encoder_hidden_states=padded, return_dict=False)[0]
    assert ours.shape == latents[:, : model.config.out_dim].shape
    assert rel_err(ours, ref) < 1e-5
    # The two samples differ (batch rows not mixed up) and the output depends on the timestep.
    assert rel_err(ours[0], ours[1]) > 0.1


def test_rope_matches_official_complex_formula():
    """Reference: official rope_params / rope_apply (complex128 polar tables, split d-4(d//6), 2(d//6), 2(d//6))."""
    head_dim, grid = 16, (3, 2, 4)
    x = torch.randn(2, math.prod(grid), 2, head_dim)
    cos, sin = rope_tables(grid, head_dim, torch.device("cpu"))
    ours = apply_rope(x, cos, sin)

    def params(n, dim):  # official rope_params: positions x dim/2 complex rotations
        angle = torch.outer(torch.arange(n, dtype=torch.float64),
                            1.0 / 10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        return torch.polar(torch.ones_like(angle), angle)

    assert axis_channels(128) == (44, 42, 42)
    f, h, w = grid
    cf, ch, cw = axis_channels(head_dim)
    table = torch.cat([params(f, cf).view(f, 1, 1, -1).expand(f, h, w, -1),
                       params(h, ch).view(1, h, 1, -1).expand(f, h, w, -1),
                       params(w, cw).view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(1, -1, 1, head_dim // 2)
    ref = torch.view_as_real(torch.view_as_complex(x.double().unflatten(-1, (-1, 2))) * table).flatten(-2)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    assert rope_tables(grid, head_dim, torch.device("cpu"))[0] is cos  # cached per grid
    # A table first built while sampling (inference mode) must still serve training.
    with torch.inference_mode():
        rope_tables((2, 2, 2), head_dim, torch.device("cpu"))
    y = torch.randn(1, 8, 2, head_dim, requires_grad=True)
    apply_rope(y, *rope_tables((2, 2, 2), head_dim, torch.device("cpu"))).sum().backward()
    assert y.grad is not None


def test_gradient_checkpointing_same_outputs_and_gradients():
    model = tiny_model("tiny-ti2v")
    latents, timestep, context, lens = inputs(model.config, per_token=True)

    def run(every):
        model.zero_grad()
        model.enable_gradient_checkpointing(every > 0, every=max(every, 1))
        x = latents.clone().requires_grad_(True)
        out = model(x, timestep, context, lens)
        out.square().mean().backward()
        return out.detach(), x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out0, gx0, g0 = run(0)
    for every in (1, 2):
        out1, gx1, g1 = run(every)
        torch.testing.assert_close(out1, out0, rtol=0, atol=0)
        torch.testing.assert_close(gx1, gx0, rtol=1e-6, atol=1e-7)
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    assert g0["blocks.1.self_attn.q.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="every"):
        model.enable_gradient_checkpointing(True, every=0)


def test_bf16_weights_and_autocast_stay_close_to_fp32():
    """bf16 runs keep the float32 islands: t = 999 and t = 998 (one bf16 step apart is 4) stay distinct."""
    model = tiny_model("tiny-t2v")
    latents, _, context, lens = inputs(model.config)
    t_a, t_b = torch.tensor([999.0, 999.0]), torch.tensor([998.0, 998.0])
    with torch.no_grad():
        ref_a, ref_b = model(latents, t_a, context, lens), model(latents, t_b, context, lens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model(latents, t_a, context, lens)
        model.to(torch.bfloat16)
        half_a = model(latents.bfloat16(), t_a, context.bfloat16(), lens)
        half_b = model(latents.bfloat16(), t_b, context.bfloat16(), lens)
    assert auto.dtype == torch.float32 and half_a.dtype == torch.bfloat16
    assert rel_err(auto, ref_a) < 2e-2  # measured 0.5%
    assert rel_err(half_a, ref_a) < 2e-2  # measured 0.6%
    # A timestep rounded to bf16 would make both 1000 and their difference 0 (error 1.0); measured 0.04.
    assert rel_err(half_a.float() - half_b.float(), ref_a - ref_b) < 0.2


def test_broadcast_timestep_equals_per_token_and_context_padding_semantics():
    model = tiny_model("tiny-t2v")
    latents, timestep, context, lens = inputs(model.config)
    tokens = math.prod(n // p for n, p in zip(GRID_LATENTS, model.config.patch_size))
    with torch.no_grad():
        out = model(latents, timestep, context, lens)
        per_token = model(latents, timestep[:, None].expand(-1, tokens), context, lens)
        # Rows past context_lens are ignored; a shorter context equals its zero padding.
        noisy = context.clone()
        noisy[0, lens[0]:] = 100.0
        garbage = model(latents, timestep, noisy, lens)
        short = model(latents[:1], timestep[:1], context[:1, : lens[0]])
    # Same values, other kernels (full [B, L, 6, d] modulation instead of a broadcast one): float32 rounding.
    torch.testing.assert_close(per_token, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(garbage, out, rtol=0, atol=0)
    torch.testing.assert_close(short, out[:1], rtol=1e-5, atol=1e-6)


def test_per_token_time_embedding_runs_once_per_distinct_timestep(monkeypatch):
    import wan_model.transformer as transformer

    model = tiny_model("tiny-ti2v")
    t = torch.tensor([[0.0, 0.0, 500.0, 500.0, 500.0], [0.0, 999.0, 999.0, 999.0, 3.0]])
    seen = []
    real = transformer.sinusoidal_embedding
    monkeypatch.setattr(transformer, "sinusoidal_embedding", lambda v, dim: seen.append(v.clone()) or real(v, dim))
    with torch.no_grad():
        e, e0 = model._embed_time(t, batch=2, tokens=5)
    assert seen[0].tolist() == [0.0, 3.0, 500.0, 999.0]  # the MLP ran on 4 rows, not 10
    assert e.shape == (2, 5, model.config.dim) and e0.shape == (2, 5, 6, model.config.dim)
    with torch.no_grad():  # the per-token formula, row by row
        emb = real(t, model.config.freq_dim)
        e_ref = transformer.linear_fp32(model.time_embedding[2],
                                        F.silu(transformer.linear_fp32(model.time_embedding[0], emb)))
        e0_ref = transformer.linear_fp32(model.time_projection[1], F.silu(e_ref)).unflatten(-1, (6, model.config.dim))
    torch.testing.assert_close(e, e_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e0, e0_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(e0[0, 0], e0[1, 0]) and torch.equal(e0[1, 1], e0[1, 3])  # gathered rows, not recomputed


def test_bad_inputs_name_the_problem():
    model = tiny_model("tiny-i2v")
    latents, timestep, context, lens = inputs(model.config)
    with pytest.raises(ValueError, match=r"\[B, 36, F, H, W\].*i2v"):
        model(latents[:, :16], timestep, context, lens)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(latents[..., :3], timestep, context, lens)
    with pytest.raises(ValueError, match="timestep must be"):
        model(latents, timestep[:, None].repeat(1, 5), context, lens)
    with pytest.raises(ValueError, match="L_text <= 512"):
        model(latents, timestep, torch.zeros(2, 513, model.config.text_dim), None)


def test_official_names_meta_build_and_strict_load():
    cfg = PRESETS["tiny-i2v"].transformer
    with torch.device("meta"):
        empty = WanTransformer(cfg)
    model = empty.to_empty(device="cpu")
    model.init_weights()
    assert torch.all(model.blocks[0].self_attn.norm_q.weight == 1) and torch.all(model.head.head.weight == 0)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, p = cfg.dim, cfg.patch_size
    assert shapes["patch_embedding.weight"] == (d, 36, *p)
    assert shapes["time_projection.1.weight"] == (6 * d, d)
    assert shapes["blocks.0.modulation"] == (1, 6, d) and shapes["head.modulation"] == (1, 2, d)
    assert shapes["blocks.1.norm3.weight"] == (d,) and shapes["blocks.1.cross_attn.norm_k.weight"] == (d,)
    assert shapes["head.head.weight"] == (math.prod(p) * cfg.out_dim, d)
    assert not any("img" in k for k in shapes)  # Wan 2.2 I2V: no CLIP image branch
    assert len(shapes) == 12 + cfg.num_layers * 27 + 3
    model.load_state_dict(tiny_model("tiny-i2v").state_dict(), strict=True)


def test_attention_backends():
    q, k, v = (torch.randn(2, n, 3, 8) for n in (5, 7, 7))
    ref = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(8), dim=-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", ref, v)
    torch.testing.assert_close(attn_mod.attention(q, k, v), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="sdpa"):
        attn_mod.set_attention_backend("xformers")
    if attn_mod._flash_attn_func is None:
        with pytest.raises(ImportError, match="flash-attn"):
            attn_mod.set_attention_backend("flash")
    assert attn_mod.get_attention_backend() == "auto"


def test_flash_backend_dispatch(monkeypatch):
    """'flash' calls flash_attn_func on [B, L, heads, head_dim] as is and unwraps FA3's (out, lse) tuple."""
    calls = []

    def fake_flash(q, k, v):
        calls.append(q.shape)
        return torch.zeros_like(q), None

    monkeypatch.setattr(attn_mod, "_flash_attn_func", fake_flash)
    monkeypatch.setattr(attn_mod, "_backend", "auto")
    q = torch.randn(1, 4, 2, 8)
    attn_mod.set_attention_backend("flash")
    assert torch.equal(attn_mod.attention(q, q, q), torch.zeros_like(q)) and calls == [q.shape]
    attn_mod.set_attention_backend("auto")  # CPU float32: sdpa
    assert not torch.equal(attn_mod.attention(q, q, q), torch.zeros_like(q)) and len(calls) == 1


@pytest.mark.gpu
def test_a14b_expert_forward_backward_on_gpu():
    """Real T2V-A14B expert shape, random bf16 weights, 480x832x81 (latents [1, 16, 21, 60, 104]),
    checkpointing every block. Run alone: pytest -m gpu tests/wan_model/test_transformer.py -s"""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from bench.forward_backward import build_random, latent_shape, measure, random_inputs

    preset = PRESETS["t2v-A14B"]
    shape = latent_shape(preset, 480, 832, 81)
    assert shape == (1, 16, 21, 60, 104)
    model = build_random(preset, torch.device("cuda"))
    result = measure(model, random_inputs(preset, shape, torch.device("cuda")), warmup=1, iters=1)
    print(f"\nt2v-A14B expert, latents {shape}: {result}")
    assert result["peak_gib"] < 78


@pytest.mark.gpu
def test_compiled_blocks_match_eager_on_gpu():
    """compile_blocks (torch.compile per block) changes kernels, not results: output and input gradient."""
    model = tiny_model("tiny-ti2v").cuda()
    model.enable_gradient_checkpointing(True)
    latents, timestep, context, lens = (t.cuda() for t in inputs(model.config, per_token=True))

    def run():
        x = latents.clone().requires_grad_(True)
        out = model(x, timestep, context, lens)
        out.square().mean().backward()
        return out.detach(), x.grad

    eager_out, eager_grad = run()
    model.compile_blocks()
    compiled_out, compiled_grad = run()
    assert rel_err(compiled_out, eager_out) < 1e-5
    assert rel_err(compiled_grad, eager_grad) < 1e-5


def test_compile_blocks_raises_the_shared_recompile_limit_and_never_lowers_it():
    """The blocks of every model share one code object, so dynamo's default 8 recompilations run out across
    shapes, grad modes and experts, and past them the blocks run eagerly (slower, more memory than planned)."""
    from wan_model.transformer import RECOMPILE_LIMIT

    config = torch._dynamo.config
    saved = config.recompile_limit
    try:
        config.recompile_limit = 8
        tiny_model("tiny-t2v").compile_blocks()
        assert config.recompile_limit == RECOMPILE_LIMIT > 8
        config.recompile_limit = 10 * RECOMPILE_LIMIT
        tiny_model("tiny-t2v").compile_blocks()
        assert config.recompile_limit == 10 * RECOMPILE_LIMIT
    finally:
        config.recompile_limit = saved


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-ti2v"])
def test_the_residual_stream_enters_the_blocks_row_major(preset):
    """The patch embedding's [B, d, L] output transposed alone would reach the blocks with the tokens contiguous,
    a layout the blocks' element-wise ops keep: every norm over d would then read with a stride of L (the
    compiled A14B step's layer-norm backward took 2.9 ms a call on such a layout)."""
    model = tiny_model(preset)
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    latents, timestep, context, lens = inputs(model.config, per_token=preset == "tiny-ti2v")
    with torch.no_grad():
        model(latents, timestep, context, lens)
    assert seen == [True]
