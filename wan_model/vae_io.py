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
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .checkpoint import read_json
from .files import atomic_write
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


# ----------------------------------------------------------------------------------------- load / save

def _read_pth(path: Path) -> dict[str, Tensor]:
    """An official .pth state dict (tensors only; memory-mapped where the file is a zip archive)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ValueError(f"{path}: cannot be read as a PyTorch state dict ({type(err).__name__}: {err}); "
                         f"re-download the file") from err
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a VAE state dict (name -> tensor), found {type(sd).__name__}")
    return sd


def detect_kind(state_dict: Mapping[str, Tensor], where: str) -> str:
    """'wan2.1' or 'wan2.2' from the input channels of `encoder.conv1.weight` (3 pixels vs 12 patch channels)."""
    w = state_dict.get("encoder.conv1.weight")
    if w is None or w.dim() != 5 or w.shape[1] not in KIND_BY_IN_CHANNELS:
        found = "missing" if w is None else f"shape {tuple(w.shape)}"
        raise ValueError(f"{where}: not a Wan VAE: encoder.conv1.weight is {found}; expected [dim, 3, 3, 3, 3] "
                         f"(Wan 2.1) or [dim, 12, 3, 3, 3] (Wan 2.2)")
    return KIND_BY_IN_CHANNELS[w.shape[1]]


def infer_config(state_dict: Mapping[str, Tensor], where: str) -> VAEConfig:
    """VAEConfig from shapes: kind, z_dim (conv2), encoder width (encoder.conv1), decoder width (decoder.head.2).

    The released files give exactly WAN21_VAE / WAN22_VAE; other widths keep the release's structure.
    """
    kind = detect_kind(state_dict, where)
    base = WAN21_VAE if kind == "wan2.1" else WAN22_VAE
    try:
        return dataclasses.replace(base, z_dim=state_dict["conv2.weight"].shape[0],
                                   base_dim=state_dict["encoder.conv1.weight"].shape[0],
                                   decoder_base_dim=state_dict["decoder.head.2.weight"].shape[1] // base.dim_mult[0])
    except KeyError as err:
        raise ValueError(f"{where}: {kind} VAE state dict lacks {err.args[0]!r}; the file is incomplete") from None


def _check_shapes(model: nn.Module, state_dict: Mapping[str, Tensor], config: VAEConfig, where: str) -> None:
    """Fail naming the first differing keys/shapes, before load_state_dict's less specific message."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: file {tuple(state_dict[k].shape)}, model {expected[k]}" for k in expected
             if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        problems = (([f"missing {missing[:3]}"] if missing else []) + ([f"unexpected {unexpected[:3]}"] if unexpected
                    else []) + ([f"shape {'; '.join(wrong[:3])}"] if wrong else []))
        raise ValueError(f"{where}: does not fit the {config.kind} VAE config (z_dim {config.z_dim}, base_dim "
                         f"{config.base_dim}, decoder_base_dim {config.decoder_base_dim}): {', '.join(problems)}; "
                         f"pass the matching config or config=None to read it from the file")


def _diffusers_config(raw: dict, where: str) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKLWan config.json (`is_residual` marks Wan 2.2)."""
    if raw.get("_class_name") != DIFFUSERS_CLASS:
        raise ValueError(f"{where}: _class_name is {raw.get('_class_name')!r}, expected {DIFFUSERS_CLASS!r}")
    base = WAN22_VAE if raw.get("is_residual") else WAN21_VAE
    return dataclasses.replace(
        base, z_dim=raw.get("z_dim", base.z_dim), base_dim=raw.get("base_dim", base.base_dim),
        decoder_base_dim=raw.get("decoder_base_dim") or raw.get("base_dim", base.decoder_base_dim),
        dim_mult=tuple(raw.get("dim_mult", base.dim_mult)), num_res_blocks=raw.get("num_res_blocks", base.num_res_blocks),
        temporal_downsample=tuple(raw.get("temperal_downsample", base.temporal_downsample)))


def read_vae_state(path: str | os.PathLike) -> tuple[dict[str, Tensor], VAEConfig, str]:
    """(official-named state dict, config read from the file, description) of an official .pth or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        cfg_path, weights = path / DIFFUSERS_CONFIG, path / DIFFUSERS_WEIGHTS
        if not cfg_path.is_file() or not weights.is_file():
            raise FileNotFoundError(f"{path}: a diffusers VAE folder needs {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS}")
        file_config = _diffusers_config(read_json(cfg_path), str(cfg_path))
        return diffusers_to_official(load_file(weights), file_config, str(weights)), file_config, str(weights)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such VAE file or folder (expected Wan2.1_VAE.pth, Wan2.2_VAE.pth or a "
                                f"diffusers AutoencoderKLWan folder)")
    sd = _read_pth(path)
    return sd, infer_config(sd, str(path)), str(path)


def load_vae(path: str | os.PathLike, config: VAEConfig | None = None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu") -> WanVAEBase:
    """A Wan VAE with the weights of an official .pth or a diffusers folder, in eval mode, frozen.

    config None reads the shape from the file; a given config must be of the file's kind
    (a Wan2.2_VAE.pth for a 2.1 config fails naming both).
    """
    sd, file_config, where = read_vae_state(path)
    if config is None:
        config = file_config
    elif config.kind != file_config.kind:
        raise ValueError(f"{where}: is a {file_config.kind} VAE ({KIND_FILE[file_config.kind]}) but the config asks "
                         f"for a {config.kind} VAE ({KIND_FILE[config.kind]}); pass the {KIND_FILE[config.kind]} "
                         f"file of this model, or the config of the file")
    with torch.device("meta"):
        vae = build_vae(config)
    _check_shapes(vae, sd, config, where)
    vae.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def save_vae_official(vae: WanVAEBase, path: str | os.PathLike) -> Path:
    """Write the VAE as the release does (`torch.save` of the official-named state dict), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in vae.state_dict().items()}
    atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return path
