"""LoRA file formats (wan_model/lora_formats.py): round trips of the four layouts, key resolution, errors that
name the model a file belongs to, and diffusers (0.42, WanPipeline LoRA loader) loading our files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from tests.wan_model.test_transformer import diffusers_twin, tiny_model
from wan_model.config import PRESETS
from wan_model.keymaps import official_key_to_diffusers
from wan_model.lora_formats import (PEFT_METADATA_KEY, LoraModule, kohya_name, load_lora, lora_targets,
                                    parse_lora_state_dict, save_lora)

TINY = PRESETS["tiny-t2v"].transformer


def random_lora(names, rank=4, alpha=8.0, dtype=torch.float32, config=TINY) -> dict[str, LoraModule]:
    """Random factors for `names` with the shapes of `config`; rank / alpha may be per-name dicts."""
    targets = lora_targets(config)
    out = {}
    for n in names:
        r = rank[n] if isinstance(rank, dict) else rank
        a = alpha[n] if isinstance(alpha, dict) else alpha
        fan_in, fan_out = targets[n]
        out[n] = LoraModule(down=torch.randn(r, fan_in).to(dtype), up=torch.randn(fan_out, r).to(dtype), alpha=a)
    return out


BLOCK_MODULES = [f"blocks.{i}.{m}" for i in range(TINY.num_layers)
                 for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")]
# Outside the blocks diffusers reads no alpha, so these round-trip exactly only with alpha == rank.
OUTER_MODULES = ["time_projection.1", "text_embedding.0", "time_embedding.2", "head.head"]


def assert_same(a: dict[str, LoraModule], b: dict[str, LoraModule]) -> None:
    assert sorted(a) == sorted(b)
    for n in a:
        assert torch.equal(a[n].down, b[n].down), n
        assert torch.equal(a[n].up, b[n].up), n
        assert a[n].alpha == b[n].alpha, n


def mixed_lora(dtype=torch.bfloat16):
    """Block modules with two ranks and three alphas, bf16, plus outer modules with alpha == rank."""
    ranks = {n: (2 if "ffn" in n else 4) for n in BLOCK_MODULES}
    alphas = {n: (1.0 if n.endswith(".q") else 4.0 if "cross" in n else 2.5) for n in BLOCK_MODULES}
    weights = random_lora(BLOCK_MODULES, ranks, alphas, dtype)
    weights.update(random_lora(OUTER_MODULES, 3, 3.0, dtype))
    return weights


def write_comfy_original(weights, path):
    """ComfyUI 'original' layout by hand: diffusion_model.<name>.lora_down / lora_up / alpha."""
    tensors = {}
    for n, m in weights.items():
        tensors |= {f"diffusion_model.{n}.lora_down.weight": m.down, f"diffusion_model.{n}.lora_up.weight": m.up,
                    f"diffusion_model.{n}.alpha": torch.tensor(m.alpha)}
    save_file(tensors, path)


def write_kohya(weights, path):
    """musubi-tuner layout by hand: lora_unet_<name with _>.lora_down / lora_up / alpha."""
    tensors = {}
    for n, m in weights.items():
        k = kohya_name(n)
        tensors |= {f"{k}.lora_down.weight": m.down, f"{k}.lora_up.weight": m.up, f"{k}.alpha": torch.tensor(m.alpha)}
    save_file(tensors, path)


@pytest.mark.parametrize("layout", ["comfy", "peft", "comfy-original", "kohya"])
def test_round_trip_each_layout_is_exact(tmp_path, layout):
    weights = mixed_lora()
    path = tmp_path / "lora.safetensors"
    if layout in ("comfy", "peft"):
        save_lora(weights, path, {"wanlora.trigger": "sks"}, format=layout)
    elif layout == "comfy-original":
        write_comfy_original(weights, path)
    else:
        write_kohya(weights, path)
    loaded, report = load_lora(path, config=TINY)
    assert report.format == layout
    assert report.unmatched == {}
    assert_same(loaded, weights)
    if layout in ("comfy", "peft"):
        assert report.metadata["wanlora.trigger"] == "sks"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # atomic write left no temp file


def test_file_keys_of_each_writer(tmp_path):
    weights = random_lora(["blocks.1.ffn.0", "time_projection.1"], rank=2, alpha=2.0)
    save_lora(weights, tmp_path / "c.safetensors")
    save_lora(weights, tmp_path / "p.safetensors", format="peft")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "c.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["diffusion_model.blocks.1.ffn.0.alpha", "diffusion_model.blocks.1.ffn.0.lora_A.weight",
                                    "diffusion_model.blocks.1.ffn.0.lora_B.weight",
                                    "diffusion_model.time_projection.1.lora_A.weight",
                                    "diffusion_model.time_projection.1.lora_B.weight"]
        assert PEFT_METADATA_KEY not in f.metadata()
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["transformer.blocks.1.ffn.net.0.proj.lora_A.weight",
                                    "transformer.blocks.1.ffn.net.0.proj.lora_B.weight",
                                    "transformer.condition_embedder.time_proj.lora_A.weight",
                                    "transformer.condition_embedder.time_proj.lora_B.weight"]
        config = json.loads(f.metadata()[PEFT_METADATA_KEY])
    assert config["transformer.r"] == 2 and config["transformer.lora_alpha"] == 2.0


def test_outer_module_alpha_is_folded_into_up_for_comfy(tmp_path):
    weights = random_lora(["head.head", "text_embedding.2"], rank=4, alpha=16.0)
    save_lora(weights, tmp_path / "l.safetensors")
    loaded, report = load_lora(tmp_path / "l.safetensors")
    for n, m in weights.items():
        assert loaded[n].alpha == loaded[n].rank == 4
        torch.testing.assert_close(loaded[n].delta(), m.delta(), rtol=1e-5, atol=1e-6)


def test_kohya_names_resolve_against_the_module_list():
    """Underscores inside names (self_attn, time_projection) resolve; an unknown kohya name is reported."""
    weights = random_lora(["blocks.1.cross_attn.o", "time_projection.1", "blocks.0.ffn.2"], rank=2, alpha=1.0)
    tensors = {}
    for n, m in weights.items():
        tensors |= {f"{kohya_name(n)}.lora_down.weight": m.down, f"{kohya_name(n)}.lora_up.weight": m.up}
    tensors["lora_unet_blocks_0_self_attn_qq.lora_down.weight"] = torch.zeros(2, 32)
    loaded, report = parse_lora_state_dict(tensors)
    assert sorted(loaded) == sorted(weights)
    assert all(loaded[n].alpha == 2.0 for n in loaded)  # no alpha key: alpha = rank (scale 1)
    assert list(report.unmatched) == ["lora_unet_blocks_0_self_attn_qq.lora_down.weight"]


def test_unmatched_keys_are_reported_with_reasons():
    weights = random_lora(["blocks.0.self_attn.q"], rank=2)
    tensors = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": weights["blocks.0.self_attn.q"].down,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": weights["blocks.0.self_attn.q"].up,
               "diffusion_model.blocks.0.self_attn.k.lora_A.weight": torch.zeros(2, 32),  # no lora_B
               "diffusion_model.blocks.0.norm3.diff": torch.zeros(32),
               "diffusion_model.blocks.0.feed.lora_A.weight": torch.zeros(2, 32),
               "transformer.blocks.0.attn1.to_z.lora_B.weight": torch.zeros(32, 2)}
    loaded, report = parse_lora_state_dict(tensors)
    assert list(loaded) == ["blocks.0.self_attn.q"]
    assert set(report.unmatched) == set(tensors) - {"diffusion_model.blocks.0.self_attn.q.lora_A.weight",
                                                      "diffusion_model.blocks.0.self_attn.q.lora_B.weight",
                                                      "diffusion_model.blocks.0.norm3.diff"}
    assert "no lora_B" in report.unmatched["diffusion_model.blocks.0.self_attn.k.lora_A.weight"]
    assert list(report.diffs) == ["blocks.0.norm3.weight"]  # a difference, applied by the sampler


def test_difference_keys_name_their_parameters_and_are_checked_against_the_model():
    """lightx2v-style files: .diff (weight), .diff_b (bias), .diff_m (a block's modulation) next to factors;
    one for a parameter the model lacks is reported, one of another width is refused."""
    from wan_model.lora_formats import check_lora

    cfg = PRESETS["tiny-t2v"].transformer
    tensors = {"diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(cfg.dim),
               "diffusion_model.blocks.0.self_attn.norm_q.diff": torch.ones(cfg.dim),
               "diffusion_model.blocks.1.diff_m": torch.ones(1, 6, cfg.dim),
               "head.head.diff_b": torch.ones(cfg.out_dim * 4),
               "diffusion_model.blocks.0.modulation.diff": torch.ones(1, 6, cfg.dim),  # ComfyUI's own name
               "diffusion_model.blocks.0.self_attn.nope.diff_b": torch.ones(cfg.dim)}
    weights, report = parse_lora_state_dict(tensors)
    assert not weights and report.format == "differences"
    assert set(report.diffs) == {"blocks.0.self_attn.q.bias", "blocks.0.self_attn.norm_q.weight",
                                 "blocks.1.modulation", "head.head.bias", "blocks.0.modulation",
                                 "blocks.0.self_attn.nope.bias"}
    check_lora(weights, report, cfg)
    assert "blocks.0.self_attn.nope.bias" not in report.diffs and "blocks.0.modulation" in report.diffs
    why = report.unmatched["diffusion_model.blocks.0.self_attn.nope.diff_b"]  # named by its file key
    assert "blocks.0.self_attn.nope.bias, which this model lacks" in why
    _, wide = parse_lora_state_dict({"blocks.0.self_attn.q.diff_b": torch.ones(5120)})
    with pytest.raises(ValueError, match=r"blocks.0.self_attn.q.bias has shape \(5120,\)"):
        check_lora({}, wide, cfg)


def test_wan21_i2v_lora_on_wan22_model_is_named(tmp_path):
    weights = random_lora(["blocks.0.cross_attn.k"], rank=2)
    tensors = {f"diffusion_model.blocks.0.cross_attn.{m}.lora_{ab}.weight": t.clone()
               for m in ("k", "k_img", "v_img") for ab, t in (("A", weights["blocks.0.cross_attn.k"].down),
                                                             ("B", weights["blocks.0.cross_attn.k"].up))}
    save_file(tensors, tmp_path / "i2v21.safetensors")
    _, report = load_lora(tmp_path / "i2v21.safetensors")
    assert report.foreign_model == "Wan 2.1 I2V-14B LoRA"
    assert len(report.unmatched) == 4
    with pytest.raises(ValueError, match="Wan 2.1 I2V"):
        load_lora(tmp_path / "i2v21.safetensors", config=PRESETS["tiny-i2v"].transformer)


@pytest.mark.parametrize("dim,fits", [(5120, "t2v-A14B, i2v-A14B"), (3072, "ti2v-5B"), (1536, "Wan 2.1 T2V-1.3B")])
def test_shape_mismatch_names_the_preset_it_fits(tmp_path, dim, fits):
    weights = {f"blocks.0.self_attn.{m}": LoraModule(torch.zeros(1, dim), torch.zeros(dim, 1), 1.0) for m in "qkvo"}
    save_lora(weights, tmp_path / "big.safetensors")
    with pytest.raises(ValueError, match="shapes of another model") as err:
        load_lora(tmp_path / "big.safetensors", config=TINY)
    assert f"dim {dim}" in str(err.value) and fits in str(err.value)


def test_modules_beyond_the_model_are_an_error(tmp_path):
    weights = random_lora(["blocks.0.ffn.0"], rank=2)
    weights["blocks.5.ffn.0"] = weights["blocks.0.ffn.0"]
    save_lora(weights, tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"blocks.5.ffn.0.*do not exist.*2 blocks.*6 blocks"):
        load_lora(tmp_path / "deep.safetensors", config=TINY)


def test_bad_metadata_and_format_fail_clearly(tmp_path):
    weights = random_lora(["blocks.0.ffn.0"], rank=2)
    with pytest.raises(TypeError, match="step"):
        save_lora(weights, tmp_path / "x.safetensors", {"step": 3})
    with pytest.raises(ValueError, match="format"):
        save_lora(weights, tmp_path / "x.safetensors", format="kohya")
    with pytest.raises(ValueError, match="reserved"):
        save_lora(weights, tmp_path / "x.safetensors", {PEFT_METADATA_KEY: "{}"})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- diffusers loads our files

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_into_diffusers(path, twin, adapter_name="ours") -> set[str]:
    """WanPipeline.lora_state_dict + load_lora_into_transformer(twin); asserts diffusers logged no missing or
    unexpected keys; returns the modules of the loaded adapter (diffusers names)."""
    diffusers = pytest.importorskip("diffusers")
    from peft.utils import get_peft_model_state_dict

    records = _Records()
    logger = logging.getLogger("diffusers")  # diffusers' loggers do not propagate to the root (caplog)
    logger.addHandler(records)
    try:
        state, metadata = diffusers.WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        diffusers.WanPipeline.load_lora_into_transformer(state, transformer=twin, adapter_name=adapter_name,
                                                         metadata=metadata)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if "unexpected" in m or "missing" in m], records.messages
    return {k.rsplit(".lora_", 1)[0] for k in get_peft_model_state_dict(twin, adapter_name=adapter_name)}


@pytest.mark.parametrize("layout", ["comfy", "peft"])
def test_diffusers_loads_our_file_with_nothing_missing_or_unexpected(tmp_path, layout):
    """Reference: diffusers 0.42 WanPipeline.lora_state_dict + load_lora_into_transformer on WanTransformer3DModel."""
    twin = diffusers_twin(tiny_model("tiny-t2v"))
    weights = mixed_lora(torch.float32)
    path = save_lora(weights, tmp_path / "lora.safetensors", {"wanlora.expert": "high_noise"}, format=layout)
    assert load_into_diffusers(path, twin) == {official_key_to_diffusers(n) for n in weights}
    # diffusers' effective update (its scaling times B @ A) equals ours for every module.
    for n, m in weights.items():
        layer = twin.get_submodule(official_key_to_diffusers(n))
        theirs = layer.scaling["ours"] * layer.lora_B["ours"].weight.float() @ layer.lora_A["ours"].weight.float()
        torch.testing.assert_close(theirs, m.delta(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("writer,source", [("save_lora_adapter", "peft"), ("WanPipeline.save_lora_weights", "comfy")])
def test_we_read_what_diffusers_writes(tmp_path, writer, source):
    """Reference: diffusers 0.42 writers: the model's save_lora_adapter (no prefix, LoraConfig header) and
    WanPipeline.save_lora_weights (`transformer.` prefix), after loading our mixed-rank file (from a comfy
    file diffusers builds its own rank / alpha patterns)."""
    diffusers = pytest.importorskip("diffusers")
    from peft.utils import get_peft_model_state_dict

    twin = diffusers_twin(tiny_model("tiny-t2v"))
    weights = mixed_lora(torch.float32)
    load_into_diffusers(save_lora(weights, tmp_path / "ours.safetensors", format=source), twin)
    out = tmp_path / "theirs"
    if writer == "save_lora_adapter":
        twin.save_lora_adapter(out, adapter_name="ours")
    else:
        diffusers.WanPipeline.save_lora_weights(
            out, transformer_lora_layers=get_peft_model_state_dict(twin, adapter_name="ours"),
            transformer_lora_adapter_metadata=twin.peft_config["ours"].to_dict())
    loaded, report = load_lora(out / "pytorch_lora_weights.safetensors", config=TINY)
    assert report.format == "peft" and report.unmatched == {}
    assert sorted(loaded) == sorted(weights)
    for n, m in weights.items():
        torch.testing.assert_close(loaded[n].delta(), m.delta(), rtol=1e-5, atol=1e-6)
