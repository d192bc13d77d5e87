"""Speed options: the fast paths compute the plain path's loss and LoRA gradients (reference: the same
WanTransformer with plain checkpointing, bf16/float32 torch), selective checkpointing really skips the
self-attention recomputation, option validation; GPU: compile + fp8 + saved attention, block offload,
the cuDNN -> FlashAttention-2 fallback."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch.utils._python_dispatch import TorchDispatchMode

from wan_model import attention as attn_mod
from wan_model import cudnn_fp8_attention as cfa
from wan_model.config import PRESETS
from wan_model.fp8 import FP8Linear
from wan_model.speed import _ATTENTION_OPS, BLOCK_LINEARS, SpeedOptions, apply_speed_options
from wan_model.transformer import WanTransformer

PLAIN = SpeedOptions(compile=False, save_attention="none", fp8_base="none")


def lora_model(device: str, dtype: torch.dtype, dim: int = 32) -> WanTransformer:
    """tiny-t2v (2 blocks) with random weights and rank-4 LoRA on every block linear (B nonzero)."""
    cfg = dataclasses.replace(PRESETS["tiny-t2v"].transformer, dim=dim, ffn_dim=2 * dim, text_len=16)
    torch.manual_seed(0)
    model = WanTransformer(cfg)
    torch.nn.init.normal_(model.head.head.weight, std=0.02)
    model.to(device=device, dtype=dtype).requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=list(BLOCK_LINEARS)), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    model.enable_gradient_checkpointing(True)
    return model


def batch(model: WanTransformer, device: str, frames: int = 3):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, cfg.in_dim, frames, 8, 8, generator=g).to(device)
    context = torch.randn(1, 7, cfg.text_dim, generator=g).to(device)
    target = torch.randn(1, cfg.out_dim, frames, 8, 8, generator=g).to(device)
    return latents, torch.tensor([400.0], device=device), context, target


def loss_and_grads(model, data, autocast: bool = False):
    latents, t, context, target = data
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.mse_loss(model(latents, t, context).float(), target.float())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class AttentionCounter(TorchDispatchMode):
    """Counts attention kernel calls (q length == k length: self-attention)."""

    def __init__(self):
        super().__init__()
        self.self_attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _ATTENTION_OPS and args[0].shape[-2] == args[1].shape[-2]:
            self.self_attention += 1
        return func(*args, **(kwargs or {}))


def test_options_validated():
    with pytest.raises(ValueError, match="speed.fp8_base"):
        SpeedOptions(fp8_base="int8")
    with pytest.raises(ValueError, match="save_attention_every"):
        SpeedOptions(save_attention="every_k", save_attention_every=0)
    with pytest.raises(ValueError, match="attention_backend: fp8"):  # the 8-bit forward is not a training option
        SpeedOptions(attention_backend="fp8")


@pytest.mark.parametrize("mode,saved_blocks", [("all", 2), ("every_k", 1)])
def test_saved_attention_same_grads_and_skips_recompute(mode, saved_blocks):
    data = None
    results = {}
    for options in (PLAIN, dataclasses.replace(PLAIN, save_attention=mode, save_attention_every=2)):
        model = lora_model("cpu", torch.float32)
        apply_speed_options(model, options)
        data = data or batch(model, "cpu")
        latents, t, context, target = data
        loss = torch.nn.functional.mse_loss(model(latents, t, context), target)
        counter = AttentionCounter()
        with counter:
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[options.save_attention] = (float(loss.detach()), grads, counter.self_attention)
    (loss0, grads0, recomputed0), (loss1, grads1, recomputed1) = results["none"], results[mode]
    assert recomputed0 == 2  # plain checkpointing recomputes both blocks' self-attention
    assert recomputed1 == 2 - saved_blocks
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-5, name


def test_fp8_storage_option_keeps_keys_and_loss():
    ref = lora_model("cpu", torch.bfloat16)
    data = batch(ref, "cpu")
    keys = sorted(ref.state_dict())
    loss0, grads0 = loss_and_grads(ref, data)
    model = lora_model("cpu", torch.bfloat16)
    apply_speed_options(model, dataclasses.replace(PLAIN, fp8_base="storage"))
    assert isinstance(model.blocks[1].ffn[2].base_layer, FP8Linear)
    assert sorted(model.state_dict()) == keys
    loss1, grads1 = loss_and_grads(model, data)
    assert loss1 == pytest.approx(loss0, rel=2e-2)
    for name in grads0:
        # fp8 weights (3 mantissa bits) on every base linear of both blocks: bound 0.1.
        assert rel(grads1[name], grads0[name]) < 0.1, name


class OpCounter(TorchDispatchMode):
    """Counts calls of one operator."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("save,forward_runs", [("none", 4), ("all", 2)])
