"""Time our Wan VAEs' encode and decode at the released models' real shapes, on one GPU, in bf16.

    python bench/vae.py                      # both: 2.1 VAE 81 x 480x832, 2.2 VAE 121 x 704x1280
    python bench/vae.py --vae wan2.2 --diffusers   # also time diffusers AutoencoderKLWan on the same weights
    python bench/vae.py --tiling 256 64      # spatial tiles of 256 px sharing 64 px
    python bench/vae.py --tiny               # CPU, tiny configs, 9 x 32x32: checks the script only

Random weights (nothing to download): the model is built on the meta device, materialised on the GPU
and re-drawn in bf16. Shapes: 2.1: [1, 3, 81, 480, 832] -> latents [1, 16, 21, 60, 104];
2.2: [1, 3, 121, 704, 1280] -> [1, 48, 31, 44, 80]. One warm-up pass on 5 frames first (cuDNN set-up).
Reported (JSON, one line per VAE): encode and decode seconds of the whole clip, peak GPU memory of
each (torch.cuda.max_memory_allocated), shapes, device.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_model.config import TINY_VAE21, TINY_VAE22, WAN21_VAE, WAN22_VAE, VAEConfig  # noqa: E402
from wan_model.vae_io import build_vae, official_to_diffusers  # noqa: E402

# (config, frames, height, width) of each released VAE's benchmark clip.
REAL = {"wan2.1": (WAN21_VAE, 81, 480, 832), "wan2.2": (WAN22_VAE, 121, 704, 1280)}
TINY = {"wan2.1": (TINY_VAE21, 9, 32, 32), "wan2.2": (TINY_VAE22, 9, 32, 32)}


def build_random(config: VAEConfig, device: torch.device, dtype: torch.dtype):
    """A frozen VAE of `config` with random weights, built without a CPU copy."""
    with torch.device("meta"):
        vae = build_vae(config).to(dtype)  # cast on meta: no fp32 copy on the device
    vae = vae.to_empty(device=device)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.dim() > 1:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            else:
                p.zero_()
    return vae.eval().requires_grad_(False)


def diffusers_twin(vae, device, dtype):
    """diffusers AutoencoderKLWan with the same weights, for a baseline timing."""
    from diffusers import AutoencoderKLWan

    c = vae.config
    extra = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                 latents_mean=list(vae.latents_mean), latents_std=list(vae.latents_std)) if c.kind == "wan2.2" else {}
    with torch.device("meta"):
        ref = AutoencoderKLWan(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim,
                               dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
                               temperal_downsample=list(c.temporal_downsample), **extra)
    ref.load_state_dict(official_to_diffusers(vae.state_dict(), c), strict=True, assign=True)
    return ref.to(device, dtype).eval().requires_grad_(False)


def timed(fn, device: torch.device):
    """(result, seconds, peak bytes) of fn() on device."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return out, time.perf_counter() - start, peak


def bench_one(kind: str, spec, device, dtype, tiling, with_diffusers: bool) -> dict:
    config, frames, height, width = spec
    vae = build_random(config, device, dtype)
    if tiling:
        vae.enable_tiling(*tiling)
    video = torch.rand(1, 3, frames, height, width, device=device, dtype=dtype) * 2 - 1
    with torch.no_grad():
        vae.decode(vae.encode(video[:, :, :5]))  # warm-up
        latents, enc_s, enc_peak = timed(lambda: vae.encode(video), device)
        decoded, dec_s, dec_peak = timed(lambda: vae.decode(latents), device)
    gib = 2**30
    row = {"vae": kind, "video": list(video.shape), "latents": list(latents.shape), "dtype": str(dtype),
           "tiling": list(tiling) if tiling else None, "encode_s": round(enc_s, 3), "decode_s": round(dec_s, 3),
           "encode_peak_gib": round(enc_peak / gib, 2), "decode_peak_gib": round(dec_peak / gib, 2),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    assert decoded.shape == video.shape and torch.isfinite(decoded).all()
    if with_diffusers:
        ref = diffusers_twin(vae, device, dtype)
        mean, std = vae.latent_stats(latents)
        raw = latents * std + mean  # diffusers decodes un-normalised latents
        del vae
        with torch.no_grad():
            ref.encode(video[:, :, :5])
            dist, r_enc_s, r_enc_peak = timed(lambda: ref.encode(video).latent_dist, device)
            ref_video, r_dec_s, r_dec_peak = timed(lambda: ref.decode(raw.to(dtype)).sample, device)

        def rel(a, b):
            return round(((a.float() - b.float()).norm() / b.float().norm()).item(), 5)

        row.update(diffusers_encode_s=round(r_enc_s, 3), diffusers_decode_s=round(r_dec_s, 3),
                   diffusers_encode_peak_gib=round(r_enc_peak / gib, 2),
                   diffusers_decode_peak_gib=round(r_dec_peak / gib, 2),
                   # bf16 agreement with diffusers at the real shape (same weights, same inputs)
                   latents_rel_err_vs_diffusers=rel(latents, (dist.mean.float() - mean) / std),
                   video_rel_err_vs_diffusers=rel(decoded, ref_video))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", choices=["wan2.1", "wan2.2", "both"], default="both")
    ap.add_argument("--tiny", action="store_true", help="tiny configs on CPU in fp32 (script check only)")
    ap.add_argument("--tiling", type=int, nargs=2, metavar=("TILE_PX", "OVERLAP_PX"), default=None)
    ap.add_argument("--diffusers", action="store_true", help="also time diffusers AutoencoderKLWan")
    args = ap.parse_args()
    if args.tiny:
        device, dtype, specs = torch.device("cpu"), torch.float32, TINY
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/vae.py needs a CUDA GPU (use --tiny for a CPU check of the script)")
        device, dtype, specs = torch.device("cuda"), torch.bfloat16, REAL
        torch.backends.cudnn.benchmark = True
    for kind in (["wan2.1", "wan2.2"] if args.vae == "both" else [args.vae]):
        print(json.dumps(bench_one(kind, specs[kind], device, dtype, args.tiling, args.diffusers)), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
