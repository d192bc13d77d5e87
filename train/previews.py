"""Preview videos during training: `training.sample_prompts` rendered every `training.sample_every` steps.

The previews use the experts being trained as they are (their live LoRA layers), the release's other
parts (the frozen experts that do not train, the VAE, UMT5), loaded once on first use, and the bundled
sampler (wan_model.pipeline). Same seeds at every step, so the folders compare: the style appearing
step by step. Image-conditioned previews (I2V always, TI2V when given) start from training.sample_image
or, for I2V, the first frame of the first held-out clip; the recipe check refuses an I2V recipe with
previews and neither, before step 0. Written to <output_dir>/samples/step-NNNNNNNN/<i>.mp4 (+ .png strip). Main process only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from wan_model.media import read_image, save_video
from wan_model.pipeline import GenerationRequest, WanPipeline


class PreviewRenderer:
    """Loads the release's VAE, text encoder and non-training experts lazily; renders at a step."""

    def __init__(self, trainer, release_root: str | Path):
        self.trainer, self.release_root = trainer, Path(release_root)
        self._parts = None
        self._image: torch.Tensor | None = None  # the I2V first frame taken from a held-out clip

    def _load(self):
        from wan_model.checkpoint import load_transformer
        from wan_model.release import load_release
        from wan_model.text_encoder import TextEncoder
        from wan_model.vae_io import load_vae

        t = self.trainer
        release = load_release(self.release_root, t.recipe.preset.name)
        # Frozen experts wait on the host; the pipeline moves each in for its steps when offloading.
        frozen = {name: load_transformer(path, dtype=t.base_dtype, device="cpu")
                  for name, path in release.expert_paths.items() if name not in t.states}
        vae = load_vae(release.vae_path, release.preset.vae, dtype=torch.float32, device=t.device)
        text_encoder = TextEncoder.from_release(release.t5_path, release.tokenizer_path,
                                                release.preset.text_encoder, dtype=t.base_dtype, device=t.device)
        self._parts = (frozen, vae, text_encoder)

    def _first_frame(self, vae) -> torch.Tensor | None:
        """[3, H, W] in [-1, 1]: training.sample_image, else for I2V the first frame of the first held-out
        clip (its first latent frame decoded: the causal VAE encodes frame 0 alone); None: text only."""
        t = self.trainer
        path = t.settings.sample_image
        if path is not None:
            return read_image(path)
        if t.recipe.preset.task != "i2v":
            return None
        if self._image is None:
            from .validation import held_out_batches

            first = held_out_batches(t.recipe.dataset.cache_dir, 1, t.recipe.preset.text_len)[0].latents[:, :, :1]
            self._image = vae.decode(first.to(t.device))[0, :, 0].float().cpu()
        return self._image

    @torch.no_grad()
    def render(self, step: int) -> list[Path]:
        t, s = self.trainer, self.trainer.settings
        if self._parts is None:
            self._load()
        frozen, vae, text_encoder = self._parts
        live = {name: getattr(state.model, "module", state.model) for name, state in t.states.items()}
        experts = {**frozen, **live}
        offload = t.offload or bool(frozen)
        # Without parking, the trained experts stay where the trainer put them (on the device, or with their
        # block weights streamed from the host) and the pipeline moves only the frozen ones. With parking it
        # moves every expert, and the next step's activate() restores the trainer's placement (below).
        pipe = WanPipeline(t.recipe.preset, experts, vae, text_encoder, device=t.device, dtype=t.base_dtype,
                           offload_experts=offload, resident=set() if t.offload else set(live))
        height, width, frames = s.sample_size
        out = Path(s.output_dir) / "samples" / f"step-{step:08d}"
        written = []
        image = self._first_frame(vae)
        try:
            for i, prompt in enumerate(s.sample_prompts):
                video = pipe.generate(GenerationRequest(prompt=prompt, seed=s.seed + i, height=height, width=width,
                                                        frames=frames, steps=s.sample_steps, image=image)).video
                written.append(save_video(video, out / f"{i}", fps=t.recipe.preset.sample_fps)[0])
        finally:
            for model in live.values():
                model.train()
            if offload:
                t.active_name = None  # the next step puts its expert (and its optimizer state) back
        return written