def test_fp8_attention_backend_trains_and_is_kept_through_checkpointing(save, forward_runs):
    """The "fp8" attention backend in training (a bench lever; SpeedOptions refuses it): on this tiny model the
    8-bit forward with the flash backward stays near the plain path's loss and LoRA gradients, and
    save_attention keeps its output (one forward per block, not two)."""
    ref = lora_model("cpu", torch.float32)
    data = batch(ref, "cpu")
    loss0, grads0 = loss_and_grads(ref, data)
    model = lora_model("cpu", torch.float32)
    try:
        apply_speed_options(model, dataclasses.replace(PLAIN, save_attention=save))
        attn_mod.set_attention_backend("fp8")
        with OpCounter(torch.ops.wanlora.fp8_attention_train.default) as counter:
            loss1, grads1 = loss_and_grads(model, data)
    finally:
        attn_mod.set_attention_backend("auto")
    assert counter.calls == forward_runs
    assert loss1 == pytest.approx(loss0, rel=1e-2) and loss1 != loss0
    for name in grads0:
        # Measured at most 0.036, loss 8e-6 apart (head_dim 16: the scores are 16-term int8 dot products)
        assert rel(grads1[name], grads0[name]) < 0.08, name


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,attention", [
    ("none", "auto"), ("storage", "auto"), ("matmul", "auto"), ("matmul_dgrad", "auto"),
    # cuDNN's FP8 attention (a SpeedOptions choice since the table at 62971b8) failed here at 7088204 (q's LoRA
    # gradients 170% off) against a reference whose cuDNN backward was wrong: the cuDNN probe run under autocast had
    # left PyTorch's cached backward graph for that shape wrong (fixed in 5b4a8b5). The 8-bit bench lever failed
    # likewise (v's 52% off at f9778ec); it stays a non-strict xfail until it has run again (issue 16).
    ("matmul_dgrad", "cudnn_fp8"),
    pytest.param("matmul_dgrad", "fp8", marks=pytest.mark.xfail(
        strict=False, raises=AssertionError, reason="8-bit lever: failed before the cuDNN probe fix (issue 16)"))])
def test_fast_path_matches_plain_on_gpu(fp8, attention):
    """compile + saved self-attention (+ fp8 weights, + the 8-bit attention forward or cuDNN's FP8 attention)
    against plain checkpointing, bf16 under autocast."""
    if attention == "cudnn_fp8":
        pytest.importorskip("cudnn")
    ref = lora_model("cuda", torch.bfloat16, dim=256)
    data = batch(ref, "cuda", frames=5)
    loss0, grads0 = loss_and_grads(ref, data, autocast=True)
    model = lora_model("cuda", torch.bfloat16, dim=256)
    try:
        backend = attention if attention != "fp8" else "auto"  # the 8-bit lever is not a SpeedOptions choice
        apply_speed_options(model, SpeedOptions(compile=True, save_attention="all", fp8_base=fp8,
                                                attention_backend=backend))
        attn_mod.set_attention_backend(attention)
        for _ in range(2):  # the second step runs the compiled code warm
            model.zero_grad(set_to_none=True)
            loss1, grads1 = loss_and_grads(model, data, autocast=True)
    finally:
        attn_mod.set_attention_backend("auto")
    tol = 2e-2 if fp8 == "none" else 0.15 if attention == "cudnn_fp8" else 0.1
    assert loss1 == pytest.approx(loss0, rel=tol / 2)
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < tol, name


