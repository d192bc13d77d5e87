"""Sampling solvers for flow-matching Wan models: Euler, the flow UniPC multistep solver (bh2, order 2) and
flow DPM-Solver++ (2M), the official generators' two options ('unipc', their default, and 'dpm++').

The grid is the official pipeline's (`wan/text2video.py` builds
`FlowUniPCMultistepScheduler(num_train_timesteps=1000, shift=1, use_dynamic_shifting=False)` and calls
`set_timesteps(sampling_steps, shift=shift)`; `wan/utils/fm_solvers_unipc.py`):
  - the scheduler's train sigmas are 1 - linspace(1, 1/N, N)[::-1], so sigma_max = 1 - 1/N = 0.999
    (kept in float32) and sigma_min = 0;
  - sigmas = shift_sigma(linspace(sigma_max, 0, steps + 1)[:-1], shift), then a final sigma of 0;
  - the DiT sees int64(sigma * N): truncated, not rounded.
diffusers' `UniPCMultistepScheduler(use_flow_sigmas=True)` starts from linspace(1, 1/N, steps + 1)
instead (a slightly different grid); given the official sigmas it reproduces the same updates.
The official 'dpm++' grid (`wan/utils/fm_solvers.py` get_sampling_sigmas, FlowDPMSolverMultistepScheduler
with shift=1) starts at sigma 1 instead: shift_sigma(linspace(1, 0, steps + 1)[:-1], shift), then 0; its
first timestep is 1000.

The solvers keep the previous step's state (UniPC is multistep) but compute every coefficient from
Python floats, so a step is a handful of element-wise tensor ops with no host-device sync; create one
per sample (or call `reset()`), and call `step` for indices 0, 1, ..., steps - 1 in order.
"""

from __future__ import annotations

import math

import torch

from .config import NUM_TRAIN_TIMESTEPS
from .schedule import shift_sigma

SOLVERS = ("unipc", "euler", "dpm++")


