"""Per-expert LoRA training on the tiny presets: both adapters train, the loss falls on an overfit set,
the expert not routed to stays bitwise unchanged, non-finite steps are skipped and stop the run."""

from __future__ import annotations

import math
import pytest
import torch

from data.config import DatasetConfig, ModelSource
from train.experts import expert_for_step
from train.batches import Batch
from train.loop import NonFiniteError, Trainer, run
from train.objective import flow_matching_loss
from wan_model.conditioning import i2v_mask, token_timesteps
from train.recipe import ExpertRecipe, LoraSettings, OptimizerSettings, Recipe, TrainingSettings
from wan_model.config import get_preset
from wan_model.transformer import WanTransformer


class MemorySource:
    """N fixed random clips, batch i = clips [i*B, (i+1)*B) mod N (deterministic, random access)."""

    def __init__(self, preset: str, n: int = 4, batch_size: int = 2, seed: int = 0, frames: int = 2, size: int = 4):
        cfg = get_preset(preset).transformer
        g = torch.Generator().manual_seed(seed)
        self.latents = torch.randn(n, cfg.out_dim, frames, size, size, generator=g)
        self.context = torch.randn(n, 8, cfg.text_dim, generator=g)
        self.lens = torch.full((n,), 8)
        self.image = torch.randn(n, 16, frames, size, size, generator=g) if cfg.model_type == "i2v" else None
        self.n, self.b = n, batch_size

    def batch(self, index: int) -> Batch:
        idx = torch.arange(index * self.b, (index + 1) * self.b) % self.n
        return Batch(self.latents[idx], self.context[idx], self.lens[idx],
                     None if self.image is None else self.image[idx], [f"clip{i}" for i in idx.tolist()])


def tiny_recipe(tmp_path, preset="tiny-t2v", steps=6, **training) -> Recipe:
    expert = ExpertRecipe(lora=LoraSettings(rank=8, alpha=8.0), optimizer=OptimizerSettings(lr=3e-2))
    names = ["dense"] if preset == "tiny-ti2v" else ["high_noise", "low_noise"]
    settings = dict(steps=steps, batch_size=2, precision="fp32", gradient_checkpointing=False, save_every=0,
                    output_dir=str(tmp_path / "run"), log_every=2)
    settings.update(training)
    return Recipe(model=ModelSource(preset=preset), dataset=DatasetConfig(root=str(tmp_path)),
                  experts={n: expert for n in names}, training=TrainingSettings(**settings))


def tiny_models(recipe: Recipe, seed: int = 0) -> dict[str, WanTransformer]:
    cfg = recipe.preset.transformer
    out = {}
    for i, name in enumerate(recipe.experts):
        torch.manual_seed(seed + i)
        model = WanTransformer(cfg)
        torch.nn.init.normal_(model.head.head.weight, std=0.2)  # official init zeroes it: no gradient to LoRA
        out[name] = model
    return out


def make_trainer(recipe, source=None, **kw) -> Trainer:
    source = source or MemorySource(recipe.model.preset, batch_size=recipe.training.batch_size)
    return Trainer(recipe, tiny_models(recipe), source, **kw)


def snapshot(trainer, name):
    return {k: v.clone() for k, v in trainer.lora_weights(name).items()}


