"""The attention backend's cuDNN probe (wan_model/attention.py): it must not change what later
backwards compute. PyTorch caches cuDNN's backward graph per shape; a probe run under the trainer's autocast
with `out.sum().backward()` left every later backward of that shape wrong (docs/benchmarks.md, issue 16)."""

import pytest
import torch

from wan_model.attention import _cudnn_works, attention, prepare_attention


def dv_token_sum_error(length: int, heads: int) -> float:
    """Worst head's |sum_tokens dv - sum_tokens dO| / |sum_tokens dO| through `attention` (0 up to rounding for
    any correct backward: P's rows sum to one)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad_out = (torch.randn(1, length, heads, 128, device="cuda", generator=g).to(torch.bfloat16)
                         for _ in range(4))
    grad_out = grad_out / length ** 0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    attention(*leaves, self_attention=True).backward(grad_out)
    dv_sum, do_sum = leaves[2].grad.float().sum(1), grad_out.float().sum(1)
    return float(((dv_sum - do_sum).norm(dim=-1) / do_sum.norm(dim=-1)).max())


@pytest.mark.gpu
@pytest.mark.parametrize("length", [4088, 32744])
def test_cudnn_probe_under_autocast_leaves_later_backwards_right(length):
    """prepare_attention under no_grad + autocast (as the trainer's forward calls it) at a shape not seen before,
    then a bf16 backward there: the identity holds. With the old probe: 1.65 at 4,088 and 1.60 at 32,744 tokens
    (40 heads, H200, torch 2.11, cuDNN 9.19)."""
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        prepare_attention(1, length, (length,), 40, 128, torch.device("cuda"))
    assert _cudnn_works[(1, length, length, 40, 128)]
    assert dv_token_sum_error(length, 40) < 1e-3


def fake_cudnn_attention(seen: dict, dv_factor: float = 1.0):
    """A CPU stand-in for `aten._scaled_dot_product_cudnn_attention`: exact attention, recording the output
    gradient its backward receives; dv_factor != 1 makes its dv wrong."""

    class FakeCudnnAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            ctx.save_for_backward(q, k, v)
            return torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)

        @staticmethod
        def backward(ctx, grad):
            seen.update(dtype=grad.dtype, stride=grad.stride())
            leaves = [t.detach().float().requires_grad_(True) for t in ctx.saved_tensors]
            with torch.enable_grad():
                out = torch.nn.functional.scaled_dot_product_attention(*leaves)
            dq, dk, dv = torch.autograd.grad(out, leaves, grad.float())
            return dq.to(grad.dtype), dk.to(grad.dtype), (dv * dv_factor).to(grad.dtype)

    def fake(q, k, v, bias, compute_log_sumexp):
        out = FakeCudnnAttention.apply(q, k, v)
        seen["out_stride"] = out.stride()
        return (out,)

    return fake


def test_cudnn_probe_backward_is_shaped_like_training_on_any_device(monkeypatch):
    """CPU stand-in for the GPU test above: under autocast the probe hands its backward a bf16 gradient laid out
    as the output and dense (the old `out.sum().backward()` gave a broadcast gradient, strides 0, float32 before
    the cast: what PyTorch's cached cuDNN backward graph then kept for the shape), and an exact backward passes
    its identity check."""
    import wan_model.attention as attention_module

    seen = {}
    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", fake_cudnn_attention(seen))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.enable_grad():   # as prepare_attention calls it
        assert attention_module._try_cudnn(1, 16, 24, 2, 8, torch.device("cpu"))
    assert seen["dtype"] == torch.bfloat16
    assert seen["stride"] == seen["out_stride"] and 0 not in seen["stride"]


def test_cudnn_probe_refuses_a_backward_that_fails_the_identity(monkeypatch):
    """A backward whose dv is off (here doubled, as the broken cached graph's was 160% off) is refused with a
    warning naming the shape, so `attention` takes FlashAttention-2 there instead of training on it."""
    import wan_model.attention as attention_module

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", fake_cudnn_attention({}, 2.0))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    with torch.enable_grad(), pytest.warns(UserWarning, match="lengths 16 x 24, 2 heads"):
        assert not attention_module._try_cudnn(1, 16, 24, 2, 8, torch.device("cpu"))


def test_backward_check_bench_on_the_cpu(monkeypatch):
    """bench/sdpa_backward_check.py's comparison with SDPA's math kernel standing in for the GPU kernels: exact
    sides match float32 and meet the dv identity, the quantised levers do not match, nothing is overwritten."""
    from torch.nn.attention import SDPBackend

    import bench.sdpa_backward_check as check_bench

    monkeypatch.setattr(check_bench, "KERNELS", dict.fromkeys(("cudnn", "flash", "efficient"), SDPBackend.MATH))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 4, 32, generator=g) for _ in range(3))
    result = check_bench.check(q, k, v, torch.randn(1, 64, 4, 32, generator=g) / 8, 2, True)
    assert result["attention_default_changed_by_later_sides"] == [0.0, 0.0, 0.0]
    for side in ("attention_default", "cudnn", "flash", "efficient", "cudnn_first_heads_only"):
        assert result[side]["dq_rel_err_vs_float32"] < 1e-4 and result[side]["dv_token_sum_identity_worst_head"] < 1e-4
    assert 1e-3 < result["cudnn_fp8"]["dq_rel_err_vs_float32"] < 0.15
