"""The training loop: per-expert LoRA on cached latents with the flow-matching loss, under accelerate.

One step = `grad_accum` micro-batches routed to one expert (train/experts.py), then that expert's
optimizer step. Each expert has its own model, adapter, optimizer and LR schedule; an expert not routed
to is not touched at all (no forward, no zero-grad Adam step), so its weights and moments stay bitwise.

Loss (rectified flow, wan_model/schedule.py), per sample with sigma = t / 1000:
    x_t = (1 - sigma) x0 + sigma eps,   target = eps - x0,   L = w(sigma) * mean((v(x_t, t, c) - target)^2)
Conditioning as the official pipelines:
  i2v  (wan/image2video.py): input = cat([x_t (16), mask (4), image_cond (16)]) on channels, the mask is 1
       on the first latent frame (its 4 channels are the 4 pixel frames folded into latent frame 0).
  ti2v (wan/textimage2video.py): with probability `ti2v_image_prob` a sample keeps its first latent frame
       clean (x0), those tokens get timestep 0, and the loss covers only the other frames.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from wan_model.offload import BlockOffloader
from wan_model.sequence_parallel import SequenceParallel
from wan_model.memory_plan import GIB, ActivationPlan, resident_gib
from wan_model.speed import SpeedOptions, apply_speed_options, plan_speed

from .batches import BatchSource
from .checkpoints import checkpoint_root, list_checkpoints, load_checkpoint, save_checkpoint
from .experts import (STREAM_NOISE, STREAM_TI2V, Expert, expert_for_step, experts_from_recipe, planned_updates,
                      step_generator, step_timesteps)
from .lora import attach_lora, lora_parameters, make_optimizer, make_scheduler
from .metrics import MetricsLogger
from .objective import flow_matching_loss
from .parking import HostParking
from .validation import Validator, best_steps, is_best_step
from .recipe import Recipe, TrainingSettings


# ------------------------------------------------------------------------------------------------ set-up

DEEPSPEED_CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "deepspeed"


def deepspeed_config(settings: TrainingSettings) -> dict:
    """recipes/deepspeed/<zero2|zero3>.json with the recipe's batch, accumulation, clipping and precision
    written in (the recipe is the one source of these numbers; the JSON holds the ZeRO settings)."""
    path = DEEPSPEED_CONFIGS / f"{settings.deepspeed}.json"
    config = json.loads(path.read_text())
    config.update(train_micro_batch_size_per_gpu=settings.batch_size,
                  gradient_accumulation_steps=settings.grad_accum,
                  gradient_clipping=settings.max_grad_norm, bf16={"enabled": settings.precision == "bf16"})
    return config


def make_accelerator(settings: TrainingSettings):
    """An Accelerator for the recipe: DeepSpeed ZeRO-2/3 when `training.deepspeed` is set, else plain
    (single device, or DDP under `accelerate launch --num_processes N`). Mixed precision is ours (autocast),
    so accelerate does not wrap the models."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs

    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if settings.deepspeed is None:
        if launched_ds:
            raise ValueError("launched with a DeepSpeed accelerate config but the recipe has training.deepspeed: "
                             "null; set it to zero2 / zero3, or launch with recipes/accelerate/single.yaml")
        # DDP (several processes) would copy rank 0's buffers into every rank at each forward. The model's only
        # buffers training writes are attention_backend cudnn_fp8's scaling states, which each rank keeps from
        # its own data (its amaxes and saturation counts); the rest are loaded, the same on every rank.
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("RANK", "0"),
                       ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(key, value)  # `python train_lora.py` without a launcher: one process
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(settings))
    # No cpu=True here even without CUDA: accelerate then ignores the plugin; DS_ACCELERATOR=cpu runs it on CPU.
    return Accelerator(deepspeed_plugin=plugin)


# ------------------------------------------------------------------------------------------------ placement

