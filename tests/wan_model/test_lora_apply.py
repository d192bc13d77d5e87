"""Applying LoRAs to WanTransformer (wan_model/lora_apply.py): merged vs attached, strengths, exact unmerge,
missing targets, PEFT-wrapped models, and parity with diffusers' WanTransformer3DModel + PEFT adapter."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.wan_model.test_lora_formats import BLOCK_MODULES, TINY
from tests.wan_model.test_transformer import diffusers_twin, inputs, rel_err, tiny_model
from wan_model.lora_apply import LoraSet, merge_loras, parse_lora_spec
from wan_model.lora_formats import LoraModule, lora_targets, save_lora


def small_lora(names, rank=4, alpha=2.0, seed=1) -> dict[str, LoraModule]:
    """Factors scaled so the update is a visible but moderate change of the tiny model's weights."""
    g = torch.Generator().manual_seed(seed)
    targets = lora_targets(TINY)
    return {n: LoraModule(down=torch.randn(rank, targets[n][0], generator=g) * 0.3,
                          up=torch.randn(targets[n][1], rank, generator=g) * 0.3, alpha=alpha) for n in names}


STYLE = BLOCK_MODULES + ["time_projection.1", "head.head"]
MOTION = [n for n in BLOCK_MODULES if "self_attn" in n]


def fixed_inputs(config):
    """The same random inputs on every call (tests compare outputs across calls)."""
    with torch.random.fork_rng():
        torch.manual_seed(123)
        return inputs(config, batch=1)  # one sample: these tests compare models, not batch handling


def run(model):
    latents, timestep, context, lens = fixed_inputs(model.config)
    with torch.no_grad():
        return model(latents, timestep, context, lens)


def test_merge_and_attach_give_the_same_output():
    model = tiny_model("tiny-t2v")
    base = run(model)
    style, motion = small_lora(STYLE, seed=1), small_lora(MOTION, rank=2, alpha=1.0, seed=2)
    lora_set = LoraSet({"style": (style, 0.7), "motion": (motion, -0.4)})
    assert lora_set.attach(model) == []
    attached = run(model)
    lora_set.detach()
    assert torch.equal(run(model), base)  # detach leaves no trace
    handle = merge_loras(model, [(style, 0.7), (motion, -0.4)])
    merged = run(model)
    assert rel_err(merged, base) > 1e-2  # the LoRAs do change the output
    assert rel_err(attached, merged) < 1e-5
    handle.unmerge()
    assert torch.equal(run(model), base)


def test_strength_zero_gives_the_base_output_exactly():
    model = tiny_model("tiny-t2v")
    base = run(model)
    style = small_lora(STYLE)
    handle = merge_loras(model, [(style, 0.0)])
    assert handle.merged == [] and torch.equal(run(model), base)
    lora_set = LoraSet({"style": (style, 1.0)})
    lora_set.attach(model)
    on = run(model)
    lora_set.set_strength("style", 0.0)
    assert torch.equal(run(model), base)
    lora_set.set_strength("style", 0.5)  # strengths move in place; 0.5 lies between base and full
    half = run(model)
    assert 0 < rel_err(half, base) < rel_err(on, base)
    with pytest.raises(KeyError, match="style"):
        lora_set.set_strength("styl", 1.0)


def test_unmerge_restores_bf16_weights_bitwise():
    model = tiny_model("tiny-t2v").to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = merge_loras(model, [(small_lora(STYLE, seed=3), 1.3), (small_lora(MOTION, seed=4), 0.2)])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert sorted(changed) == sorted(f"{n}.weight" for n in STYLE)
    handle.unmerge()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for_good = merge_loras(model, [(small_lora(MOTION), 1.0)], backup_device=None)
    with pytest.raises(RuntimeError, match="backup_device=None"):
        for_good.unmerge()


def test_missing_targets_are_reported_and_wrong_shapes_raise(caplog):
    model = tiny_model("tiny-t2v")
    lora = small_lora(["blocks.0.ffn.0"])
    lora["blocks.7.ffn.0"] = lora["blocks.0.ffn.0"]
    with caplog.at_level(logging.WARNING, logger="wan_model.lora_apply"):
        handle = merge_loras(model, [(lora, 1.0)])
    assert handle.missing == ["blocks.7.ffn.0"] and handle.merged == ["blocks.0.ffn.0"]
    assert "blocks.7.ffn.0" in caplog.text
    handle.unmerge()
    assert LoraSet({"a": (lora, 1.0)}).attach(model) == ["blocks.7.ffn.0"]
    wide = {f"blocks.0.self_attn.{m}": LoraModule(torch.zeros(1, 5120), torch.zeros(5120, 1), 1.0) for m in "qkvo"}
    with pytest.raises(ValueError, match="dim 5120: presets t2v-A14B, i2v-A14B"):
        merge_loras(model, [(wide, 1.0)])


def test_applies_through_peft_layers():
    """A model carrying PEFT LoRA layers (training): our LoRA goes into the wrapped base Linear."""
    from peft import LoraConfig, inject_adapter_in_model

    model = tiny_model("tiny-t2v")
    base = run(model)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q", "ffn.0"]), model)  # lora_B = 0: no change yet
    lora = small_lora(["blocks.0.self_attn.q", "blocks.1.ffn.0"])
    handle = merge_loras(model, [(lora, 1.0)])
    assert handle.missing == []
    merged = run(model)
    handle.unmerge()
    lora_set = LoraSet({"a": (lora, 1.0)})
    lora_set.attach(model)
    assert rel_err(run(model), merged) < 1e-5 and rel_err(merged, base) > 1e-3


