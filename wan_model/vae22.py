"""Wan 2.2 VAE (TI2V-5B): z 48, stride 4x16x16, official `wan/modules/vae2_2.py` parameter names.

Differences from 2.1 (`vae.py`; both build from the layers of `vae_blocks.py` and encode/decode
through `vae.WanVAEBase`):
  * pixels are 2x2-patchified first: [B, 3, F, H, W] -> [B, 12, F, H/2, W/2] (channel = c*4 + dx*2 + dy),
    then three 2x spatial stages, 2 * 8 = 16 pixels per latent; the decoder writes 12 channels back;
  * each encoder stage is a `Down_ResidualBlock`: its residual blocks and resampler plus a parameter-free
    shortcut that averages groups of space-time-to-channel folded values (`avg_down`);
  * each decoder stage is an `Up_ResidualBlock` with a shortcut that duplicates channels and unfolds them
    into space and time (`dup_up`); upsampling convs keep the width (dim -> dim, 2.1 halves it);
  * encoder width 160, decoder width 256.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .config import VAEConfig
from .vae import WanVAEBase
from .vae_blocks import CausalCache, CausalStack, Resample, residual_blocks

# Per-channel statistics of Wan 2.2 latents (`Wan2_2_VAE.__init__` in vae2_2.py): z = (mu - mean) / std.
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)
PATCH = 2  # pixels per side folded into channels before the encoder


def patchify(video: Tensor, p: int = PATCH) -> Tensor:
    """[B, C, F, H, W] -> [B, C*p*p, F, H/p, W/p]; channel c*p*p + dx*p + dy holds pixel (p*h + dy, p*w + dx)."""
    b, c, f, h, w = video.shape
    x = video.view(b, c, f, h // p, p, w // p, p)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x: Tensor, p: int = PATCH) -> Tensor:
    """Inverse of `patchify`: [B, C*p*p, F, h, w] -> [B, C, F, h*p, w*p]."""
    b, cpp, f, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, f, h, w)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, cpp // (p * p), f, h * p, w * p)


def avg_down(x: Tensor, out_channels: int, ft: int, fs: int) -> Tensor:
    """Parameter-free downsampling shortcut: fold ft x fs x fs blocks into channels, average channel groups.

    x: [B, C, T, H, W] -> [B, out_channels, ceil(T/ft), H/fs, W/fs]. T is first front-padded with zeros to a
    multiple of ft (a one-frame first chunk pairs with a zero frame). Folded channel c*ft*fs*fs + (dt, dh, dw)
    then groups of C*ft*fs*fs / out_channels consecutive channels are averaged.
    """
    pad_t = (-x.shape[2]) % ft
    if pad_t:
        x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, out_channels, -1, t // ft, h // fs, w // fs).mean(dim=2)


def dup_up(x: Tensor, out_channels: int, ft: int, fs: int, first_chunk: bool) -> Tensor:
    """Parameter-free upsampling shortcut, the mirror of `avg_down`: repeat channels, unfold into space-time.

    x: [B, C, T, H, W] -> [B, out_channels, T*ft, H*fs, W*fs]; each input channel is repeated
    out_channels*ft*fs*fs / C times. On the first chunk the first ft-1 frames are dropped, matching the
    temporal upsampler that does not double the first latent frame.
    """
    b, c, t, h, w = x.shape
    repeats = out_channels * ft * fs * fs // c
    x = x.repeat_interleave(repeats, dim=1).view(b, out_channels, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, out_channels, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first_chunk else x


class DownResidualBlock(nn.Module):
    """Official `Down_ResidualBlock`: `downsamples` (residual blocks + optional Resample) + avg_down shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, 2 if temporal else 1, 2 if down else 1
        if (in_dim * self.ft * self.fs**2) % out_dim:
            raise ValueError(f"Wan 2.2 VAE: in_dim {in_dim} x factor {self.ft * self.fs**2} must be divisible by "
                             f"out_dim {out_dim}")
        layers: list[nn.Module] = residual_blocks(in_dim, out_dim, num_res_blocks)
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, in_dim, T, H, W] -> [B, out_dim, T', H/fs, W/fs]."""
        shortcut = avg_down(x, self.out_dim, self.ft, self.fs)
        for layer in self.downsamples:
            x = layer(x, cache)
        return x + shortcut


class UpResidualBlock(nn.Module):
    """Official `Up_ResidualBlock`: `upsamples` (residual blocks + optional Resample) + dup_up shortcut."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.up, self.out_dim, self.ft = up, out_dim, 2 if temporal else 1
        if up and (out_dim * self.ft * 4) % in_dim:
            raise ValueError(f"Wan 2.2 VAE: out_dim {out_dim} x factor {self.ft * 4} must be divisible by "
                             f"in_dim {in_dim}")
        layers: list[nn.Module] = residual_blocks(in_dim, out_dim, num_res_blocks)
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: Tensor, cache: CausalCache) -> Tensor:
        """x: [B, in_dim, T, H, W] -> [B, out_dim, T', 2H, 2W] (or same size for the last stage)."""
        y = x
        for layer in self.upsamples:
            y = layer(y, cache)
        if not self.up:
            return y
        return y + dup_up(x, self.out_dim, self.ft, 2, cache.first_chunk)


def encoder22(config: VAEConfig) -> CausalStack:
    """Official vae2_2 `Encoder3d`: 12 patch channels, widths base * [1, *dim_mult] = 160, 160, 320, 640, 640."""
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    last = len(config.dim_mult) - 1
    blocks = nn.Sequential(*[
        DownResidualBlock(a, b, config.num_res_blocks,
                          temporal=i < last and config.temporal_downsample[i], down=i != last)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
    return CausalStack(3 * PATCH * PATCH, dims[0], blocks, dims[-1], dims[-1], 2 * config.z_dim,
                       "downsamples", middle_first=False)


def decoder22(config: VAEConfig) -> CausalStack:
    """Official vae2_2 `Decoder3d`: widths dec_base * [4, 4, 4, 2, 1] = 1024, 1024, 1024, 512, 256; 12 outputs."""
    mult = config.dim_mult
    dims = [config.decoder_base_dim * m for m in (mult[-1], *mult[::-1])]
    t_up = config.temporal_downsample[::-1]
    last = len(mult) - 1
    blocks = nn.Sequential(*[
        UpResidualBlock(a, b, config.num_res_blocks + 1, temporal=i < last and t_up[i], up=i != last)
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:]))])
    return CausalStack(config.z_dim, dims[0], blocks, dims[-1], dims[0], 3 * PATCH * PATCH,
                       "upsamples", middle_first=True)


class WanVAE22(WanVAEBase):
    """Wan 2.2 VAE (TI2V-5B): z 48, stride 4x16x16 (2x2 patchify x 8), official vae2_2 names."""

    kind = "wan2.2"
    latents_mean = WAN22_LATENTS_MEAN
    latents_std = WAN22_LATENTS_STD

    def __init__(self, config: VAEConfig) -> None:
        super().__init__(config, encoder22(config), decoder22(config))

    def to_encoder_input(self, video: Tensor) -> Tensor:
        return patchify(video)

    def from_decoder_output(self, x: Tensor) -> Tensor:
        return unpatchify(x)