# Device memory a training step needs besides the weights, measured on an H100 (bf16, gradient checkpointing,
# LoRA rank 32, one 480x832x81 clip = 32,760 tokens): a 4-block expert of A14B width peaked at 22.1 GiB with
# 6.1 GiB of weights of both experts, so ~16 GiB of working set, plus each block's stored input
# (32,760 x 5,120 x 2 bytes = 0.31 GiB) for the other 36 blocks of a 40-block expert: ~27 GiB; rounded up.
ACTIVATION_RESERVE_BYTES = 30 * 2**30


def should_offload(mode: str, expert_bytes: list[int], free_bytes: int | None) -> bool:
    """Keep idle experts in host memory? 'auto': when all experts' weights plus ACTIVATION_RESERVE_BYTES
    exceed the free device memory (None: a CPU run, nothing to offload to). Two bf16 A14B experts (2 x 26 GiB)
    + 30 GiB do not fit an 80 GB H100: offload; they fit a 141 GB H200."""
    if mode == "never" or free_bytes is None:
        return False
    if mode == "always":
        return True
    return sum(expert_bytes) + ACTIVATION_RESERVE_BYTES > free_bytes


def cuda_budget_bytes(device: torch.device) -> int:
    """Bytes this process may still allocate on `device`: the free memory, or less under a
    `torch.cuda.set_per_process_memory_fraction` cap (a 141 GB card run as an 80 GB one)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    free = torch.cuda.mem_get_info(index)[0]
    cap = torch.cuda.get_per_process_memory_fraction(index) * torch.cuda.get_device_properties(index).total_memory
    return int(min(free, cap - torch.cuda.memory_reserved(index)))


def cap_device_memory(device: torch.device, gib: float) -> None:
    """Limit this process's allocator to `gib` GiB on `device` (speed.memory_gib: a 141 GB card trains as
    the 80 GB one the plan was made for); more than the card has leaves it uncapped."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), index)


# A container's memory limit and use (cgroup v2, then v1); MemAvailable sees the whole machine.
CGROUP_MEMORY_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                       ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def host_available_gib(meminfo: str = "/proc/meminfo", cgroup_files=CGROUP_MEMORY_FILES) -> float:
    """Host memory available to this process: the kernel's MemAvailable, within the container's limit less
    its use where a limit is set; 0 where unknown, so that no memory plan counts on pinning host memory
    it cannot see."""
    available = 0.0
    try:
        with open(meminfo) as lines:
            for line in lines:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024 / GIB
    except OSError:
        return 0.0
    for limit_file, usage_file in cgroup_files:
        try:
            limit_text = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text.isdigit() and int(limit_text) < 2**60:  # "max" / a huge number: no limit
            available = min(available, max(0, int(limit_text) - usage) / GIB)
        break
    return available


# ------------------------------------------------------------------------------------------------ the trainer

