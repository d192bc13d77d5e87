"""Wan video VAEs: causal 3D building blocks, the shared encode/decode machinery, and the Wan 2.1 VAE.

Parameter names are those of the official `wan/modules/vae2_1.py` (`encoder.downsamples.0.residual.2.weight`,
`conv1.weight`, `decoder.head.2.weight`, ...), so the released `Wan2.1_VAE.pth` loads with
`load_state_dict(strict=True)`. The Wan 2.2 VAE (`vae22.py`) reuses every block here.

Causality in time: a 3x3x3 convolution sees the current frame and the two before it, never later ones.
Videos of 1 + 4k frames are encoded in temporal chunks (the first frame, then 4 frames at a time) and
latents decoded one latent frame at a time; each causal layer carries the last frames of its input to
the next chunk in a `CausalCache`, so activation memory is bounded by one chunk, not the clip. All
tensors are batched: `[B, C, F, H, W]`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig

# Frames of its input each causal 3x3x3 layer keeps for the next chunk (its temporal kernel minus one).
CACHE_T = 2

# Per-channel statistics of Wan 2.1 latents (`Wan2_1_VAE.__init__` in vae2_1.py): z = (mu - mean) / std.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)
# DiagonalGaussian log-variance clamp of the official `sample` and diffusers: keeps exp() finite.
LOGVAR_RANGE = (-30.0, 20.0)


class CausalCache:
    """State carried between temporal chunks of one encode or decode pass (one per pass, per tile).

    `tails[layer]` holds the last input frames of a causal layer (or the marker `REPEAT` for the first
    chunk of a temporal upsampler); `first_chunk` tells the Wan 2.2 duplicate-up shortcut to drop the
    frame that precedes the video.
    """

    REPEAT = "repeat"

    def __init__(self) -> None:
        self.tails: dict[nn.Module, Tensor | str] = {}
        self.first_chunk = True


class CausalConv3d(nn.Conv3d):
    """Conv3d padded in time on the past side only: output frame t sees input frames t-k+1 .. t.

    Spatial zero padding is left to the convolution itself (no padded copy of the input); in time,
    `2 * padding[0]` frames are prepended: the cached frames of the previous chunk, then zeros.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        pad = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, pad[1], pad[2]))
        self.time_pad = 2 * pad[0]

    def forward(self, x: Tensor, prev: Tensor | None = None) -> Tensor:
        """x: [B, C, T, H, W]; prev: [B, C, <=time_pad, H, W] frames before x, or None -> [B, C', T', H, W]."""
        pad = self.time_pad
        if prev is not None and pad > 0:
            x = torch.cat([prev.to(x.dtype), x], dim=2)
            pad -= prev.shape[2]
        if pad > 0:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))
        return super().forward(x)


def causal_step(conv: CausalConv3d, x: Tensor, cache: CausalCache) -> Tensor:
    """Run a causal 3x3x3 conv on one chunk and remember its last CACHE_T input frames for the next chunk.

    A one-frame chunk keeps the last frame of the previous tail too, so the next chunk still sees two
    frames of past (as the official feature cache does).
    """
    prev = cache.tails.get(conv)
    tail = x[:, :, -CACHE_T:]
    if tail.shape[2] < CACHE_T and prev is not None:
        tail = torch.cat([prev[:, :, -1:], tail], dim=2)
    cache.tails[conv] = tail.clone()
    return conv(x, prev)


