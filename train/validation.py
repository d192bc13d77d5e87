"""Validation loss: each expert's flow-matching loss on held-out clips, to pick the checkpoint.

The held-out clips (the recipe's `validation:` section, data/config.py ValidationSettings) are prepared
into <cache_dir>/validation and never trained on. A pass scores every training expert on the same
fixed problems, so passes compare across steps and across a resume:
  * items: the first `max_items` held-out cache entries (sorted as the training dataset sorts), each with
    its posterior-mean latents (no sampling noise), its first prompt variant and its image condition;
  * timesteps: for an expert with range [lo, hi), the centres of `timesteps` equal bands,
    lo + (k + 1/2) (hi - lo) / timesteps;
  * noise: drawn per (validation seed, item, band) from its own generator;
  * loss: the training objective (train/objective.py: conditioning as in training; TI2V scores every
    other item in its image mode, the held-out clip's own first frame given, as training mixes both, or
    all / none of them when training.ti2v_image_prob is 1 / 0) with plain MSE weighting, without gradients, the model in eval mode (no LoRA
    dropout), under the training autocast.
A pass returns {expert: {"loss": mean over items and bands, "bands": {"<centre>": mean over items},
"problem": a digest of the clips, timesteps, noise seed and image modes scored}}. `timesteps` and `max_items`
may change on a resume (train/recipe.py recipe_hash), so the best step is chosen among the passes that scored
the newest pass's problem only: a loss over other timesteps or clips is not comparable.
With offload_inactive_expert the pass swaps each expert in (two swaps per pass), so keep `every` coarse.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from data.cache import LatentCache, entry_order, pad_context
from data.config import VALIDATION_FOLDER, ValidationSettings

from .batches import Batch
from .experts import Expert
from .objective import flow_matching_loss


def band_centres(lo: int, hi: int, count: int) -> list[float]:
    """Centres of `count` equal bands of [lo, hi)."""
    width = (hi - lo) / count
    return [lo + (k + 0.5) * width for k in range(count)]


def held_out_batches(cache_dir: str | Path, max_items: int, text_len: int) -> list[Batch]:
    """The validation set: up to `max_items` entries of <cache_dir>/validation as one-item batches."""
    folder = Path(cache_dir) / VALIDATION_FOLDER
    cache = LatentCache(folder)
    if not cache.entries:
        raise FileNotFoundError(f"{folder}: no held-out clips are prepared; run python -m train.prepare RECIPE "
                                f"(with the recipe's validation: section) first")
    batches = []
    for key in entry_order(cache.entries)[:max_items]:
        tensors, meta = cache.read(key)
        image = tensors.get("image_cond")
        batches.append(Batch(latents=tensors["latent_mean"].float()[None],
                             context=pad_context(tensors["context"][0], text_len)[None].float(),
                             context_lens=tensors["context_lens"][:1].clone(),
                             image_cond=None if image is None else image.float()[None],
                             clip_ids=[str(meta["clip_id"])]))
    return batches


def _noise(seed: int, item: int, band: int, like: torch.Tensor) -> torch.Tensor:
    digest = hashlib.blake2b(f"validation/{seed}/{item}/{band}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "big") >> 1)
    return torch.randn(like.shape, generator=generator, dtype=torch.float32)


class Validator:
    """Scores the trainer's experts on the held-out batches (module docstring)."""

    def __init__(self, batches: list[Batch], settings: ValidationSettings):
        self.batches, self.settings = batches, settings

    def due(self, step: int, total: int) -> bool:
        """After `step` completed steps: every `every` steps, and at the last one."""
        every = self.settings.every
        return bool(every) and (step % every == 0 or step == total)

    @torch.no_grad()
    def run(self, trainer) -> dict[str, dict]:
        results = {}
        # The active expert first: with parking, a pass then costs one swap out and one back.
        names = sorted(trainer.states, key=lambda n: n != trainer.active_name)
        for name in names:
            trainer.activate(name)
            state = trainer.states[name]
            results[name] = self._score(trainer, state.model, state.expert)
        return results

    def _score(self, trainer, model: torch.nn.Module, expert: Expert) -> dict:
        lo, hi = expert.t_range
        centres = band_centres(lo, hi, self.settings.timesteps)
        device = trainer.device
        autocast = trainer.base_dtype == torch.bfloat16 and not trainer.deepspeed
        was_training = model.training
        model.eval()
        per_band = {c: [] for c in centres}
        image_modes = [None] * len(self.batches)
        if trainer.task == "ti2v":  # image mode (first frame given) on every other item, as training mixes
            p = trainer.settings.ti2v_image_prob
            # A still (one latent frame) is scored in text mode (train/objective.py), and recorded so.
            image_modes = [(p >= 1 or (p > 0 and i % 2 == 1)) and b.latents.shape[2] > 1
                           for i, b in enumerate(self.batches)]
        try:
            for i, batch in enumerate(self.batches):
                batch = batch.to(device)
                clean_first = None if image_modes[i] is None else torch.tensor([image_modes[i]], device=device)
                for k, centre in enumerate(centres):
                    t = torch.full((1,), centre, device=device)
                    noise = _noise(self.settings.seed, i, k, batch.latents).to(device, batch.latents.dtype)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                        loss, _ = flow_matching_loss(model, batch, t, noise, trainer.task, clean_first, "none")
                    per_band[centre].append(float(loss))
        finally:
            model.train(was_training)
        bands = {f"{c:.0f}": sum(v) / len(v) for c, v in per_band.items()}
        clip_ids = [c for b in self.batches for c in b.clip_ids]
        problem = problem_digest(clip_ids, self.settings.seed, centres, image_modes)
        return {"loss": sum(bands.values()) / len(bands), "bands": bands, "problem": problem}


def problem_digest(clip_ids: list[str], seed: int, centres: list[float], image_modes: list) -> str:
    """12 hex digits naming what a pass scored: which clips in which order (their noise is drawn by
    position), the noise seed, the timesteps and each clip's image mode. Equal digests: comparable losses."""
    text = json.dumps({"clips": clip_ids, "seed": seed, "timesteps": centres, "image_modes": image_modes})
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


def best_steps(history: list[dict]) -> dict[str, dict]:
    """{expert: {"step": steps done, "loss": lowest validation loss}} over validation records
    ({"steps_done": N, "experts": {expert: {"loss": ..., "problem": ...}}}), each expert's chosen among
    the passes that scored the same problem as its newest pass (module docstring). Records written before
    passes named their problem have none; they compare only with each other."""
    newest = {name: result.get("problem") for record in history for name, result in record["experts"].items()}
    best: dict[str, dict] = {}
    for record in history:
        for name, result in record["experts"].items():
            if result.get("problem") != newest[name]:
                continue  # scored other timesteps or clips (a resume changed validation.timesteps or max_items)
            if not math.isfinite(result["loss"]):
                continue  # a diverged pass is never the best
            if name not in best or result["loss"] < best[name]["loss"]:
                best[name] = {"step": record["steps_done"], "loss": result["loss"]}
    return best


def is_best_step(history: list[dict], steps_done: int) -> bool:
    """Whether the pass after `steps_done` steps is the best so far for some expert (its adapters are kept)."""
    return any(best["step"] == steps_done for best in best_steps(history).values())
