"""Routing: the official boundary rule, per-step plans that are seeded, in range and resumable."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from data.config import DatasetConfig, ModelSource
from train.experts import expert_for_step, experts_from_recipe, planned_updates, route, step_timesteps
from train.lora import lr_factor
from train.recipe import ExpertRecipe, LRScheduleSettings, Recipe, SamplerSettings, TrainingSettings


def recipe(preset="tiny-t2v", experts=None, **training) -> Recipe:
    return Recipe(model=ModelSource(preset=preset), dataset=DatasetConfig(root="x"), experts=experts or {},
                  training=TrainingSettings(**training))


def test_route_is_the_official_boundary_rule():
    for preset, boundary in (("t2v-A14B", 875), ("i2v-A14B", 900)):
        experts = experts_from_recipe(recipe(preset))
        for t in (0.0, 1.0, boundary - 0.5, boundary, boundary + 0.5, 999.9, 1000.0):
            want = "high_noise" if t >= boundary else "low_noise"  # wan/text2video.py: t >= boundary*1000
            assert route(t, experts).name == want, (preset, t)
    assert route(500.0, experts_from_recipe(recipe("ti2v-5B"))).name == "dense"


def test_random_routing_follows_range_width_and_timesteps_stay_in_range():
    r = recipe(seed=3)
    experts = experts_from_recipe(r)
    counts = Counter()
    for step in range(400):
        e = expert_for_step(step, experts, r.training)
        counts[e.name] += 1
        t = step_timesteps(step, e, 4, seed=3)
        lo, hi = e.t_range
        assert ((t >= lo) & (t < hi)).all(), (e.name, t)
    share = counts["high_noise"] / 400
    assert 0.07 < share < 0.19  # 125 / 1000 = 0.125 expected


def test_plan_is_pure_and_seeded():
    r = recipe(seed=1)
    experts = experts_from_recipe(r)
    a = [expert_for_step(s, experts, r.training).name for s in range(50)]
    b = [expert_for_step(s, experts, r.training).name for s in reversed(range(50))][::-1]
    assert a == b  # any order, same plan: a resume re-derives it
    assert torch.equal(step_timesteps(7, experts[1], 3, 1), step_timesteps(7, experts[1], 3, 1))
    other = recipe(seed=2)
    assert a != [expert_for_step(s, experts, other.training).name for s in range(50)]


def test_phased_blocks_and_frozen_experts_never_chosen():
    r = recipe(routing="phased", phase_steps=3)
    experts = experts_from_recipe(r)
    assert [expert_for_step(s, experts, r.training).name for s in range(7)] == \
        ["high_noise"] * 3 + ["low_noise"] * 3 + ["high_noise"]
    frozen = recipe(experts={"low_noise": ExpertRecipe()})  # high_noise unlisted: frozen
    experts = experts_from_recipe(frozen)
    assert [e.trains for e in experts] == [False, True]
    assert {expert_for_step(s, experts, frozen.training).name for s in range(100)} == {"low_noise"}
    assert planned_updates(experts, frozen.training, 10) == {"high_noise": 0, "low_noise": 10}


def test_sampler_settings_reach_the_schedule():
    r = recipe(experts={"high_noise": ExpertRecipe(sampler=SamplerSettings(kind="shift", shift=12.0)),
                        "low_noise": ExpertRecipe(sampler=SamplerSettings(kind="logit_normal", logit_mean=-3.0))})
    high, low = experts_from_recipe(r)
    # shift 12 piles high-noise draws toward 1000; logit-normal(-3) piles low-noise draws toward 0.
    assert step_timesteps(0, high, 512, 0).mean() > 950  # uniform: 937.5
    assert step_timesteps(0, low, 512, 0).mean() < 150  # uniform: 437.5


@pytest.mark.parametrize("kind,at_half", [("constant", 1.0), ("linear", 0.5), ("cosine", 0.5)])
def test_lr_schedule(kind, at_half):
    s = LRScheduleSettings(kind=kind, warmup_steps=10)
    assert lr_factor(0, s, 110) == pytest.approx(0.1)
    assert lr_factor(9, s, 110) == pytest.approx(1.0)
    assert lr_factor(60, s, 110) == pytest.approx(at_half)
