"""Recipe errors fail at load time (no model is built), naming the key and the fix; the shipped recipes load."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from data.typed_config import ConfigError
from train.recipe import default_range, expert_ranges, load_recipe, recipe_hash
from wan_model.config import get_preset
from wan_model.release import write_transformer_release

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, body: dict | str, name="recipe.yaml") -> Path:
    """A recipe file: `body` as YAML, or as it is written when text (to reach PyYAML's own readings)."""
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def base(**experts) -> dict:
    return {"model": {"preset": "tiny-t2v"}, "dataset": {"root": "clips"}, "experts": experts,
            "training": {"steps": 4}}


def fails(tmp_path, body, *needles, check_release=False):
    with pytest.raises(ConfigError) as err:
        load_recipe(write(tmp_path, body), check_release=check_release)
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_unknown_key_suggests_the_nearest(tmp_path):
    msg = fails(tmp_path, base(high_noise={"lora": {"rnak": 4}}), "experts.high_noise.lora.rnak", "'rank'")
    assert "recipe.yaml" in msg


def test_wrong_type_names_key_and_expected_type(tmp_path):
    body = base()
    body["training"]["steps"] = "many"
    fails(tmp_path, body, "training.steps", "whole number", "'many'")


def test_rank_zero_is_refused(tmp_path):
    fails(tmp_path, base(low_noise={"lora": {"rank": 0}}), "experts.low_noise.lora", "rank must be >= 1")


def test_lora_targets_the_dit_never_calls_are_refused(tmp_path):
    """The head and the time embedding run in float32 straight from their weights (linear_fp32): a LoRA layer
    there is never called and its B would stay zero. Refused by name, also where a short target ("0") reaches
    one of them through PEFT's suffix match."""
    for target in ("head.head", "time_embedding.0", "0", "1"):
        fails(tmp_path, base(high_noise={"lora": {"target_modules": ["ffn.2", target]}}), "experts.high_noise.lora",
              f"['{target}']", "would not train")


def test_overlapping_ranges(tmp_path):
    fails(tmp_path, base(high_noise={"timesteps": [800, 1000]}), "experts.low_noise.timesteps [0, 875)",
          "overlaps high_noise [800, 1000)")


def test_gapped_ranges(tmp_path):
    fails(tmp_path, base(high_noise={"timesteps": [900, 1000]}), "[875, 900)", "no expert")
    fails(tmp_path, base(low_noise={"timesteps": [10, 875]}), "[0, 10)")


def test_expert_names_must_fit_the_preset(tmp_path):
    fails(tmp_path, base(dense={}), "experts.dense", "high_noise, low_noise")
    body = base(high_noise={})
    body["model"]["preset"] = "tiny-ti2v"
    fails(tmp_path, body, "experts.high_noise", "'tiny-ti2v'", "dense")


def test_no_expert_training(tmp_path):
    fails(tmp_path, base(high_noise={"train": False}, low_noise={"train": False}), "no expert has train: true")


def test_missing_release_file_named(tmp_path):
    release = tmp_path / "release"
    write_transformer_release(release, "tiny-t2v", seed=0)  # transformer only: no VAE, T5, tokenizer
    body = base()
    body["model"]["release"] = str(release)
    fails(tmp_path, body, "model.release", "Wan2.1_VAE.pth", check_release=True)
    body["model"]["release"] = str(tmp_path / "nowhere")
    fails(tmp_path, body, "model.release", "does not exist", check_release=True)


def test_errors_come_before_any_model_is_built(tmp_path, monkeypatch):
    import wan_model.transformer as transformer

    def boom(*a, **k):
        raise AssertionError("a model was built while checking the recipe")

    monkeypatch.setattr(transformer.WanTransformer, "__init__", boom)
    fails(tmp_path, base(high_noise={"timesteps": [800, 1000]}), "overlaps")


def test_default_ranges_follow_the_boundary():
    assert default_range(get_preset("t2v-A14B"), "high_noise") == (875, 1000)
    assert default_range(get_preset("i2v-A14B"), "low_noise") == (0, 900)
    assert default_range(get_preset("ti2v-5B"), "dense") == (0, 1000)


def test_shipped_recipes_load_and_hash_ignores_step_count(tmp_path):
    for name in ("quickstart", "t2v_a14b_style", "i2v_a14b_style", "ti2v_5b_style"):
        recipe = load_recipe(RECIPES / f"{name}.yaml", check_release=False)
        assert expert_ranges(recipe)
    a = load_recipe(RECIPES / "quickstart.yaml", check_release=False)
    raw = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    raw["training"]["steps"] = 99
    assert recipe_hash(load_recipe(write(tmp_path, raw), check_release=False)) == recipe_hash(a)
    raw["training"]["seed"] = 5
    assert recipe_hash(load_recipe(write(tmp_path, raw), check_release=False)) != recipe_hash(a)


def test_preview_settings_go_together_and_not_under_zero3(tmp_path):
    body = base()
    body["training"]["sample_every"] = 100
    fails(tmp_path, body, "recipe.yaml: training", "sample_every and sample_prompts go together")
    body["training"]["sample_prompts"] = ["mystyle, a ball"]
    body["training"]["deepspeed"] = "zero3"
    fails(tmp_path, body, "recipe.yaml: training", "ZeRO-3 shards")


def test_speed_section_defaults_to_the_plain_path_and_is_typed(tmp_path):
    from train.recipe import PLAIN_SPEED

    assert load_recipe(write(tmp_path, base()), check_release=False).speed == PLAIN_SPEED
    body = base()
    body["speed"] = {"compile": True, "save_attention": "all", "fp8_base": "matmul"}
    speed = load_recipe(write(tmp_path, body), check_release=False).speed
    assert (speed.compile, speed.save_attention, speed.fp8_base) == (True, "all", "matmul")
    body["speed"] = {"fp8": "matmul"}
    fails(tmp_path, body, "speed.fp8 is not a known key; did you mean 'fp8_base'")
    body["speed"] = {"fp8_base": "int4"}
    fails(tmp_path, body, "speed.fp8_base: 'int4' is not allowed")
    body["speed"] = {"compile": True}
    body["training"]["deepspeed"] = "zero2"
    fails(tmp_path, body, "not combined with DeepSpeed")
    body["speed"] = {"compile": False, "fp8_base": "none", "attention_backend": "cudnn_fp8"}
    fails(tmp_path, body, "cudnn_fp8 keeps float32 scaling states")
    body["training"]["deepspeed"] = None
    for offload in ("always", "never"):  # parking carries the scaling states (train.parking's mutable buffers)
        body["training"]["offload_inactive_expert"] = offload
        assert load_recipe(write(tmp_path, body), check_release=False).speed.attention_backend == "cudnn_fp8"
    body["training"]["sequence_parallel"] = 2
    fails(tmp_path, body, "does not reach the sequence-parallel attention path")
    one_expert = base(high_noise={})  # the experts listed are the ones trained
    one_expert["speed"] = {"compile": False, "fp8_base": "none", "attention_backend": "cudnn_fp8"}
    assert load_recipe(write(tmp_path, one_expert), check_release=False).speed.attention_backend == "cudnn_fp8"


def test_validation_schedule_may_change_on_resume_but_not_the_split(tmp_path):
    """recipe_hash: validation.every / timesteps / max_items do not define what is trained; the held-out
    split does (it changes the training set); no validation section hashes as before the section existed."""
    import dataclasses

    from data.config import ValidationSettings
    from tests.train.test_loop import tiny_recipe
    from train.recipe import recipe_hash

    base = tiny_recipe(tmp_path)
    split = dataclasses.replace(base, validation=ValidationSettings(fraction=0.1, every=50))
    assert recipe_hash(dataclasses.replace(split, validation=ValidationSettings(fraction=0.1, every=10,
                                                                                timesteps=8))) == recipe_hash(split)
    assert recipe_hash(dataclasses.replace(split, validation=ValidationSettings(fraction=0.2, every=50))) \
        != recipe_hash(split)
    assert recipe_hash(split) != recipe_hash(base)


def test_recipe_hash_ignores_the_memory_cap_and_keeps_hashes_from_before_it(tmp_path):
    """speed.memory_gib belongs to the machine: a resume on another card keeps the hash, and a recipe
    written before the key existed hashes as it did then (fe63a9a2ca4cb2a7, computed at 2ea22a4)."""
    import dataclasses

    from data.config import DatasetConfig, ModelSource
    from train.recipe import Recipe, recipe_hash
    from wan_model.speed import SpeedOptions

    recipe = Recipe(model=ModelSource(preset="tiny-t2v"), dataset=DatasetConfig(root="clips"),
                    speed=SpeedOptions(compile=True, save_attention="all", fp8_base="matmul"))
    assert recipe_hash(recipe) == "fe63a9a2ca4cb2a7"
    capped = dataclasses.replace(recipe, speed=dataclasses.replace(recipe.speed, memory_gib=80.0))
    assert recipe_hash(capped) == recipe_hash(recipe)


def test_auto_memory_plan_refused_where_it_cannot_plan(tmp_path):
    """Under DeepSpeed (ZeRO partitions what the plan counts) and without gradient checkpointing (nothing
    to plan) save_attention: auto fails at load with the key and the fix."""
    import dataclasses

    from data.config import DatasetConfig, ModelSource
    from data.typed_config import ConfigError
    from train.recipe import Recipe, TrainingSettings, check_recipe
    from wan_model.speed import SpeedOptions

    auto = SpeedOptions(compile=False, save_attention="auto", fp8_base="none")
    base = Recipe(model=ModelSource(preset="tiny-t2v"), dataset=DatasetConfig(root="clips"), speed=auto)
    zero = dataclasses.replace(base, training=TrainingSettings(deepspeed="zero2"))
    with pytest.raises(ConfigError, match="save_attention: all, every_k or none"):
        check_recipe(zero, "r.yaml", check_release=False)
    plain = dataclasses.replace(base, training=TrainingSettings(gradient_checkpointing=False))
    with pytest.raises(ConfigError, match="gradient_checkpointing: true"):
        check_recipe(plain, "r.yaml", check_release=False)
    check_recipe(base, "r.yaml", check_release=False)


HEAD = "model: {preset: tiny-t2v}\ndataset: {root: clips}\n"  # the sections every text recipe below starts with


def test_exponent_numbers_without_a_dot_name_the_yaml_fix(tmp_path):
    """PyYAML (YAML 1.1) reads `1e-4` as the text '1e-4': the error names the key and a spelling it reads as a
    number, where it said only 'expected a number, found str'."""
    fails(tmp_path, HEAD + "experts: {high_noise: {optimizer: {lr: 1e-4}}}\n", "experts.high_noise.optimizer.lr",
               "'1e-4'", "write 1.0e-4")
    fails(tmp_path, HEAD + "experts: {low_noise: {optimizer: {eps: 2E-8}}}\n", "optimizer.eps", "write 2.0E-8")
    fails(tmp_path, HEAD + "training: {steps: 3e3}\n", "training.steps", "write 3000")
    fails(tmp_path, HEAD + "training: {steps: many}\n", "training.steps", "'many'")  # no hint for plain text
    # the spelling the hint gives loads
    assert load_recipe(write(tmp_path, HEAD + "experts: {high_noise: {optimizer: {lr: 1.0e-4}}}\n"),
                       check_release=False).experts["high_noise"].optimizer.lr == 1e-4


def test_yes_no_on_off_read_as_booleans_name_the_yaml_fix(tmp_path):
    """`deepspeed: no` / `off` reach the recipe as False (YAML 1.1 booleans), `deepspeed: none` as the text
    'none': the error says how to write 'no DeepSpeed' (null) and that such words need quotes."""
    for word in ("no", "off", "false"):
        fails(tmp_path, HEAD + f"training: {{deepspeed: {word}}}\n", "training.deepspeed", "null")
    fails(tmp_path, HEAD + "training: {deepspeed: none}\n", "training.deepspeed", "null")
    fails(tmp_path, HEAD + "training: {offload_inactive_expert: no}\n", "training.offload_inactive_expert",
               "boolean", "quote")
    fails(tmp_path, HEAD + "dataset: {root: clips, trigger: on}\n", "dataset.trigger", "quote")
    recipe = load_recipe(write(tmp_path, HEAD + "training: {deepspeed: null}\n"), check_release=False)
    assert recipe.training.deepspeed is None


def test_optimizer_lora_and_clipping_values_out_of_range_are_refused_at_load(tmp_path):
    """Each of these used to load: eps 0 makes Adam's first update 0/0 (LoRA A's gradient is 0 while B is 0),
    a negative weight decay or a nan lr failed in torch only after the base weights had loaded, an infinite lr
    trains nan, alpha 0 scales the adapter to nothing (it trains nothing), and a negative or nan
    max_grad_norm turned clipping off silently."""
    for optimizer, needle in (({"eps": 0.0}, "eps must be > 0"), ({"eps": -1.0e-8}, "eps must be > 0"),
                              ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
                              ({"lr": float("inf")}, "lr must be"), ({"lr": float("nan")}, "lr must be")):
        fails(tmp_path, base(high_noise={"optimizer": optimizer}), "experts.high_noise.optimizer", needle)
    for alpha in (0, -16):
        fails(tmp_path, base(low_noise={"lora": {"alpha": alpha}}), "experts.low_noise.lora", "alpha must be > 0")
    for norm in (-1.0, float("nan")):
        body = base()
        body["training"]["max_grad_norm"] = norm
        fails(tmp_path, body, "recipe.yaml: training", "max_grad_norm must be >= 0")
    body = base(high_noise={"sampler": {"kind": "shift", "shift": float("nan")}})
    fails(tmp_path, body, "experts.high_noise.sampler", "shift must be > 0")


def test_recipe_hash_is_unchanged_by_speed_keys_left_at_their_default():
    """A resume refuses a checkpoint whose recipe hash differs: a key added to the recipe must hash as before
    while it keeps its default (speed.fp8_fast_accum: false), or every earlier checkpoint would be refused.
    speed.compiled_checkpoint is not hashed. The values were taken before the keys existed."""
    import dataclasses
    from pathlib import Path

    from tests.train.test_loop import tiny_recipe
    from train.recipe import recipe_hash
    from wan_model.speed import SpeedOptions

    recipe = tiny_recipe(Path("/fixed"))
    fast_path = SpeedOptions(compile=True, save_attention="all", fp8_base="matmul_dgrad", attention_backend="cudnn_fp8")
    assert recipe_hash(recipe) == "438fc808bdf34d4a"
    assert recipe_hash(dataclasses.replace(recipe, speed=fast_path)) == "d08d8918ea582558"
    fast_accum = dataclasses.replace(fast_path, fp8_fast_accum=True)
    assert recipe_hash(dataclasses.replace(recipe, speed=fast_accum)) != "d08d8918ea582558"
    no_call = dataclasses.replace(fast_path, compiled_checkpoint=False)  # not hashed at all: resumes either way
    assert recipe_hash(dataclasses.replace(recipe, speed=no_call)) == "d08d8918ea582558"
