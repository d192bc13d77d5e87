"""Self-attention on cuDNN's FP8 graphs for training (wan_model/cudnn_fp8_attention.py): on the CPU its float32
emulation against float64 attention, the delayed-scaling state, the checkpoint policy and a tiny model's step;
on the GPU cuDNN's graphs against float64 attention and a compiled, checkpointed block against bf16."""

import weakref

import pytest
import torch
import torch.nn.functional as F

from wan_model import attention as attention_mod
from wan_model import cudnn_fp8_attention as cfa
from wan_model.attention import attention, attention_backend, set_attention_backend


def qkv(batch, length, heads, head_dim, device="cpu", dtype=torch.float32, seed=0, value_offset=0.0):
    """q, k RMS-normed over the full dim (as Wan's norms do), k with a shared offset, v Gaussian (+ offset)."""
    g = torch.Generator().manual_seed(seed)

    def rms_normed():
        x = torch.randn(batch, length, heads * head_dim, generator=g)
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).unflatten(-1, (heads, head_dim))

    q, k = rms_normed(), rms_normed() + torch.randn(1, 1, heads, head_dim, generator=g)
    v = torch.randn(batch, length, heads, head_dim, generator=g) + value_offset * torch.randn(
        1, 1, heads, head_dim, generator=g)
    return tuple(t.to(device, dtype) for t in (q, k, v))


def exact_forward_backward(q, k, v, grad_out):
    """float64 autograd of SDPA's maths: (out, dq, dk, dv)."""
    leaves = [t.detach().double().transpose(1, 2).requires_grad_(True) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*leaves)
    out.backward(grad_out.double().transpose(1, 2))
    return (out.detach().transpose(1, 2), *(t.grad.transpose(1, 2) for t in leaves))


def random_model(cfg):
    """A WanTransformer with random weights everywhere (the release's init zeroes the head: no gradient)."""
    from wan_model.transformer import WanTransformer

    model = WanTransformer(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.5 / p.shape[1] ** 0.5)
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def fp8_forward_backward(q, k, v, grad_out, state, steps=1):
    for _ in range(steps):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = cfa.cudnn_fp8_attention(*leaves, state)
        out.backward(grad_out)
    return (out.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("value_offset", [0.0, 10.0])
def test_emulation_tracks_float64_attention_and_its_gradients(value_offset):
    """Per-tensor e4m3 everywhere moves the gradients by a few percent (not less: the quantisation is in play),
    the same with values sharing a component ten times their spread (smoothing takes it out: measured 7.2 /
    7.0 / 5.9% both ways); out moves 5.8%, or 0.06% of the offset output (its mean skips the rounding)."""
    q, k, v = qkv(1, 256, 2, 64, value_offset=value_offset)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)) / 16
    state = cfa.new_scaling_state()
    got = fp8_forward_backward(q, k, v, grad_out, state, steps=2)
    want = exact_forward_backward(q, k, v, grad_out)
    errors = [rel(a, b) for a, b in zip(got, want)]
    print("out, dq, dk, dv rel. err", errors)
    assert all(0.005 < e < 0.12 for e in errors[1:]), errors
    assert errors[0] < 0.12


def test_delayed_scaling_state_records_amaxes_and_counts_saturation():
    """After calibration the state holds the last amaxes (scale = 448 / (2 amax) next time): a repeat of the
    same inputs saturates nothing; inputs 8x larger in v saturate O's e4m3 once, and are counted."""
    q, k, v = qkv(1, 128, 2, 64)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)) / 16
    state = cfa.new_scaling_state()
    out, *_ = fp8_forward_backward(q, k, v, grad_out, state, steps=2)
    assert state[cfa.CALLS] == 4 and state[cfa.SATURATED] == 0
    v_smoothed = v - v.mean(1, keepdim=True)
    out_smoothed = out - v.mean(1, keepdim=True)
    assert state[cfa.AMAX_O] == pytest.approx(float(out_smoothed.abs().amax()), rel=0.08)
    assert all(state[slot] > 0 for slot in (cfa.AMAX_DP, cfa.AMAX_DQ, cfa.AMAX_DK, cfa.AMAX_DV))
    fp8_forward_backward(q, k, v * 8, grad_out, state)
    assert state[cfa.SATURATED] >= 1
    assert float(v_smoothed.abs().amax()) > 0


