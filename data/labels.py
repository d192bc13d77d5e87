"""Aesthetic labels: a fixed vocabulary, measurements from pixels, and user labels that win.

docs/labels.md lists every label and value and how each measurable one is computed. Measurable:
lighting key, colour tone, contrast, camera motion. Composition, shot size, the other lighting values
and the score come only from the user.

    labels = resolve_labels({"shot_size": "close-up", "score": 0.8}, frames)   # frames: [F, 3, H, W] uint8
    labels.lighting, labels.source["lighting"], labels.measurements["brightness_mean"]

Camera motion names what the camera does, as a cinematographer would caption it: when the camera pans
right the scene content moves left in the frame, so content moving left reads "pan right".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping

import torch
import torch.nn.functional as F

LABEL_VALUES: dict[str, tuple[str, ...]] = {
    "lighting": ("high-key", "low-key", "golden hour", "blue hour", "backlit", "silhouette", "soft", "hard",
                 "natural", "neon", "overcast", "candlelit"),
    "colour_tone": ("warm", "cool", "neutral", "saturated", "muted"),
    "contrast": ("low", "medium", "high"),
    "composition": ("centered", "rule of thirds", "symmetrical", "leading lines", "negative space",
                    "frame within frame", "diagonal"),
    "shot_size": ("extreme close-up", "close-up", "medium close-up", "medium", "medium wide", "full", "wide",
                  "extreme wide"),
    "camera_motion": ("static", "pan left", "pan right", "tilt up", "tilt down", "zoom in", "zoom out",
                      "dolly in", "dolly out", "tracking", "orbit", "handheld"),
}
FIELD_ALIASES = {"color_tone": "colour_tone"}
# Which measurements decide each computed label (stored with the label as its evidence).
LABEL_EVIDENCE: dict[str, tuple[str, ...]] = {
    "lighting": ("brightness_mean",),
    "colour_tone": ("warmth", "saturation_mean"),
    "contrast": ("contrast_rms",),
    "camera_motion": ("camera_dx", "camera_dy", "zoom", "jitter", "motion_support"),
}

# Thresholds. Luma, saturation and warmth are in [0, 1] units of gamma-encoded RGB. Motion is per frame
# at the training frame rate (16 fps), as a fraction of the frame width.
LOW_KEY_MAX_BRIGHTNESS = 0.25
HIGH_KEY_MIN_BRIGHTNESS = 0.65
LOW_CONTRAST_MAX_RMS = 0.12
HIGH_CONTRAST_MIN_RMS = 0.25
WARM_MIN_WARMTH = 0.06  # mean(R - B): R x1.06, B x0.94 on mid grey (0.53 - 0.47) is a clear orange cast
COOL_MAX_WARMTH = -0.06
SATURATED_MIN = 0.45
MUTED_MAX = 0.15
PAN_MIN_SPEED = 0.003  # 0.3 % of the width per frame = 5 % per second at 16 fps
ZOOM_MIN_RATE = 0.004  # |log zoom| per frame: 1.004^16 = 6.6 % magnification per second
HANDHELD_MIN_JITTER = 0.004  # frame-to-frame change of camera velocity, fraction of width
# Camera motion is labelled only when at least half of the 4 x 4 tiles can be tracked (confidence >= 0.25):
# on a black or flat background only the subject moves measurably, and its motion is not the camera's.
MIN_MOTION_SUPPORT = 0.5
TRACKABLE_MIN_CONFIDENCE = 0.25

_MOTION_SIZE = 128  # grey frames are resized to 128 x 128 for motion: cheap FFTs, 1/128 = 0.8 % resolution
_COLOUR_LONG_SIDE = 256  # colour statistics on frames shrunk to this long side (antialiased)
_PEAK_SIGMA = 2.0  # Gaussian low-pass on the correlation surface, px: a smooth peak for sub-pixel fits


class LabelError(ValueError):
    """An unknown label name or value; the message names the field, the value and the valid values."""


@dataclass
class Measurements:
    """Numbers measured from frames (see `measure`); all floats, JSON-friendly via dataclasses.asdict.

    brightness_mean: mean luma Y' = 0.2126 R + 0.7152 G + 0.0722 B, in [0, 1]
    brightness_spread: standard deviation over time of the per-frame mean luma (flicker / fades)
    contrast_rms: standard deviation of luma within a frame, averaged over frames
    contrast_p5_p95: 95th minus 5th percentile of luma within a frame, averaged over frames
    saturation_mean: mean of (max - min) / max(max, 0.1) over RGB (HSV saturation, damped for near-black)
    warmth: mean of R - B, the colour temperature proxy (> 0 warm/orange, < 0 cool/blue)
    camera_dx: mean camera motion per frame, fraction of width; > 0 the camera pans right
    camera_dy: mean camera motion per frame, fraction of width; > 0 the camera tilts up
    zoom: mean magnification per frame (geometric mean); > 1 zoom in (content grows)
    jitter: RMS frame-to-frame change of the camera velocity (dx, dy), fraction of width; shake
    motion_support: fraction of 4 x 4 tiles trackable between frames (correlation confidence >= 0.25),
      averaged over frame pairs; 0 for one frame
    """

    brightness_mean: float
    brightness_spread: float
    contrast_rms: float
    contrast_p5_p95: float
    saturation_mean: float
    warmth: float
    camera_dx: float
    camera_dy: float
    zoom: float
    jitter: float
    motion_support: float


@dataclass
class AestheticLabels:
    """Labels of one clip. Each label is None when neither given nor measurable.

    source[field] is 'user' or 'computed' for every label that is set (score included);
    measurements holds every measured number (Measurements as a dict) when frames were measured.
    """

    lighting: str | None = None
    colour_tone: str | None = None
    contrast: str | None = None
    composition: str | None = None
    shot_size: str | None = None
    camera_motion: str | None = None
    score: float | None = None
    source: dict[str, Literal["user", "computed"]] = field(default_factory=dict)
    measurements: dict[str, float] = field(default_factory=dict)

    def labels(self) -> dict[str, str]:
        """The set labels (not the score), in vocabulary order: {'lighting': 'low-key', ...}."""
        return {name: getattr(self, name) for name in LABEL_VALUES if getattr(self, name) is not None}

    def as_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def _luma(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3, H, W] in [0, 1] -> [..., H, W] Rec. 709 luma."""
    return 0.2126 * rgb[..., 0, :, :] + 0.7152 * rgb[..., 1, :, :] + 0.0722 * rgb[..., 2, :, :]


