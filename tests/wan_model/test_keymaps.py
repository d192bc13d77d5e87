"""Key maps between official, diffusers and ComfyUI names of the Wan 2.2 DiT (wan_model/keymaps.py)."""

from __future__ import annotations

import pytest
import torch

from wan_model.config import PRESETS
from wan_model.keymaps import (detect_transformer_format, diffusers_key_to_official, diffusers_to_official,
                               official_key_to_diffusers, official_to_diffusers, to_official)
from wan_model.transformer import WanTransformer


def official_state(preset: str) -> dict:
    return WanTransformer(PRESETS[preset].transformer).state_dict()


@pytest.mark.parametrize("preset", ["tiny-t2v", "tiny-i2v", "tiny-ti2v"])
def test_round_trip_is_exact_and_keys_match_diffusers_model(preset):
    state = official_state(preset)
    converted = official_to_diffusers(state)
    back = diffusers_to_official(converted)
    assert list(back) == list(state)
    assert all(back[k] is state[k] for k in state)  # tensors pass through untouched
    # Every official key maps onto exactly the names of a diffusers model of the same shape.
    diffusers = pytest.importorskip("diffusers")
    cfg = PRESETS[preset].transformer
    twin = diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, eps=cfg.eps)
    theirs = twin.state_dict()
    assert set(converted) == set(theirs)
    assert all(converted[k].shape == theirs[k].shape for k in theirs)


def test_named_renames_norm_swap_and_lora_suffixes():
    pairs = {
        "blocks.12.norm3.weight": "blocks.12.norm2.weight",
        "blocks.0.cross_attn.o.bias": "blocks.0.attn2.to_out.0.bias",
        "blocks.3.self_attn.norm_k.weight": "blocks.3.attn1.norm_k.weight",
        "blocks.3.ffn.0.weight": "blocks.3.ffn.net.0.proj.weight",
        "blocks.39.modulation": "blocks.39.scale_shift_table",
        "head.modulation": "scale_shift_table",
        "head.head.weight": "proj_out.weight",
        "time_projection.1.bias": "condition_embedder.time_proj.bias",
        "text_embedding.2.weight": "condition_embedder.text_embedder.linear_2.weight",
        "blocks.7.self_attn.q.lora_A.weight": "blocks.7.attn1.to_q.lora_A.weight",
        "blocks.7.ffn.2.lora_B.default.weight": "blocks.7.ffn.net.2.lora_B.default.weight",
    }
    for official, diffusers in pairs.items():
        assert official_key_to_diffusers(official) == diffusers
        assert diffusers_key_to_official(diffusers) == official


@pytest.mark.parametrize("key", ["blocks.0.cross_attn.k_img.weight", "img_emb.proj.0.weight",
                                 "blocks.0.self_attn.qq.weight", "blocks.x.ffn.0.weight"])
def test_unknown_official_keys_raise_naming_the_key(key):
    with pytest.raises(KeyError, match=key.replace(".", r"\.")):
        official_to_diffusers({key: torch.zeros(1)})


def test_unknown_diffusers_keys_raise_naming_the_key():
    with pytest.raises(KeyError, match=r"blocks\.0\.attn2\.add_k_proj\.weight"):
        diffusers_to_official({"blocks.0.attn2.add_k_proj.weight": torch.zeros(1)})


def test_detect_and_convert_any_format_to_official():
    state = official_state("tiny-ti2v")
    diffusers = official_to_diffusers(state)
    comfy = {"model.diffusion_model." + k: v for k, v in state.items()}
    comfy_short = {"diffusion_model." + k: v for k, v in state.items()}
    assert detect_transformer_format(state) == "official"
    assert detect_transformer_format(diffusers) == "diffusers"
    assert detect_transformer_format(comfy) == detect_transformer_format(comfy_short) == "comfy"
    model = WanTransformer(PRESETS["tiny-ti2v"].transformer)
    for source in (state, diffusers, comfy, comfy_short):
        converted = to_official(source)
        assert list(converted) == list(state)
        model.load_state_dict(converted, strict=True)
    with pytest.raises(ValueError, match="cannot tell the format"):
        detect_transformer_format(["encoder.block.0.layer.0.SelfAttention.q.weight"])