def test_new_state_at_a_reused_address_is_calibrated_again():
    state = cfa.new_scaling_state()
    assert cfa._needs_calibration(state, "forward")
    assert cfa._needs_calibration(state, "forward")                     # not recorded before calibration ran
    cfa._mark_calibrated(state, "forward")
    assert not cfa._needs_calibration(state, "forward")
    assert not cfa._needs_calibration(state.view(1, -1)[0], "forward")  # another tensor over the same buffer
    assert state.untyped_storage() in cfa._calibrated["forward"]
    storage = weakref.ref(state.untyped_storage())
    del state
    assert storage() is None                                            # the entry went with the state's memory
    again = cfa.new_scaling_state()                                     # often at the freed address
    assert again.untyped_storage() not in cfa._calibrated["forward"] and cfa._needs_calibration(again, "forward")


def test_states_sharing_one_allocation_calibrate_each():
    """Two states in one buffer (offsets 0 and STATE_SIZE) are two states: calibrating one leaves the other."""
    both = torch.zeros(2 * cfa.STATE_SIZE)
    first, second = both[: cfa.STATE_SIZE], both[cfa.STATE_SIZE:]
    cfa._mark_calibrated(first, "backward")
    assert not cfa._needs_calibration(first, "backward") and cfa._needs_calibration(second, "backward")


def test_a_state_moved_to_new_memory_keeps_its_calibration_and_a_zero_one_calibrates():
    """An expert parked in host memory comes back with its states in new buffers: one that holds amaxes needs no
    second calibration; one that never ran (parked before its first step) still calibrates, whatever address."""
    q, k, v = qkv(1, 64, 2, 32)
    state = cfa.new_scaling_state()
    fp8_forward_backward(q, k, v, torch.ones_like(q), state)
    moved, fresh = state.clone(), cfa.new_scaling_state().clone()
    assert not cfa._needs_calibration(moved, "forward") and not cfa._needs_calibration(moved, "backward")
    assert cfa._needs_calibration(fresh, "forward") and cfa._needs_calibration(fresh, "backward")


def test_backend_needs_the_scaling_state():
    q, k, v = qkv(1, 16, 2, 32)
    with attention_backend("cudnn_fp8"), pytest.raises(ValueError, match="attach_scaling_states"):
        attention(q, k, v, self_attention=True)


def test_checkpointing_keeps_the_fp8_forward_instead_of_recomputing_it(monkeypatch):
    """save_attention's policy saves the op's outputs: with checkpointing its forward runs once, and the scaling
    state sees one forward and one backward per step."""
    from torch.utils.checkpoint import checkpoint

    from wan_model.speed import self_attention_saver

    calls = []
    original = cfa._emulated_forward
    monkeypatch.setattr(cfa, "_emulated_forward", lambda *a: calls.append(1) or original(*a))
    q, k, v = (t.requires_grad_(True) for t in qkv(1, 64, 2, 32))
    state = cfa.new_scaling_state()
    with attention_backend("cudnn_fp8"):
        fp8_forward_backward(q, k, v, torch.ones_like(q), state)       # calibrated outside the count
        for context_fn, runs in ((self_attention_saver(1), 1), (None, 2)):
            calls.clear()
            kwargs = {"context_fn": context_fn(0)} if context_fn else {}
            out = checkpoint(lambda a, b, c: attention(a * 1.0, b, c, self_attention=True, scaling_state=state),
                             q, k, v, use_reentrant=False, **kwargs)
            out.sum().backward()
            assert len(calls) == runs