def _shrink(frames: torch.Tensor, long_side: int) -> torch.Tensor:
    """[F, 3, H, W] uint8 -> float in [0, 1], long side at most `long_side` (antialiased)."""
    h, w = frames.shape[-2:]
    scale = long_side / max(h, w)
    if scale < 1:
        frames = F.interpolate(frames, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                               mode="bilinear", antialias=True, align_corners=False)
    return frames.float() / 255.0


def _consecutive_shifts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Translation between consecutive frames by phase correlation, sub-pixel.

    x: [F, ..., h, w] -> shift [F - 1, ..., 2] (dy, dx) px with x[t+1](p) ~ x[t](p - shift), and
    confidence [F - 1, ...] in ~[0, 1]. Each frame is windowed (Hann) and transformed once (rfft2).
    R = F_b conj(F_a) / |F_b conj(F_a)| keeps only the phase difference exp(-i k.shift); its inverse FFT
    is a delta at `shift`. A Gaussian low-pass G turns the delta into a Gaussian bump, whose log is a
    parabola, so a 3-point parabola fit of log r around the peak gives the sub-pixel offset exactly.
    Confidence = peak height / mean(G): 1 for a perfect translation, ~0 for unrelated or flat images.
    """
    lead, (h, w) = x.shape[1:-2], x.shape[-2:]
    window = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    spectra = torch.fft.rfft2((x - x.mean((-2, -1), keepdim=True)) * window)
    cross = spectra[1:] * spectra[:-1].conj()
    cross = cross / cross.abs().clamp_min(1e-9)
    fy, fx = torch.fft.fftfreq(h), torch.fft.fftfreq(w)
    gauss = torch.exp(-2 * math.pi ** 2 * _PEAK_SIGMA ** 2 * (fy[:, None] ** 2 + fx[None, :] ** 2))  # [h, w]
    surface = torch.fft.irfft2(cross * gauss[:, : w // 2 + 1], s=(h, w)).reshape(-1, h, w)
    n = surface.shape[0]
    flat = surface.reshape(n, -1).argmax(1)
    iy, ix = flat // w, flat % w
    rows = torch.arange(n)
    peak = surface[rows, iy, ix]

    def offset(minus: torch.Tensor, plus: torch.Tensor) -> torch.Tensor:
        lm, l0, lp = (v.clamp_min(1e-6).log() for v in (minus, peak, plus))
        curvature = lm - 2 * l0 + lp
        sub = torch.where(curvature < -1e-6, (lm - lp) / (2 * curvature), torch.zeros_like(curvature))
        return sub.clamp(-0.5, 0.5)

    dy = iy.float() + offset(surface[rows, (iy - 1) % h, ix], surface[rows, (iy + 1) % h, ix])
    dx = ix.float() + offset(surface[rows, iy, (ix - 1) % w], surface[rows, iy, (ix + 1) % w])
    dy = torch.where(dy > h / 2, dy - h, dy)  # indices past the middle are negative shifts (FFT wraps)
    dx = torch.where(dx > w / 2, dx - w, dx)
    shape = (x.shape[0] - 1, *lead)
    return torch.stack([dy, dx], 1).reshape(*shape, 2), (peak / gauss.mean()).reshape(shape)


def _tile_shifts(grey: torch.Tensor, size: int, stride: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local motion: phase correlation of `size` px tiles every `stride` px between consecutive frames.

    grey: [F, S, S] -> shifts [F - 1, L, 2] (dy, dx) px, confidences [F - 1, L], tile centres [L, 2]
    (y, x) px from the frame centre, L = ((S - size) / stride + 1)^2.
    """
    f, s, _ = grey.shape
    tiles = F.unfold(grey[:, None], size, stride=stride)  # [F, size * size, L]
    count = tiles.shape[-1]
    tiles = tiles.transpose(1, 2).reshape(f, count, size, size)
    shift, conf = _consecutive_shifts(tiles)
    per_side = (s - size) // stride + 1
    centre = torch.arange(per_side, dtype=torch.float32) * stride + size / 2 - s / 2
    cy, cx = torch.meshgrid(centre, centre, indexing="ij")
    centres = torch.stack([cy.reshape(-1), cx.reshape(-1)], 1)
    return shift, conf, centres