@pytest.mark.gpu
def test_block_offload_same_grads_and_weights_on_host():
    """Streaming the weights must not change the arithmetic: same options without offload as reference."""
    options = SpeedOptions(compile=False, save_attention="all", fp8_base="storage")
    ref = lora_model("cuda", torch.bfloat16, dim=256)
    apply_speed_options(ref, options)
    data = batch(ref, "cuda")
    loss0, grads0 = loss_and_grads(ref, data, autocast=True)
    model = lora_model("cuda", torch.bfloat16, dim=256)
    apply_speed_options(model, dataclasses.replace(options, offload="blocks"))
    assert model.blocks[0].ffn[0].base_layer.weight_fp8.device.type == "cpu"
    loss1, grads1 = loss_and_grads(model, data, autocast=True)
    assert all(b.self_attn.q.base_layer.weight_fp8.device.type == "cpu" for b in model.blocks)  # none left
    assert model.blocks[1].self_attn.q.lora_A["default"].weight.device.type == "cuda"
    assert loss1 == pytest.approx(loss0, rel=1e-4)
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-3, name


def test_host_checkpoints_same_loss_and_grads_and_stash_block_inputs():
    """Keeping the checkpointed block inputs in host memory changes where they wait, not the arithmetic:
    each block's input goes through the copy (on the CPU too) and backward recomputes from the copy."""
    ref = lora_model("cpu", torch.float32)
    data = batch(ref, "cpu")
    loss0, grads0 = loss_and_grads(ref, data)
    model = lora_model("cpu", torch.float32)
    apply_speed_options(model, dataclasses.replace(PLAIN, host_checkpoints=True))
    loss1, grads1 = loss_and_grads(model, data)
    assert model.host_checkpoints.stashed == len(model.blocks)  # the inputs alone, not the shared tensors
    assert loss1 == loss0
    for name in grads0:
        assert torch.equal(grads1[name], grads0[name]), name


def test_host_checkpoints_with_saved_attention_same_grads_and_no_attention_recompute():
    """The memory plan's 720p choice: inputs in host memory and every block keeping its self-attention.
    Both act together: the block inputs go through the host, attention runs once per block, and the
    gradients are the plain path's."""
    ref = lora_model("cpu", torch.float32)
    data = batch(ref, "cpu")
    loss0, grads0 = loss_and_grads(ref, data)
    model = lora_model("cpu", torch.float32)
    apply_speed_options(model, dataclasses.replace(PLAIN, host_checkpoints=True, save_attention="all"))
    with AttentionCounter() as counter:
        loss1, grads1 = loss_and_grads(model, data)
    assert model.host_checkpoints.stashed == len(model.blocks)
    assert counter.self_attention == len(model.blocks)  # forward only: backward reused the saved outputs
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-5, name


def test_host_checkpoints_reach_the_compiled_checkpoint_call():
    """The plan may keep the compiled checkpoint call with host checkpoints (720p with inputs on the host, every
    block keeping attention): the compiled call's saved block input still goes through the host copy, once per
    block and step, and the gradients are the plain path's."""
    ref = lora_model("cpu", torch.float32)
    data = batch(ref, "cpu")
    loss0, grads0 = loss_and_grads(ref, data)
    model = lora_model("cpu", torch.float32)
    apply_speed_options(model, dataclasses.replace(PLAIN, compile=True, host_checkpoints=True, save_attention="all"))
    calls = []
    compiled = model._checkpoint_compiled
    model._checkpoint_compiled = lambda *args: calls.append(1) or compiled(*args)
    for _ in range(2):  # the second step runs the compiled code
        model.host_checkpoints.stashed = 0
        model.zero_grad(set_to_none=True)
        loss1, grads1 = loss_and_grads(model, data)
    assert model._compiled_checkpoint is not None  # compiled whole, no fallback
    assert len(calls) == 2 * len(model.blocks)  # every block of both steps took the compiled call
    assert model.host_checkpoints.stashed == len(model.blocks)
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    for name in grads0:
        assert rel(grads1[name], grads0[name]) < 1e-5, name


def test_host_checkpoints_release_the_block_inputs_after_forward():
    """Between forward and backward nothing may hold a stashed block input (on a GPU that memory is the
    point of the option). A pack hook that closed over the input kept all of them alive: autograd keeps
    each saved tensor's hooks until backward, which is how the 24 GiB mode once stopped fitting."""
    import weakref

    from wan_model.offload import HostCheckpointInputs

    inputs = []

    class Watching(HostCheckpointInputs):
        def keep(self, x):
            inputs.append(weakref.ref(x))
            return super().keep(x)

    model = lora_model("cpu", torch.float32)
    apply_speed_options(model, dataclasses.replace(PLAIN, host_checkpoints=True))
    model.host_checkpoints = Watching()
    latents, t, context, target = batch(model, "cpu")
    loss = torch.nn.functional.mse_loss(model(latents, t, context), target)
    assert len(inputs) == len(model.blocks)
    assert all(ref() is None for ref in inputs), "a block input outlived the forward pass"
    loss.backward()


