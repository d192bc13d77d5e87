"""fp8 (e4m3) base linears: quantisation error bound, outputs and LoRA gradients close to the bf16 layer
(reference: the same layer in float32/bf16 torch), official state-dict keys, PEFT attaching; FP8 matmul on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model

from wan_model.fp8 import FP8Linear, dequantize_rows, quantize_linears_, quantize_rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_quantisation_error_bound():
    # Rows of very different magnitudes, and a zero row: the per-row scale must follow each.
    w = torch.randn(64, 256) * torch.logspace(-4, 2, 64)[:, None]
    w[3] = 0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = dequantize_rows(q, scale, torch.float32)
    # e4m3: half an ulp is 2^-4 relative for normal values, 2^-10 * scale in the subnormal range.
    bound = 2.0**-4 * w.abs() + 2.0**-10 * scale[:, None]
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())
    assert bool((back[3] == 0).all())
    # Each row's largest element maps to 448 exactly.
    assert torch.allclose(back.abs().amax(1)[scale != 1], w.abs().amax(1)[scale != 1], rtol=1e-6)


def test_fp8_storage_output_close_to_bf16():
    torch.manual_seed(1)
    lin = nn.Linear(256, 128).to(torch.bfloat16).requires_grad_(False)
    fp8 = FP8Linear.from_linear(lin)
    x = torch.randn(4, 37, 256, dtype=torch.bfloat16)
    err = rel(fp8(x), lin(x))
    # Random weights: about 2.5% relative error from 3 mantissa bits; bound 4e-2, and it is not exact.
    assert 5e-3 < err < 4e-2, err
    assert fp8.weight.dtype == torch.bfloat16 and fp8.weight_fp8.dtype == torch.float8_e4m3fn


def test_state_dict_keys_official_and_dtype_kept():
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8)).requires_grad_(False)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_linears_(model, ["0", "1"]) == 2
    model.to(torch.bfloat16)
    assert model[0].weight_fp8.dtype == torch.float8_e4m3fn and model[0].weight_scale.dtype == torch.float32
    sd = model.state_dict()
    assert sorted(sd) == sorted(ref)
    assert rel(sd["0.weight"], ref["0.weight"]) < 4e-2
    # Loading the official (unquantised) weights again: strict, and quantised on the way in.
    result = model.load_state_dict(ref, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with pytest.raises(RuntimeError, match="size mismatch for 1.weight"):
        model.load_state_dict({**ref, "1.weight": torch.zeros(3, 3)})


def test_requires_frozen_weights():
    with pytest.raises(ValueError, match="requires grad"):
        FP8Linear.from_linear(nn.Linear(16, 16))


def lora_model(quantize: bool, base: nn.Module) -> nn.Module:
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    model.load_state_dict(base.state_dict())
    model.requires_grad_(False)
    if quantize:
        quantize_linears_(model, ["0", "2"])
    torch.manual_seed(3)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
            if "lora_B" in name:  # nonzero B so every LoRA gradient depends on the base weights
                nn.init.normal_(p, std=0.1)
    return model


def test_peft_lora_on_fp8_gradients_close():
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    x, target = torch.randn(8, 64), torch.randn(8, 64)
    grads = {}
    for quantize in (False, True):
        model = lora_model(quantize, base)
        assert isinstance(model[0].base_layer, FP8Linear) == quantize
        nn.functional.mse_loss(model(x), target).backward()
        grads[quantize] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads[True]) == sorted(grads[False])
    for name in grads[False]:
        # fp8 base weights shift the LoRA gradients by the weights' few-percent error: bound 6e-2.
        assert rel(grads[True][name], grads[False][name]) < 6e-2, name


@pytest.mark.gpu
def test_fp8_matmul_close_to_storage_on_gpu():
    torch.manual_seed(4)
    lin = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    storage, matmul = FP8Linear.from_linear(lin, "storage"), FP8Linear.from_linear(lin, "matmul")
    x = torch.randn(3, 200, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_ref = lin(x)
    g = torch.randn_like(y_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    y = matmul(x)
    (dx,) = torch.autograd.grad(y, x, g)
    # Activations quantised per row as well: about 3.5% relative error forward; dx uses the dequantised weight.
    assert rel(y, y_ref) < 6e-2 and rel(storage(x), y_ref) < 4e-2
    assert rel(dx, dx_ref) < 4e-2
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())


def test_fp8_input_grad_close_to_dequantised_matmul():
    """dx = dy W' as one FP8 matmul with the weight's channel scales folded into dy (CPU _scaled_mm):
    within a few percent of the float32 product, also for channels of very different size."""
    from wan_model.fp8 import fp8_input_grad, quantize_rows

    torch.manual_seed(5)
    w = torch.randn(96, 64) * torch.logspace(-2, 1, 96)[:, None]  # channels of very different size
    q, scale = quantize_rows(w)
    dy = torch.randn(2, 50, 96)
    ref = dy @ dequantize_rows(q, scale, torch.float32)
    dx = fp8_input_grad(dy, q, scale)
    assert dx.shape == (2, 50, 64) and dx.dtype == dy.dtype
    assert rel(dx, ref) < 5e-2
    assert rel(fp8_input_grad(dy.bfloat16(), q, scale), ref) < 6e-2
    # Without folding the scales in (Q alone), the result would be far off: the test can tell.
    assert rel(dy @ q.float(), ref) > 0.5


def test_fp8_dgrad_mode_flows_through_autograd():
    """The autograd function's backward takes the FP8 input-gradient path when asked (CPU _scaled_mm)."""
    from wan_model.fp8 import _FP8MatmulLinear

    torch.manual_seed(6)
    lin = nn.Linear(64, 48).requires_grad_(False)
    q, scale = quantize_rows(lin.weight)
    x = torch.randn(30, 64, requires_grad=True)
    g = torch.randn(30, 48)
    grads = []
    for fp8_dgrad in (False, True):
        y = _FP8MatmulLinear.apply(x, q, scale, lin.bias, torch.float32, fp8_dgrad)
        (dx,) = torch.autograd.grad(y, x, g)
        grads.append(dx)
    assert rel(grads[1], grads[0]) < 5e-2 and not torch.equal(grads[1], grads[0])