def test_both_adapters_train_and_differ_and_idle_expert_is_bitwise_unchanged(tmp_path):
    trainer = make_trainer(tiny_recipe(tmp_path, steps=8, routing="phased", phase_steps=2))
    before = {n: snapshot(trainer, n) for n in trainer.states}
    seen = set()
    for _ in range(8):
        other = {n: snapshot(trainer, n) for n in trainer.states}
        opt_before = {n: {k: {kk: vv.clone() for kk, vv in v.items()} for k, v in s.optimizer.state.items()}
                      for n, s in trainer.states.items()}
        record = trainer.train_step()
        seen.add(record["expert"])
        idle = [n for n in trainer.states if n != record["expert"]][0]
        after = trainer.lora_weights(idle)
        assert all(torch.equal(after[k], other[idle][k]) for k in after), f"step {record['step']}: {idle} changed"
        assert {k: {kk: vv for kk, vv in v.items()} for k, v in trainer.states[idle].optimizer.state.items()}.keys() \
            == opt_before[idle].keys()
        for k, v in trainer.states[idle].optimizer.state.items():
            assert all(torch.equal(v[kk], opt_before[idle][k][kk]) for kk in v)
    assert seen == {"high_noise", "low_noise"}
    a, b = trainer.lora_weights("high_noise"), trainer.lora_weights("low_noise")
    for name in trainer.states:
        after = trainer.lora_weights(name)
        assert any(not torch.equal(after[k], before[name][k]) for k in after), f"{name} did not train"
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_timesteps_stay_in_the_routed_experts_range(tmp_path):
    trainer = make_trainer(tiny_recipe(tmp_path, steps=6))
    ranges = {e.name: e.t_range for e in trainer.experts}
    for _ in range(6):
        record = trainer.train_step()
        lo, hi = ranges[record["expert"]]
        assert all(lo <= t < hi for t in record["timesteps"]), (record["expert"], record["timesteps"])


def test_loss_goes_down_on_a_tiny_overfit_set(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=30, routing="phased", phase_steps=15)
    trainer = make_trainer(recipe, MemorySource("tiny-t2v", n=2, batch_size=2))
    history = run(trainer, log=False)
    for name in ("high_noise", "low_noise"):
        losses = [h["loss"] for h in history if h["expert"] == name]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        assert last < 0.85 * first, (name, losses)


def test_loop_writes_logs_and_a_final_checkpoint(tmp_path):
    trainer = make_trainer(tiny_recipe(tmp_path, steps=4))
    run(trainer)
    out = tmp_path / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    assert list((out / "logs").iterdir()), "no TensorBoard events"
    assert (out / "checkpoints" / "step-00000004" / "high_noise" / "adapter.safetensors").is_file()


def test_i2v_input_is_noisy_mask_image_and_mask_marks_frame_zero(tmp_path):
    recipe = tiny_recipe(tmp_path, preset="tiny-i2v", steps=2)
    trainer = make_trainer(recipe)
    mask = i2v_mask(torch.zeros(1, 16, 3, 2, 2))
    assert mask.shape == (1, 4, 3, 2, 2) and mask[:, :, 0].eq(1).all() and mask[:, :, 1:].eq(0).all()
    seen = []
    hooks = [s.model.patch_embedding.register_forward_hook(lambda m, i, o: seen.append(i[0]) and None)
             for s in trainer.states.values()]
    record = trainer.train_step()
    for hook in hooks:
        hook.remove()
    x = seen[0]
    assert x.shape[1] == 36 and math.isfinite(record["loss"])
    assert torch.equal(x[:, 16:20], i2v_mask(x[:, :16]))
    assert torch.equal(x[:, 20:].cpu(), trainer.source.batch(0).image_cond)


def test_ti2v_clean_first_frame_gets_timestep_zero_and_no_loss(tmp_path):
    t = torch.tensor([500.0, 700.0])
    tok = token_timesteps(t, torch.tensor([True, False]), (2, 2, 2))
    assert tok[0, :4].eq(0).all() and tok[0, 4:].eq(500).all() and tok[1].eq(700).all()
    # A model that is exact on frames 1.. and wrong on frame 0: the clean-first loss is 0.
    src = MemorySource("tiny-ti2v", n=1, batch_size=1)
    batch = src.batch(0)
    noise = torch.randn_like(batch.latents)
    target = noise - batch.latents

    class Oracle(torch.nn.Module):
        """Exact on frames 1.., wrong by 5 on frame 0; checks what the DiT is given."""

        config = get_preset("tiny-ti2v").transformer

        def forward(self, x, timestep, context, lens):
            # 2 latent frames of 4x4 -> 2x2x2 tokens of 1x2x2 patches; the first frame's 4 tokens get t = 0.
            assert timestep.shape == (1, 8) and timestep[0, :4].eq(0).all() and timestep[0, 4:].eq(400).all()
            assert torch.equal(x[:, :, 0], batch.latents[:, :, 0])  # the first frame is given clean
            out = target.clone()
            out[:, :, 0] += 5.0
            return out

    oracle = Oracle()
    loss, _ = flow_matching_loss(oracle, batch, torch.tensor([400.0]), noise, "ti2v", torch.tensor([True]), "none")
    assert loss.item() == 0.0