def test_host_checkpoint_copy_is_what_backward_uses():
    """A stashed input altered while it waits on the host changes the gradients: backward really reads
    the host copy (a hook that kept the device tensor would leave them unchanged)."""
    from wan_model.offload import HostCheckpointInputs

    model = lora_model("cpu", torch.float32)
    data = batch(model, "cpu")
    _, grads0 = loss_and_grads(model, data)
    model.zero_grad(set_to_none=True)

    class Corrupting(HostCheckpointInputs):
        def keep(self, x):
            hooks = super().keep(x)
            pack = hooks.pack_hook

            def pack_and_corrupt(t):
                packed = pack(t)
                if isinstance(packed, tuple):
                    packed[1].mul_(2.0)
                return packed
            hooks.pack_hook = pack_and_corrupt
            return hooks

    model.host_checkpoints = Corrupting()
    _, grads1 = loss_and_grads(model, data)
    assert any(not torch.allclose(grads1[n], grads0[n]) for n in grads0)


def test_block_offload_placement_moves_all_but_frozen_block_weights():
    """A host-loaded model for `offload: blocks`: embeddings, head and LoRA go to the device (here the
    meta device stands in for it), the blocks' frozen weights stay on the host for the streamer."""
    from wan_model.speed import place_for_block_offload

    model = lora_model("cpu", torch.float32)
    place_for_block_offload(model, torch.device("meta"))
    for name, p in model.named_parameters():
        on_host = name.startswith("blocks.") and not p.requires_grad
        assert p.device.type == ("cpu" if on_host else "meta"), name
    assert model.blocks[0].self_attn.q.lora_A["default"].weight.is_meta
    assert model.head.head.weight.is_meta and model.patch_embedding.weight.is_meta