@pytest.mark.gpu
def test_fp8_dgrad_close_to_bf16_on_gpu():
    torch.manual_seed(7)
    lin = nn.Linear(1024, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = FP8Linear.from_linear(lin, "matmul_dgrad")
    x = torch.randn(3, 200, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y_ref = lin(x)
    g = torch.randn_like(y_ref)
    (dx_ref,) = torch.autograd.grad(y_ref, x, g)
    (dx,) = torch.autograd.grad(layer(x), x, g)
    assert dx.dtype == torch.bfloat16 and rel(dx, dx_ref) < 6e-2


def test_fp8_gradient_bench_keeps_each_part(tmp_path):
    """bench/fp8_gradients.py (issue 16's FP8 table) on the tiny model: the gradient rows name each mode and
    timestep, --skip-repeat leaves out the noise floor, --loss-steps 0 writes the gradients alone, and the
    loss curves compare every mode with bf16's. On the CPU every mode dequantises, so storage's error is
    the e4m3 rounding alone: nonzero and small."""
    import json

    from bench.fp8_gradients import main

    grads = tmp_path / "gradients.json"
    main(["--preset", "tiny-t2v", "--size", "32x32", "--frames", "5", "--modes", "storage", "--timesteps", "990",
          "150", "--skip-repeat", "--loss-steps", "0", "--json", str(grads)])
    summary = json.loads(grads.read_text())
    assert [(r["mode"], r["t"], r["expert"]) for r in summary["gradients"]] == [
        ("storage", 990.0, "high_noise"), ("storage", 150.0, "low_noise")]
    assert all(0 < r["all_rel_err"] < 0.1 and r["all_cosine"] > 0.99 for r in summary["gradients"])
    assert "loss" not in summary

    curves = tmp_path / "loss.json"
    main(["--preset", "tiny-t2v", "--skip-gradients", "--modes", "storage", "--loss-steps", "6", "--loss-every",
          "2", "--loss-size", "32x32", "--loss-frames", "5", "--json", str(curves)])
    loss = json.loads(curves.read_text())["loss"]
    assert list(loss["curves"]) == ["none", "storage"] and len(loss["curves"]["none"]) == 4  # steps 0, 2, 4, 5
    assert loss["final_vs_bf16"]["none"] == 1.0 and loss["mean_abs_gap_vs_bf16"]["none"] == 0.0
    assert loss["mean_abs_gap_vs_bf16"]["storage"] > 0


def test_gelu_row_bound_is_the_row_max_of_gelu():
    """max |GELU(h)| per row from max h alone: equal where GELU(max h) >= 0.171 (a value a test with every
    row's max pushed below it would catch), floored at 0.171 elsewhere, never below the true max."""
    import torch.nn.functional as F

    from wan_model.fp8 import GELU_NEGATIVE_BOUND, gelu_row_bound

    torch.manual_seed(8)
    h = torch.randn(4, 50, 384) * torch.logspace(-1, 0.5, 50)[:, None]
    h[0, 0] = -torch.rand(384) * 6  # all negative: the floor
    h[0, 1] = torch.linspace(-0.7525 - 2, 0.2, 384)  # near GELU's minimum and a small positive max
    exact = F.gelu(h, approximate="tanh").abs().amax(-1)
    bound = gelu_row_bound(h)
    assert bound.dtype == torch.float32 and bound.shape == (4, 50)
    assert bool((bound >= exact * (1 - 1e-6)).all())
    assert float(exact.min()) < GELU_NEGATIVE_BOUND and float(bound.min()) == pytest.approx(GELU_NEGATIVE_BOUND)
    plain = exact >= GELU_NEGATIVE_BOUND
    assert int(plain.sum()) > 150 and torch.allclose(bound[plain], exact[plain], rtol=1e-6)
    # The minimum of the tanh GELU lies just above -0.171, so the floor is a bound (checked finely).
    x = torch.linspace(-8, 0, 200_001, dtype=torch.float64)
    assert float(F.gelu(x, approximate="tanh").abs().max()) < GELU_NEGATIVE_BOUND
    assert float(F.gelu(x.bfloat16(), approximate="tanh").abs().max()) < GELU_NEGATIVE_BOUND


def test_fp8_matmul_row_bound_and_fast_accum_on_cpu(monkeypatch):
    """The FP8 matmul forward (CPU _scaled_mm) with the GELU row bound as its input scale: the same output as
    the reduction over GELU(h), bit for bit compiled (Inductor keeps GELU in float32, like the bound) and
    within a bf16 rounding eager; fast accumulation accepted. And the FFN passes the bound through a PEFT
    LoRA layer to its FP8 base linear (recorded by a stand-in forward: on the CPU the FP8 modes dequantise)."""
    import torch.nn.functional as F

    from wan_model.fp8 import _FP8MatmulLinear, gelu_row_bound

    torch.manual_seed(9)
    lin = nn.Linear(192, 64).bfloat16().requires_grad_(False)
    q, scale = quantize_rows(lin.weight)
    h = torch.randn(2, 40, 192, dtype=torch.bfloat16) * 2

    def two_pass(h):
        return _FP8MatmulLinear.apply(F.gelu(h, approximate="tanh"), q, scale, lin.bias, torch.bfloat16)

    def bounded(h, fast_accum=False):
        return _FP8MatmulLinear.apply(F.gelu(h, approximate="tanh"), q, scale, lin.bias, torch.bfloat16, False,
                                      fast_accum, gelu_row_bound(h))

    reference = two_pass(h)
    assert rel(bounded(h), reference) < 4e-3
    assert torch.equal(bounded(h, fast_accum=True), bounded(h))  # the CPU has one accumulation
    with torch.no_grad():
        compiled_two_pass, compiled_bounded = torch.compile(two_pass), torch.compile(bounded)
        assert torch.equal(compiled_bounded(h), compiled_two_pass(h))

    from wan_model.config import PRESETS
    from wan_model.transformer import WanBlock

    block = WanBlock(PRESETS["tiny-t2v"].transformer).bfloat16().requires_grad_(False)
    quantize_linears_(block, ["ffn.2"], "matmul")
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["ffn.2"]), block)
    seen = {}

    def record(self, x, x_amax=None):
        seen["x_amax"] = x_amax
        return F.linear(x, self.weight, self.bias)

    x = torch.randn(1, 30, block.ffn[0].in_features, dtype=torch.bfloat16)
    h = block.ffn[0](x)
    with monkeypatch.context() as patch:
        patch.setattr(FP8Linear, "forward", record)
        patch.setattr(FP8Linear, "quantizes_input", property(lambda self: True))
        out = block._ffn(x)
    assert torch.equal(seen["x_amax"], gelu_row_bound(h))
    seen.clear()
    with torch.no_grad():
        assert rel(block._ffn(x), out) < 2e-2 and not seen  # the CPU's dequantised path: no bound asked for