@pytest.mark.parametrize("layout", ["comfy", "peft"])
def test_merged_matches_diffusers_with_adapter_loaded(tmp_path, layout):
    """Reference: diffusers 0.42 WanTransformer3DModel with our file loaded by WanPipeline's LoRA loader (fp32)."""
    diffusers = pytest.importorskip("diffusers")
    model = tiny_model("tiny-t2v")
    twin = diffusers_twin(model)
    lora = small_lora(STYLE, rank=4, alpha=3.0)
    path = save_lora(lora, tmp_path / "lora.safetensors", format=layout)
    state, metadata = diffusers.WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    diffusers.WanPipeline.load_lora_into_transformer(state, transformer=twin, metadata=metadata)
    base = run(model)
    merge_loras(model, [(lora, 1.0)])
    latents, timestep, context, lens = fixed_inputs(model.config)
    padded = torch.nn.functional.pad(
        context.masked_fill(torch.arange(context.shape[1])[None, :, None] >= lens[:, None, None], 0),
        (0, 0, 0, model.config.text_len - context.shape[1]))
    with torch.no_grad():
        ours = model(latents, timestep, context, lens)
        ref = twin(hidden_states=latents, timestep=timestep, encoder_hidden_states=padded, return_dict=False)[0]
    assert rel_err(ours, base) > 1e-2
    assert rel_err(ours, ref) < 1e-5


def test_attach_in_bf16_matches_merge_in_bf16():
    """The fused bf16 hook path (addmm) agrees with merged bf16 weights to bf16 accuracy."""
    model = tiny_model("tiny-t2v").to(torch.bfloat16)
    base = run(model)
    lora = small_lora(STYLE, seed=5)
    lora_set = LoraSet({"a": (lora, 0.8)})
    lora_set.attach(model)
    attached = run(model)
    lora_set.detach()
    merge_loras(model, [(lora, 0.8)])
    assert rel_err(attached, base) > 0.2  # the LoRA moves the output far more than the bf16 disagreement
    assert rel_err(attached, run(model)) < 2e-2  # measured 0.006


@pytest.mark.parametrize("spec,expected", [
    ("out/adapters/step-00002000", (Path("out/adapters/step-00002000"), 1.0, None)),
    ("a.safetensors:0.75", (Path("a.safetensors"), 0.75, None)),
    ("dir:-1@low_noise", (Path("dir"), -1.0, "low_noise")),
    ("C:/loras/x.safetensors@dense", (Path("C:/loras/x.safetensors"), 1.0, "dense")),
])
def test_parse_lora_spec(spec, expected):
    assert parse_lora_spec(spec) == expected
    with pytest.raises(ValueError, match="expert"):
        parse_lora_spec("x@high noise")


def test_lora_spec_at_sign_inside_an_existing_path(tmp_path):
    from wan_model.lora_apply import parse_lora_spec

    f = tmp_path / "style@v2.safetensors"
    f.write_bytes(b"")
    assert parse_lora_spec(str(f)) == (f, 1.0, None)
    assert parse_lora_spec(f"{f}:0.5") == (f, 0.5, None)
    assert parse_lora_spec(f"{tmp_path / 'x.safetensors'}:0.5@low_noise") == (tmp_path / "x.safetensors", 0.5, "low_noise")


def test_a_second_set_is_refused_without_touching_the_model():
    """One LoraSet per model: a second attach fails before it fills any slot, so the first set's output
    stays exact, and after detaching it a third set attaches cleanly."""
    model = tiny_model("tiny-t2v")
    first = LoraSet({"ffn": (small_lora([n for n in BLOCK_MODULES if "ffn" in n], seed=1), 1.0)})
    first.attach(model)
    with_first = run(model)
    second = LoraSet({"all": (small_lora(BLOCK_MODULES, seed=2), 1.0)})
    with pytest.raises(RuntimeError, match="one set per model"):
        second.attach(model)
    assert torch.equal(run(model), with_first)
    first.detach()
    base = run(model)
    third = LoraSet({"all": (small_lora(BLOCK_MODULES, seed=3), 1.0)})
    third.attach(model)
    assert not torch.allclose(run(model), base)
    third.detach()
    assert torch.equal(run(model), base)


def test_merging_into_fp8_weights_is_refused():
    """An fp8 Linear's `weight` is a dequantised copy: a merge would silently change nothing."""
    from wan_model.fp8 import quantize_linears_

    model = tiny_model("tiny-t2v").requires_grad_(False)
    quantize_linears_(model, ["blocks.0.ffn.0"], "storage")
    with pytest.raises(ValueError, match="fp8"):
        merge_loras(model, [(small_lora(["blocks.0.ffn.0"]), 1.0)])


def test_a_second_set_on_the_non_block_linears_is_refused_too_and_merge_into_them_as_well():
    """Outside the blocks LoRA is a weight parametrization: a second set there would stack on it and one
    detach would remove both; a merge would write into the computed weight and change nothing."""
    model = tiny_model("tiny-t2v")
    first = LoraSet({"head": (small_lora(["head.head"], seed=1), 1.0)})
    first.attach(model)
    with pytest.raises(RuntimeError, match="one set per model"):
        LoraSet({"head": (small_lora(["head.head"], seed=2), 1.0)}).attach(model)
    with pytest.raises(ValueError, match="while a LoraSet is attached"):
        merge_loras(model, [(small_lora(["head.head"], seed=3), 1.0)])
    first.detach()
    assert "head.head.weight" in model.state_dict()
