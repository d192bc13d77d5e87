"""Flow-matching noise schedule of Wan 2.x: noise levels, training pairs, timestep samplers, loss weights.

Conventions (official `wan/utils/fm_solvers_unipc.py`, diffusers `FlowMatchEulerDiscreteScheduler`):
a noise level `sigma` in [0, 1] (0 = clean, 1 = pure noise) is given to the DiT as the timestep
`t = sigma * num_train_timesteps` (1000), so `t` in [0, 1000]. The Wan MoE boundary (0.875 / 0.900)
is a threshold on this `t`.

Every function is pure; tensors broadcast over a leading batch dimension.
"""

from __future__ import annotations

import math

import torch

from .config import NUM_TRAIN_TIMESTEPS

SAMPLERS = ("uniform", "shift", "logit_normal")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Time shift of a noise level: sigma' = shift * sigma / (1 + (shift - 1) * sigma).

    shift > 1 moves mass towards high noise (Wan samples with 5 or 12); shift = 1 is the identity;
    0 and 1 are fixed points.
    """
    _check_shift(shift)
    return shift * sigma / (1 + (shift - 1) * sigma)


def unshift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Inverse of `shift_sigma`: sigma = sigma' / (shift - (shift - 1) * sigma')."""
    _check_shift(shift)
    return sigma / (shift - (shift - 1) * sigma)


def sigma_to_timestep(sigma: torch.Tensor | float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """t = sigma * num_train_timesteps (the value the DiT's timestep embedding sees)."""
    return sigma * num_train_timesteps


def timestep_to_sigma(timestep: torch.Tensor | float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """sigma = t / num_train_timesteps."""
    return timestep / num_train_timesteps


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma [B] -> [B, 1, ..., 1] matching `like`'s rank, in `like`'s dtype."""
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must have shape [B]=[{like.shape[0]}], got {tuple(sigma.shape)}")
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Noisy latents of rectified flow: x_t = (1 - sigma) * x0 + sigma * eps.

    x0, noise: [B, C, F, H, W] (any rank with batch first); sigma: [B].
    """
    s = _per_sample(sigma, x0)
    return torch.lerp(x0, noise, s)


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Training target of the DiT (velocity): d x_t / d sigma = eps - x0. Shapes as `add_noise`."""
    return noise - x0


def sample_timesteps(
    sampler: str,
    batch_size: int,
    *,
    generator: torch.Generator,
    t_range: tuple[float, float] = (0.0, float(NUM_TRAIN_TIMESTEPS)),
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """Draw training timesteps t [B] (float32, on the generator's device) restricted to [lo, hi).

    Each sampler is a distribution of sigma = t / N with CDF F; restricting it to [lo, hi) is done
    exactly by inverse-CDF sampling, so every draw is used (no rejection loop, fixed cost on GPU):
        u ~ U(F(lo / N), F(hi / N)),  sigma = F^-1(u),  t = N * sigma.
      - 'uniform':      F(s) = s.
      - 'shift':        sigma = shift_sigma(v, shift), v ~ U(0, 1)  =>  F(s) = unshift_sigma(s, shift).
      - 'logit_normal': sigma = sigmoid(n), n ~ N(mean, std)  (SD3)  =>  F(s) = Phi((logit(s) - mean) / std).
    """
    lo, hi = float(t_range[0]), float(t_range[1])
    if not 0.0 <= lo < hi <= num_train_timesteps:
        raise ValueError(f"timestep range [{lo}, {hi}) must satisfy 0 <= lo < hi <= {num_train_timesteps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    s_lo, s_hi = lo / num_train_timesteps, hi / num_train_timesteps
    device = generator.device
    u = torch.rand(batch_size, generator=generator, device=device, dtype=torch.float32)

    if sampler == "uniform":
        sigma = s_lo + (s_hi - s_lo) * u
    elif sampler == "shift":
        a, b = unshift_sigma(s_lo, shift), unshift_sigma(s_hi, shift)
        sigma = shift_sigma(a + (b - a) * u, shift)
    elif sampler == "logit_normal":
        if logit_std <= 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std}")
        c_lo, c_hi = (_logit_normal_cdf(s, logit_mean, logit_std) for s in (s_lo, s_hi))
        p = c_lo + (c_hi - c_lo) * u
        sigma = torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(p))
    else:
        raise ValueError(f"unknown timestep sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")

    t = sigma * num_train_timesteps
    # float32 rounding at the ends of the inverse CDF may land a hair outside [lo, hi): pull it back in.
    # The bound is the largest float32 below hi (a float64 one would round back up to hi).
    hi32 = torch.tensor(hi, dtype=torch.float32)
    below_hi = torch.nextafter(hi32, hi32.new_tensor(-math.inf)).item()
    return t.clamp(lo, below_hi)


def _logit_normal_cdf(s: float, mean: float, std: float) -> float:
    """P(sigmoid(n) < s) for n ~ N(mean, std) = Phi((logit(s) - mean) / std), in float64 Python maths
    so logit(0) = -inf and logit(1) = +inf are exact."""
    if s <= 0.0:
        return 0.0
    if s >= 1.0:
        return 1.0
    return 0.5 * math.erfc(-(math.log(s / (1 - s)) - mean) / (std * math.sqrt(2)))


def loss_weighting(scheme: str, sigma: torch.Tensor, min_sigma: float = 1e-3) -> torch.Tensor:
    """Per-sample loss weight w(sigma) [B] (the set of diffusers `compute_loss_weighting_for_sd3`).

      - 'none':       w = 1.
      - 'sigma_sqrt': w = sigma^-2. Unbounded at sigma -> 0, so sigma is clamped to >= `min_sigma`
                      (diffusers does not clamp; a t = 0 draw would give an infinite loss).
      - 'cosmap':     w = 2 / (pi * (1 - 2 sigma + 2 sigma^2)).
    """
    if scheme == "none":
        return torch.ones_like(sigma)
    if scheme == "sigma_sqrt":
        return sigma.clamp_min(min_sigma).pow(-2.0)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {scheme!r}; choose one of: {', '.join(WEIGHTINGS)}")


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