def test_ti2v_stills_train_in_text_mode(tmp_path):
    """A one-frame TI2V sample (a still, the recipes' 1-frame bucket) drawn into image mode would be given its
    only frame as the answer, and its loss was 0/0 (NaN: the step skipped, the run stopped after a few):
    it is scored in text mode, the same loss as clean_first None."""
    recipe = tiny_recipe(tmp_path, preset="tiny-ti2v", steps=2, ti2v_image_prob=1.0)
    stills = MemorySource("tiny-ti2v", batch_size=2, frames=1)
    trainer = make_trainer(recipe, stills)
    batch = stills.batch(0)
    noise, t = torch.randn_like(batch.latents), torch.tensor([300.0, 600.0])
    model = trainer.states["dense"].model
    given, _ = flow_matching_loss(model, batch, t, noise, "ti2v", torch.tensor([True, False]), "none")
    text, _ = flow_matching_loss(model, batch, t, noise, "ti2v", None, "none")
    assert math.isfinite(given.item()) and given.item() == text.item()
    record = trainer.train_step()
    assert not record["skipped"] and math.isfinite(record["loss"])


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=6, max_nonfinite_steps=2)
    source = MemorySource("tiny-t2v")
    source.latents[:] = float("nan")
    trainer = make_trainer(recipe, source)
    before = {n: snapshot(trainer, n) for n in trainer.states}
    with pytest.raises(NonFiniteError, match="clip"):
        run(trainer, log=False)
    assert trainer.step == 2 and all(h["skipped"] for h in trainer.history)
    for n in trainer.states:
        after = trainer.lora_weights(n)
        assert all(torch.equal(after[k], before[n][k]) for k in after)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_step_record_logs_the_lr_its_update_used(tmp_path):
    """Warm-up over 4 updates: the first update runs at lr / 4, and its record says so (it showed the next
    update's rate, 2 lr / 4)."""
    import dataclasses

    from train.recipe import LRScheduleSettings

    recipe = tiny_recipe(tmp_path, steps=3, routing="phased", phase_steps=3)
    expert = dataclasses.replace(recipe.experts["high_noise"], lr_schedule=LRScheduleSettings(warmup_steps=4))
    recipe = dataclasses.replace(recipe, experts={**recipe.experts, "high_noise": expert})
    trainer = make_trainer(recipe)
    lr = expert.optimizer.lr
    assert [trainer.train_step()["lr"] for _ in range(3)] == pytest.approx([lr / 4, 2 * lr / 4, 3 * lr / 4])


def test_routing_plan_matches_records(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=5)
    trainer = make_trainer(recipe)
    for step in range(5):
        assert trainer.train_step()["expert"] == expert_for_step(step, trainer.experts, recipe.training).name


def test_bf16_base_is_frozen_and_lora_and_adam_stay_fp32(tmp_path):
    trainer = make_trainer(tiny_recipe(tmp_path, steps=2, precision="bf16", routing="phased", phase_steps=1))
    model = trainer.states["high_noise"].model
    frozen = [p for n, p in model.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.states["high_noise"].params)
    record = trainer.train_step()
    assert math.isfinite(record["loss"]) and not record["skipped"]
    moments = trainer.states["high_noise"].optimizer.state.values()
    assert all(s["exp_avg"].dtype == torch.float32 for s in moments)


def test_offload_decision():
    from train.loop import should_offload

    gb = 2**30
    assert should_offload("auto", [26 * gb, 26 * gb], 78 * gb)  # two A14B experts + activations: not on an H100
    assert not should_offload("auto", [26 * gb, 26 * gb], 139 * gb)  # an H200 holds both
    assert not should_offload("auto", [3 * gb, 3 * gb], 78 * gb)
    assert should_offload("always", [1, 1], 78 * gb) and not should_offload("never", [99 * gb] * 2, gb)
    assert not should_offload("always", [1, 1], None)  # CPU run: nowhere to offload to


