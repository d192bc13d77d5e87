"""Release folders: layouts of T2V/I2V-A14B (two experts) and TI2V-5B (root), preset detection, lazy
paths, and errors naming the missing file, its folder and the preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wan_model.checkpoint import INDEX_NAME, load_transformer, shard_name
from wan_model.config import PRESETS
from wan_model.release import Release, detect_preset, load_release, write_transformer_release


def fake_release(root: Path, preset: str, seed: int = 0) -> Path:
    """Tiny transformer experts (real weights) plus placeholder VAE / T5 files and tokenizer folder: this
    module only checks that they are there; their contents belong to the VAE and T5 loaders."""
    p = PRESETS[preset]
    write_transformer_release(root, preset, seed)
    (root / p.vae.checkpoint).write_bytes(b"vae")
    (root / p.text_encoder.checkpoint).write_bytes(b"t5")
    (root / p.text_encoder.tokenizer).mkdir(parents=True)
    return root


@pytest.mark.parametrize("preset,experts", [("tiny-t2v", {"high_noise", "low_noise"}),
                                            ("tiny-i2v", {"high_noise", "low_noise"}),
                                            ("tiny-ti2v", {"dense"})])
def test_detects_preset_and_finds_every_part(tmp_path, preset, experts):
    root = fake_release(tmp_path, preset)
    release = load_release(root)
    assert isinstance(release, Release)
    assert release.preset == PRESETS[preset]
    assert set(release.expert_paths) == experts
    if "dense" in experts:
        assert release.expert_paths["dense"] == root
        assert release.vae_path == root / "Wan2.2_VAE.pth"
    else:
        assert release.expert_paths["high_noise"] == root / "high_noise_model"
        assert release.expert_paths["low_noise"] == root / "low_noise_model"
        assert release.vae_path == root / "Wan2.1_VAE.pth"
    assert release.t5_path == root / "models_t5_umt5-xxl-enc-bf16.pth"
    assert release.tokenizer_path == root / "google" / "umt5-xxl"
    assert load_release(root, preset=preset) == release


def test_experts_are_sharded_distinct_and_load_lazily_one_at_a_time(tmp_path):
    root = fake_release(tmp_path, "tiny-t2v", seed=5)
    release = load_release(root)
    for folder in release.expert_paths.values():
        shards = set(json.loads((folder / INDEX_NAME).read_text())["weight_map"].values())
        assert len(shards) >= 2
    high = load_transformer(release.expert_paths["high_noise"], dtype=torch.float32)
    low = load_transformer(release.expert_paths["low_noise"], dtype=torch.float32)
    w = "blocks.0.self_attn.q.weight"
    assert not torch.equal(high.state_dict()[w], low.state_dict()[w])  # seed + i per expert
    assert high.head.head.weight.abs().sum() > 0  # random, not the zero-initialised head


def test_released_configs_detect_by_model_type_and_dim():
    for name in ("t2v-A14B", "i2v-A14B", "ti2v-5B"):
        cfg = PRESETS[name].transformer
        assert detect_preset(cfg) == name
        # A config.json that leaves out a field (eps from another version) still maps by model_type + dim.
        assert detect_preset(cfg.__class__(**{**cfg.__dict__, "eps": 1e-5})) == name


@pytest.mark.parametrize("missing,where", [("Wan2.1_VAE.pth", ""), ("models_t5_umt5-xxl-enc-bf16.pth", ""),
                                           ("google/umt5-xxl", ""), ("config.json", "low_noise_model")])
def test_missing_file_names_file_folder_and_preset(tmp_path, missing, where):
    root = fake_release(tmp_path, "tiny-i2v")
    path = root / where / missing
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_release(root)
    msg = str(err.value)
    assert missing in msg and str(root / where).rstrip("/") in msg
    assert "tiny-i2v" in msg


def test_missing_config_names_the_preset_asked_for(tmp_path):
    root = fake_release(tmp_path, "tiny-ti2v")
    (root / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found in .*preset .tiny-ti2v."):
        load_release(root, preset="tiny-ti2v")


def test_missing_shard_is_named(tmp_path):
    root = fake_release(tmp_path, "tiny-t2v")
    shards = sorted((root / "low_noise_model").glob("*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        load_release(root)


def test_config_not_matching_named_preset_names_both(tmp_path):
    root = fake_release(tmp_path, "tiny-t2v")
    with pytest.raises(ValueError, match=r"is preset 'tiny-t2v', but preset 'tiny-i2v' was asked for"):
        load_release(root, preset="tiny-i2v")


def test_experts_with_different_shapes_are_refused(tmp_path):
    root = fake_release(tmp_path, "tiny-t2v")
    cfg_path = root / "low_noise_model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_layers"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="low_noise_model.*config differs"):
        load_release(root)


def test_empty_folder_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json not found in .*TI2V-5B \(dense\)"):
        load_release(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_release(tmp_path / "nope")


def test_shard_names_follow_the_official_pattern(tmp_path):
    folders = write_transformer_release(tmp_path, "tiny-ti2v", seed=0)
    names = sorted(p.name for p in folders["dense"].glob("*.safetensors"))
    assert names == [shard_name(i + 1, len(names)) for i in range(len(names))]