def test_checkpointing_keeps_one_byte_an_element(monkeypatch):
    """save_attention keeps the forward graph's e4m3 output, log-sum-exp and descale, not a bf16 copy: the bf16
    output is recomputed from them (12.5 GiB less over an A14B step's 40 blocks at 480p than keeping both)."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint

    from wan_model import speed

    kept = []
    policy = speed._save_self_attention

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            out = ctx.op_output
            kept.extend(out if isinstance(out, (tuple, list)) else [out])
        return decision

    monkeypatch.setattr(speed, "_save_self_attention", recording)
    b, length, heads, dim = 1, 64, 2, 32
    q, k, v = (t.requires_grad_(True) for t in qkv(b, length, heads, dim))
    state = cfa.new_scaling_state()
    with attention_backend("cudnn_fp8"):
        out = checkpoint(lambda a, b_, c: attention(a * 1.0, b_, c, self_attention=True, scaling_state=state),
                         q, k, v, use_reentrant=False, context_fn=speed.self_attention_saver(1)(0))
        out.sum().backward()
    assert [t.dtype for t in kept] == [torch.float8_e4m3fn, torch.float32, torch.float32]
    assert sum(t.numel() * t.element_size() for t in kept) == b * length * heads * dim + b * heads * length * 4 + 4
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_tiny_model_trains_through_the_backend_set_by_speed_options():
    """SpeedOptions(attention_backend="cudnn_fp8") selects the backend and gives each block one float32 scaling
    state (not in the state dict), but not with offload: blocks; a checkpointed tiny model's gradients stay
    within the emulation's error of float32."""
    from wan_model.config import PRESETS
    from wan_model.speed import SpeedOptions, apply_speed_options

    cfg = PRESETS["tiny-t2v"].transformer
    torch.manual_seed(0)
    model = random_model(cfg)
    keys = set(model.state_dict())
    latents = torch.randn(1, cfg.in_dim, 5, 16, 16)
    context = torch.randn(1, cfg.text_len, cfg.text_dim)
    t = torch.tensor([700.0])

    def grads():
        model.zero_grad()
        model(latents, t, context).float().pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.blocks.parameters()])

    model.enable_gradient_checkpointing()
    want = grads()
    with pytest.raises(ValueError, match="offload: blocks"):
        SpeedOptions(attention_backend="cudnn_fp8", offload="blocks")
    try:
        apply_speed_options(model, SpeedOptions(compile=False, save_attention="all", fp8_base="none",
                                                attention_backend="cudnn_fp8"))
        assert attention_mod._backend == "cudnn_fp8"
        assert set(model.state_dict()) == keys
        states = [b.self_attn.fp8_scaling for b in model.blocks]
        assert len(states) == cfg.num_layers and all(s.dtype == torch.float32 for s in states)
        grads()
        got = grads()
    finally:
        set_attention_backend("auto")
    assert all(s[cfa.CALLS] == 4 for s in states)   # two steps: one forward and one backward each
    err = rel(got, want)
    print("block gradients rel. err vs float32", err)
    assert 1e-3 < err < 0.15, err
    assert cfa.saturation_count(model) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1024, 2, 128), (1, 4000, 4, 128)])
def test_cudnn_graphs_track_float64_attention_and_the_emulation(shape):
    """cuDNN's FP8 forward and backward (second call: delayed scales) against float64 autograd, with a shared
    key offset and values sharing a component; the emulation on the same e4m3 inputs lands as close."""
    pytest.importorskip("cudnn")
    q, k, v = qkv(*shape, device="cuda", dtype=torch.bfloat16, value_offset=4.0)
    grad_out = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16) / 16
    state = cfa.new_scaling_state("cuda")
    got = fp8_forward_backward(q, k, v, grad_out, state, steps=2)
    want = exact_forward_backward(q, k, v, grad_out)
    errors = [rel(a, b) for a, b in zip(got, want)]
    emulated = fp8_forward_backward(*(t.cpu().float() for t in (q, k, v, grad_out)), cfa.new_scaling_state(),
                                    steps=2)
    emulated_errors = [rel(a, b.cpu()) for a, b in zip(emulated, want)]
    print("cuDNN FP8 vs float64: out, dq, dk, dv", errors, "emulation", emulated_errors)
    assert all(e < 0.12 for e in errors), errors
    assert all(e < 2 * max(f, 0.02) for e, f in zip(errors, emulated_errors)), (errors, emulated_errors)
    assert state[cfa.SATURATED] == 0 and state[cfa.CALLS] == 4


