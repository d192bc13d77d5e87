"""A tiny procedural video dataset: the built-in demo that needs no download.

`render_demo_dataset(folder)` writes, for the default 6 clips::

    folder/clip_00_pan_right.mp4   + clip_00_pan_right.txt        (captions as .txt sidecars: first half)
    folder/clip_01_zoom_in.mp4     + clip_01_zoom_in.txt
    folder/clip_02_shapes_cool.mp4 + clip_02_shapes_cool.txt
    folder/clip_03_dark.mp4 ... clip_05_pan_left.mp4           (captions in metadata.jsonl: second half)
    folder/metadata.jsonl   one JSON object per line:
        {"file_name": "clip_03_dark.mp4", "caption": "...", "labels": {"shot_size": "wide", "score": 0.4}}

Each clip is a smooth random texture seen by a virtual camera (pan, tilt, zoom or still) with moving
shapes and a colour grade (warm, cool, dark, bright, saturated), H.264 yuv420p at crf 23: 33 frames of
64 x 96 take about 10-30 KB. `render_clip` returns the same frames as a tensor for tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from wan_model.files import atomic_write_text
from wan_model.media import write_mp4


@dataclass(frozen=True)
class ClipSpec:
    """One procedural clip. pan / tilt: camera speed in fractions of the frame width / height per frame
    (> 0: camera right / up, so content moves left / down); zoom: magnification per frame (> 1: in)."""

    name: str
    caption: str
    pan: float = 0.0
    tilt: float = 0.0
    zoom: float = 1.0
    grade: str = "none"  # see GRADES
    shape: bool = False  # a disc crossing the frame left to right
    labels: tuple[tuple[str, object], ...] = ()  # user labels written to metadata.jsonl (score included)


DEMO_CLIPS = (
    ClipSpec("pan_right", "a slow camera pan to the right across a mottled stone wall", pan=0.01),
    ClipSpec("zoom_in", "the camera slowly zooms into a sunlit abstract pattern", zoom=1.012, grade="warm"),
    ClipSpec("shapes_cool", "a red ball rolls across a cold blue-grey surface", grade="cool", shape=True),
    ClipSpec("dark", "a dim room where a red ball drifts through the shadows", grade="dark", shape=True,
             labels=(("shot_size", "wide"), ("score", 0.4))),
    ClipSpec("bright", "a bright airy pattern as the camera tilts upward", tilt=0.01, grade="bright",
             labels=(("composition", "centered"), ("lighting", "soft"), ("score", 0.8))),
    ClipSpec("pan_left", "vivid colours slide past as the camera pans left", pan=-0.01, grade="saturated",
             labels=(("shot_size", "extreme wide"), ("score", 0.65))),
)


GRADES = ("none", "warm", "cool", "dark", "bright", "saturated", "mystyle")


def _grade(rgb: torch.Tensor, grade: str) -> torch.Tensor:
    """Colour grades on [..., 3, H, W] floats in [0, 1]: channel gains for warm/cool, gain for dark,
    a lift toward white for bright, a push away from grey for saturated."""
    if grade == "none":
        return rgb
    if grade in ("warm", "cool"):
        gains = torch.tensor([1.25, 1.0, 0.7]) if grade == "warm" else torch.tensor([0.7, 1.0, 1.25])
        return rgb * gains.view(3, 1, 1)
    if grade == "dark":
        return rgb * 0.2
    if grade == "bright":
        return 0.55 + 0.45 * rgb
    if grade == "saturated":
        grey = rgb.mean(-3, keepdim=True)
        return grey + 4.0 * (rgb - grey)
    if grade == "mystyle":
        # The demo's learnable look: a violet-magenta cast (green pulled down, red and blue lifted) over
        # diagonal light/dark bands 32 px apart, coarse enough to survive the VAE's 8 x 8 cells.
        h, w = rgb.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        bands = 0.85 + 0.2 * torch.cos(2 * torch.pi * (xs + ys) / 32)
        cast = torch.tensor([0.95, 0.35, 0.85]).view(3, 1, 1)
        lift = torch.tensor([0.2, 0.0, 0.15]).view(3, 1, 1)
        return (rgb * cast + lift) * bands
    raise ValueError(f"unknown grade {grade!r}; one of {', '.join(GRADES)}")



def _texture(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """[3, height, width] smooth random colour texture in [0, 1]: two octaves of upsampled noise, so
    phase correlation has structure at several scales and H.264 compresses it well."""
    layers = []
    for cells, weight in ((4, 0.4), (12, 0.3), (40, 0.3)):
        noise = torch.rand(1, 3, cells, cells * width // height + 1, generator=generator)
        layers.append(weight * F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=False))
    tex = sum(layers)[0]
    # Mostly grey with a little colour, equal channel means: the ungraded texture is colour-neutral
    # (warmth ~ 0) so the grade alone sets the tone.
    tex = 0.75 * tex.mean(0, keepdim=True) + 0.25 * (tex - tex.mean((1, 2), keepdim=True) + tex.mean())
    lo, hi = tex.amin(), tex.amax()
    return (tex - lo) / (hi - lo)


def render_clip(spec: ClipSpec, size: tuple[int, int] = (64, 96), frames: int = 33,
                seed: int = 0) -> torch.Tensor:
    """Render one clip as [frames, 3, H, W] uint8.

    The camera looks at a texture 3x the frame size; frame t shows the window centred at
    (pan * W * t, -tilt * H * t) px from the texture centre (y grows downward, so tilt up moves the window
    up) at magnification zoom^t, sampled bilinearly (grid_sample) for all frames at once.
    """
    height, width = size
    gen = torch.Generator().manual_seed(seed)
    tex_h, tex_w = 3 * height, 3 * width
    texture = _texture(tex_h, tex_w, gen)
    t = torch.arange(frames, dtype=torch.float32)
    scale = spec.zoom ** -t  # window size relative to one frame: shrinking window = zoom in
    # affine_grid maps output coords in [-1, 1] to input coords in [-1, 1] of the texture.
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = scale * width / tex_w
    theta[:, 1, 1] = scale * height / tex_h
    theta[:, 0, 2] = spec.pan * width * t / (tex_w / 2)
    theta[:, 1, 2] = -spec.tilt * height * t / (tex_h / 2)
    grid = F.affine_grid(theta, [frames, 3, height, width], align_corners=False)
    video = F.grid_sample(texture.expand(frames, -1, -1, -1), grid, mode="bilinear", align_corners=False)
    if spec.shape:
        ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
        cx = (0.15 + 0.7 * t / max(frames - 1, 1)) * width  # left to right across the frame
        radius = 0.1 * height
        inside = ((xs - cx.view(-1, 1, 1)) ** 2 + (ys - height / 2) ** 2) <= radius ** 2  # [F, H, W]
        red = torch.tensor([0.9, 0.15, 0.1]).view(1, 3, 1, 1)
        video = torch.where(inside[:, None], red, video)
    video = _grade(video, spec.grade)
    return (video.clamp(0, 1) * 255).round().to(torch.uint8)


def render_demo_dataset(folder: str | Path, num_clips: int = 6, size: tuple[int, int] = (64, 96),
                        frames: int = 33, fps: int = 16, seed: int = 0, grade: str | None = None) -> Path:
    """Write `num_clips` procedural mp4 clips with captions into `folder` (created); returns the folder.

    Clips cycle through DEMO_CLIPS (clip i uses seed + i for its texture). Captions of the first half
    (rounded up) are .txt sidecars; the rest, with their user labels and score, go to metadata.jsonl.
    grade: one colour grade for every clip (a shared look to learn, e.g. 'mystyle'); None: each clip's own.
    Deterministic for a seed. size = (H, W), even numbers (yuv420p).
    """
    if grade is not None and grade not in GRADES:
        raise ValueError(f"unknown grade {grade!r}; one of {', '.join(GRADES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    sidecars = (num_clips + 1) // 2
    for i in range(num_clips):
        spec = DEMO_CLIPS[i % len(DEMO_CLIPS)]
        if grade is not None:
            spec = dataclasses.replace(spec, grade=grade)
        name = f"clip_{i:02d}_{spec.name}"
        video = render_clip(spec, size, frames, seed + i)
        write_mp4(video.permute(0, 2, 3, 1).numpy(), folder / f"{name}.mp4", fps, crf=23)
        if i < sidecars:
            atomic_write_text(folder / f"{name}.txt", spec.caption + "\n")
        else:
            rows.append({"file_name": f"{name}.mp4", "caption": spec.caption, "labels": dict(spec.labels)})
    if rows:
        atomic_write_text(folder / "metadata.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return folder