@pytest.mark.gpu
def test_offloaded_idle_expert_waits_on_the_host_and_swaps_in(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=6, routing="phased", phase_steps=2, offload_inactive_expert="always",
                         precision="bf16")
    trainer = make_trainer(recipe)
    assert trainer.offload
    records = [trainer.train_step() for _ in range(4)]
    assert [r["expert"] for r in records] == ["high_noise"] * 2 + ["low_noise"] * 2
    assert records[0]["swap_s"] > 0 and records[2]["swap_s"] > 0 and records[1]["swap_s"] == 0
    idle = trainer.states["high_noise"]
    assert all(p.device.type == "cpu" for p in idle.model.parameters())
    assert all(v.device.type == "cpu" for s in idle.optimizer.state.values() for v in s.values() if v.ndim)
    assert all(p.device.type == "cuda" for p in trainer.states["low_noise"].model.parameters())
    assert all(math.isfinite(r["loss"]) for r in records)
    # Parking changes where the idle expert waits, not what is trained: the same losses as without it.
    import dataclasses

    kept = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, offload_inactive_expert="never",
                                                                    output_dir=str(tmp_path / "kept")))
    reference = make_trainer(kept)
    assert not reference.offload
    records += [trainer.train_step() for _ in range(2)]  # high_noise back from the host, moments included
    losses = [reference.train_step()["loss"] for _ in range(6)]
    assert [r["loss"] for r in records] == pytest.approx(losses, rel=1e-3)


def test_speed_options_reach_the_model(tmp_path):
    """speed.save_attention installs the selective checkpoint policy; fp8 storage swaps the block linears."""
    import dataclasses

    from wan_model.fp8 import FP8Linear
    from wan_model.speed import SpeedOptions

    recipe = tiny_recipe(tmp_path, steps=2)
    recipe = dataclasses.replace(recipe, speed=SpeedOptions(compile=False, save_attention="all", fp8_base="storage"),
                                 training=dataclasses.replace(recipe.training, gradient_checkpointing=True))
    trainer = make_trainer(recipe)
    model = trainer.states["high_noise"].model
    assert model.checkpoint_context_fn is not None
    assert isinstance(model.blocks[0].self_attn.q.base_layer, FP8Linear)
    record = trainer.train_step()
    assert math.isfinite(record["loss"])


@pytest.mark.gpu
def test_block_streaming_trains_host_loaded_experts(tmp_path):
    """speed.offload: blocks with both experts loaded on the host (as train_lora.py loads them): no expert
    parking, block weights stay in host memory, LoRA on the GPU, the same losses as the plain path."""
    import dataclasses

    from wan_model.speed import SpeedOptions

    plain = SpeedOptions(compile=False, save_attention="none", fp8_base="none")
    recipe = tiny_recipe(tmp_path, steps=4, routing="phased", phase_steps=2, precision="bf16",
                         gradient_checkpointing=True)
    recipe = dataclasses.replace(recipe, speed=plain)
    plain_trainer = make_trainer(recipe)
    reference = [plain_trainer.train_step()["loss"] for _ in range(4)]
    del plain_trainer
    torch.cuda.empty_cache()
    streamed = dataclasses.replace(recipe, speed=dataclasses.replace(plain, offload="blocks", host_checkpoints=True),
                                   training=dataclasses.replace(recipe.training, output_dir=str(tmp_path / "s")))
    trainer = make_trainer(streamed)
    assert not trainer.offload and set(trainer.offloaders) == {"high_noise", "low_noise"}
    for state in trainer.states.values():  # right after building: no block weight on the device
        blocks = state.model.blocks
        assert all(p.device.type == "cpu" for p in blocks.parameters() if not p.requires_grad)
        assert all(p.is_cuda for p in blocks.parameters() if p.requires_grad) and state.model.head.head.weight.is_cuda
    records = [trainer.train_step() for _ in range(4)]
    assert all(p.device.type == "cpu" for s in trainer.states.values()
               for p in s.model.blocks.parameters() if not p.requires_grad)  # none left behind by backward
    assert [r["loss"] for r in records] == pytest.approx(reference, rel=1e-3)