@pytest.mark.gpu
def test_compiled_checkpointed_block_trains_on_the_cudnn_fp8_backend():
    """Two blocks of width 1024 (8 heads of 128), compiled with save-attention, on the backend: LoRA gradients
    within the FP8 error of bf16's, the op run once per step per pass (the state counts calls)."""
    pytest.importorskip("cudnn")
    from wan_model.config import TransformerConfig
    from wan_model.speed import SpeedOptions, apply_speed_options

    cfg = TransformerConfig(model_type="t2v", dim=1024, ffn_dim=2048, num_heads=8, num_layers=2, in_dim=16,
                            out_dim=16, text_len=32, text_dim=64, freq_dim=64)
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 5, 32, 32, device="cuda", dtype=torch.bfloat16)
    context = torch.randn(1, 32, 64, device="cuda", dtype=torch.bfloat16)
    t = torch.tensor([700.0], device="cuda")
    results = {}
    for backend in ("auto", "cudnn_fp8"):
        torch.manual_seed(0)
        model = random_model(cfg).to("cuda", torch.bfloat16)
        model.requires_grad_(False)
        for block in model.blocks:
            block.self_attn.q.weight.requires_grad_(True)
            block.self_attn.v.weight.requires_grad_(True)
        model.enable_gradient_checkpointing()
        try:
            apply_speed_options(model, SpeedOptions(compile=True, save_attention="all", fp8_base="none"))
            set_attention_backend(backend)
            if backend == "cudnn_fp8":
                cfa.attach_scaling_states(model)
            for _ in range(2):
                model.zero_grad()
                model(latents, t, context).float().pow(2).mean().backward()
        finally:
            set_attention_backend("auto")
        results[backend] = [p.grad.float().clone() for p in model.parameters() if p.requires_grad]
        assert model._compiled_checkpoint is not None  # the checkpointed blocks compiled whole (no fallback)
        if backend == "cudnn_fp8":
            assert all(b.self_attn.fp8_scaling[cfa.CALLS] == 4 for b in model.blocks)
            assert cfa.saturation_count(model) == 0
    errors = [rel(a, b) for a, b in zip(results["cudnn_fp8"], results["auto"])]
    print("cudnn_fp8 vs bf16 SDPA, q / v weight gradients per block", errors)
    assert all(e < 0.15 for e in errors), errors


def test_graph_constants_are_made_once_per_device():
    """The graphs' constant scalars are cached (a Python float made into a CUDA tensor per call is a host-to-device
    copy that waits for the stream); tensors pass through as [1, 1, 1, 1] float32."""
    first = cfa._scalar_tensor(cfa.E4M3_MAX, "cpu")
    assert cfa._scalar_tensor(cfa.E4M3_MAX, torch.device("cpu")) is first
    assert first.shape == (1, 1, 1, 1) and first.dtype == torch.float32 and float(first) == cfa.E4M3_MAX
    passed = cfa._scalar_tensor(torch.tensor([0.5], dtype=torch.float64), "cpu")
    assert passed.shape == (1, 1, 1, 1) and passed.dtype == torch.float32 and float(passed) == 0.5


def test_backward_calibration_cut_between_its_runs_leaves_the_state_to_calibrate(monkeypatch):
    """The backward calibrates in two runs (dP's amax first, then the gradients' at dP's scale) and writes the
    state once, after both: a failure in the second (out of memory, say) must not leave half-calibrated amaxes
    that the next call would take as calibrated."""
    q, k, v = qkv(1, 64, 2, 32)
    state = cfa.new_scaling_state()
    real, runs = cfa._emulated_backward, []

    def second_run_fails(*args):
        runs.append(1)
        if len(runs) == 2:
            raise RuntimeError("out of memory")
        return real(*args)

    monkeypatch.setattr(cfa, "_emulated_backward", second_run_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        fp8_forward_backward(q, k, v, torch.ones_like(q), state)
    assert bool((state[cfa.AMAX_DP:cfa.AMAX_DV + 1] == 0).all()) and cfa._needs_calibration(state, "backward")
    monkeypatch.setattr(cfa, "_emulated_backward", real)
    fp8_forward_backward(q, k, v, torch.ones_like(q), state)
    assert bool((state[cfa.AMAX_DP:cfa.AMAX_DV + 1] > 0).all())
