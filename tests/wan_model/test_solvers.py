"""Solvers: the official sampling grid and full trajectories against diffusers.

References: the grid of Wan's `FlowUniPCMultistepScheduler.set_timesteps` (wan/utils/fm_solvers_unipc.py,
re-derived below in numpy exactly as written there); diffusers `UniPCMultistepScheduler` configured as
the diffusers Wan pipelines ship it (prediction_type='flow_prediction', use_flow_sigmas=True,
flow_shift=shift, solver_order=2, bh2, lower_order_final) and `FlowMatchEulerDiscreteScheduler`.
"""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from wan_model.solvers import EulerSolver, UniPCSolver, flow_sigma_grid, make_solver

N = 1000


def _official_grid(steps, shift):
    """fm_solvers_unipc.py: __init__(shift=1) then set_timesteps(steps, shift=shift), in numpy."""
    alphas = np.linspace(1, 1 / N, N)[::-1].copy()
    train_sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
    sigma_max, sigma_min = train_sigmas[0].item(), train_sigmas[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * N).to(torch.int64)
    return torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32)), timesteps


def _unshifted(steps):
    """The pre-shift official sigmas, to hand to diffusers' `set_timesteps(sigmas=...)`."""
    sigma_max = torch.tensor(1 - 1 / N, dtype=torch.float32).item()
    return np.linspace(sigma_max, 0.0, steps + 1)[:-1]


def _toy_velocity(x, t):
    """A smooth, state-dependent stand-in for the DiT: v = eps_hat - x0_hat with t-dependent mixing."""
    s = t / N
    return torch.tanh(x) * (1.5 - s) + 0.3 * torch.sin(3 * x) + 0.1 * s


@pytest.mark.parametrize("steps,shift", [(4, 12.0), (10, 5.0), (40, 12.0), (50, 5.0), (7, 1.0)])
def test_grid_matches_official(steps, shift):
    sigmas, timesteps = flow_sigma_grid(steps, shift)
    ref_sigmas, ref_t = _official_grid(steps, shift)
    assert sigmas.dtype == torch.float32 and timesteps.dtype == torch.float32
    assert torch.equal(sigmas, ref_sigmas)
    assert torch.equal(timesteps, ref_t.to(torch.float32))
    assert sigmas[-1] == 0 and len(timesteps) == steps


@pytest.mark.parametrize("steps,shift", [(4, 12.0), (12, 5.0), (20, 3.0)])
def test_unipc_trajectory_matches_diffusers(steps, shift):
    ref = UniPCMultistepScheduler(num_train_timesteps=N, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    ref.set_timesteps(sigmas=_unshifted(steps))
    ours = make_solver("unipc", steps, shift)
    assert isinstance(ours, UniPCSolver)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-7, rtol=0)
    assert torch.equal(ours.timesteps.long(), ref.timesteps)

    x_ref = x_ours = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for i in range(steps):
        x_ref = ref.step(_toy_velocity(x_ref, ref.timesteps[i].float()), ref.timesteps[i], x_ref).prev_sample
        x_ours = ours.step(_toy_velocity(x_ours, ours.timesteps[i]), i, x_ours)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5, msg=f"step {i}")
    # the corrector must matter: a predictor-only run lands elsewhere
    assert steps < 3 or (x_ours - _predictor_only(steps, shift)).abs().max() > 1e-3


def _predictor_only(steps, shift):
    ref = UniPCMultistepScheduler(num_train_timesteps=N, prediction_type="flow_prediction", use_flow_sigmas=True,
                                  flow_shift=shift, solver_order=2, disable_corrector=list(range(steps)))
    ref.set_timesteps(sigmas=_unshifted(steps))
    x = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    for t in ref.timesteps:
        x = ref.step(_toy_velocity(x, t.float()), t, x).prev_sample
    return x


def test_unipc_on_diffusers_own_grid():
    """Given diffusers' default flow grid, the same maths gives the same trajectory (grid-agnostic)."""
    steps, shift = 8, 5.0
    ref = UniPCMultistepScheduler(num_train_timesteps=N, prediction_type="flow_prediction",
                                  use_flow_sigmas=True, flow_shift=shift, solver_order=2)
    ref.set_timesteps(steps)
    ours = UniPCSolver(steps, shift)
    ours.sigmas = ref.sigmas.clone()
    ours._s = ours.sigmas.tolist()
    x_ref = x_ours = torch.randn(1, 2, 2, 3, 3)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(_toy_velocity(x_ref, t.float()), t, x_ref).prev_sample
        x_ours = ours.step(_toy_velocity(x_ours, t.float()), i, x_ours)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps,shift", [(5, 3.0), (16, 12.0)])
def test_euler_matches_diffusers(steps, shift):
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=shift)
    ref.set_timesteps(sigmas=_unshifted(steps))
    ours = make_solver("euler", steps, shift)
    assert isinstance(ours, EulerSolver)
    # diffusers' Euler shifts in float32 (we shift in float64 as the official grid): 1 ulp apart at most
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=2.4e-7, rtol=0)
    x_ref = x_ours = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    for i in range(steps):
        x_ref = ref.step(_toy_velocity(x_ref, ref.timesteps[i]), ref.timesteps[i], x_ref).prev_sample
        x_ours = ours.step(_toy_velocity(x_ours, ours.sigmas[i] * N), i, x_ours)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