@dataclass
class ExpertState:
    """One training expert: its (possibly wrapped) model, LoRA params, optimizer, schedule, update count."""

    expert: Expert
    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    updates: int = 0
    engine: object | None = None  # the DeepSpeed engine (also `model`) under DeepSpeed
    parking: HostParking | None = None  # when idle experts wait in host memory


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint is untouched."""


class Trainer:
    """Builds per-expert LoRA training from a recipe and already loaded base models, then runs steps.

    models: expert name -> WanTransformer (base weights, any device); experts that do not train may be
    absent. accelerator: an `accelerate.Accelerator` (None: a plain single-process one is made).
    max_video_tokens: video tokens of the largest sample the source can give (its largest bucket), which
    `speed.save_attention: auto` plans the memory for; train_lora.py takes it from the cache."""

    def __init__(self, recipe: Recipe, models: dict[str, torch.nn.Module], source: BatchSource,
                 accelerator=None, total_steps: int | None = None, max_video_tokens: int | None = None):
        from accelerate import Accelerator

        self.recipe = recipe
        self.settings = recipe.training
        self.task = recipe.preset.task
        self.source = source
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        self.device = self.accelerator.device
        self.total_steps = total_steps or self.settings.steps
        self.deepspeed = self.settings.deepspeed is not None
        self.sequence_parallel = self.settings.sequence_parallel
        if self.sequence_parallel > 1 and self.sequence_parallel != self.accelerator.num_processes:
            raise ValueError(f"training.sequence_parallel = {self.sequence_parallel} must equal the number of "
                             f"processes ({self.accelerator.num_processes}); launch with --num_processes "
                             f"{self.sequence_parallel}")
        # (processes, this rank) as the data sees them: sequence-parallel processes share every sample.
        self.data_world = ((1, 0) if self.sequence_parallel > 1
                           else (self.accelerator.num_processes, self.accelerator.process_index))
        self.experts = experts_from_recipe(recipe)
        self.base_dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float32
        self.step = 0
        self.history: list[dict] = []
        self.validation_history: list[dict] = []  # validation passes: {"step", "steps_done", "experts"}
        self.nonfinite_in_a_row = 0
        # LR schedules span training.steps even when --max-steps stops earlier, so a resume continues them.
        updates = planned_updates(self.experts, self.settings, self.settings.steps)
        self.states: dict[str, ExpertState] = {}
        self.offloaders: dict[str, BlockOffloader | None] = {}  # expert -> its weight streamer (offload: blocks)
        active = [e for e in self.experts if e.trains]
        missing = [e.name for e in active if e.name not in models]
        if missing:
            raise ValueError(f"no base model given for training expert(s) {missing}")
        sizes = [sum(p.numel() * self.base_dtype.itemsize for p in models[e.name].parameters()) for e in active]
        if recipe.speed.memory_gib is not None and self.device.type == "cuda":
            cap_device_memory(self.device, recipe.speed.memory_gib)
        free = None
        if self.device.type == "cuda":  # what is free once the experts' own weights are counted out
            on_device = sum(p.numel() * p.element_size() for e in active for p in models[e.name].parameters()
                            if p.device.type == "cuda")
            free = cuda_budget_bytes(self.device) + on_device
        # With speed.offload: blocks the block weights already wait on the host, streamed in as used; what
        # each expert keeps on the device (embeddings, head, LoRA, moments) is small: no parking then.
        self.stream_blocks = recipe.speed.offload == "blocks"
        self.offload = not self.deepspeed and not self.stream_blocks and len(active) > 1 and should_offload(
            self.settings.offload_inactive_expert, sizes, free)
        if self.offload and self.accelerator.num_processes > 1:
            raise ValueError(f"the experts ({sum(sizes) / 2**30:.0f} GiB) would be offloaded, which a multi-process "
                             f"run cannot do (DDP keeps each model on its GPU); set training.deepspeed: zero3 to "
                             f"partition them, or training.offload_inactive_expert: never")
        # Each expert's speed options, save_attention / host_checkpoints "auto" resolved by the memory plan.
        self.activation_plans: dict[str, ActivationPlan] = {}
        self.speeds: dict[str, SpeedOptions] = {e.name: recipe.speed for e in active}
        if recipe.speed.planned:
            self._plan_memory(active, models, max_video_tokens)
        for i, expert in enumerate(active):
            self.states[expert.name] = self._build(expert, models[expert.name], i, updates[expert.name])
        self.active_name: str | None = None

    def memory_budget_gib(self) -> float:
        """What this process may allocate in all: speed.memory_gib (the allocator is capped to it) within
        what the device has free plus what this process already holds; on the CPU the memory available."""
        cap = self.recipe.speed.memory_gib
        if self.device.type != "cuda":
            return cap if cap is not None else host_available_gib()
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        return (cuda_budget_bytes(self.device) + torch.cuda.memory_reserved(index)) / GIB

    def _plan_memory(self, active: list[Expert], models: dict[str, torch.nn.Module],
                     max_video_tokens: int | None) -> None:
        """Resolve speed "auto" per expert for the largest micro-batch (batch_size samples of the largest
        bucket, a 1/N share of its tokens under sequence parallelism) within the memory budget, less what
        the other experts keep on the device when they are not parked."""
        speed = self.recipe.speed
        if max_video_tokens is None:
            raise ValueError("speed.save_attention: auto plans memory for the largest bucket, but the trainer was "
                             "given no max_video_tokens (train_lora.py passes the cache's largest)")
        batch = self.settings.batch_size
        tokens = math.ceil(max_video_tokens * batch / self.sequence_parallel)
        budget = self.memory_budget_gib()
        fp8 = speed.fp8_base != "none"
        # Processes on one host share its memory: each may pin its share (torchrun / accelerate set this).
        host = host_available_gib() / int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        source = ("host memory available" if self.device.type != "cuda" and speed.memory_gib is None
                  else "speed.memory_gib within the device's memory" if speed.memory_gib is not None
                  else "the device's free memory")
        for expert in active:
            # Parked experts wait on the host; streamed ones keep their non-block part on the device.
            others = 0.0 if self.offload else sum(
                resident_gib(models[o.name].config, o.lora.rank, fp8_weights=fp8, streamed_blocks=self.stream_blocks)
                for o in active if o is not expert)
            try:
                self.speeds[expert.name], plan = plan_speed(
                    speed, models[expert.name].config, tokens, budget - others, rank=expert.lora.rank,
                    host_available_gib=host, samples=batch, shards=self.sequence_parallel)
            except ValueError as err:
                raise ValueError(f"speed.save_attention: auto, expert {expert.name}: {err} (budget: {source}, "
                                 f"{budget:.1f} GiB{f' less {others:.1f} for the other experts' if others else ''})") from None
            self.activation_plans[expert.name] = plan

    def _build(self, expert: Expert, model: torch.nn.Module, index: int, total_updates: int) -> ExpertState:
        model.to(self.base_dtype)
        params = attach_lora(model, expert.lora, seed=self.settings.seed * 100 + index)
        model.enable_gradient_checkpointing(self.settings.gradient_checkpointing)
        if self.sequence_parallel > 1:
            model.enable_sequence_parallel(SequenceParallel())
        model.train()
        optimizer = make_optimizer(params, expert.optimizer)
        scheduler = make_scheduler(optimizer, expert.lr_schedule, total_updates)
        if self.deepspeed:  # check_recipe allows only speed.save_attention here
            apply_speed_options(model, self.speeds[expert.name])
            engine, _ = self.accelerator.prepare(model, optimizer)
            return ExpertState(expert, engine, params, optimizer, scheduler, engine=engine)
        if not self.stream_blocks:
            # Also an expert that will be parked: its speed options (fp8 quantisation) then run on the
            # device, so a parked run computes bit for bit what a kept one does; one expert at a time.
            model.to(self.device)
        self.offloaders[expert.name] = apply_speed_options(model, self.speeds[expert.name], self.device)
        # Placement is ours (above): the idle expert waits on the host, streamed block weights stay there.
        wrapped = self.accelerator.prepare_model(model, device_placement=False)
        parking = None
        if self.offload:
            parking = HostParking(model, optimizer, pin=self.device.type == "cuda")
            parking.park()  # until `activate` puts it back
            torch.cuda.synchronize(self.device)
        return ExpertState(expert, wrapped, params, optimizer, scheduler, parking=parking)

    # -- placement
    def activate(self, name: str) -> float:
        """Put expert `name` on the device (idle ones to host memory when offloading); returns seconds spent."""
        if not self.offload or self.active_name == name:
            self.active_name = name
            return 0.0
        start = time.perf_counter()
        for other, state in self.states.items():
            if other != name:
                state.parking.park()
        self.states[name].parking.unpark(self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.active_name = name
        seconds = time.perf_counter() - start
        return seconds

    # -- one step
    def train_step(self) -> dict:
        """Run step `self.step` on its expert; returns the step record (loss, grad norm, lr, skipped, ...)."""
        s = self.settings
        step = self.step
        expert = expert_for_step(step, self.experts, s)
        swap = self.activate(expert.name)
        state = self.states[expert.name]
        # Under sequence parallelism every process draws the same batch, timesteps and noise.
        world, rank = self.data_world
        losses, per_sample, timesteps, clips = [], [], [], []
        poisoned = False
        for micro in range(s.grad_accum):
            index = step * s.grad_accum + micro
            batch = self.source.batch(index).to(self.device)
            draw = index * world + rank  # one independent stream per (micro-batch, process)
            t = step_timesteps(draw, expert, batch.latents.shape[0], s.seed).to(self.device)
            noise = torch.randn(batch.latents.shape, generator=step_generator(s.seed, draw, STREAM_NOISE),
                                dtype=torch.float32).to(self.device, batch.latents.dtype)
            clean_first = None
            if self.task == "ti2v":
                u = torch.rand(batch.latents.shape[0], generator=step_generator(s.seed, draw, STREAM_TI2V))
                clean_first = (u < s.ti2v_image_prob).to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                enabled=self.base_dtype == torch.bfloat16 and not self.deepspeed):
                loss, per = flow_matching_loss(state.model, batch, t, noise, self.task, clean_first,
                                               expert.loss_weighting)
            finite = self._all_finite(loss.detach())
            losses.append(loss.detach().float())
            per_sample.append(per.float())
            timesteps.append(t.float())
            clips.extend(batch.clip_ids)
            if not finite:
                poisoned = True
                if self.deepspeed and micro > 0:
                    raise NonFiniteError(f"step {step} ({expert.name}): non-finite loss on clips {clips} after "
                                         f"{micro} micro-batches; DeepSpeed cannot drop a partial accumulation")
                break  # the rest of this step's micro-batches would be thrown away with it
            if self.deepspeed:
                # DeepSpeed counts micro-batches in step(): called after every backward, it updates on the
                # window's last one only (called once per window, it updated every grad_accum-th window).
                state.engine.backward(loss)
                state.engine.step()
            else:
                # Each process's gradients are its token shard's share; DDP averages them over the
                # processes, so scaling by the shard count turns that average into the needed sum.
                (loss * self.sequence_parallel / s.grad_accum).backward()
        lr = state.optimizer.param_groups[0]["lr"]  # the rate this update uses (_update steps the schedule)
        grad_norm = self._update(state, poisoned)
        skipped = poisoned or not math.isfinite(grad_norm)
        mean_loss = torch.stack(losses).mean()
        record = {"step": step, "expert": expert.name, "loss": float(self.accelerator.reduce(mean_loss, "mean")),
                  "grad_norm": grad_norm, "lr": lr, "skipped": skipped,
                  "swap_s": swap, "timesteps": torch.cat(timesteps).tolist(),
                  "sample_losses": torch.cat(per_sample).tolist()}
        if skipped:
            self.nonfinite_in_a_row += 1
            record["clip_ids"] = clips
        else:
            self.nonfinite_in_a_row = 0
        self.history.append({k: record[k] for k in ("step", "expert", "loss", "grad_norm", "skipped")})
        self.step += 1
        if self.nonfinite_in_a_row >= s.max_nonfinite_steps:
            raise NonFiniteError(f"{self.nonfinite_in_a_row} non-finite steps in a row (last: step {step}, expert "
                                 f"{expert.name}, clips {clips}); lower the lr, check these clips, or resume from "
                                 f"the last checkpoint")
        return record

    def _all_finite(self, value: Tensor) -> bool:
        """True when `value` is finite on every process (all processes then skip or step together)."""
        bad = (~torch.isfinite(value)).float().reshape(1)
        return float(self.accelerator.reduce(bad, "sum")) == 0.0

    def _update(self, state: ExpertState, poisoned: bool) -> float:
        """Clip and apply the accumulated gradients; nothing changes when they are poisoned (returns nan)."""
        s = self.settings
        if self.deepspeed:  # the window's last engine.step() (train_step) clipped and applied them
            norm = None if poisoned else state.engine.get_global_grad_norm()
            if norm is None or not math.isfinite(norm) or not state.engine.was_step_applied():
                return math.nan  # nothing applied (DeepSpeed skips an overflowing step itself): no schedule step
            state.scheduler.step()
            state.updates += 1
            return float(norm)
        if poisoned:
            state.optimizer.zero_grad(set_to_none=True)
            return math.nan
        limit = s.max_grad_norm if s.max_grad_norm > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(state.params, limit))
        if math.isfinite(norm):
            state.optimizer.step()
            state.scheduler.step()
            state.updates += 1
        state.optimizer.zero_grad(set_to_none=True)
        return norm if math.isfinite(norm) else math.nan

    def lora_weights(self, name: str) -> dict[str, Tensor]:
        """Expert `name`'s LoRA weights by in-model name, full (gathered under ZeRO-3), fp32, on CPU."""
        state = self.states[name]
        inner = getattr(state.model, "module", state.model)
        params = lora_parameters(inner)
        if self.settings.deepspeed == "zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(params.values())):
                return {k: p.detach().float().cpu().clone() for k, p in params.items()}
        return {k: p.detach().float().cpu().clone() for k, p in params.items()}


