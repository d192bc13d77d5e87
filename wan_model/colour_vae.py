"""Set a Wan 2.1 VAE's weights so that it is a working colour autoencoder: the tiny releases' VAE.

A VAE with random weights maps every clip to about the same latents and every latent to about the same
colours (measured on the tiny Wan 2.1 VAE: six colour grades, from dark to saturated, reconstructed to
one palette within 1/255), so nothing a tiny model learns could ever show in its renders. This module
writes weights into the unchanged Wan 2.1 architecture (`vae.py`, `vae_blocks.py`; the official layout
and file) so that

    encode: latent z[k] = a * sum_i P[k, i] * c_i        c = the RGB colour (in [-1, 1]) averaged over each
                                                          latent cell: 8 x 8 pixels, and 4 frames after the first
    decode: c = P^T z / a, shown over the cell            (P: 16 x 3 with orthonormal columns, a = LATENT_GAIN)

so the normalised latents hold the clips' colours at about unit scale and decoding inverts encoding on
them. Spatial texture finer than a cell is lost; colour, brightness and colour casts survive exactly as
a trained VAE keeps them, which is what the demo's palette check and the learning test measure.

How the architecture is made linear (weights only; the forward code is the real one):
  * every residual branch ends in a zero conv and every attention block in a zero projection, so those
    blocks are identities (their shortcuts pass channels through);
  * convolutions use their centre tap (the current frame, for the causal ones) as identities on the
    carried channels; spatial downsampling averages 2 x 2, temporal downsampling averages the two frames
    it pairs, upsampling repeats;
  * the two heads are RMSNorm -> SiLU -> conv, both nonlinear. The carried channels are c + OFFSET beside
    a constant channel of size ANCHOR, so the norm of every channel vector is ANCHOR to 3e-5 (RMSNorm
    becomes a fixed scale, undone by its gamma) and SiLU sees values near OFFSET = 10, where it is the
    identity to 1e-3; the head conv's bias removes the offset.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .vae import WanVAEBase
from .vae_blocks import AttentionBlock, CausalConv3d, CausalStack, Resample, ResidualBlock

OFFSET = 10.0  # carried colour channels hold c + OFFSET: SiLU is near-linear there
ANCHOR = 1000.0  # a constant channel that fixes every channel vector's norm
LATENT_GAIN = 3.0  # normalised latents = LATENT_GAIN * P c: about unit scale for typical clips
COLOUR, CONST = [0, 1, 2], 3  # the carried channels


def colour_projection(z_dim: int, seed: int = 0) -> torch.Tensor:
    """P: [z_dim, 3] with orthonormal columns (a seeded random rotation of the RGB axes into z_dim)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(z_dim, 3, generator=g, dtype=torch.float64))
    return q.float()


def _zero(module: nn.Module) -> None:
    for p in module.parameters():
        nn.init.zeros_(p)