class RMSNorm(nn.Module):
    """y = x / ||x||_2 * sqrt(C) * gamma over the channel axis (dim 1); in fp32 for low-precision inputs.

    gamma: [C, 1, 1, 1] for videos (`images=False`), [C, 1, 1] for the per-frame attention input.
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.normalize(x, dim=1) * (self.gamma * self.scale)
        # Low precision: the norm is reduced in fp32 without an fp32 copy of x (at 256 x 4 x 352 x 640 a copy
        # is 0.9 GB per norm); only the per-position factor 1 / ||x|| is rounded to x's dtype.
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
        return x * norm.clamp_min(1e-12).reciprocal().to(x.dtype) * (self.gamma * self.scale).to(x.dtype)


def frames_to_images(x: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W]."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def images_to_frames(x: Tensor, b: int) -> Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W]."""
    bt, c, h, w = x.shape
    return x.view(b, bt // b, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """2x spatial down/up-sampling per frame, plus 2x in time for the '3d' modes.

    downsample3d: frames are paired by a stride-2 causal conv over (last frame of previous chunk, chunk);
    the first chunk (one frame) passes unchanged, so 1 + 2k frames -> 1 + k.
    upsample3d: `time_conv` makes 2C channels that interleave into 2 frames per frame; the first chunk
    (one latent frame) is not doubled, so 1 + k frames -> 1 + 2k.
    `out_dim` of the upsampling conv: dim // 2 in Wan 2.1, dim in Wan 2.2.
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            # Pad right/bottom only so that a stride-2 3x3 conv maps H -> H/2 with the official alignment.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode must be up/downsample2d/3d, got {mode!r}")

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, C, T, H, W] -> [B, C', T', 2H, 2W] (upsample) or [B, C, T', H/2, W/2] (downsample)."""
        b = x.shape[0]
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        x = images_to_frames(self.resample(frames_to_images(x)), b)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def _double_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        state = cache.tails.get(self.time_conv)
        if state is None:
            cache.tails[self.time_conv] = CausalCache.REPEAT
            return x
        tail = x[:, :, -CACHE_T:]
        if tail.shape[2] < CACHE_T:
            before = torch.zeros_like(tail) if state is CausalCache.REPEAT else state[:, :, -1:]
            tail = torch.cat([before, tail], dim=2)
        # The second chunk convolves with zeros for its past, as the official 'Rep' state does.
        y = self.time_conv(x, None if state is CausalCache.REPEAT else state)
        cache.tails[self.time_conv] = tail.clone()
        b, c2, t, h, w = y.shape
        # Channels [0, C) make frame 2t, [C, 2C) frame 2t+1.
        return y.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _halve_frames(self, x: Tensor, cache: CausalCache) -> Tensor:
        prev = cache.tails.get(self.time_conv)
        cache.tails[self.time_conv] = x[:, :, -1:].clone()
        if prev is None:
            return x
        return self.time_conv(torch.cat([prev, x], dim=2))


class ResidualBlock(nn.Module):
    """x + F(x) with F = conv(SiLU(norm(conv(SiLU(norm(x)))))); a 1x1x1 conv shortcut where widths differ.

    `residual` keeps the official Sequential indices: 0 norm, 2 conv, 3 norm, 5 dropout, 6 conv.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        r = self.residual
        h = causal_step(r[2], F.silu(r[0](x)), cache)
        h = causal_step(r[6], r[5](F.silu(r[3](h))), cache)
        return h + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame separately (no mixing in time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, cache: CausalCache | None = None) -> Tensor:
        """x: [B, C, T, H, W] -> same; softmax(q k^T / sqrt(C)) v per frame, plus x."""
        b, c, t, h, w = x.shape
        y = self.to_qkv(self.norm(frames_to_images(x)))
        q, k, v = y.view(b * t, 1, 3 * c, h * w).transpose(2, 3).chunk(3, dim=-1)  # each [B*T, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + images_to_frames(self.proj(y), b)


def residual_blocks(in_dim: int, out_dim: int, count: int) -> list[ResidualBlock]:
    """`count` ResidualBlocks, the first changing the width in_dim -> out_dim."""
    return [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(count)]


def middle_block(dim: int) -> nn.Sequential:
    """`middle`: residual, attention, residual (official indices 0, 1, 2)."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def head_block(dim: int, out_dim: int) -> nn.Sequential:
    """`head`: norm (0), SiLU (1), causal 3x3x3 conv (2)."""
    return nn.Sequential(RMSNorm(dim), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


class CausalStack(nn.Module):
    """conv1 -> blocks -> middle -> head, every layer causal in time: the body of an encoder or decoder.

    `blocks` is the official `downsamples` (encoder) or `upsamples` (decoder) Sequential; each of its
    layers is called as `layer(x, cache)`.
    """

    def __init__(self, in_channels: int, first_dim: int, blocks: nn.Sequential, last_dim: int, mid_dim: int,
                 out_channels: int, blocks_name: str, middle_first: bool) -> None:
        super().__init__()
        self.conv1 = CausalConv3d(in_channels, first_dim, 3, padding=1)
        self.middle_first = middle_first
        self.blocks_name = blocks_name
        setattr(self, blocks_name, blocks)
        self.middle = middle_block(mid_dim)
        self.head = head_block(last_dim, out_channels)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, C_in, T, H, W] (one temporal chunk) -> [B, C_out, T', H', W']."""
        x = causal_step(self.conv1, x, cache)
        stages = [self.middle, getattr(self, self.blocks_name)]
        for stage in (stages if self.middle_first else stages[::-1]):
            for layer in stage:
                x = layer(x, cache)
        x = F.silu(self.head[0](x))
        return causal_step(self.head[2], x, cache)


# ------------------------------------------------------------------------------------- Wan 2.1 layout

def encoder21(config: VAEConfig) -> CausalStack:
    """Official vae2_1 `Encoder3d`: per stage `num_res_blocks` ResidualBlocks then a Resample (not the last).

    Widths: dims = base_dim * [1, *dim_mult] = 96, 96, 192, 384, 384; spatial /8 over 3 stages, time /4
    over the stages with temporal_downsample True.
    """
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        layers += residual_blocks(in_dim, out_dim, config.num_res_blocks)
        if i != len(config.dim_mult) - 1:
            layers.append(Resample(out_dim, "downsample3d" if config.temporal_downsample[i] else "downsample2d"))
    return CausalStack(3, dims[0], nn.Sequential(*layers), dims[-1], dims[-1], 2 * config.z_dim,
                       "downsamples", middle_first=False)


def decoder21(config: VAEConfig) -> CausalStack:
    """Official vae2_1 `Decoder3d`: per stage `num_res_blocks + 1` ResidualBlocks then a Resample.

    dims = base * [4, 4, 4, 2, 1]; each upsampling conv halves the width, so stages after the first
    start from in_dim // 2 (384 -> 192 -> ... as in the official channel plan).
    """
    mult = config.dim_mult
    dims = [config.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
    t_up = config.temporal_downsample[::-1]
    layers: list[nn.Module] = []
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        layers += residual_blocks(in_dim // 2 if i > 0 else in_dim, out_dim, config.num_res_blocks + 1)
        if i != len(mult) - 1:
            layers.append(Resample(out_dim, "upsample3d" if t_up[i] else "upsample2d"))
    return CausalStack(config.z_dim, dims[0], nn.Sequential(*layers), dims[-1], dims[0], 3,
                       "upsamples", middle_first=True)


# ------------------------------------------------------------------------------- input checks, tiling

def fit_frames(video: Tensor, temporal_stride: int = 4, mode: str = "pad") -> Tensor:
    """Make the frame count 1 + k * temporal_stride, warning when anything changes.

    video: [B, C, F, H, W]. mode 'pad' repeats the last frame up to the next valid count; 'cut' drops
    frames from the end down to the previous one (81 stays; 80 -> pad 1 or cut 3).
    """
    f = video.shape[2]
    extra = (f - 1) % temporal_stride
    if extra == 0:
        return video
    if mode == "pad":
        n = temporal_stride - extra
        warnings.warn(f"video has {f} frames, not 1 + {temporal_stride}k: padded with {n} repeat(s) of the last "
                      f"frame to {f + n}", stacklevel=3)
        return torch.cat([video, video[:, :, -1:].expand(-1, -1, n, -1, -1)], dim=2)
    if mode == "cut":
        warnings.warn(f"video has {f} frames, not 1 + {temporal_stride}k: cut {extra} frame(s) from the end "
                      f"to {f - extra}", stacklevel=3)
        return video[:, :, :f - extra]
    raise ValueError(f"frame fix mode must be 'pad' or 'cut', got {mode!r}")


def check_spatial(height: int, width: int, stride: int, what: str) -> None:
    """Raise if height or width is not a multiple of `stride`, naming the nearest valid sizes."""
    for name, size in (("height", height), ("width", width)):
        if size % stride:
            lo, hi = size // stride * stride, (size // stride + 1) * stride
            options = f"{lo} or {hi}" if lo else f"{hi}"
            raise ValueError(f"{what}: {name} {size} is not a multiple of the VAE's spatial stride {stride}; "
                             f"nearest valid {name}: {options} (resize or crop the video)")


def tile_starts(total: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of size `tile` covering [0, total) with at least `overlap` shared; the last ends at total."""
    if tile >= total:
        return [0]
    step = tile - overlap
    starts = list(range(0, total - tile, step))
    return starts + [total - tile]


def edge_ramp(length: int, ramp: int, left: bool, right: bool, like: Tensor) -> Tensor:
    """1-D blend weight of a tile: rises over `ramp` samples on a side shared with a neighbour, else 1.

    w(i) = min(1, (i + 1) / (ramp + 1), (length - i) / (ramp + 1)), each term only on a shared side;
    weights stay > 0, so a normalised sum of tiles is defined everywhere.
    """
    i = torch.arange(length, device=like.device, dtype=torch.float32)
    w = torch.ones(length, device=like.device, dtype=torch.float32)
    if ramp > 0 and left:
        w = torch.minimum(w, (i + 1) / (ramp + 1))
    if ramp > 0 and right:
        w = torch.minimum(w, (length - i) / (ramp + 1))
    return w


def blend_tiles(run, x: Tensor, tile: int, overlap: int) -> Tensor:
    """Apply `run` to overlapping spatial tiles of x and blend the results with linear ramps.

    x: [B, C, T, H, W]; tiles are tile x tile sharing `overlap`; `run(tile)` returns [B, C', T', r*h, r*w] for
    a fixed ratio r (1/8 when encoding 2.1 pixels, 8 when decoding 2.1 latents), read from its output.
    out = sum_k w_k * run(x_k) / sum_k w_k, with w_k the outer product of the edge ramps of tile k.
    """
    _, _, _, h, w = x.shape
    hs, ws = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out = norm = None
    for i in hs:
        for j in ws:
            y = run(x[:, :, :, i:i + tile, j:j + tile])
            th, tw = y.shape[-2:]
            r = th / min(tile, h)  # output pixels per input pixel (1/8 encoding, 8 decoding)
            if out is None:
                out = y.new_zeros(*y.shape[:3], round(h * r), round(w * r), dtype=torch.float32)
                norm = y.new_zeros(round(h * r), round(w * r), dtype=torch.float32)
            ramp = round(overlap * r)
            oi, oj = round(i * r), round(j * r)
            wt = (edge_ramp(th, ramp, i > 0, i + tile < h, y)[:, None]
                  * edge_ramp(tw, ramp, j > 0, j + tile < w, y)[None, :])
            out[..., oi:oi + th, oj:oj + tw] += y.float() * wt
            norm[oi:oi + th, oj:oj + tw] += wt
    return (out / norm).to(y.dtype)


# ----------------------------------------------------------------------------------------- the VAEs

class WanVAEBase(nn.Module):
    """Encode / decode shared by the Wan 2.1 and 2.2 VAEs. Subclasses set the layout and constants.

    Parameters (official names): `encoder`, `conv1` (moments 2z -> 2z), `conv2` (z -> z), `decoder`.
    Videos: [B, 3, F, H, W] in [-1, 1], F = 1 + 4k. Latents: [B, z, 1 + k, H / s, W / s], normalised.
    """

    kind = ""
    latents_mean: tuple[float, ...] = ()
    latents_std: tuple[float, ...] = ()

    def __init__(self, config: VAEConfig, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        if config.kind != self.kind:
            raise ValueError(f"{type(self).__name__} needs a VAEConfig of kind {self.kind!r}, got {config.kind!r}")
        if len(self.latents_mean) != config.z_dim:
            raise ValueError(f"{self.kind} VAE: z_dim must be {len(self.latents_mean)} (one mean/std per latent "
                             f"channel of the release), got {config.z_dim}")
        self.config = config
        self.encoder = encoder
        self.conv1 = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.conv2 = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = decoder
        self.tiling: tuple[int, int] | None = None

    @property
    def z_dim(self) -> int:
        return self.config.z_dim

    @property
    def stride(self) -> tuple[int, int, int]:
        return self.config.stride

    # ---- layout hooks: pixels <-> the channels the encoder reads and the decoder writes
    def to_encoder_input(self, video: Tensor) -> Tensor:
        return video

    def from_decoder_output(self, x: Tensor) -> Tensor:
        return x

    # ---- tiling
    def enable_tiling(self, tile_px: int = 256, overlap_px: int = 64) -> None:
        """Encode/decode frames larger than tile_px in tile_px x tile_px tiles sharing overlap_px, blended.

        Both must be multiples of the spatial stride (8 for 2.1, 16 for 2.2) so tiles align with latents.
        Memory then scales with the tile, not the frame; the seams are blended linearly over the overlap.
        """
        s = self.stride[1]
        if tile_px % s or overlap_px % s or not 0 <= overlap_px < tile_px:
            raise ValueError(f"enable_tiling: tile_px {tile_px} and overlap_px {overlap_px} must be multiples of "
                             f"the spatial stride {s} with 0 <= overlap_px < tile_px (e.g. 256 and 64)")
        self.tiling = (tile_px, overlap_px)

    def disable_tiling(self) -> None:
        self.tiling = None

    def latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """Latent mean and std as [1, z, 1, 1, 1] fp32 on like's device."""
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, device=like.device).view(shape)
        std = torch.tensor(self.latents_std, device=like.device).view(shape)
        return mean, std

    # ---- encode
    def _param_dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _check_video(self, video: Tensor, frame_fix: str) -> Tensor:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"{self.kind} VAE encode: video must be [B, 3, F, H, W], got {tuple(video.shape)}")
        check_spatial(video.shape[3], video.shape[4], self.stride[1], f"{self.kind} VAE encode")
        return fit_frames(video, self.stride[0], frame_fix)

    def _moments_untiled(self, video: Tensor) -> Tensor:
        """video: [B, 3, F, H, W] -> raw moments [B, 2z, 1 + (F-1)/4, H/s, W/s] (mu, logvar; not normalised).

        Chunks: frame 0 alone, then 4 frames at a time, through one CausalCache.
        """
        x = self.to_encoder_input(video.to(self._param_dtype()))
        cache = CausalCache()
        outs = []
        step = self.stride[0]  # one chunk of frames per latent frame after the first
        for start in range(0, x.shape[2], step):
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - step + 1:start + 1]
            cache.first_chunk = start == 0
            outs.append(self.encoder(chunk, cache))
        return self.conv1(torch.cat(outs, dim=2))

    def _moments(self, video: Tensor) -> Tensor:
        if self.tiling is None:
            return self._moments_untiled(video)
        tile, overlap = self.tiling
        return blend_tiles(self._moments_untiled, video, tile, overlap)

    def encode_distribution(self, video: Tensor, frame_fix: str = "pad") -> tuple[Tensor, Tensor]:
        """video: [B, 3, F, H, W] in [-1, 1] -> (mean, logvar), each [B, z, 1 + (F-1)/4, H/s, W/s], fp32.

        Both in normalised units, so a sample of them is a normalised latent:
            mean_n = (mu - m) / s,  logvar_n = logvar - 2 log s   (std_n = std / s)
            z_n = mean_n + exp(logvar_n / 2) * eps = ((mu + std * eps) - m) / s
        with m, s the release's per-channel latent mean and std; logvar is clamped to [-30, 20] first.
        """
        moments = self._moments(self._check_video(video, frame_fix)).float()
        mu, logvar = moments.chunk(2, dim=1)
        mean, std = self.latent_stats(mu)
        return (mu - mean) / std, logvar.clamp(*LOGVAR_RANGE) - 2 * torch.log(std)

    def encode(self, video: Tensor, frame_fix: str = "pad") -> Tensor:
        """video: [B, 3, F, H, W] in [-1, 1] -> latents [B, z, 1 + (F-1)/4, H/s, W/s], fp32, normalised.

        z = (mu - mean) * (1 / std): the mean of the posterior, as the official `encode` returns.
        F not of the form 1 + 4k is padded (repeat last frame) or cut (frame_fix='cut') with a warning.
        """
        return self.encode_distribution(video, frame_fix)[0]

    # ---- decode
    def _decode_untiled(self, z: Tensor) -> Tensor:
        """z: [B, z, T, h, w] raw latents -> [B, 3, 1 + 4(T-1), h*s, w*s]; one latent frame per chunk."""
        x = self.conv2(z)
        cache = CausalCache()
        outs = []
        for t in range(x.shape[2]):
            cache.first_chunk = t == 0
            outs.append(self.decoder(x[:, :, t:t + 1], cache))
        return self.from_decoder_output(torch.cat(outs, dim=2))

    def decode(self, latents: Tensor) -> Tensor:
        """latents: [B, z, T, h, w] normalised -> video [B, 3, 1 + 4(T-1), h*s, w*s] in [-1, 1], param dtype.

        mu = z * std + mean, then the decoder; output clamped to [-1, 1].
        """
        if latents.dim() != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"{self.kind} VAE decode: latents must be [B, {self.z_dim}, T, h, w], "
                             f"got {tuple(latents.shape)}")
        mean, std = self.latent_stats(latents)
        z = (latents.float() * std + mean).to(self._param_dtype())
        if self.tiling is None:
            video = self._decode_untiled(z)
        else:
            s = self.stride[1]
            tile, overlap = self.tiling
            video = blend_tiles(self._decode_untiled, z, tile // s, overlap // s)
        return video.clamp_(-1.0, 1.0)


class WanVAE21(WanVAEBase):
    """Wan 2.1 VAE (A14B models): z 16, stride 4x8x8, widths 96 * [1, 2, 4, 4], official vae2_1 names."""

    kind = "wan2.1"
    latents_mean = WAN21_LATENTS_MEAN
    latents_std = WAN21_LATENTS_STD

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config, encoder21(config), decoder21(config))
