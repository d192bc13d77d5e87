"""The Wan 2.1 VAE, and the encode/decode machinery (chunking, tiling, latent normalisation) both VAEs share.

Parameter names are those of the official `wan/modules/vae2_1.py` (`encoder.downsamples.0.residual.2.weight`,
`conv1.weight`, `decoder.head.2.weight`, ...), so the released `Wan2.1_VAE.pth` loads with
`load_state_dict(strict=True)`. The layers are in `vae_blocks.py`; the Wan 2.2 VAE (`vae22.py`) subclasses
`WanVAEBase` here with its own layout.

Videos of 1 + 4k frames are encoded in temporal chunks (the first frame, then 4 frames at a time) and
latents decoded one latent frame at a time, through one `CausalCache` per pass (per tile when tiling),
so activation memory is bounded by one chunk, not the clip. All tensors are batched: `[B, C, F, H, W]`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .config import VAEConfig
from .vae_blocks import CausalCache, CausalConv3d, CausalStack, Resample, residual_blocks

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