def _centre_identity(conv: nn.Module, channels: list[int], bias: dict[int, float] | None = None) -> None:
    """conv (any kernel) copies `channels` at its centre tap (the current frame for causal convs)."""
    _zero(conv)
    w = conv.weight.data
    if isinstance(conv, CausalConv3d):
        t = w.shape[2] - 1  # causal: the last temporal tap is the current frame
        centre = (t, w.shape[3] // 2, w.shape[4] // 2)
    else:
        centre = tuple(k // 2 for k in w.shape[2:])
    for c in channels:
        w[(c, c) + centre] = 1.0
    for c, value in (bias or {}).items():
        conv.bias.data[c] = value


def _linearise_head(stack: CausalStack, in_map: torch.Tensor, out_bias: torch.Tensor) -> None:
    """Head: RMSNorm -> SiLU -> conv; out = in_map @ (carried colour) + out_bias, offsets removed."""
    norm, conv = stack.head[0], stack.head[2]
    dim = norm.gamma.shape[0]
    nominal = math.sqrt(ANCHOR**2 + 3 * OFFSET**2)  # ||x|| for c = 0
    nn.init.zeros_(norm.gamma)
    norm.gamma.data.view(-1)[COLOUR] = nominal / math.sqrt(dim)  # normalised colour channel = c + OFFSET
    _zero(conv)
    t, h, w = conv.weight.shape[2] - 1, conv.weight.shape[3] // 2, conv.weight.shape[4] // 2
    conv.weight.data[:, COLOUR, t, h, w] = in_map
    conv.bias.data[:] = out_bias - in_map.sum(dim=1) * OFFSET


def _linearise_body(stack: CausalStack) -> None:
    for module in stack.modules():
        if isinstance(module, ResidualBlock):
            _zero(module.residual[6])  # the branch adds nothing
            if isinstance(module.shortcut, CausalConv3d):
                _centre_identity(module.shortcut, COLOUR + [CONST])
        elif isinstance(module, AttentionBlock):
            _zero(module.proj)
        elif isinstance(module, Resample):
            conv = module.resample[1]
            _zero(conv)
            if module.mode.startswith("downsample"):  # zero-pad right/bottom, 3x3 stride 2: average taps 0..1
                for c in COLOUR + [CONST]:
                    conv.weight.data[c, c, :2, :2] = 0.25
            else:  # nearest upsample, then a 3x3 conv: the centre tap copies
                _centre_identity(conv, COLOUR + [CONST])
            if hasattr(module, "time_conv"):
                tc = module.time_conv
                _zero(tc)
                channels = tc.weight.shape[1]
                for c in COLOUR + [CONST]:
                    if module.mode == "downsample3d":  # stride 2 over (a, b, c): average the two newest
                        tc.weight.data[c, c, 1:, 0, 0] = 0.5
                    else:  # 2C outputs interleave into two frames: both copy the current frame
                        tc.weight.data[c, c, -1, 0, 0] = 1.0
                        tc.weight.data[channels + c, c, -1, 0, 0] = 1.0


@torch.no_grad()
def make_colour_autoencoder_(vae: WanVAEBase, seed: int = 0) -> WanVAEBase:
    """Write colour-autoencoder weights into a Wan 2.1 VAE in place (module docstring); returns it."""
    if vae.config.kind != "wan2.1":
        raise ValueError(f"make_colour_autoencoder_: built for the Wan 2.1 layout, got a {vae.config.kind} VAE")
    z = vae.z_dim
    p = colour_projection(z, seed)  # [z, 3]
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in (vae.latents_mean, vae.latents_std))
    carried = {c: OFFSET for c in COLOUR} | {CONST: ANCHOR}
    enc, dec = vae.encoder, vae.decoder
    for stack in (enc, dec):
        _linearise_body(stack)
    # Encoder: RGB -> carried channels; head -> raw mu = mean + std * gain * P c (normalised z = gain * P c).
    _centre_identity(enc.conv1, COLOUR, carried)
    mu_map = std[:, None] * LATENT_GAIN * p  # [z, 3]
    _linearise_head(enc, torch.cat([mu_map, torch.zeros(z, 3)]), torch.cat([mean, torch.full((z,), -20.0)]))
    _centre_identity(vae.conv1, list(range(2 * z)))
    _centre_identity(vae.conv2, list(range(z)))
    # Decoder: raw mu -> carried colour c = P^T (mu - mean) / (std * gain); head -> RGB.
    _zero(dec.conv1)
    t, h, w = (k - 1 if i == 0 else k // 2 for i, k in enumerate(dec.conv1.weight.shape[2:]))
    unmix = p.T / (std[None, :] * LATENT_GAIN)  # [3, z]
    dec.conv1.weight.data[COLOUR, :, t, h, w] = unmix
    dec.conv1.bias.data[COLOUR] = OFFSET - unmix @ mean
    dec.conv1.bias.data[CONST] = ANCHOR
    _linearise_head(dec, torch.eye(3), torch.zeros(3))
    return vae