def run(trainer: Trainer, resume: os.PathLike | None = None, log: bool = True,
        stop_requested: Callable[[], bool] = lambda: False, validator: Validator | None = None) -> list[dict]:
    """Train from the start or from checkpoint `resume` to `trainer.total_steps`; checkpoints every
    `save_every` steps, at the end, and when `stop_requested()` turns true (a signal: checkpoint, then
    return early); exports the adapters at each save, at the end and at each new best validation pass.
    `validator` scores the held-out clips every validation.every steps and at the end
    (train/validation.py). Returns the loss history (one dict per step since step 0)."""
    s = trainer.settings
    if resume is not None:
        load_checkpoint(trainer, resume)
    elif list_checkpoints(checkpoint_root(s.output_dir)):
        raise FileExistsError(f"{checkpoint_root(s.output_dir)} holds checkpoints of an earlier run; continue it with "
                              f"--resume latest, or set another training.output_dir (or delete that folder)")
    logger = MetricsLogger(s.output_dir, trainer.total_steps, trainer.step, s.log_every,
                           enabled=log and trainer.accelerator.is_main_process)
    for name, plan in trainer.activation_plans.items():
        logger.message(f"{name}: {plan.describe()}")
    if trainer.offload:
        logger.message("idle experts wait in host memory (offload_inactive_expert); each expert change swaps "
                       "weights: prefer routing: phased")
    previews = None
    if s.sample_every and trainer.accelerator.is_main_process:
        from .previews import PreviewRenderer
        previews = PreviewRenderer(trainer, trainer.recipe.model.release)
    try:
        while trainer.step < trainer.total_steps:
            record = trainer.train_step()
            logger.log(record)
            if record["swap_s"]:
                logger.message(f"step {record['step']}: swapped in {record['expert']} in {record['swap_s']:.2f} s")
            if record["skipped"]:
                logger.message(f"step {record['step']} ({record['expert']}): non-finite loss or gradient, update "
                               f"skipped; clips {record['clip_ids']}")
            validated = validator is not None and validator.due(trainer.step, trainer.total_steps)
            if validated:
                validate(trainer, validator, logger)
            if previews is not None and trainer.step % s.sample_every == 0:
                for path in previews.render(trainer.step):
                    logger.message(f"preview: {path}")
            before_end = trainer.step < trainer.total_steps
            if s.save_every and trainer.step % s.save_every == 0 and before_end:
                save_checkpoint(trainer, s.keep_last)
                export_adapters(trainer)  # each saved step's adapters (and card)
            elif validated and before_end and is_best_step(trainer.validation_history, trainer.step):
                export_adapters(trainer)  # a new best validated step between saves: its adapters are kept too
            if stop_requested():
                logger.message(f"stop requested: checkpoint at step {trainer.step}; continue with --resume latest")
                break
        done = list_checkpoints(checkpoint_root(s.output_dir))
        if not done or done[-1].name != f"step-{trainer.step:08d}":
            save_checkpoint(trainer, s.keep_last)
        for path in export_adapters(trainer):
            logger.message(f"adapter: {path}")
        if trainer.validation_history:
            for name, best in best_steps(trainer.validation_history).items():
                folder = Path(s.output_dir) / "adapters" / f"step-{best['step']:08d}"
                where = folder if folder.is_dir() else (f"{folder} is missing: deleted, or written by a run before "
                                                        f"best steps were exported; its checkpoint may still be there")
                logger.message(f"best validation loss of {name}: {best['loss']:.4f} at step {best['step']} ({where})")
        write_summary(trainer)
    finally:
        logger.close()
    return trainer.history