@pytest.mark.gpu
def test_fp8_fast_accum_and_gelu_bound_on_gpu():
    """On the GPU: fast accumulation (the sampler's) changes the FP8 matmul far less than e4m3 does; the FFN's
    GELU row bound gives the two-pass reduction's output bit for bit compiled, and one as close to the
    unquantised FFN eager."""
    import torch.nn.functional as F

    from wan_model.config import PRESETS
    from wan_model.transformer import WanBlock

    torch.manual_seed(10)
    lin = nn.Linear(5120, 1024, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    promoted, fast = FP8Linear.from_linear(lin, "matmul"), FP8Linear.from_linear(lin, "matmul", fast_accum=True)
    x = torch.randn(4096, 5120, device="cuda", dtype=torch.bfloat16)
    y_ref, y_promoted, y_fast = lin(x), promoted(x), fast(x)
    assert rel(y_fast, y_promoted) < 1e-2 and rel(y_fast, y_ref) < 6e-2 and rel(y_promoted, y_ref) < 6e-2

    block = WanBlock(PRESETS["tiny-t2v"].transformer).to("cuda", torch.bfloat16).requires_grad_(False)
    quantize_linears_(block, ["ffn.0", "ffn.2"], "matmul")
    h_in = torch.randn(2, 300, block.ffn[0].in_features, device="cuda", dtype=torch.bfloat16)

    def two_pass(x):
        return block.ffn(x)  # nn.Sequential: the second linear reduces over GELU(h) itself

    with torch.no_grad():
        up, down = block.ffn[0], block.ffn[2]
        exact = F.linear(F.gelu(F.linear(h_in, up.weight, up.bias), approximate="tanh"), down.weight, down.bias)
        # Eager, the bound may differ from the bf16 GELU's max by half a bf16 step: another e4m3 scale, so other
        # roundings (1.1% apart in the first run), equally close to the unquantised FFN.
        bounded_err, two_pass_err = rel(block._ffn(h_in), exact), rel(two_pass(h_in), exact)
        assert bounded_err < 6e-2 and abs(bounded_err - two_pass_err) < 0.2 * two_pass_err
        assert torch.equal(torch.compile(block._ffn)(h_in), torch.compile(two_pass)(h_in))
        assert F.gelu(block.ffn[0](h_in), approximate="tanh").abs().amax(-1).min() > 0.171  # the bound is exact here
