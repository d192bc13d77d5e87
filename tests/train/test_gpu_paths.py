"""Trainer-level equivalence of the GPU-only memory paths (run on the device machine).

A phased run through `train/loop.py`'s Trainer, with several expert changes, on a model of the real
block structure (WanBlock: self-attention with RoPE and q/k RMSNorm, cross-attention, FFN, modulation)
at reduced width and depth:
  * expert parking (offload_inactive_expert: always) against both experts kept on the device (never):
    bitwise the same losses, adapters and AdamW state, with the shipped recipes' fast path (compiled
    blocks, saved self-attention, fp8 storage). Parking moves tensors; it must not change one bit.
  * block streaming + host-kept checkpoint inputs (the 24 GiB mode) against the plain path: the same
    losses, adapters and moments within rounding.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.train.test_loop import MemorySource, tiny_recipe
from train.checkpoints import load_checkpoint, save_checkpoint
from train.loop import Trainer
from wan_model.config import get_preset
from wan_model.cudnn_fp8_attention import CALLS
from wan_model.speed import SpeedOptions
from wan_model.transformer import WanTransformer

pytestmark = pytest.mark.gpu

STEPS, PHASE = 10, 2  # high, low, high, low, high: four expert changes


def wide_models(recipe, dim: int = 128, layers: int = 3) -> dict[str, WanTransformer]:
    cfg = dataclasses.replace(get_preset(recipe.model.preset).transformer, dim=dim, ffn_dim=2 * dim,
                              num_heads=2, num_layers=layers)
    models = {}
    for i, name in enumerate(recipe.experts):
        torch.manual_seed(100 + i)
        model = WanTransformer(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.2)  # official init zeroes it: no gradient to LoRA
        models[name] = model
    return models


def train(recipe, resume_at: int | None = None,
          dim: int = 128) -> tuple[list[float], dict[str, dict[str, torch.Tensor]], Trainer]:
    """Run the recipe's steps; returns the losses, each expert's LoRA weights and AdamW state (host copies).
    resume_at: checkpoint there, build a new trainer, resume from the checkpoint and finish with it."""
    source = MemorySource(recipe.model.preset, batch_size=recipe.training.batch_size, frames=3, size=8)
    trainer = Trainer(recipe, wide_models(recipe, dim), source)
    stop = recipe.training.steps if resume_at is None else resume_at
    losses = [trainer.train_step()["loss"] for _ in range(stop)]
    if resume_at is not None:
        path = save_checkpoint(trainer, keep_last=1)
        del trainer
        trainer = Trainer(recipe, wide_models(recipe, dim), source)
        load_checkpoint(trainer, path)
        losses += [trainer.train_step()["loss"] for _ in range(recipe.training.steps - resume_at)]
    torch.cuda.synchronize()
    final = {}
    for name, state in trainer.states.items():
        tensors = {f"lora.{k}": v for k, v in trainer.lora_weights(name).items()}
        for i, p in enumerate(state.params):
            for key, value in state.optimizer.state[p].items():
                tensors[f"adam.{i}.{key}"] = value.detach().cpu().clone()
        final[name] = tensors
    return losses, final, trainer


def recipe_with(tmp_path, name: str, speed: SpeedOptions, **training):
    recipe = tiny_recipe(tmp_path / name, steps=STEPS, routing="phased", phase_steps=PHASE, precision="bf16",
                         gradient_checkpointing=True, **training)
    return dataclasses.replace(recipe, speed=speed)


def test_parking_trains_bitwise_as_keeping_both_experts(tmp_path):
    fast = SpeedOptions(compile=True, save_attention="all", fp8_base="storage")
    kept_losses, kept, kept_trainer = train(recipe_with(tmp_path, "kept", fast, offload_inactive_expert="never"))
    assert not kept_trainer.offload
    del kept_trainer
    parked_recipe = recipe_with(tmp_path, "parked", fast, offload_inactive_expert="always")
    # Through a checkpoint taken while low_noise trains and high_noise waits on the host, and a resume.
    for resume_at in (None, 7):
        parked_losses, parked, trainer = train(parked_recipe, resume_at)
        assert trainer.offload
        expected = (["high_noise"] * 2 + ["low_noise"] * 2) * 2 + ["high_noise"] * 2
        assert [h["expert"] for h in trainer.history] == expected
        idle = trainer.states["low_noise"]  # parked at the end, moments included
        assert all(not p.is_cuda for p in idle.model.parameters())
        assert all(not v.is_cuda for s in idle.optimizer.state.values() for v in s.values())
        assert parked_losses == kept_losses, resume_at
        for name in kept:
            assert parked[name].keys() == kept[name].keys()
            changed = [k for k in kept[name] if not torch.equal(parked[name][k], kept[name][k])]
            assert not changed, f"resume at {resume_at}, {name}: {len(changed)} tensors differ, e.g. {changed[:3]}"
        del trainer
        parked_recipe = recipe_with(tmp_path, "parked-resumed", fast, offload_inactive_expert="always")


def test_parking_under_cudnn_fp8_attention_trains_bitwise_as_keeping_both_experts(tmp_path):
    """attention_backend cudnn_fp8 gives each block a scaling state that training writes: a parked expert carries
    it through host memory (train.parking copies `mutable_buffers` at every park) and, back in new device
    buffers, needs no second calibration, so parking changes no bit. Heads of 128, as cuDNN's FP8 graphs take.
    (Checkpoints keep the states too: tests/train/test_checkpoints.py resumes through them on the CPU.)"""
    pytest.importorskip("cudnn")
    from wan_model.attention import set_attention_backend

    fast = SpeedOptions(compile=True, save_attention="all", fp8_base="storage", attention_backend="cudnn_fp8")
    runs = {}
    try:
        for offload in ("never", "always"):
            losses, final, trainer = train(recipe_with(tmp_path, offload, fast, offload_inactive_expert=offload),
                                           dim=256)
            assert trainer.offload == (offload == "always")
            states = [b.self_attn.fp8_scaling for s in trainer.states.values() for b in s.model.blocks]
            assert all(float(state[CALLS]) > 0 for state in states)  # every block's attention ran
            runs[offload] = losses, final
            del trainer
    finally:
        set_attention_backend("auto")
    (kept_losses, kept), (parked_losses, parked) = runs["never"], runs["always"]
    assert parked_losses == kept_losses
    for name in kept:
        changed = [k for k in kept[name] if not torch.equal(parked[name][k], kept[name][k])]
        assert not changed, f"{name}: {len(changed)} tensors differ, e.g. {changed[:3]}"


def test_block_streaming_and_host_checkpoints_train_as_plain(tmp_path):
    plain = SpeedOptions(compile=False, save_attention="none", fp8_base="none")
    ref_losses, ref, ref_trainer = train(recipe_with(tmp_path, "plain", plain))
    del ref_trainer
    torch.cuda.empty_cache()
    streamed = dataclasses.replace(plain, offload="blocks", host_checkpoints=True)
    losses, out, trainer = train(recipe_with(tmp_path, "streamed", streamed))
    assert not trainer.offload and set(trainer.offloaders) == {"high_noise", "low_noise"}
    stashed = sum(s.model.host_checkpoints.stashed for s in trainer.states.values())
    assert stashed == STEPS * 3  # every block input of every step went through host memory
    assert all(not p.is_cuda for s in trainer.states.values()
               for p in s.model.blocks.parameters() if not p.requires_grad)  # none left behind by backward
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for name in ref:
        for key, value in ref[name].items():
            err = float((out[name][key].float() - value.float()).norm() / value.float().norm().clamp_min(1e-12))
            assert err < 1e-3, (name, key, err)