def validate(trainer: Trainer, validator: Validator, logger: MetricsLogger) -> dict:
    """One validation pass after `trainer.step` steps: recorded in the trainer (checkpointed) and logged."""
    experts = validator.run(trainer)
    if trainer.accelerator.num_processes > 1:
        # Each process scored the same problems; the main process's numbers are the run's, so every process
        # keeps the same history and agrees on which steps export (a collective under ZeRO-3).
        from accelerate.utils import broadcast_object_list

        experts = broadcast_object_list([experts], from_process=0)[0]
    record = {"step": trainer.step - 1, "steps_done": trainer.step, "experts": experts}
    trainer.validation_history.append(record)
    logger.log_validation(record)
    logger.message(f"validation after step {trainer.step}: " + ", ".join(
        f"{name} {result['loss']:.4f}" for name, result in experts.items()))
    return record


def write_summary(trainer: Trainer) -> None:
    """<output_dir>/summary.json: steps, last loss per expert, validation passes and the best step per expert."""
    if not trainer.accelerator.is_main_process:
        return
    from wan_model.files import atomic_write_text

    last = {}
    for record in trainer.history:
        if not record["skipped"]:
            last[record["expert"]] = record["loss"]
    summary = {"steps": trainer.step, "last_loss": last, "validation": trainer.validation_history,
               "best_validation": best_steps(trainer.validation_history),
               "memory_plan": {name: dataclasses.asdict(plan) for name, plan in trainer.activation_plans.items()}}
    atomic_write_text(Path(trainer.settings.output_dir) / "summary.json", json.dumps(summary, indent=1))


