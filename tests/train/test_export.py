"""Adapter export (train/export.py): file layout and header, PEFT sources, the exported file reproducing the
trained model in our DiT and in diffusers' WanTransformer3DModel (0.42, WanPipeline LoRA loader), input errors."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from tests.wan_model.test_lora_apply import fixed_inputs, run
from tests.wan_model.test_lora_formats import load_into_diffusers
from tests.wan_model.test_transformer import diffusers_twin, rel_err, tiny_model
from train.export import adapter_path, export_expert_adapter, lora_weights_from_peft
from wan_model.keymaps import official_key_to_diffusers
from wan_model.lora_apply import merge_loras
from wan_model.lora_formats import load_lora

TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
ARGS = dict(base_model="tiny-t2v", expert="high_noise", timestep_range=(875, 1000), rank=4, alpha=8.0,
            trigger="sks fox", recipe_hash="abc123", step=2000)


def trained():
    """(clean tiny model, the same model with a PEFT adapter r=4, alpha=8 whose factors are all non-zero)."""
    clean = tiny_model("tiny-t2v")
    model = tiny_model("tiny-t2v")
    model.load_state_dict(clean.state_dict())
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return clean, model


def test_layout_and_header(tmp_path):
    _, model = trained()
    paths = export_expert_adapter(model, tmp_path, formats=("comfy", "peft"), **ARGS)
    assert paths == [tmp_path / "adapters/step-00002000/high_noise.safetensors",
                     tmp_path / "adapters/step-00002000/diffusers/high_noise.safetensors"]
    assert paths == [adapter_path(tmp_path, 2000, "high_noise", f) for f in ("comfy", "peft")]
    with safe_open(str(paths[0]), "pt") as f:
        header = f.metadata()
        assert f.get_tensor("diffusion_model.blocks.0.ffn.0.lora_A.weight").dtype == torch.bfloat16
    assert {k: v for k, v in header.items() if k != "format"} == {
        "wanlora.base_model": "tiny-t2v", "wanlora.expert": "high_noise", "wanlora.timestep_range": "[875, 1000]",
        "wanlora.rank": "4", "wanlora.alpha": "8.0", "wanlora.trigger": "sks fox", "wanlora.recipe_hash": "abc123",
        "wanlora.step": "2000", "ss_network_dim": "4", "ss_network_alpha": "8.0"}
    comfy, report = load_lora(paths[0], config=model.config)
    peft, _ = load_lora(paths[1], config=model.config)
    assert report.unmatched == {} and len(comfy) == 10 * model.config.num_layers
    assert all(torch.equal(comfy[n].up, peft[n].up) and comfy[n].alpha == peft[n].alpha == 8.0 for n in comfy)
    assert json.loads(report.metadata["wanlora.timestep_range"]) == [875, 1000]


def test_every_peft_source_gives_the_same_weights():
    _, model = trained()
    in_model = {k: v for k, v in model.state_dict().items() if "lora_" in k}  # 'q.lora_A.default.weight'
    assert any(".lora_A.default.weight" in k for k in in_model)
    peft_state = get_peft_model_state_dict(model)  # 'q.lora_A.weight'
    wrapped = {f"base_model.model.{k}": v for k, v in peft_state.items()}  # a PeftModel's keys
    results = [lora_weights_from_peft(s, 8.0) for s in (model, in_model, peft_state, wrapped)]
    for other in results[1:]:
        assert sorted(other) == sorted(results[0])
        assert all(torch.equal(other[n].down, results[0][n].down) for n in other)
    with pytest.raises(ValueError, match="no LoRA factors of adapter 'other'"):
        lora_weights_from_peft(in_model, 8.0, adapter_name="other")


def test_export_reproduces_the_trained_model_here_and_in_diffusers(tmp_path):
    """Reference: the PEFT-adapted model itself; diffusers 0.42 WanTransformer3DModel with the file loaded."""
    clean, model = trained()
    trained_out = run(model)
    twin = diffusers_twin(clean)
    comfy, peft = export_expert_adapter(model, tmp_path, formats=("comfy", "peft"), dtype=torch.float32, **ARGS)
    weights, _ = load_lora(comfy, config=clean.config)
    base_out = run(clean)
    merge_loras(clean, [(weights, 1.0)])
    assert rel_err(trained_out, base_out) > 1e-2
    assert rel_err(run(clean), trained_out) < 1e-5
    assert load_into_diffusers(comfy, twin) == {official_key_to_diffusers(n) for n in weights}
    latents, timestep, context, lens = fixed_inputs(clean.config)
    padded = torch.nn.functional.pad(
        context.masked_fill(torch.arange(context.shape[1])[None, :, None] >= lens[:, None, None], 0),
        (0, 0, 0, clean.config.text_len - context.shape[1]))
    with torch.no_grad():
        ref = twin(hidden_states=latents, timestep=timestep, encoder_hidden_states=padded, return_dict=False)[0]
    assert rel_err(ref, trained_out) < 1e-5
    twin_peft = diffusers_twin(tiny_model("tiny-t2v"))
    assert load_into_diffusers(peft, twin_peft) == {official_key_to_diffusers(n) for n in weights}


@pytest.mark.parametrize("change,match", [
    (dict(rank=8), "declared rank 8"),
    (dict(timestep_range=(900, 875)), "0 <= lo < hi <= 1000"),
    (dict(base_model="t2v-14B"), "not a preset"),
    (dict(base_model="t2v-A14B"), "dim 64"),
    (dict(expert="high/noise"), "plain file name"),
    (dict(formats=("kohya",)), "formats"),
])
def test_bad_arguments_fail_clearly(tmp_path, change, match):
    _, model = trained()
    with pytest.raises(ValueError, match=match):
        export_expert_adapter(model, tmp_path, **{**ARGS, **change})
    assert not (tmp_path / "adapters").exists()


def test_non_lora_keys_are_refused():
    with pytest.raises(ValueError, match="lora_magnitude_vector"):
        lora_weights_from_peft({"blocks.0.self_attn.q.lora_magnitude_vector.default.weight": torch.ones(4)}, 1.0)


def _wrong_key_or_shape(kind):
    _, model = trained()
    state = get_peft_model_state_dict(model)
    if kind == "diffusers names":  # an adapter trained on diffusers' WanTransformer3DModel
        return {official_key_to_diffusers(k): v for k, v in state.items()}, ARGS
    if kind == "transposed factor":
        key = "blocks.0.ffn.0.lora_B.weight"
        return {**state, key: state[key].T.contiguous()}, ARGS
    return model, {**ARGS, "base_model": "t2v-A14B"}  # shapes of another model


@pytest.mark.parametrize("kind,names", [
    ("another model's preset", ["base_model", "tiny-t2v"]),
    ("diffusers names", ["blocks.0.attn1.to_q", "official module names"]),
    ("transposed factor", ["blocks.0.ffn.0", "lora_B"]),
])
def test_refusal_names_the_file_and_the_fix(tmp_path, kind, names):
    """A wrong-shaped or wrong-key adapter is refused naming the file that was not written and what to change."""
    source, args = _wrong_key_or_shape(kind)
    with pytest.raises(ValueError) as err:
        export_expert_adapter(source, tmp_path, **args)
    message = str(err.value)
    assert str(adapter_path(tmp_path, 2000, "high_noise")) in message, message
    assert "LoRA file LoRA" not in message and "Fix:" in message, message
    assert all(n in message for n in names), message
    assert not (tmp_path / "adapters").exists()