def test_metrics_log_resumes_past_a_half_written_line(tmp_path):
    """A kill during a metrics.jsonl write leaves a broken last line; the resume drops it, keeps the rest."""
    import json

    from train.metrics import _open_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n" + json.dumps({"step": 1, "loss": 0.9}) + "\n"
                    + '{"step": 2, "lo')
    _open_jsonl(path, start_step=2).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]


def test_ti2v_validation_scores_both_modes(tmp_path, monkeypatch):
    """TI2V trains text-to-video and image-to-video: validation scores every other held-out item with its
    first frame given, at each expert's band-centre timesteps."""
    import train.validation as validation
    from data.config import ValidationSettings

    recipe = tiny_recipe(tmp_path, preset="tiny-ti2v", steps=2)
    trainer = make_trainer(recipe)
    source = MemorySource("tiny-ti2v", n=4, batch_size=1)
    seen = []
    real = validation.flow_matching_loss

    def recording(model, batch, t, noise, task, clean_first, weighting):
        seen.append((float(t), None if clean_first is None else bool(clean_first.item())))
        return real(model, batch, t, noise, task, clean_first, weighting)

    monkeypatch.setattr(validation, "flow_matching_loss", recording)
    result = validation.Validator([source.batch(i) for i in range(2)], ValidationSettings(fraction=0.1, timesteps=2)).run(trainer)
    assert set(result) == {"dense"} and set(result["dense"]["bands"]) == {"250", "750"}
    assert seen == [(250.0, False), (750.0, False), (250.0, True), (750.0, True)]


def test_validation_passes_name_their_problem_and_the_best_compares_like_with_like(tmp_path):
    """A pass records what it scored; a resume may change validation.timesteps or max_items, and the best
    step is then chosen among the passes over the newest problem only, not across incomparable losses."""
    from data.config import ValidationSettings
    from train.validation import Validator, best_steps

    trainer = make_trainer(tiny_recipe(tmp_path, steps=2))
    source = MemorySource("tiny-t2v", n=4, batch_size=1)
    batches = [source.batch(i) for i in range(3)]

    def problems(settings, items=3):
        return {name: r["problem"] for name, r in Validator(batches[:items], settings).run(trainer).items()}

    four = problems(ValidationSettings(fraction=0.1, timesteps=4))
    assert four == problems(ValidationSettings(fraction=0.1, timesteps=4))
    assert four["high_noise"] != four["low_noise"]  # other timesteps
    for other in (problems(ValidationSettings(fraction=0.1, timesteps=2)),
                  problems(ValidationSettings(fraction=0.1, timesteps=4), items=2),
                  problems(ValidationSettings(fraction=0.1, timesteps=4, seed=1))):
        assert all(other[name] != four[name] for name in four)

    def record(steps, loss, problem):
        return {"steps_done": steps, "experts": {"a": {"loss": loss, "problem": problem}}}

    # 8 bands scored lower losses than the 4 the resume changed to: they are not the best.
    history = [record(50, 0.5, "p8"), record(100, 0.4, "p8"), record(150, 0.9, "p4"), record(200, 0.8, "p4")]
    assert best_steps(history) == {"a": {"step": 200, "loss": 0.8}}
    old = [{"steps_done": 50, "experts": {"a": {"loss": 0.1}}}]  # a record from before passes named a problem
    assert best_steps(old + history[2:]) == {"a": {"step": 200, "loss": 0.8}}
    assert best_steps(old) == {"a": {"step": 50, "loss": 0.1}}


@pytest.mark.parametrize("save_every", [0, 3])
def test_a_new_best_validation_step_exports_its_adapters_between_saves(tmp_path, monkeypatch, save_every):
    """The best validated step always has an adapters folder, whatever save_every is: a pass that is a new
    best exports; one that is not, does not."""
    import json

    from data.config import ValidationSettings
    from train.validation import Validator

    losses = iter([1.0, 0.5, 0.7, 0.6])  # passes after steps 2, 4, 6 and 8: the best is step 4
    monkeypatch.setattr(Validator, "_score", lambda self, trainer, model, expert: {
        "loss": next(losses) if expert.name == "high_noise" else 1.0, "bands": {}, "problem": "p"})
    recipe = tiny_recipe(tmp_path, steps=8, save_every=save_every)
    trainer = make_trainer(recipe)
    run(trainer, log=False, validator=Validator([], ValidationSettings(fraction=0.1, every=2)))
    exported = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "adapters").glob("step-*"))
    # step 2: the first pass is the best so far for both experts; step 4: a new best for high_noise;
    # steps 6: neither; 8: the end. Saves add steps 3 and 6 when save_every is 3.
    assert exported == ([2, 4, 8] if save_every == 0 else [2, 3, 4, 6, 8])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_validation"]["high_noise"] == {"step": 4, "loss": 0.5}
    assert (tmp_path / "run" / "adapters" / "step-00000004" / "high_noise.safetensors").is_file()