def flow_sigma_grid(steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                    sigma_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The official sampling grid: (sigmas [steps + 1] float32 ending in 0, timesteps [steps] float32).

    sigmas_i = shift_sigma(sigma_max * (1 - i / steps), shift) for i < steps, sigma_steps = 0, with
    sigma_max = float32(1 - 1/N) (UniPC's; 1.0 for DPM-Solver++); timesteps_i = floor(sigma_i * N) (the
    official int64 cast). Built on the CPU in float64 (as the official numpy code), rounded to float32 once.
    """
    if steps < 1:
        raise ValueError(f"sampling steps must be >= 1, got {steps}")
    if sigma_max is None:
        sigma_max = float(torch.tensor(1.0 - 1.0 / num_train_timesteps, dtype=torch.float32))
    base = torch.linspace(sigma_max, 0.0, steps + 1, dtype=torch.float64)[:-1]
    shifted = shift_sigma(base, shift)
    timesteps = torch.floor(shifted * num_train_timesteps).to(torch.float32)
    sigmas = torch.cat([shifted, shifted.new_zeros(1)]).to(torch.float32)
    return sigmas, timesteps


class _FlowSolver:
    """Shared grid and step bookkeeping. `timesteps` [steps] go to the DiT; `sigmas` [steps + 1]."""

    sigma_max: float | None = None  # the grid's first sigma before the shift; None: UniPC's 1 - 1/N

    def __init__(self, steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        self.steps = steps
        self.shift = shift
        self.sigmas, self.timesteps = flow_sigma_grid(steps, shift, num_train_timesteps, self.sigma_max)
        self._s = self.sigmas.tolist()  # Python floats: coefficients never touch the device
        self.reset()

    def reset(self) -> None:
        self._next = 0

    def _advance(self, index: int) -> None:
        if index != self._next:
            raise ValueError(f"{type(self).__name__}.step got timestep_index {index}, expected {self._next}: "
                             "steps must run 0, 1, ..., steps - 1 in order; call reset() to start again")
        if index >= self.steps:
            raise ValueError(f"timestep_index {index} is past the last step ({self.steps - 1})")
        self._next += 1


class EulerSolver(_FlowSolver):
    """First-order flow-matching Euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v(x_i, t_i)."""

    def step(self, model_output: torch.Tensor, timestep_index: int, sample: torch.Tensor) -> torch.Tensor:
        """model_output (velocity eps - x0), sample: [B, C, F, H, W] -> sample at the next sigma."""
        self._advance(timestep_index)
        dt = self._s[timestep_index + 1] - self._s[timestep_index]
        # float32 update as diffusers' FlowMatchEulerDiscreteScheduler: bf16 latents would drift.
        return (sample.float() + dt * model_output.float()).to(sample.dtype)


class UniPCSolver(_FlowSolver):
    """Flow UniPC multistep (UniPC-p with B(h) = e^h - 1 "bh2", order 2, predict x0, lower order final).

    With alpha = 1 - sigma, lambda = log(alpha / sigma), the data prediction m_i = x_i - sigma_i * v_i and
    h = lambda_{i+1} - lambda_i, the predictor (UniP) is
        x_{i+1} = sigma_{i+1}/sigma_i * x_i + alpha_{i+1} (1 - e^-h) m_i - alpha_{i+1} B(h) rho_p D_i,
        D_i = (m_{i-1} - m_i) / r,  r = (lambda_{i-1} - lambda_i) / h,  rho_p = 1/2   (order 2),
    and the corrector (UniC), run when the model output at x_{i+1} is known, redoes the same step from
    x_i with the extra term rho_c [D_i, m_{i+1} - m_i] where rho_c solves the order-p system R rho = b
    (order 1: rho_c = 1/2). The order is min(2, i + 1, steps - i): first-order warm-up and final step.
    """

    def reset(self) -> None:
        super().reset()
        self._m: list[torch.Tensor] = []  # data predictions m_{i-1}, m_i (float32)
        self._last_sample: torch.Tensor | None = None  # x_{i} before the predictor, for the corrector
        self._last_order = 0

    def _lambda(self, i: int) -> float:
        s = self._s[i]
        return math.inf if s == 0.0 else math.log(1.0 - s) - math.log(s)

    def _order(self, i: int) -> int:
        return min(2, i + 1, self.steps - i)

    def step(self, model_output: torch.Tensor, timestep_index: int, sample: torch.Tensor) -> torch.Tensor:
        """model_output (velocity eps - x0), sample: [B, C, F, H, W] -> sample at the next sigma."""
        i = timestep_index
        self._advance(i)
        x = sample.float()
        m = x - self._s[i] * model_output.float()
        if i > 0:
            x = self._correct(m, i)
        self._m = (self._m + [m])[-2:]
        self._last_sample = x
        self._last_order = self._order(i)
        return self._predict(x, i, self._last_order).to(sample.dtype)

    def _phi(self, i: int, j: int) -> tuple[float, float, float, float]:
        """Scalars of the step sigma_i -> sigma_j: (sigma_j / sigma_i, alpha_j, h, e^-h - 1)."""
        h = self._lambda(j) - self._lambda(i)
        return self._s[j] / self._s[i], 1.0 - self._s[j], h, math.expm1(-h)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP from x_i (float32) with data predictions self._m ending in m_i."""
        ratio, alpha, h, h_phi_1 = self._phi(i, i + 1)
        m0 = self._m[-1]
        # x_t_ = ratio * x - alpha * h_phi_1 * m0 (bh2: B(h) = h_phi_1)
        out = torch.add(ratio * x, m0, alpha=-alpha * h_phi_1)
        if order == 2:
            r = (self._lambda(i - 1) - self._lambda(i)) / h
            # - alpha * B_h * 0.5 * (m_{i-1} - m0) / r
            out = out - (alpha * h_phi_1 * 0.5 / r) * (self._m[-2] - m0)
        return out

    def _correct(self, m_new: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: re-take the step sigma_{i-1} -> sigma_i from the kept x_{i-1} using m_i = m_new."""
        order = self._last_order
        ratio, alpha, h, h_phi_1 = self._phi(i - 1, i)
        hh = -h
        b_h = h_phi_1
        m0 = self._m[-1]
        # b_k = k! * phi_k(hh) terms of the B(h) system (fm_solvers_unipc.multistep_uni_c_bh_update).
        h_phi_k = h_phi_1 / hh - 1.0
        b1 = h_phi_k / b_h
        out = torch.add(ratio * self._last_sample, m0, alpha=-alpha * h_phi_1)
        if order == 1:
            return out - (alpha * b_h * 0.5) * (m_new - m0)
        h_phi_k = h_phi_k / hh - 0.5
        b2 = h_phi_k * 2.0 / b_h
        r = (self._lambda(i - 2) - self._lambda(i - 1)) / h
        # R = [[1, 1], [r, 1]], b = [b1, b2]  =>  rho = ((b1 - b2) / (1 - r), b1 - rho_0)
        rho0 = (b1 - b2) / (1.0 - r)
        rho1 = b1 - rho0
        corr = (rho0 / r) * (self._m[-2] - m0) + rho1 * (m_new - m0)
        return out - (alpha * b_h) * corr


class DPMSolverPP(_FlowSolver):
    """Flow DPM-Solver++ 2M, midpoint (the official 'dpm++': wan/utils/fm_solvers.py, solver_order 2, final
    sigma 0, lower order final), on its grid from sigma 1 (module docstring).

    With alpha = 1 - sigma, lambda = log(alpha / sigma) (-inf at sigma 1, +inf at 0), the data prediction
    m_i = x_i - sigma_i * v_i and h = lambda_{i+1} - lambda_i:
        x_{i+1} = sigma_{i+1}/sigma_i * x_i - alpha_{i+1} (e^-h - 1) (m_i + (m_i - m_{i-1}) / (2 r)),
        r = (lambda_i - lambda_{i-1}) / h,
    without the m_{i-1} term at the first and the last step. Starting at sigma 1 makes r infinite at the
    second step, so its correction term is 0 (as in the official code, where 1 / inf = 0).
    """

    sigma_max = 1.0

    def reset(self) -> None:
        super().reset()
        self._previous: torch.Tensor | None = None  # m_{i-1} (float32)

    def _lambda(self, i: int) -> float:
        s = self._s[i]
        if s >= 1.0:
            return -math.inf
        return math.inf if s == 0.0 else math.log(1.0 - s) - math.log(s)

    def step(self, model_output: torch.Tensor, timestep_index: int, sample: torch.Tensor) -> torch.Tensor:
        """model_output (velocity eps - x0), sample: [B, C, F, H, W] -> sample at the next sigma."""
        i = timestep_index
        self._advance(i)
        x = sample.float()
        m = x - self._s[i] * model_output.float()
        h = self._lambda(i + 1) - self._lambda(i)
        alpha_em1 = (1.0 - self._s[i + 1]) * math.expm1(-h)  # alpha_{i+1} (e^-h - 1)
        out = torch.add((self._s[i + 1] / self._s[i]) * x, m, alpha=-alpha_em1)
        if self._previous is not None and i < self.steps - 1:
            inverse_r = h / (self._lambda(i) - self._lambda(i - 1))  # 0 when lambda_{i-1} = -inf
            if inverse_r:
                out = out - (0.5 * alpha_em1 * inverse_r) * (m - self._previous)
        self._previous = m
        return out.to(sample.dtype)


def make_solver(name: str, steps: int, shift: float,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> EulerSolver | UniPCSolver | DPMSolverPP:
    """A fresh solver on its official grid; `name` is 'unipc' (the official default), 'dpm++' or 'euler'."""
    classes = {"unipc": UniPCSolver, "euler": EulerSolver, "dpm++": DPMSolverPP}
    if name not in classes:
        raise ValueError(f"unknown sampling solver {name!r}; choose one of: {', '.join(SOLVERS)}")
    return classes[name](steps, shift, num_train_timesteps)
