"""Wan VAE files: build, load (official .pth or diffusers folder), save, and the official <-> diffusers key map.

Accepted by `load_vae`:
  * the official release files `Wan2.1_VAE.pth` / `Wan2.2_VAE.pth`: a state dict with the names of
    `wan/modules/vae2_1.py` / `vae2_2.py`, which are our module's own names (strict load, no renaming);
  * a diffusers `AutoencoderKLWan` folder: `config.json` + `diffusion_pytorch_model.safetensors`, names
    mapped to the official ones by `diffusers_to_official`.
The file's kind (2.1 or 2.2) is read from its shapes: the first encoder conv reads 3 pixel channels in
2.1 and 12 (RGB x 2x2 patch) in 2.2. The model is built on the meta device and takes the file's tensors
(`load_state_dict(assign=True)`), so no random initialisation is paid for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .config import WAN21_VAE, WAN22_VAE, VAEConfig
from .vae import WanVAE21, WanVAEBase
from .vae22 import WanVAE22

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CLASS = "AutoencoderKLWan"
# encoder.conv1.weight: [base_dim, in_channels, 3, 3, 3]; in_channels tells the kind.
KIND_BY_IN_CHANNELS = {3: "wan2.1", 12: "wan2.2"}
KIND_FILE = {"wan2.1": "Wan2.1_VAE.pth", "wan2.2": "Wan2.2_VAE.pth"}


def build_vae(config: VAEConfig) -> WanVAEBase:
    """The VAE class of config.kind (random init on the current default device)."""
    return {"wan2.1": WanVAE21, "wan2.2": WanVAE22}[config.kind](config)


# ------------------------------------------------------------------------------------------- key map

_RESNET = (("residual.0.", "norm1."), ("residual.2.", "conv1."), ("residual.3.", "norm2."),
           ("residual.6.", "conv2."), ("shortcut.", "conv_shortcut."))
_MIDDLE = {"0": "mid_block.resnets.0.", "1": "mid_block.attentions.0.", "2": "mid_block.resnets.1."}


def _resnet_key(rest: str) -> str:
    """ResidualBlock parameter: official `residual.2.weight` -> diffusers `conv1.weight`; others unchanged."""
    for old, new in _RESNET:
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def official_to_diffusers_key(key: str, kind: str, num_res_blocks: int = 2) -> str:
    """Official vae2_1/vae2_2 parameter name -> diffusers `AutoencoderKLWan` name.

    conv1/conv2 -> quant_conv/post_quant_conv; {en,de}coder.conv1 -> conv_in; head.0/head.2 -> norm_out/conv_out;
    middle.{0,1,2} -> mid_block.{resnets.0, attentions.0, resnets.1}.
    2.1 encoder: downsamples.i -> down_blocks.i (both flat). 2.1 decoder: upsamples.j, flat with stages of
    num_res_blocks + 1 resnets and one resampler -> up_blocks.(j // (n+2)).{resnets.r | upsamplers.0}.
    2.2: downsamples.i.downsamples.r -> down_blocks.i.{resnets.r | downsampler} (r == num_res_blocks),
    upsamples.i.upsamples.r -> up_blocks.i.{resnets.r | upsampler} (r == num_res_blocks + 1).
    """
    top, _, rest = key.partition(".")
    if top == "conv1":
        return "quant_conv." + rest
    if top == "conv2":
        return "post_quant_conv." + rest
    if top not in ("encoder", "decoder"):
        raise KeyError(f"not a Wan VAE parameter name: {key!r}")
    m = re.match(r"(conv1|head\.0|head\.2|middle\.(\d)|downsamples|upsamples)\.(.*)", rest)
    if m is None:
        raise KeyError(f"not a Wan VAE parameter name: {key!r}")
    part, mid, tail = m.groups()
    if part == "conv1":
        return f"{top}.conv_in.{tail}"
    if part.startswith("head"):
        return f"{top}.{'norm_out' if part == 'head.0' else 'conv_out'}.{tail}"
    if mid is not None:
        body = _resnet_key(tail) if mid != "1" else tail
        return f"{top}.{_MIDDLE[mid]}{body}"
    n = num_res_blocks
    if kind == "wan2.2":
        i, r, tail = re.match(r"(\d+)\.(?:downsamples|upsamples)\.(\d+)\.(.*)", tail).groups()
        blocks, resnets = ("down_blocks", n) if part == "downsamples" else ("up_blocks", n + 1)
        if int(r) < resnets:
            return f"{top}.{blocks}.{i}.resnets.{r}.{_resnet_key(tail)}"
        return f"{top}.{blocks}.{i}.{'downsampler' if part == 'downsamples' else 'upsampler'}.{tail}"
    j, tail = re.match(r"(\d+)\.(.*)", tail).groups()
    if part == "downsamples":
        return f"{top}.down_blocks.{j}.{_resnet_key(tail)}"
    stage, r = divmod(int(j), n + 2)
    if r < n + 1:
        return f"{top}.up_blocks.{stage}.resnets.{r}.{_resnet_key(tail)}"
    return f"{top}.up_blocks.{stage}.upsamplers.0.{tail}"


def official_to_diffusers(state_dict: Mapping[str, Tensor], config: VAEConfig) -> dict[str, Tensor]:
    """Rename a whole official state dict to diffusers names."""
    return {official_to_diffusers_key(k, config.kind, config.num_res_blocks): v for k, v in state_dict.items()}


def diffusers_to_official(state_dict: Mapping[str, Tensor], config: VAEConfig, where: str = "") -> dict[str, Tensor]:
    """Rename a diffusers state dict to official names (the inverse of the map over the model's own keys)."""
    with torch.device("meta"):
        names = list(build_vae(config).state_dict())
    inverse = {official_to_diffusers_key(k, config.kind, config.num_res_blocks): k for k in names}
    unknown = sorted(set(state_dict) - set(inverse))
    if unknown:
        raise KeyError(f"{where or 'diffusers VAE'}: {len(unknown)} key(s) are not parameters of a {config.kind} "
                       f"AutoencoderKLWan of this config, e.g. {unknown[:3]}; check the folder's config.json")
    return {inverse[k]: v for k, v in state_dict.items()}