@pytest.mark.gpu
def test_flash_fallback_where_cudnn_fails():
    attn_mod.set_attention_backend("auto")
    q, k, v = (torch.randn(1, 300, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = attn_mod.attention(q.float(), k.float(), v.float())
    attn_mod.prepare_attention(1, 300, (300,), 4, 64, q.device)
    assert attn_mod._cudnn_works[(1, 300, 300, 4, 64)]  # cuDNN runs at this small shape
    attn_mod._cudnn_works[(1, 300, 300, 4, 64)] = False  # as if it had failed: FA2 must take over
    try:
        out = attn_mod.attention(q, k, v)
    finally:
        del attn_mod._cudnn_works[(1, 300, 300, 4, 64)]
    assert rel(out, ref) < 1e-2


def test_auto_is_resolved_by_the_memory_plan_before_it_is_applied():
    """save_attention / host_checkpoints "auto" become concrete settings from the plan (720p on 80 GiB:
    inputs to the host, every block saves); apply_speed_options refuses an unresolved "auto"."""
    from wan_model.speed import plan_speed

    a14b = PRESETS["t2v-A14B"].transformer
    auto = SpeedOptions(save_attention="auto", host_checkpoints="auto", fp8_base="matmul", memory_gib=80.0)
    resolved, plan = plan_speed(auto, a14b, 75600, 80.0, rank=32, host_available_gib=100.0)
    assert (resolved.save_attention, resolved.host_checkpoints) == ("all", True) and plan.saved_attention_blocks == 40
    resolved, plan = plan_speed(auto, a14b, 75600, 80.0, rank=32, host_available_gib=0.0)
    assert (resolved.save_attention, resolved.host_checkpoints) == ("every_k", False)
    assert len(range(0, 40, resolved.save_attention_every)) == plan.saved_attention_blocks == 14
    device_only = dataclasses.replace(auto, host_checkpoints=False)
    resolved, _ = plan_speed(device_only, a14b, 32760, 75.0, rank=32, host_available_gib=100.0)
    assert (resolved.save_attention, resolved.host_checkpoints) == ("all", False)
    fixed = SpeedOptions(save_attention="all")
    assert plan_speed(fixed, a14b, 75600, 10.0, rank=32, host_available_gib=0.0) == (fixed, None)
    model = WanTransformer(PRESETS["tiny-t2v"].transformer)
    with pytest.raises(ValueError, match="plan_speed"):
        apply_speed_options(model, auto)


def test_the_plan_decides_the_compiled_checkpoint_call_and_the_model_follows():
    """plan_speed resolves speed.compiled_checkpoint with the rest: kept at 480p on 75 GiB (every block keeps
    attention with its memory too), turned off at 720p on 80 GiB with the inputs on the device and cudnn_fp8
    attention (its memory would cost saved blocks; with bf16 attention it has none and stays), never planned where the model cannot run it (no compile, offload: blocks,
    sequence parallel) or the recipe turned it off. apply_speed_options compiles the call only when on."""
    from wan_model.speed import plan_speed

    a14b = PRESETS["t2v-A14B"].transformer
    auto = SpeedOptions(save_attention="auto", fp8_base="matmul_dgrad")
    with pytest.raises(ValueError, match="compiled_checkpoint"):
        SpeedOptions(compiled_checkpoint="yes")
    resolved, plan = plan_speed(auto, a14b, 32760, 75.0, rank=32, host_available_gib=0.0)
    assert resolved.compiled_checkpoint and plan.compiled_checkpoint and resolved.save_attention == "all"
    fp8 = dataclasses.replace(auto, attention_backend="cudnn_fp8")  # where the call has its extra transient
    resolved, plan = plan_speed(fp8, a14b, 75600, 80.0, rank=32, host_available_gib=0.0)
    assert not resolved.compiled_checkpoint and not plan.compiled_checkpoint and 0 < plan.saved_attention_blocks < 40
    resolved, plan = plan_speed(auto, a14b, 75600, 80.0, rank=32, host_available_gib=0.0)  # bf16: it costs nothing
    assert resolved.compiled_checkpoint and plan.compiled_checkpoint and 0 < plan.saved_attention_blocks < 40
    for options, shards in ((dataclasses.replace(auto, compile=False), 1),
                            (dataclasses.replace(auto, compiled_checkpoint=False), 1),
                            (dataclasses.replace(auto, offload="blocks"), 1), (auto, 2)):
        _, plan = plan_speed(options, a14b, 32760, 75.0, rank=32, host_available_gib=0.0, shards=shards)
        assert not plan.compiled_checkpoint, (options, shards)
    for call in (True, False):
        model = WanTransformer(PRESETS["tiny-t2v"].transformer)
        apply_speed_options(model, SpeedOptions(compile=True, save_attention="all", fp8_base="none",
                                                compiled_checkpoint=call))
        assert (model._compiled_checkpoint is not None) is call


def test_no_compiled_checkpoint_call_where_flash_attention_serves_self_attention(monkeypatch):
    """flash-attention's kernels are not aten ops in every release, so the save policy cannot keep their outputs
    and a "keeping" block would recompute attention inside the compiled call (ten L x f buffers on the GPU):
    with flash-attn 3 importable under "auto" neither the plan nor the model uses the call, and apply_speed_options
    warns that no block keeps its attention; cudnn_fp8's own op still runs the call."""
    from wan_model.speed import plan_speed

    monkeypatch.setattr(attn_mod, "_flash3_func", lambda q, k, v: q)  # flash-attn 3 "installed"
    a14b = PRESETS["t2v-A14B"].transformer
    auto = SpeedOptions(save_attention="auto", fp8_base="matmul_dgrad")
    _, plan = plan_speed(auto, a14b, 32760, 75.0, rank=32, host_available_gib=0.0)
    assert not plan.compiled_checkpoint
    _, plan = plan_speed(dataclasses.replace(auto, attention_backend="cudnn_fp8"), a14b, 32760, 75.0, rank=32,
                         host_available_gib=0.0)
    assert plan.compiled_checkpoint
    try:
        for backend, call in (("auto", False), ("cudnn_fp8", True)):
            model = WanTransformer(PRESETS["tiny-t2v"].transformer)
            options = SpeedOptions(compile=True, save_attention="all", fp8_base="none", attention_backend=backend)
            if call:
                apply_speed_options(model, options)
            else:  # and the user learns that no attention output is kept
                with pytest.warns(UserWarning, match="every block recomputes its attention"):
                    apply_speed_options(model, options)
            assert (model._compiled_checkpoint is not None) is call, backend
    finally:
        attn_mod.set_attention_backend("auto")


def test_the_plan_counts_cudnn_fp8_attentions_e4m3_output():
    """attention_backend cudnn_fp8 keeps an e4m3 output per saved block instead of the bf16 one: the plan's
    prediction shrinks by L x d bytes a block, and with a budget between the two only the FP8 setting saves all."""
    from wan_model.memory_plan import MARGIN, compiled_call_gib
    from wan_model.speed import plan_speed

    a14b = PRESETS["t2v-A14B"].transformer
    auto = SpeedOptions(save_attention="auto", fp8_base="matmul_dgrad")
    _, plain = plan_speed(auto, a14b, 32760, 120.0, rank=32, host_available_gib=0.0)
    _, fp8 = plan_speed(dataclasses.replace(auto, attention_backend="cudnn_fp8"), a14b, 32760, 120.0, rank=32,
                        host_available_gib=0.0)
    assert plain.saved_attention_blocks == fp8.saved_attention_blocks == 40
    # L x d bytes a block less, and the compiled call's transient more (it has one with e4m3 outputs only)
    assert plain.predicted_peak_gib - fp8.predicted_peak_gib == pytest.approx(
        40 * 32760 * a14b.dim / 2**30 - compiled_call_gib(a14b, 32760, True), rel=1e-3)
    between = (plain.predicted_peak_gib + fp8.predicted_peak_gib) / 2 / (1 - MARGIN)
    _, plain = plan_speed(auto, a14b, 32760, between, rank=32, host_available_gib=0.0)
    _, fp8 = plan_speed(dataclasses.replace(auto, attention_backend="cudnn_fp8"), a14b, 32760, between, rank=32,
                        host_available_gib=0.0)
    assert fp8.saved_attention_blocks == 40 > plain.saved_attention_blocks


def test_auto_options_validated():
    with pytest.raises(ValueError, match="host_checkpoints: auto"):
        SpeedOptions(save_attention="all", host_checkpoints="auto")
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="memory_gib"):
            SpeedOptions(memory_gib=bad)


def test_fp8_fast_accum_option_reaches_every_block_linear_and_needs_fp8_matmuls():
    """speed.fp8_fast_accum: the block linears' forward FP8 GEMMs accumulate as the sampler's; refused where
    fp8_base runs no FP8 GEMM (storage dequantises, none keeps bf16)."""
    for base in ("none", "storage"):
        with pytest.raises(ValueError, match="fp8_fast_accum"):
            SpeedOptions(fp8_base=base, fp8_fast_accum=True)
    with pytest.raises(ValueError, match="true or false"):
        SpeedOptions(fp8_base="matmul_dgrad", fp8_fast_accum="yes")
    for fast in (False, True):
        model = lora_model("cpu", torch.bfloat16)
        apply_speed_options(model, SpeedOptions(compile=False, save_attention="none", fp8_base="matmul_dgrad",
                                                fp8_fast_accum=fast))
        linears = [m for m in model.blocks.modules() if isinstance(m, FP8Linear)]
        assert len(linears) == 10 * len(model.blocks)
        assert all(m.fast_accum is fast and m.mode == "matmul_dgrad" for m in linears)


CKPT_CONFIG = dict(model_type="t2v", dim=64, ffn_dim=96, num_heads=2, num_layers=6, in_dim=16, out_dim=16,
                   text_len=16, text_dim=32, freq_dim=32)


def ckpt_model(compiled: bool, backend: str = "auto", checkpointing: bool = True):
    """A 6-block model with random non-zero weights, q / FFN weights trained, every second block keeping its
    self-attention through checkpointing; (model, trained weights)."""
    from wan_model.config import TransformerConfig

    torch.manual_seed(0)
    model = WanTransformer(TransformerConfig(**CKPT_CONFIG))
    model.init_weights()
    with torch.no_grad():  # zero-initialised projections (the head's, FFN down's) would leave no gradient
        for w in model.parameters():
            if w.dim() == 2 and not w.any():
                w.normal_(std=w.shape[1] ** -0.5)
    model.requires_grad_(False)
    trained = [w for b in model.blocks for w in (b.self_attn.q.weight, b.ffn[0].weight, b.ffn[2].weight)]
    for w in trained:
        w.requires_grad_(True)
    model.enable_gradient_checkpointing(checkpointing)
    apply_speed_options(model, SpeedOptions(compile=compiled, save_attention="every_k", save_attention_every=2,
                                            fp8_base="none", attention_backend=backend))
    return model, trained


def ckpt_step(model, trained, profiled: bool = False):
    """One loss.backward() on fixed inputs; (gradients, backward profile or None)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(1)
    latents, context, t = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 16, 32), torch.tensor([600.0])
    model.zero_grad()
    loss = model(latents, t, context).float().pow(2).mean()
    if not profiled:
        loss.backward()
        return torch.cat([w.grad.flatten() for w in trained]), None
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    return torch.cat([w.grad.flatten() for w in trained]), prof


def ffn_down_shaped_gemms(prof) -> int:
    """GEMMs in a profile whose operands have FFN down's forward shapes, [L, ffn] x [ffn, dim] (FFN up's input
    gradient has them too: compare against a run without checkpointing)."""
    tokens, ffn, dim = 3 * 4 * 4, CKPT_CONFIG["ffn_dim"], CKPT_CONFIG["dim"]
    want = [[tokens, ffn], [ffn, dim]]
    count = 0
    for e in prof.events():
        shapes = [list(s) for s in e.input_shapes]
        if (e.name == "aten::addmm" and shapes[1:3] == want) or (e.name == "aten::mm" and shapes[:2] == want):
            count += 1
    return count


@pytest.mark.parametrize("backend", ["auto", "cudnn_fp8"])
def test_compiled_checkpoint_trains_as_eager_without_recomputing_ffn_down(backend):
    """compile_blocks also compiles the checkpointed call of blocks that keep self-attention, so their recompute
    is part of the compiled backward and runs only what the backward uses: FFN down's forward GEMM (its output
    feeds only the block's output) is not run again, where the checkpoint around the compiled block replays it.
    Blocks that recompute self-attention keep that checkpoint around the compiled block (its compiled backward
    held ten L x f buffers on the GPU): with every_k 2, blocks 1, 3, 5 replay FFN down, once each. Gradients as
    eager. Blocks that share a save policy share a graph: 3 for 6 blocks (the compiled call of block 0, whose
    input needs no gradient, and of blocks 2, 4; the compiled block of the others), where a context_fn per
    block index made one for each block. With cudnn_fp8 (the CPU emulation) the keeping blocks run its
    forward graph once per step."""
    def run(compiled: bool, around: bool = False, checkpointing: bool = True):
        model, trained = ckpt_model(compiled, backend, checkpointing)
        if around:
            model._compiled_checkpoint = None  # the checkpoint around the compiled block
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        ckpt_step(model, trained)
        grads, prof = ckpt_step(model, trained, profiled=True)
        calls = [int(b.self_attn.fp8_scaling[cfa.CALLS]) for b in model.blocks] if backend == "cudnn_fp8" else None
        return grads, ffn_down_shaped_gemms(prof), torch._dynamo.utils.counters["stats"]["unique_graphs"], calls

    try:
        want, _, _, _ = run(compiled=False)
        got, gemms, graphs, calls = run(compiled=True)
        _, gemms_around, _, _ = run(compiled=True, around=True)
        _, gemms_plain, _, _ = run(compiled=True, checkpointing=False)
    finally:
        attn_mod.set_attention_backend("auto")
    assert gemms == gemms_plain + 3 < gemms_around, (gemms, gemms_plain, gemms_around)
    assert graphs == 3, graphs
    if backend == "cudnn_fp8":  # two steps: forward and backward graph each in the keeping blocks 0, 2, 4
        assert calls[0] == calls[2] == calls[4] == 4, calls
    # float32 sums in another order can move a value across an e4m3 rounding boundary: 1e-4 with cudnn_fp8
    assert rel(got, want) < (1e-5 if backend == "auto" else 1e-3), rel(got, want)


def test_compiled_checkpoint_that_cannot_compile_whole_warns_and_keeps_training():
    """A graph break in the checkpointed block (fullgraph fails before anything runs): a warning, the model
    goes back to the checkpoint around the compiled block for good, and the gradients stay eager's."""
    want, _ = ckpt_step(*ckpt_model(compiled=False))
    model, trained = ckpt_model(compiled=True)
    for block in model.blocks:
        forward = block.eager_forward

        def broken(*args, _forward=forward):
            torch._dynamo.graph_break()
            return _forward(*args)

        block.eager_forward = broken
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="compiled checkpointing failed"):
        got, _ = ckpt_step(model, trained)
    assert model._compiled_checkpoint is None
    assert rel(got, want) < 1e-5, rel(got, want)
