"""Text/image-to-video sampling for the three Wan 2.2 models, as the official pipelines do it.

The official generators (`wan/text2video.py`, `wan/image2video.py`, `wan/textimage2video.py`) share one
loop; this module keeps that loop once and takes the model-specific parts as data:

  * T2V-A14B / I2V-A14B: two experts; timesteps t >= boundary * 1000 run the high-noise expert with
    guide_scale[1], the rest the low-noise expert with guide_scale[0].
  * I2V-A14B: the DiT input is cat([x_t (16), mask (4), image latents (16)]) on channels, where the image
    latents encode the first frame followed by zero frames (mid-grey) and the mask is 1 on the first latent frame.
  * TI2V-5B: one expert; with an image, the first latent frame is the clean image latent, re-imposed after
    every solver step, and its tokens get timestep 0 (a per-token timestep).

Classifier-free guidance runs the conditional and unconditional branch in one batch of two.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention_backend
from .conditioning import i2v_mask, token_timesteps
from .config import ModelPreset
from .image_size import centre_crop, image_output_size, lanczos_cover_crop
from .lora_apply import LoraSet, add_differences, difference_target, merge_loras
from .sampling_speed import SamplingSpeed, prepare_expert
from .solvers import make_solver


@dataclass
class GenerationRequest:
    """One video to render. Sizes in pixels; `image` (I2V, TI2V) is [3, H, W] in [-1, 1]."""

    prompt: str
    seed: int = 0
    height: int | None = None  # default: the preset's sample_size (480x832 for A14B, 704x1280 for TI2V-5B)
    width: int | None = None
    frames: int | None = None  # default: the preset's frame_num (81 or 121)
    negative_prompt: str | None = None  # default: the official negative prompt
    steps: int | None = None  # default: the preset's (40 / 50)
    shift: float | None = None  # default: the preset's sample_shift
    guide_scale: tuple[float, float] | None = None  # (low-noise, high-noise); default: the preset's
    solver: str = "unipc"  # 'unipc' (official default) | 'dpm++' (the official other option) | 'euler'
    image: torch.Tensor | None = None
    # With an image: True (official) takes height x width as the pixel area and the image's aspect ratio for
    # the shape (image_output_size); False renders exactly height x width from a centre crop of the image.
    fit_image: bool = True


@dataclass
class GenerationResult:
    video: torch.Tensor  # [3, F, H, W] in [-1, 1], float32 on the CPU
    latents: torch.Tensor  # [C, F', H', W'] final latents
    seconds: dict[str, float] = field(default_factory=dict)  # time per stage


def snap_size(height: int, width: int, frames: int, preset: ModelPreset) -> tuple[int, int, int]:
    """Round a request to what the VAE and patch size allow, warning when anything changes.

    Height and width must be multiples of VAE stride x patch size (16 for A14B, 32 for 5B); frames must
    be 1 + 4k (the VAE's temporal stride).
    """
    t_stride, h_mult, w_mult = preset.latent_stride
    new_h = max(h_mult, round(height / h_mult) * h_mult)
    new_w = max(w_mult, round(width / w_mult) * w_mult)
    new_f = max(1, (frames - 1) // t_stride * t_stride + 1)
    if (new_h, new_w, new_f) != (height, width, frames):
        warnings.warn(f"size {height}x{width}x{frames} is not a multiple of the {preset.name} strides "
                      f"({h_mult}x{w_mult}, frames 1+{t_stride}k); using {new_h}x{new_w}x{new_f}", stacklevel=2)
    return new_h, new_w, new_f


LORA_CACHE_FILES = 8  # LoRA files kept in host memory (an A14B rank-32 expert file is about 0.3 GB)


class WanPipeline:
    """Sampling with one or two experts, a VAE and a text encoder.

    experts: {'high_noise': model, 'low_noise': model} for A14B presets, {'dense': model} for TI2V-5B.
    offload_experts: keep only the running expert on `device`, the other in host memory (swapped at the
    boundary, once per video). text_encoder_device: where prompts are encoded ('cpu' saves ~11 GB).
    speed: compiled blocks, fp8 weights, fp8 attention (`sampling_speed.py`); applied here to every
    expert that is not `resident`.
    """

    def __init__(self, preset: ModelPreset, experts: dict[str, nn.Module], vae: nn.Module, text_encoder,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                 offload_experts: bool = False, resident: set[str] | frozenset[str] = frozenset(),
                 speed: SamplingSpeed | None = None):
        expected = {"high_noise", "low_noise"} if preset.is_moe else {"dense"}
        if set(experts) != expected:
            raise ValueError(f"{preset.name} needs experts {sorted(expected)}, got {sorted(experts)}")
        self.preset, self.experts, self.vae, self.text_encoder = preset, experts, vae, text_encoder
        self.device, self.dtype, self.offload_experts = torch.device(device), dtype, offload_experts
        # Experts that stay where they are, never swapped (training previews: the experts being trained,
        # whose placement the trainer owns).
        self.resident = frozenset(resident)
        self.speed = speed or SamplingSpeed()
        for name, model in experts.items():
            model.eval()  # generate() runs under no_grad; trainable flags stay as they are (training previews)
            if not offload_experts and name not in self.resident:
                model.to(self.device)
            if name not in self.resident:
                prepare_expert(model, self.speed)
        self.vae.eval().requires_grad_(False)
        self._attached: dict[str, dict[str, tuple]] = {}  # expert -> {lora path: (weights, strength)}
        self._lora_sets: dict[str, LoraSet] = {}
        self._loaded_loras: dict[tuple, tuple] = {}  # (file, size, mtime) -> load_lora's result
        self._merged: set[tuple[str, str]] = set()  # (expert, resolved file) folded into the weights
        # Difference tensors of attached LoRA files (lora_formats: .diff / .diff_b / .diff_m), added to their
        # parameters in place; the originals wait on the host so a change of adapters restores them exactly.
        self._diffs: dict[str, dict[str, tuple[dict[str, torch.Tensor], float]]] = {}  # expert -> {file: ...}
        self._diff_originals: dict[str, dict[str, torch.Tensor]] = {}  # expert -> {parameter: original}

    # -- routing -------------------------------------------------------------------------------------
    def expert_for(self, t: float) -> str:
        """Official rule: t >= boundary * num_train_timesteps runs the high-noise expert."""
        if not self.preset.is_moe:
            return "dense"
        return "high_noise" if t >= self.preset.boundary_timestep else "low_noise"

    def _activate(self, name: str) -> nn.Module:
        if self.offload_experts:
            for other, model in self.experts.items():
                if other != name and other not in self.resident and \
                        next(model.parameters()).device != torch.device("cpu"):
                    model.to("cpu")
            model = self.experts[name]
            if name not in self.resident and not _on(self.device, next(model.parameters()).device):
                model.to(self.device)
                if name in self._lora_sets:  # attached factors live on the device they were attached on
                    self._reattach(name)
        return self.experts[name]

    # -- adapters ------------------------------------------------------------------------------------
    def add_lora(self, path: str | Path, strength: float = 1.0, expert: str | None = None,
                 merge: bool = False) -> str:
        """Apply a LoRA file (any of the four formats) or a folder of per-expert files; returns a report.

        A file whose metadata names its expert (our exports do) applies to that expert only; `expert`
        overrides; otherwise it applies to every expert. A folder with `expert` given applies that expert's
        file (<expert>.safetensors, as our exports name them) when there is one. merge=True folds it into the
        weights (fastest, permanent; the same file twice is refused); else it is attached, can be switched
        off with `set_adapters([])`, and adding the same file again replaces it (a new strength).
        """
        from .lora_formats import META_EXPERT, load_lora

        path = Path(path)
        if expert and expert not in self.experts:  # before any file is read (an A14B expert's is about 0.3 GB)
            raise ValueError(f"{path}: expert {expert!r} was asked for, but {self.preset.name} has experts "
                             f"{sorted(self.experts)}")
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))  # top level only: diffusers/ holds the same adapters
            if not files:
                raise FileNotFoundError(f"{path}: no .safetensors LoRA files in this folder")
            if expert and path / f"{expert}.safetensors" in files:
                files = [path / f"{expert}.safetensors"]  # not the other experts' files on this one
            return "\n".join(self.add_lora(f, strength, expert, merge) for f in files)
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._loaded_loras:  # read once: switching between adapters then only re-hooks
            if len(self._loaded_loras) >= LORA_CACHE_FILES:
                self._loaded_loras.pop(next(iter(self._loaded_loras)))  # the oldest read
            self._loaded_loras[key] = load_lora(path, config=self.preset.transformer)
        weights, report = self._loaded_loras[key]
        target = expert or report.metadata.get(META_EXPERT)
        targets = [target] if target else list(self.experts)
        unknown = [t for t in targets if t not in self.experts]  # the expert the file's metadata names
        if unknown:
            raise ValueError(f"{path}: LoRA is for expert {unknown[0]!r}, but {self.preset.name} has experts "
                             f"{sorted(self.experts)}; pass @EXPERT to choose one")
        if merge and self.speed.fp8_weights != "none":
            raise ValueError(f"{path}: merging a LoRA needs the base weights in bf16, but they are in fp8 "
                             f"({self.speed.fp8_weights}); drop --merge (attached LoRAs cost ~1%) or the fp8 option")
        merged_before = [name for name in targets if (name, key[0]) in self._merged] if merge else []
        if merged_before:
            raise ValueError(f"{path}: already merged into the {merged_before[0]} expert; merging it again would "
                             f"add it twice: give one --lora with the strength wanted")
        diffs = report.diffs
        for name in targets:
            for parameter in diffs:  # every difference lands on a parameter it can change, before anything moves
                difference_target(self.experts[name], parameter, path)
            if merge and (self._diffs.get(name) or str(path) in self._attached.get(name, {})):
                # The attached differences keep the parameters' originals to restore: a merge under them would
                # be undone by the next switch (and a merge of an attached file would add it twice).
                raise ValueError(f"{path}: the {name} expert has attached LoRAs; merge before attaching, or "
                                 f"call set_adapters([]) first")
        for name in targets:
            if merge:
                merge_loras(self.experts[name], [(weights, strength)], backup_device=None)
                add_differences(self.experts[name], [(diffs, strength)])
                self._merged.add((name, key[0]))
            else:
                if weights:
                    self._attached.setdefault(name, {})[str(path)] = (weights, strength)
                    try:
                        self._reattach(name)
                    except Exception:
                        self._attached[name].pop(str(path))  # the expert keeps the LoRAs it had
                        self._reattach(name)
                        raise
                if diffs:
                    self._diffs.setdefault(name, {})[str(path)] = (diffs, strength)
                    self._reapply_diffs(name)
        lines = [f"LoRA {path} ({report.format}, {len(weights)} modules"
                 + (f", {len(diffs)} parameter differences" if diffs else "")
                 + f", strength {strength}) -> {', '.join(targets)}{' (merged)' if merge else ''}"]
        lines += [f"  not used: {key}: {why}" for key, why in report.unmatched.items()]
        return "\n".join(lines)

    def _reattach(self, name: str) -> None:
        if name in self._lora_sets:
            self._lora_sets.pop(name).detach()
        if self._attached.get(name):
            lora_set = LoraSet(self._attached[name])
            missing = lora_set.attach(self.experts[name])
            if missing:
                lora_set.detach()
                raise ValueError(f"LoRA targets missing in the {name} expert: {missing[:5]}")
            self._lora_sets[name] = lora_set

    @torch.no_grad()
    def _reapply_diffs(self, name: str) -> None:
        """Expert `name`'s parameters as loaded plus strength x difference of each attached file."""
        model, originals = self.experts[name], self._diff_originals.setdefault(name, {})
        attached = list(self._diffs.get(name, {}).values())
        wanted = {parameter for diffs, _ in attached for parameter in diffs}
        for parameter, original in list(originals.items()):
            target = difference_target(model, parameter)
            target.copy_(original.to(target.device))
            if parameter not in wanted:
                del originals[parameter]
        for parameter in wanted - set(originals):
            originals[parameter] = difference_target(model, parameter).detach().to("cpu", copy=True)
        add_differences(model, attached)

    def set_adapters(self, paths: list[str | Path], strength: float = 1.0) -> None:
        """Replace every attached LoRA by `paths` (files or per-expert folders); [] gives the base model."""
        self._attached = {}
        for name in list(self._lora_sets):
            self._lora_sets.pop(name).detach()
        self._diffs = {}
        for name in list(self._diff_originals):
            self._reapply_diffs(name)  # the originals back
        for path in paths:
            self.add_lora(path, strength)

    # -- conditioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        context, lengths = self.text_encoder.encode(prompts)
        return context.to(self.device, self.dtype), lengths.to(self.device)

    @torch.no_grad()
    def _image_condition(self, image: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """Image latents for I2V-A14B (first frame + zero, mid-grey, frames) or TI2V (the first frame alone),
        the image resized as the official generators do: a bicubic resize without clamping for I2V (the
        image's aspect ratio is already the video's, see image_output_size), a Lanczos cover-and-crop for TI2V."""
        if self.preset.task == "i2v":
            img = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", align_corners=False)
        else:
            img = lanczos_cover_crop(image, height, width)[None]
        img = img.to(self.device)  # [1, 3, H, W]
        if self.preset.task == "i2v":
            video = torch.zeros(1, 3, frames, height, width, device=self.device)
            video[:, :, 0] = img
        else:
            video = img[:, :, None]
        return self.vae.encode(video.to(self._vae_dtype()))[0].float()

    def _vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    # -- the loop ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, request: GenerationRequest, progress: bool = False) -> GenerationResult:
        preset, clock = self.preset, {}
        frames = request.frames or preset.frame_num
        height, width, frames = snap_size(request.height or preset.sample_size[0],
                                          request.width or preset.sample_size[1], frames, preset)
        image = request.image
        if image is not None:
            if request.fit_image:
                height, width = image_output_size(preset, tuple(image.shape[-2:]), height, width)
            else:
                image = centre_crop(image, height, width)
        steps = request.steps or preset.sample_steps
        shift = preset.sample_shift if request.shift is None else request.shift
        guide_low, guide_high = request.guide_scale or preset.guide_scale
        if not preset.is_moe and guide_low != guide_high:
            raise ValueError(f"{preset.name} is one model: give one guidance scale, not low-noise {guide_low} and "
                             f"high-noise {guide_high}")
        negative = preset.negative_prompt if request.negative_prompt is None else request.negative_prompt
        if preset.task == "i2v" and request.image is None:
            raise ValueError(f"{preset.name} is image-to-video: pass an image (GenerationRequest.image)")

        start = time.perf_counter()
        context, _ = self.encode_prompts([request.prompt, negative])  # [2, 512, D]: cond, uncond
        clock["text"] = time.perf_counter() - start

        pt, ph, pw = preset.transformer.patch_size
        shape = (preset.vae.z_dim, *preset.latent_size(height, width, frames))
        grid = (shape[1] // pt, shape[2] // ph, shape[3] // pw)
        generator = torch.Generator(device=self.device).manual_seed(request.seed)
        latents = torch.randn(shape, generator=generator, device=self.device, dtype=torch.float32)

        start = time.perf_counter()
        cond_channels = clean_first = None
        if request.image is not None:
            image_latents = self._image_condition(image, frames, height, width)
            if preset.task == "i2v":
                cond_channels = torch.cat([i2v_mask(image_latents[None])[0], image_latents], dim=0)  # [20, F', H', W']
            else:
                clean_first = image_latents[:, :1]  # [48, 1, H', W']
                latents[:, :1] = clean_first
        clock["image"] = time.perf_counter() - start

        solver = make_solver(request.solver, steps=steps, shift=shift,
                             num_train_timesteps=preset.num_train_timesteps)
        kernels = (lambda: attention_backend("fp8")) if self.speed.fp8_attention else contextlib.nullcontext
        start = time.perf_counter()
        timesteps = solver.timesteps.tolist()
        iterator = enumerate(timesteps)
        if progress:
            from tqdm import tqdm
            iterator = tqdm(iterator, total=len(timesteps), desc="sampling", unit="step")
        for index, t in iterator:
            name = self.expert_for(t)
            model = self._activate(name)
            guide = guide_high if name == "high_noise" else guide_low
            x = latents
            if cond_channels is not None:
                x = torch.cat([latents, cond_channels], dim=0)
            # Guidance 1 makes uncond + 1 * (cond - uncond) = cond: the conditional branch alone, half the work.
            branches = 1 if guide == 1.0 else 2
            x = x[None].expand(branches, *x.shape).to(self.dtype)
            t_batch = torch.full((branches,), float(t), device=self.device)
            if preset.task == "ti2v":
                t_batch = token_timesteps(t_batch, torch.full((branches,), clean_first is not None, device=self.device),
                                          grid)
            with kernels(), torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                pred = model(x, t_batch, context[:branches]).float()
            velocity = pred[0] if branches == 1 else pred[1] + guide * (pred[0] - pred[1])
            latents = solver.step(velocity, index, latents)
            if clean_first is not None:
                latents[:, :1] = clean_first
        clock["denoise"] = time.perf_counter() - start

        start = time.perf_counter()
        video = self.vae.decode(latents[None].to(self._vae_dtype()))[0].float().clamp(-1, 1).cpu()
        clock["decode"] = time.perf_counter() - start
        return GenerationResult(video=video, latents=latents.cpu(), seconds=clock)


def _on(device: torch.device, where: torch.device) -> bool:
    """Whether a tensor on `where` is on `device` ('cuda' matches any index, 'cuda:1' only index 1)."""
    return where.type == device.type and (device.index is None or where.index == device.index)


def expected_tokens(preset: ModelPreset, height: int, width: int, frames: int) -> int:
    """Video tokens the DiT sees: 480x832x81 on A14B -> 21 * 30 * 52 = 32,760."""
    t, h, w = preset.latent_stride
    return ((frames - 1) // t + 1) * math.ceil(height / h) * math.ceil(width / w)


def load_pipeline(root: str | Path, preset: str | None = None, device: str = "cuda", dtype=torch.bfloat16,
                  offload_experts: bool = False, text_encoder_device: str | None = None,
                  vae_tiling: bool = False, speed: SamplingSpeed | None = None) -> WanPipeline:
    """Build a pipeline from an official release folder (see `wan_model.release.load_release`)."""
    from .checkpoint import load_transformer
    from .release import load_release
    from .text_encoder import TextEncoder
    from .vae_io import load_vae

    release = load_release(root, preset)
    expert_device = "cpu" if offload_experts else device
    # The parameters the forward reads in float32 stay float32, as the official generator and diffusers keep them.
    experts = {name: load_transformer(path, dtype=dtype, device=expert_device, keep_float32=True)
               for name, path in release.expert_paths.items()}
    vae = load_vae(release.vae_path, release.preset.vae, dtype=torch.float32, device=device)
    if vae_tiling:
        vae.enable_tiling()
    text_encoder = TextEncoder.from_release(release.t5_path, release.tokenizer_path, release.preset.text_encoder,
                                            dtype=dtype, device=text_encoder_device or device)
    return WanPipeline(release.preset, experts, vae, text_encoder, device=device, dtype=dtype,
                       offload_experts=offload_experts, speed=speed)
