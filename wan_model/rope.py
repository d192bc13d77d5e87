"""3-axis rotary position embedding of the Wan DiT (official `rope_params` / `rope_apply`).

Each attention head's `head_dim = d` channels are split between the three video axes:
frames get `d - 4 * (d // 6)` channels, height and width `2 * (d // 6)` each (128 -> 44 + 42 + 42).
Channels are rotated in adjacent pairs (x[2i], x[2i+1]); pair i of an axis with `n` channels turns by
`pos * theta^(-2i / n)` where `pos` is the token's index along that axis.

The official code builds complex128 tables of 1024 positions and loops over samples; here the real
cos/sin tables of one (F, H, W) token grid are built once (angles in float64 on the CPU, stored as
float32 on the target device, the same values diffusers' `WanRotaryPosEmbed` holds), cached, and
applied to the whole batch at once.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

ROPE_THETA = 10000.0


def axis_channels(head_dim: int) -> tuple[int, int, int]:
    """Channels of a head given to (frames, height, width): (d - 4*(d//6), 2*(d//6), 2*(d//6))."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(positions: int, channels: int, theta: float) -> Tensor:
    """Angles [positions, channels // 2] in float64: angle[p, i] = p * theta^(-2i / channels)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    return torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)


@functools.lru_cache(maxsize=32)
def rope_tables(grid: tuple[int, int, int], head_dim: int, device: torch.device,
                theta: float = ROPE_THETA) -> tuple[Tensor, Tensor]:
    """cos and sin tables of a token grid, each [1, F*H*W, 1, head_dim] float32 on `device`, every angle
    repeated for both channels of its pair (c0 c0 c1 c1 ...), as diffusers' `WanRotaryPosEmbed` holds them.

    Tokens are ordered frame-major, then height, then width (the order of `patch_embedding(x).flatten(2)`).
    Cached per (grid, head_dim, device, theta): a training run sees a handful of bucket shapes.
    """
    # Built outside inference mode so a table first made while sampling can later be saved for backward.
    with torch.inference_mode(False):
        f, h, w = grid
        cf, ch, cw = axis_channels(head_dim)
        af, ah, aw = (_axis_angles(n, c, theta) for n, c in ((f, cf), (h, ch), (w, cw)))
        angles = torch.cat([
            af.view(f, 1, 1, -1).expand(f, h, w, -1),
            ah.view(1, h, 1, -1).expand(f, h, w, -1),
            aw.view(1, 1, w, -1).expand(f, h, w, -1),
        ], dim=-1).reshape(1, f * h * w, 1, head_dim // 2).repeat_interleave(2, dim=-1)
        return (angles.cos().to(device=device, dtype=torch.float32),
                angles.sin().to(device=device, dtype=torch.float32))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs of `x: [B, L, heads, head_dim]` by the tables `cos, sin: [1, L, 1, head_dim]`.

    (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos), i.e. x * cos + (-x2, x1) * sin, in float32
    (bf16 operands widened inside the kernels), returned in x's dtype.
    """
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return torch.addcmul(x * cos, rotated, sin).to(x.dtype)
