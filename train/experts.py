"""Experts as data, and the per-step plan: which expert a step trains and at which timesteps.

Everything here is pure and seeded by (recipe seed, step), so a resumed run re-derives the exact plan of
the steps it has not done yet without storing any sampler state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_model.schedule import sample_timesteps

from .recipe import (LoraSettings, LRScheduleSettings, OptimizerSettings, Recipe, SamplerSettings,
                     TrainingSettings, expert_ranges, expert_recipe, trains)

# Salts that keep the per-step random streams apart (routing, timesteps, noise, ti2v choice).
STREAM_ROUTE, STREAM_TIMESTEPS, STREAM_NOISE, STREAM_TI2V = 0, 1, 2, 3


@dataclass(frozen=True)
class Expert:
    """One expert: name ('high_noise' | 'low_noise' | 'dense'), train timesteps [lo, hi), how to train it."""

    name: str
    t_range: tuple[int, int]
    sampler: SamplerSettings
    loss_weighting: str
    lora: LoraSettings
    optimizer: OptimizerSettings
    lr_schedule: LRScheduleSettings
    trains: bool

    @property
    def width(self) -> int:
        return self.t_range[1] - self.t_range[0]


def experts_from_recipe(recipe: Recipe) -> list[Expert]:
    """Every expert of the preset, highest noise first; frozen ones too (they are routed to at sampling)."""
    out = []
    for name, t_range in expert_ranges(recipe).items():
        r = expert_recipe(recipe, name)
        out.append(Expert(name=name, t_range=tuple(t_range), sampler=r.sampler, loss_weighting=r.loss_weighting,
                          lora=r.lora, optimizer=r.optimizer, lr_schedule=r.lr_schedule,
                          trains=trains(recipe, name)))
    return out


def route(timestep: float, experts: list[Expert]) -> Expert:
    """The expert whose [lo, hi) holds `timestep`. With the default ranges this is the official rule of
    wan/text2video.py: t >= boundary * 1000 -> high noise, else low noise."""
    for expert in experts:
        lo, hi = expert.t_range
        if lo <= timestep < hi:
            return expert
    # t = 1000 (pure noise) belongs to the expert whose range ends there.
    if timestep == max(e.t_range[1] for e in experts):
        return max(experts, key=lambda e: e.t_range[1])
    raise ValueError(f"timestep {timestep} is in no expert's range ({[(e.name, e.t_range) for e in experts]})")


def step_generator(seed: int, step: int, stream: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one (step, stream): independent of every other step, so resume needs no state."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 8 + stream)


def expert_for_step(step: int, experts: list[Expert], settings: TrainingSettings) -> Expert:
    """The expert trained at `step` (0-based), among the training experts only.

    'random': drawn with probability proportional to range width (875 vs 125 for t2v), so with uniform
    samplers each timestep in [0, 1000) is trained equally often, as one dense model would be (a shift or
    logit-normal sampler reshapes the density inside its expert's range only). 'phased': blocks of `phase_steps`
    steps on one expert, then the next (highest noise first), so the idle expert can wait in host memory.
    """
    active = [e for e in experts if e.trains]
    if not active:
        raise ValueError("no expert trains; set train: true on at least one")
    if settings.routing == "phased":
        return active[(step // settings.phase_steps) % len(active)]
    widths = torch.tensor([float(e.width) for e in active])
    u = torch.rand((), generator=step_generator(settings.seed, step, STREAM_ROUTE)).item()
    edges = (widths.cumsum(0) / widths.sum()).tolist()
    return active[next(i for i, edge in enumerate(edges) if u < edge or i == len(edges) - 1)]


def step_timesteps(step: int, expert: Expert, batch_size: int, seed: int) -> torch.Tensor:
    """Training timesteps [B] float32 for `step`, inside the expert's [lo, hi), from its sampler."""
    s = expert.sampler
    return sample_timesteps(s.kind, batch_size, generator=step_generator(seed, step, STREAM_TIMESTEPS),
                            t_range=expert.t_range, shift=s.shift, logit_mean=s.logit_mean,
                            logit_std=s.logit_std)


def planned_updates(experts: list[Expert], settings: TrainingSettings, steps: int) -> dict[str, int]:
    """How many of `steps` steps each expert trains (the LR schedules of linear/cosine decay span these)."""
    counts = {e.name: 0 for e in experts}
    for step in range(steps):
        counts[expert_for_step(step, experts, settings).name] += 1
    return counts