def test_save_attention_auto_plans_per_expert_and_logs_the_plan(tmp_path, capsys):
    """speed.save_attention: auto on the CPU within speed.memory_gib: each expert's options resolved from
    the plan for the largest sample, the plan logged at the start and written to summary.json."""
    import dataclasses
    import json

    from wan_model.speed import SpeedOptions

    recipe = tiny_recipe(tmp_path, steps=2, gradient_checkpointing=True)
    speed = SpeedOptions(compile=False, save_attention="auto", host_checkpoints="auto", fp8_base="none", memory_gib=2.0)
    recipe = dataclasses.replace(recipe, speed=speed)
    trainer = make_trainer(recipe, max_video_tokens=16)
    assert set(trainer.activation_plans) == {"high_noise", "low_noise"}
    for name, state in trainer.states.items():
        assert trainer.speeds[name].save_attention == "all" and trainer.speeds[name].host_checkpoints is False
        assert state.model.checkpoint_context_fn is not None
    run(trainer)
    out = capsys.readouterr()
    assert "high_noise: memory plan: 2 of 2 blocks keep self-attention" in out.out + out.err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["memory_plan"]["high_noise"]["saved_attention_blocks"] == recipe.preset.transformer.num_layers


def test_save_attention_auto_needs_the_largest_sample_and_a_budget_that_fits(tmp_path):
    import dataclasses

    from wan_model.speed import SpeedOptions

    recipe = tiny_recipe(tmp_path, steps=2)
    recipe = dataclasses.replace(recipe, speed=SpeedOptions(compile=False, save_attention="auto", fp8_base="none",
                                                            memory_gib=1e-4))
    with pytest.raises(ValueError, match="max_video_tokens"):
        make_trainer(recipe)
    with pytest.raises(ValueError, match=r"expert high_noise.*speed.memory_gib"):
        make_trainer(recipe, max_video_tokens=16)


def test_host_memory_for_the_plan_respects_a_container_limit(tmp_path):
    from train.loop import host_available_gib

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       131072000 kB\nMemAvailable:   104857600 kB\n")  # 100 GiB available
    limit, usage = tmp_path / "memory.max", tmp_path / "memory.current"
    limit.write_text("max\n")
    usage.write_text(str(2 * 2**30))
    assert host_available_gib(str(meminfo), [(str(limit), str(usage))]) == pytest.approx(100.0)
    limit.write_text(str(32 * 2**30))
    assert host_available_gib(str(meminfo), [(str(limit), str(usage))]) == pytest.approx(30.0)
    assert host_available_gib(str(tmp_path / "missing"), []) == 0.0


def test_ti2v_still_validation_is_scored_and_named_in_text_mode(tmp_path):
    """Held-out stills of a TI2V run are scored in text mode whatever ti2v_image_prob says, and the pass's
    problem digest records that (so it equals the digest of a text-only run)."""
    from data.config import ValidationSettings
    from train.validation import Validator

    stills = MemorySource("tiny-ti2v", n=2, batch_size=1, frames=1)
    batches = [stills.batch(i) for i in range(2)]
    digests = []
    for prob in (1.0, 0.0):
        trainer = make_trainer(tiny_recipe(tmp_path / str(prob), preset="tiny-ti2v", steps=2, ti2v_image_prob=prob))
        result = Validator(batches, ValidationSettings(fraction=0.1, timesteps=2)).run(trainer)["dense"]
        assert math.isfinite(result["loss"])
        digests.append(result["problem"])
    assert digests[0] == digests[1]
