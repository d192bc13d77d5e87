"""Causal 3D building blocks of the Wan video VAEs, shared by the 2.1 (`vae.py`) and 2.2 (`vae22.py`) models.

Parameter names are those of the official `wan/modules/vae2_1.py` and `vae2_2.py` (`residual.2.weight`,
`time_conv.weight`, `head.2.weight`, ...), so the released checkpoints load with `load_state_dict(strict=True)`.

Causality in time: a 3x3x3 convolution sees the current frame and the two before it, never later ones.
An encoder or decoder (`CausalStack`) runs on one temporal chunk at a time; each causal layer carries the
last frames of its input to the next chunk in a `CausalCache`, so activation memory is bounded by one
chunk, not the clip. All tensors are batched: `[B, C, F, H, W]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Frames of its input each causal 3x3x3 layer keeps for the next chunk (its temporal kernel minus one).
CACHE_T = 2


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
