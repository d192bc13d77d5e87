"""How the official pipelines condition the DiT on a first frame; shared by training and sampling.

* I2V-A14B (`wan/image2video.py`): the DiT input is cat([x_t (16), mask (4), image latents (16)]) on
  channels. The mask is built per pixel frame (1 on frame 0), its first frame repeated 4 times so the
  count divides by the VAE's temporal stride, and folded 4 frames -> 4 channels: all 4 channels are 1 on
  latent frame 0 and 0 after it.
* TI2V-5B (`wan/textimage2video.py`): the first latent frame is the clean image latent and its tokens get
  timestep 0 (`mask2[:, ::2, ::2] * t`, one value per 2x2 patch), the others t.
"""

from __future__ import annotations

import torch
from torch import Tensor


def i2v_mask(latents: Tensor) -> Tensor:
    """latents: [B, C, F, H, W] -> mask [B, 4, F, H, W] in their dtype: 1 on latent frame 0, 0 elsewhere."""
    b, _, f, h, w = latents.shape
    mask = torch.zeros(b, 4, f, h, w, dtype=latents.dtype, device=latents.device)
    mask[:, :, 0] = 1
    return mask


def token_timesteps(t: Tensor, clean_first: Tensor, grid: tuple[int, int, int]) -> Tensor:
    """Per-token timesteps [B, L] (L = F*H*W tokens, frame-major): t [B] everywhere, 0 on the first frame's
    H*W tokens of the samples where clean_first [B] (bool) is set."""
    f, h, w = grid
    per_token = t[:, None].expand(-1, f * h * w).clone()
    first = torch.zeros(f * h * w, dtype=torch.bool, device=t.device)
    first[: h * w] = True
    return per_token.masked_fill(clean_first[:, None] & first[None], 0.0)