def _global_shift(whole: torch.Tensor, tiles: torch.Tensor) -> torch.Tensor:
    """Camera translation per frame: the whole-frame phase correlation peak, unless fewer tiles agree with
    it than with the tiles' median (a moving subject produced the strongest peak); then the median.

    whole: [F - 1, 2], tiles: [F - 1, L, 2] -> [F - 1, 2]. A tile agrees within max(1, |shift| / 2) px.
    """
    median = tiles.median(1).values

    def support(candidate: torch.Tensor) -> torch.Tensor:
        tolerance = candidate.norm(dim=1, keepdim=True).mul(0.5).clamp_min(1.0)
        return ((tiles - candidate[:, None]).norm(dim=2) < tolerance).sum(1)

    return torch.where((support(whole) >= support(median))[:, None], whole, median)


def _zoom_rates(shift: torch.Tensor, conf: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Per-frame log magnification from the divergence of tile shifts.

    shift: [F - 1, L, 2], conf: [F - 1, L], centres: [L, 2] -> [F - 1]. A zoom by z about the centre
    moves a tile at offset c_i by (z - 1) c_i, so after removing the mean translation the weighted
    least-squares rate is z - 1 = sum_i w_i c_i . (d_i - d_mean) / sum_i w_i |c_i - c_mean|^2, with
    w_i the correlation confidence.
    """
    weight = conf.clamp_min(0)[..., None] + 1e-6
    wsum = weight.sum(1, keepdim=True)
    cc = centres - (weight * centres).sum(1, keepdim=True) / wsum
    dd = shift - (weight * shift).sum(1, keepdim=True) / wsum
    rate = (weight * cc * dd).sum((1, 2)) / (weight * cc * cc).sum((1, 2))
    return torch.log1p(rate.clamp_min(-0.5))


def measure(frames: torch.Tensor) -> Measurements:
    """Measure brightness, contrast, colour and global camera motion of a clip.

    frames: [F, 3, H, W] uint8 RGB, ideally at the training frame rate (motion is per frame).
    Colour statistics run on frames shrunk to a 256 px long side. Motion: grey frames resized to
    128 x 128; the global shift between consecutive frames by phase correlation (torch.fft), converted
    from content motion to camera motion (camera right = content left), falling back to the median of
    4 x 4 tile shifts when a moving subject outweighs the background; zoom from the divergence of
    3 x 3 overlapping tile shifts. One frame (an image) gives zero motion and zoom 1.
    """
    if frames.dim() != 4 or frames.shape[1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"measure expects [F, 3, H, W] uint8 frames, found {tuple(frames.shape)} {frames.dtype}")
    num, _, height, width = frames.shape
    rgb = _shrink(frames, _COLOUR_LONG_SIDE)  # [F, 3, h, w] in [0, 1]
    luma = _luma(rgb)  # [F, h, w]
    per_frame = luma.flatten(1)
    high, low = rgb.amax(1), rgb.amin(1)
    # Percentiles from every other pixel in each direction: a quarter of the sort, same 5 % / 95 % levels.
    quantiles = torch.quantile(luma[:, ::2, ::2].flatten(1), torch.tensor([0.05, 0.95]), dim=1)  # [2, F]
    colour = dict(
        brightness_mean=per_frame.mean(),
        brightness_spread=per_frame.mean(1).std(correction=0),
        contrast_rms=per_frame.std(1, correction=0).mean(),
        contrast_p5_p95=(quantiles[1] - quantiles[0]).mean(),
        saturation_mean=((high - low) / high.clamp_min(0.1)).mean(),
        warmth=(rgb[:, 0] - rgb[:, 2]).mean(),
    )
    motion = dict(camera_dx=0.0, camera_dy=0.0, zoom=1.0, jitter=0.0, motion_support=0.0)
    if num >= 2:
        grey = F.interpolate(luma[:, None], size=(_MOTION_SIZE, _MOTION_SIZE), mode="bilinear", antialias=True,
                             align_corners=False)[:, 0]
        whole, _ = _consecutive_shifts(grey)  # content shift, px of the 128-px frame
        # Zoom from 3 x 3 overlapping half-frame tiles: smaller tiles bias sub-pixel shifts toward zero
        # (the fixed window dominates) and measured half the true zoom. The subject check uses 4 x 4
        # separate tiles, so a moving subject stays in few of them.
        tiles, conf, centres = _tile_shifts(grey, _MOTION_SIZE // 2, _MOTION_SIZE // 4)
        small_tiles, small_conf, _ = _tile_shifts(grey, _MOTION_SIZE // 4, _MOTION_SIZE // 4)
        shift = _global_shift(whole, small_tiles)
        # Content right -> camera left; content down -> camera up. dy is in units of the height: rescale
        # to the width so equal pixel motion gives equal numbers on both axes.
        velocity = torch.stack([-shift[:, 1], shift[:, 0] * (height / width)], 1) / _MOTION_SIZE  # [F-1, 2]
        jitter = (velocity[1:] - velocity[:-1]).square().sum(1).mean().sqrt() / math.sqrt(2) if num >= 3 else 0.0
        motion = dict(camera_dx=velocity[:, 0].mean(), camera_dy=velocity[:, 1].mean(),
                      zoom=_zoom_rates(tiles, conf, centres).mean().exp(), jitter=jitter,
                      motion_support=(small_conf >= TRACKABLE_MIN_CONFIDENCE).float().mean())
    return Measurements(**{k: float(v) for k, v in {**colour, **motion}.items()})


def labels_from_measurements(m: Measurements) -> dict[str, str]:
    """The measurable labels (lighting key, colour tone, contrast, camera motion) from measurements.

    lighting: low-key if brightness < 0.25, high-key if > 0.65, else not labelled.
    colour_tone: warm / cool if |warmth| >= 0.06, else saturated if saturation >= 0.45, muted if <= 0.15,
      else neutral.
    contrast: low if RMS < 0.12, high if >= 0.25, else medium.
    camera_motion, only if motion_support >= 0.5 (so never for an image), first rule that holds:
      handheld if jitter >= 0.004; zoom in / out if |log zoom| >= 0.004; pan or tilt along the dominant
      axis if its speed >= 0.003; else static.
    """
    out: dict[str, str] = {}
    if m.brightness_mean < LOW_KEY_MAX_BRIGHTNESS:
        out["lighting"] = "low-key"
    elif m.brightness_mean > HIGH_KEY_MIN_BRIGHTNESS:
        out["lighting"] = "high-key"
    if m.warmth >= WARM_MIN_WARMTH:
        out["colour_tone"] = "warm"
    elif m.warmth <= COOL_MAX_WARMTH:
        out["colour_tone"] = "cool"
    elif m.saturation_mean >= SATURATED_MIN:
        out["colour_tone"] = "saturated"
    elif m.saturation_mean <= MUTED_MAX:
        out["colour_tone"] = "muted"
    else:
        out["colour_tone"] = "neutral"
    if m.contrast_rms < LOW_CONTRAST_MAX_RMS:
        out["contrast"] = "low"
    elif m.contrast_rms >= HIGH_CONTRAST_MIN_RMS:
        out["contrast"] = "high"
    else:
        out["contrast"] = "medium"
    log_zoom = math.log(m.zoom)
    if m.motion_support < MIN_MOTION_SUPPORT:
        return out
    if m.jitter >= HANDHELD_MIN_JITTER:
        out["camera_motion"] = "handheld"
    elif abs(log_zoom) >= ZOOM_MIN_RATE:
        out["camera_motion"] = "zoom in" if log_zoom > 0 else "zoom out"
    elif max(abs(m.camera_dx), abs(m.camera_dy)) >= PAN_MIN_SPEED:
        if abs(m.camera_dx) >= abs(m.camera_dy):
            out["camera_motion"] = "pan right" if m.camera_dx > 0 else "pan left"
        else:
            out["camera_motion"] = "tilt up" if m.camera_dy > 0 else "tilt down"
    else:
        out["camera_motion"] = "static"
    return out


def _key(text: str) -> str:
    """Spelling-insensitive form: 'High_Key', 'high key' and 'high-key' compare equal."""
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def _suggest(value: str, options: list[str]) -> str:
    close = difflib.get_close_matches(_key(value), [_key(o) for o in options], n=1, cutoff=0.5)
    if not close:
        return ""
    return f" (did you mean {options[[_key(o) for o in options].index(close[0])]!r}?)"


def validate_user_labels(user: Mapping[str, object]) -> dict[str, object]:
    """Check user labels against the vocabulary; returns them in canonical spelling (score as float).

    Names and values are matched ignoring case, '_', '-' and extra spaces ('High_Key' -> 'high-key');
    'color_tone' is accepted for 'colour_tone'. None values count as absent.
    """
    fields = list(LABEL_VALUES) + ["score"]
    by_key = {_key(n): n for n in fields} | {_key(alias): n for alias, n in FIELD_ALIASES.items()}
    out: dict[str, object] = {}
    for raw_name, value in user.items():
        name = by_key.get(_key(str(raw_name)))
        if name is None:
            raise LabelError(f"unknown label {raw_name!r}{_suggest(str(raw_name), fields)}; "
                             f"valid labels: {', '.join(fields)}")
        if value is None:
            continue
        if name == "score":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise LabelError(f"label 'score' must be a finite number, found {value!r}")
            out[name] = float(value)
            continue
        options = list(LABEL_VALUES[name])
        match = [o for o in options if _key(o) == _key(str(value))]
        if not isinstance(value, str) or not match:
            raise LabelError(f"label {name!r} has unknown value {value!r}{_suggest(str(value), options)}; "
                             f"valid values: {', '.join(options)}")
        out[name] = match[0]
    return out


def resolve_labels(user: Mapping[str, object], frames: torch.Tensor | None) -> AestheticLabels:
    """User labels, completed by measured ones where the user gave none.

    user: {'lighting': 'golden hour', 'score': 0.7, ...} (validated by `validate_user_labels`; an unknown
      name or value raises LabelError). frames: [F, 3, H, W] uint8 or None (None: user labels only).
    A computed label is stored with source 'computed' and all measurements; a user label with 'user'.
    Images (F = 1) and clips without a trackable background get no camera_motion label.
    """
    given = validate_user_labels(user)
    result = AestheticLabels(**given, source={name: "user" for name in given})
    if frames is None:
        return result
    measured = measure(frames)
    result.measurements = dataclasses.asdict(measured)
    for name, value in labels_from_measurements(measured).items():
        if name not in given:
            setattr(result, name, value)
            result.source[name] = "computed"
    return result
