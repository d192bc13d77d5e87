"""Flow-matching schedule: shift identities, training pairs, range-restricted samplers, loss weights.

References: the shift formula and t = 1000 * sigma of Wan's `fm_solvers_unipc.py` / diffusers
`FlowMatchEulerDiscreteScheduler`; loss weights of diffusers `compute_loss_weighting_for_sd3`.
"""

import math

import pytest
import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from wan_model.schedule import (add_noise, flow_target, loss_weighting, sample_timesteps, shift_sigma,
                                sigma_to_timestep, timestep_to_sigma, unshift_sigma)

N_DRAWS = 20000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_shift_identities():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_sigma(s, 1.0), s)
    for shift in (0.5, 3.0, 5.0, 12.0):
        out = shift_sigma(s, shift)
        assert out[0] == 0 and out[-1] == 1  # fixed points
        assert torch.all(out[1:] > out[:-1])  # monotone
        torch.testing.assert_close(unshift_sigma(out, shift), s, atol=1e-12, rtol=0)
        # composing shifts multiplies them: shift_a(shift_b(s)) = shift_{a*b}(s)
        torch.testing.assert_close(shift_sigma(shift_sigma(s, shift), 2.0), shift_sigma(s, 2 * shift))
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigma(s, 0.0)


def test_sigma_timestep_round_trip():
    t = torch.tensor([0.0, 1.0, 437.5, 875.0, 999.0, 1000.0])
    torch.testing.assert_close(sigma_to_timestep(timestep_to_sigma(t)), t)
    assert sigma_to_timestep(0.875) == 875.0 and timestep_to_sigma(900.0) == 0.9


def test_add_noise_and_target():
    x0, eps = torch.randn(3, 4, 2, 3, 3), torch.randn(3, 4, 2, 3, 3)
    sigma = torch.tensor([0.0, 0.25, 1.0])
    xt = add_noise(x0, eps, sigma)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[1], 0.75 * x0[1] + 0.25 * eps[1])
    torch.testing.assert_close(xt[2], eps[2])
    v = flow_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    # the target is the derivative of x_t in sigma: x_t(s + d) - x_t(s) = d * v
    d = 0.125
    torch.testing.assert_close(add_noise(x0, eps, sigma.clamp(max=0.5) + d) - add_noise(x0, eps, sigma.clamp(max=0.5)),
                               d * v, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        add_noise(x0, eps, torch.tensor([0.5]))


@pytest.mark.parametrize("sampler,kwargs", [
    ("uniform", {}), ("shift", {"shift": 5.0}), ("logit_normal", {"logit_mean": 0.5, "logit_std": 1.2})])
@pytest.mark.parametrize("t_range", [(0.0, 1000.0), (875.0, 1000.0), (0.0, 875.0), (100.0, 300.0)])
def test_samplers_stay_in_range_and_follow_the_restricted_cdf(sampler, kwargs, t_range):
    t = sample_timesteps(sampler, N_DRAWS, generator=_gen(), t_range=t_range, **kwargs)
    assert t.shape == (N_DRAWS,) and t.dtype == torch.float32
    lo, hi = t_range
    assert t.min() >= lo and t.max() < hi
    # Empirical CDF at the range's quartile points vs the analytic CDF restricted to [lo, hi).
    def cdf(x):
        s = x / 1000.0
        if sampler == "uniform":
            return s
        if sampler == "shift":
            return unshift_sigma(s, kwargs["shift"])
        if s <= 0 or s >= 1:
            return float(s >= 1)
        z = (math.log(s / (1 - s)) - kwargs["logit_mean"]) / kwargs["logit_std"]
        return 0.5 * math.erfc(-z / math.sqrt(2))
    for q in (0.25, 0.5, 0.75):
        x = lo + q * (hi - lo)
        expected = (cdf(x) - cdf(lo)) / (cdf(hi) - cdf(lo))
        assert (t < x).float().mean().item() == pytest.approx(expected, abs=0.015)


def test_samplers_are_seeded_and_shift_moves_mass_up():
    a = sample_timesteps("logit_normal", 64, generator=_gen(3))
    b = sample_timesteps("logit_normal", 64, generator=_gen(3))
    assert torch.equal(a, b)
    plain = sample_timesteps("uniform", N_DRAWS, generator=_gen())
    shifted = sample_timesteps("shift", N_DRAWS, generator=_gen(), shift=5.0)
    assert shifted.mean() > plain.mean() + 150  # E[shift_5(u)] * 1000 ~ 740 vs 500


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown timestep sampler 'cosine'"):
        sample_timesteps("cosine", 4, generator=_gen())
    with pytest.raises(ValueError, match=r"0 <= lo < hi <= 1000"):
        sample_timesteps("uniform", 4, generator=_gen(), t_range=(900, 875))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_loss_weighting_matches_diffusers(scheme):
    sigma = torch.tensor([0.01, 0.2, 0.5, 0.9, 1.0])
    ours = loss_weighting(scheme, sigma)
    ref = compute_loss_weighting_for_sd3(scheme if scheme != "none" else "other", sigma)
    torch.testing.assert_close(ours, ref)


def test_sigma_sqrt_is_finite_at_zero():
    assert torch.isfinite(loss_weighting("sigma_sqrt", torch.tensor([0.0]))).all()
    with pytest.raises(ValueError, match="unknown loss weighting"):
        loss_weighting("snr", torch.tensor([0.5]))