def test_exact_flow_is_recovered():
    """For a straight path x_sigma = (1 - sigma) x0 + sigma eps with the exact velocity, both land on x0."""
    x0, eps = torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 2, 4, 4)
    for name in ("unipc", "euler"):
        solver = make_solver(name, 6, 5.0)
        x = torch.lerp(x0, eps, solver.sigmas[0].item())
        for i in range(6):
            x = solver.step(eps - x0, i, x)
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)


def test_bf16_sample_keeps_dtype_and_reset_restarts():
    solver = make_solver("unipc", 3, 5.0)
    x = torch.randn(1, 2, 1, 2, 2, dtype=torch.bfloat16)
    out = solver.step(torch.randn_like(x), 0, x)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected 1"):
        solver.step(torch.randn_like(x), 2, out)
    solver.reset()
    solver.step(torch.randn_like(x), 0, x)


def test_make_solver_errors():
    with pytest.raises(ValueError, match="unknown sampling solver 'dpm'"):
        make_solver("dpm", 10, 5.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        make_solver("euler", 0, 5.0)


def _official_dpm(steps, shift, x):
    """wan/utils/fm_solvers.py as the official 'dpm++' runs it: get_sampling_sigmas in numpy, then
    FlowDPMSolverMultistepScheduler(shift=1).set_timesteps(sigmas=...) and its 2M midpoint steps in float32
    torch (solver_order 2, dpmsolver++, final sigma 0: first order at the first and the last step)."""
    sigmas = np.linspace(1, 0, steps + 1)[:steps]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    timesteps = torch.from_numpy(sigmas * N).to(torch.int64)
    sig = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
    lam = torch.log(1 - sig) - torch.log(sig)
    outputs = []
    for i in range(steps):
        v = _toy_velocity(x, timesteps[i].float())
        outputs.append(x - sig[i] * v)
        alpha_t, h = 1 - sig[i + 1], lam[i + 1] - lam[i]
        if i == 0 or i == steps - 1:
            x = (sig[i + 1] / sig[i]) * x - (alpha_t * (torch.exp(-h) - 1.0)) * outputs[-1]
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            d0, d1 = outputs[-1], (1.0 / r0) * (outputs[-1] - outputs[-2])
            x = (sig[i + 1] / sig[i]) * x - (alpha_t * (torch.exp(-h) - 1.0)) * d0 \
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    return x, sig, timesteps


@pytest.mark.parametrize("steps,shift", [(4, 12.0), (12, 5.0), (40, 12.0), (50, 5.0)])
def test_dpm_solver_pp_matches_the_official_dpm(steps, shift):
    """The official grid from sigma 1 (first timestep 1000) and trajectory, 4 to 50 steps."""
    from wan_model.solvers import DPMSolverPP

    x0 = torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    ref, ref_sigmas, ref_t = _official_dpm(steps, shift, x0.clone())
    ours = make_solver("dpm++", steps, shift)
    assert isinstance(ours, DPMSolverPP) and ours.timesteps[0] == 1000
    assert torch.equal(ours.sigmas, ref_sigmas) and torch.equal(ours.timesteps, ref_t.float())
    x = x0.clone()
    for i, t in enumerate(ours.timesteps):
        x = ours.step(_toy_velocity(x, t), i, x)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    # the second-order term must matter (from the third step on): Euler on the same grid lands elsewhere
    euler = EulerSolver(steps, shift)
    euler.sigmas, euler._s = ours.sigmas, ours._s
    y = x0.clone()
    for i, t in enumerate(ours.timesteps):
        y = euler.step(_toy_velocity(y, t), i, y)
    assert steps < 4 or (x - y).abs().max() > 1e-3


def test_dpm_solver_pp_on_diffusers_own_grid():
    """diffusers' DPMSolverMultistepScheduler (flow sigmas, dpmsolver++, midpoint, order 2) on its own grid:
    the same maths gives the same trajectory."""
    from diffusers import DPMSolverMultistepScheduler

    from wan_model.solvers import DPMSolverPP

    steps, shift = 10, 5.0
    ref = DPMSolverMultistepScheduler(num_train_timesteps=N, prediction_type="flow_prediction", use_flow_sigmas=True,
                                      flow_shift=shift, solver_order=2, algorithm_type="dpmsolver++",
                                      final_sigmas_type="zero", lower_order_final=True)
    ref.set_timesteps(steps)
    ours = DPMSolverPP(steps, shift)
    ours.sigmas = ref.sigmas.clone()
    ours._s = ours.sigmas.tolist()
    x_ref = x_ours = torch.randn(1, 2, 2, 3, 3, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(_toy_velocity(x_ref, t.float()), t, x_ref).prev_sample
        x_ours = ours.step(_toy_velocity(x_ours, t.float()), i, x_ours)
    torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)
