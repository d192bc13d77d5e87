"""The tiny releases' colour-autoencoder VAE (wan_model/colour_vae.py): the real Wan 2.1 architecture and
keys, with weights that make decode(encode(video)) the video's colours averaged over each latent cell."""

import torch
import torch.nn.functional as F

from wan_model.colour_vae import LATENT_GAIN, colour_projection, make_colour_autoencoder_
from wan_model.config import TINY_VAE21
from wan_model.vae_io import build_vae


def cell_means(video: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1 + 4k, H, W] -> what the colour VAE keeps: frame 0 and each later group of 4 frames averaged
    over 8 x 8 pixels, repeated back to full size (frame 0 once, the others 4 times)."""
    first = F.avg_pool3d(video[:, :, :1], (1, 8, 8))
    rest = F.avg_pool3d(video[:, :, 1:], (4, 8, 8))
    cells = torch.cat([first, rest.repeat_interleave(4, dim=2)], dim=2)
    return F.interpolate(cells, scale_factor=(1, 8, 8), mode="nearest")


def test_round_trip_keeps_cell_colours_and_latents_hold_them_at_unit_scale():
    torch.manual_seed(0)
    random_vae = build_vae(TINY_VAE21)
    vae = make_colour_autoencoder_(build_vae(TINY_VAE21)).eval()
    assert vae.state_dict().keys() == random_vae.state_dict().keys()  # the official layout, unchanged
    video = torch.rand(2, 3, 9, 32, 48) * 1.8 - 0.9
    with torch.no_grad():
        z = vae.encode(video)
        back = vae.decode(z)
    assert z.shape == (2, 16, 3, 4, 6)
    assert (back - cell_means(video)).abs().max() < 3e-3  # SiLU and the norm are linear to ~1e-3 here
    # The normalised latents are gain * P c: P^T z / gain gives the cell colours back.
    p = colour_projection(16)
    colours = torch.einsum("zc,bzfhw->bcfhw", p, z) / LATENT_GAIN
    target = F.avg_pool3d(torch.cat([video[:, :, :1], video[:, :, 1:]], 2)[:, :, 1:], (4, 8, 8))
    assert (colours[:, :, 1:] - target).abs().max() < 3e-3


def test_a_random_vae_keeps_no_colour_the_colour_vae_does():
    """Why the tiny releases need it: two clips of opposite casts decode to the same colours through random
    weights, and to their own through the colour VAE."""
    torch.manual_seed(0)
    warm = torch.zeros(1, 3, 5, 32, 32)
    warm[:, 0], warm[:, 2] = 0.6, -0.6
    cool = -warm
    with torch.no_grad():
        for vae, keeps in ((build_vae(TINY_VAE21).eval(), False),
                           (make_colour_autoencoder_(build_vae(TINY_VAE21)).eval(), True)):
            a, b = (vae.decode(vae.encode(v)).mean(dim=(2, 3, 4)) for v in (warm, cool))
            gap = float((a[0, 0] - a[0, 2]) - (b[0, 0] - b[0, 2]))  # warmth difference after the round trip
            assert (gap > 2.0) == keeps, gap