def export_adapters(trainer: Trainer) -> list:
    """Each training expert's adapter at the current step, ComfyUI and diffusers formats (train/export.py)."""
    from .adapter_card import dataset_summary, write_adapter_card
    from .export import adapter_dir, export_expert_adapter
    from .recipe import recipe_hash

    weights = {name: trainer.lora_weights(name) for name in trainer.states}  # collective under ZeRO-3
    if not trainer.accelerator.is_main_process:
        return []
    files = []
    for name, tensors in weights.items():
        e = trainer.states[name].expert
        files += export_expert_adapter(tensors, trainer.settings.output_dir, base_model=trainer.recipe.preset.name,
                                       expert=name, timestep_range=e.t_range, rank=e.lora.rank,
                                       alpha=e.lora.alpha, trigger=trainer.recipe.dataset.trigger,
                                       recipe_hash=recipe_hash(trainer.recipe), step=trainer.step,
                                       formats=("comfy", "peft"))
    step_dir = adapter_dir(trainer.settings.output_dir, trainer.step)
    samples = Path(trainer.settings.output_dir) / "samples" / f"step-{trainer.step:08d}"
    card = write_adapter_card(
        step_dir, preset=trainer.recipe.preset, step=trainer.step, trigger=trainer.recipe.dataset.trigger,
        experts=[{"name": n, "range": s.expert.t_range, "rank": s.expert.lora.rank, "alpha": s.expert.lora.alpha}
                 for n, s in trainer.states.items()],
        dataset=dataset_summary(trainer.recipe.dataset.cache_dir), validation=trainer.validation_history,
        previews=sorted(samples.glob("*.png")), recipe_hash=recipe_hash(trainer.recipe),
        release=trainer.recipe.model.release)
    return files + [card]
