"""Wan 2.1 / 2.2 VAEs: parity with diffusers `AutoencoderKLWan`, official key names and files, chunking, tiling.

Reference for parity: diffusers 0.42 `diffusers.models.autoencoders.autoencoder_kl_wan.AutoencoderKLWan`
(which implements both official vae2_1.py and vae2_2.py), built with the matching config and loaded with
our weights through `official_to_diffusers`. Tiny configs (TINY_VAE21 / TINY_VAE22), fp32, random weights.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from diffusers import AutoencoderKLWan

from wan_model.config import TINY_VAE21, TINY_VAE22, WAN21_VAE, WAN22_VAE
from wan_model.vae import WAN21_LATENTS_MEAN, WAN21_LATENTS_STD, blend_tiles, fit_frames, tile_starts
from wan_model.vae22 import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, patchify, unpatchify
from wan_model.vae_io import (build_vae, diffusers_to_official, load_vae, official_to_diffusers,
                              official_to_diffusers_key, save_vae_official)

CONFIGS = {"wan2.1": TINY_VAE21, "wan2.2": TINY_VAE22}
STATS = {"wan2.1": (WAN21_LATENTS_MEAN, WAN21_LATENTS_STD), "wan2.2": (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_vae(kind: str):
    """Tiny VAE with every parameter re-drawn (no zero projections, gammas != 1, biases != 0)."""
    vae = build_vae(CONFIGS[kind]).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return vae


def diffusers_twin(vae) -> AutoencoderKLWan:
    """diffusers AutoencoderKLWan of the same config holding the same weights."""
    c = vae.config
    mean, std = STATS[c.kind]
    extra = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16) \
        if c.kind == "wan2.2" else {}
    ref = AutoencoderKLWan(base_dim=c.base_dim, decoder_base_dim=c.decoder_base_dim, z_dim=c.z_dim,
                           dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
                           temperal_downsample=list(c.temporal_downsample), latents_mean=list(mean),
                           latents_std=list(std), **extra).eval()
    ref.load_state_dict(official_to_diffusers(vae.state_dict(), c), strict=True)
    return ref


def video(b=1, f=9, h=32, w=32) -> torch.Tensor:
    return torch.rand(b, 3, f, h, w) * 2 - 1


def small_video(kind: str, b=1, f=9) -> torch.Tensor:
    """Two latents per side: 16 px for 2.1 (stride 8), 32 px for 2.2 (stride 16)."""
    px = 2 * CONFIGS[kind].stride[1]
    return video(b, f, px, px)


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_parity_with_diffusers_encode_decode(kind):
    """9 frames (diffusers chunks them 1 + 4 + 4 too), batch 2: moments, normalised latents, decoded video."""
    vae = random_vae(kind)
    ref = diffusers_twin(vae)
    x = video(b=2, f=9, h=32, w=32)
    m, s = (torch.tensor(t).view(1, -1, 1, 1, 1) for t in STATS[kind])
    with torch.no_grad():
        mean, logvar = vae.encode_distribution(x)
        latents = vae.encode(x)
        dist = ref.encode(x).latent_dist
        z = torch.randn_like(latents)
        out = vae.decode(z)
        ref_out = ref.decode(z * s + m).sample
    s_ = vae.stride
    assert latents.shape == (2, vae.z_dim, 3, 32 // s_[1], 32 // s_[2])
    assert rel_err(mean, (dist.mean - m) / s) < 1e-4
    assert rel_err(latents, (dist.mean - m) / s) < 1e-4
    assert rel_err(logvar, dist.logvar - 2 * torch.log(s)) < 1e-4
    assert out.shape == (2, 3, 9, 32, 32)
    assert rel_err(out, ref_out) < 1e-4
    assert out.abs().max() <= 1.0 and out.std() > 0.05  # clamped, and not collapsed to a constant


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_batch_of_two_equals_two_single_runs(kind):
    vae = random_vae(kind)
    x = small_video(kind, b=2, f=5)
    with torch.no_grad():
        both = vae.encode(x)
        one = torch.cat([vae.encode(x[:1]), vae.encode(x[1:])])
        dec_both = vae.decode(both)
        dec_one = torch.cat([vae.decode(both[:1]), vae.decode(both[1:])])
    assert torch.allclose(both, one, atol=1e-5)
    assert torch.allclose(dec_both, dec_one, atol=1e-5)


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_encoding_is_causal_across_chunks(kind):
    """Latent frames 0..1 of a 9-frame clip equal those of its first 5 frames: the cache carries only the past."""
    vae = random_vae(kind)
    x = small_video(kind, f=9)
    with torch.no_grad():
        full, head = vae.encode(x), vae.encode(x[:, :, :5])
        changed_tail = x.clone()
        changed_tail[:, :, 5:] = 0
        other = vae.encode(changed_tail)
    assert torch.allclose(full[:, :, :2], head, atol=1e-6)
    assert torch.allclose(full[:, :, :2], other[:, :, :2], atol=1e-6)
    assert not torch.allclose(full[:, :, 2], other[:, :, 2], atol=1e-3)


# Names as the official modules (wan/modules/vae2_1.py, vae2_2.py) register them, with their real shapes.
OFFICIAL_21 = {
    "encoder.conv1.weight": (96, 3, 3, 3, 3),
    "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
    "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),  # downsample2d after stage 0
    "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),  # first downsample3d
    "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
    "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
    "encoder.head.2.weight": (32, 384, 3, 3, 3),
    "conv1.weight": (32, 32, 1, 1, 1),
    "conv2.weight": (16, 16, 1, 1, 1),
    "decoder.conv1.weight": (384, 16, 3, 3, 3),
    "decoder.middle.2.residual.6.weight": (384, 384, 3, 3, 3),
    "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
    "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),  # 2.1 upsampling halves the width
    "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
    "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
    "decoder.head.0.gamma": (96, 1, 1, 1),
    "decoder.head.2.weight": (3, 96, 3, 3, 3),
}
OFFICIAL_22 = {
    "encoder.conv1.weight": (160, 12, 3, 3, 3),
    "encoder.downsamples.0.downsamples.0.residual.0.gamma": (160, 1, 1, 1),
    "encoder.downsamples.1.downsamples.2.time_conv.weight": (320, 320, 3, 1, 1),
    "encoder.downsamples.3.downsamples.1.residual.6.weight": (640, 640, 3, 3, 3),
    "encoder.head.2.weight": (96, 640, 3, 3, 3),
    "conv1.weight": (96, 96, 1, 1, 1),
    "conv2.weight": (48, 48, 1, 1, 1),
    "decoder.conv1.weight": (1024, 48, 3, 3, 3),
    "decoder.middle.1.norm.gamma": (1024, 1, 1),
    "decoder.upsamples.0.upsamples.3.time_conv.weight": (2048, 1024, 3, 1, 1),
    "decoder.upsamples.0.upsamples.3.resample.1.weight": (1024, 1024, 3, 3),  # 2.2 keeps the width
    "decoder.upsamples.2.upsamples.0.shortcut.weight": (512, 1024, 1, 1, 1),
    "decoder.upsamples.3.upsamples.2.residual.2.weight": (256, 256, 3, 3, 3),
    "decoder.head.2.weight": (12, 256, 3, 3, 3),
}


@pytest.mark.parametrize("config,expected,count,params", [
    (WAN21_VAE, OFFICIAL_21, 194, 126_892_531), (WAN22_VAE, OFFICIAL_22, 196, 704_688_668)])
def test_official_names_and_shapes_of_released_configs(config, expected, count, params):
    """Real configs on the meta device: spot-checked official keys and shapes, key count, parameter count
    (the released Wan2.1_VAE.pth holds 127M fp32 values (508 MB), Wan2.2_VAE.pth 705M (2.8 GB))."""
    with torch.device("meta"):
        sd = build_vae(config).state_dict()
    for key, shape in expected.items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert len(sd) == count
    assert sum(v.numel() for v in sd.values()) == params


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_key_map_covers_diffusers_exactly_both_ways(kind):
    vae = random_vae(kind)
    ref = diffusers_twin(vae)  # strict load inside
    mapped = official_to_diffusers(vae.state_dict(), vae.config)
    assert set(mapped) == set(ref.state_dict())
    back = diffusers_to_official(ref.state_dict(), vae.config)
    assert set(back) == set(vae.state_dict())
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


def test_key_map_examples():
    assert official_to_diffusers_key("decoder.upsamples.7.time_conv.weight", "wan2.1") == \
        "decoder.up_blocks.1.upsamplers.0.time_conv.weight"
    assert official_to_diffusers_key("decoder.upsamples.5.residual.2.bias", "wan2.1") == \
        "decoder.up_blocks.1.resnets.1.conv1.bias"
    assert official_to_diffusers_key("encoder.downsamples.1.downsamples.2.resample.1.weight", "wan2.2") == \
        "encoder.down_blocks.1.downsampler.resample.1.weight"
    assert official_to_diffusers_key("decoder.upsamples.0.upsamples.3.time_conv.bias", "wan2.2") == \
        "decoder.up_blocks.0.upsampler.time_conv.bias"
    assert official_to_diffusers_key("encoder.middle.1.proj.weight", "wan2.2") == \
        "encoder.mid_block.attentions.0.proj.weight"
    with pytest.raises(KeyError, match="not a Wan VAE parameter"):
        official_to_diffusers_key("model.blocks.0.weight", "wan2.1")


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_official_pth_round_trip(kind, tmp_path):
    vae = random_vae(kind)
    path = save_vae_official(vae, tmp_path / CONFIGS[kind].checkpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIGS[kind].checkpoint]  # no temp file left
    raw = torch.load(path, weights_only=True)
    assert set(raw) == set(vae.state_dict())
    loaded = load_vae(path)  # config read from the shapes
    assert loaded.config == vae.config
    assert not any(p.requires_grad for p in loaded.parameters())
    x = small_video(kind, f=5)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), vae.encode(x))


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_load_diffusers_folder(kind, tmp_path):
    vae = random_vae(kind)
    diffusers_twin(vae).save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae", CONFIGS[kind], dtype=torch.float32)
    for k, v in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_wrong_kind_file_names_both_kinds(tmp_path):
    path = save_vae_official(random_vae("wan2.2"), tmp_path / "Wan2.2_VAE.pth")
    with pytest.raises(ValueError) as err:
        load_vae(path, TINY_VAE21)
    msg = str(err.value)
    assert "is a wan2.2 VAE" in msg and "asks for a wan2.1 VAE" in msg and "Wan2.1_VAE.pth" in msg


def test_wrong_size_config_names_the_key(tmp_path):
    path = save_vae_official(random_vae("wan2.1"), tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(ValueError, match=r"encoder\.conv1\.weight: file \(8, 3, 3, 3, 3\), model \(96, 3, 3, 3, 3\)"):
        load_vae(path, WAN21_VAE)


def test_frame_count_fix_warns_pad_or_cut():
    vae = random_vae("wan2.1")
    x = small_video("wan2.1", f=8)
    with pytest.warns(UserWarning, match=r"8 frames, not 1 \+ 4k: padded with 1 repeat"):
        padded = vae.encode(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explicit = vae.encode(torch.cat([x, x[:, :, -1:]], dim=2))
    assert padded.shape[2] == 3 and torch.equal(padded, explicit)
    with pytest.warns(UserWarning, match=r"cut 3 frame\(s\) from the end to 5"):
        cut = vae.encode(x, frame_fix="cut")
    assert cut.shape[2] == 2
    assert fit_frames(video(f=9)).shape[2] == 9


@pytest.mark.parametrize("kind,size,msg", [
    ("wan2.1", (100, 64), r"height 100 is not a multiple of the VAE's spatial stride 8; nearest valid height: 96 or 104"),
    ("wan2.2", (32, 40), r"width 40 is not a multiple of the VAE's spatial stride 16; nearest valid width: 32 or 48"),
])
def test_spatial_stride_error(kind, size, msg):
    with pytest.raises(ValueError, match=msg):
        random_vae(kind).encode(video(f=1, h=size[0], w=size[1]))


def test_patchify_matches_official_layout():
    """Official einops 'b c f (h q) (w r) -> b (c r q) f h w': channel c*4 + r*2 + q holds pixel (2h+q, 2w+r)."""
    x = torch.randn(1, 3, 2, 4, 6)
    p = patchify(x)
    assert p[0, 1 * 4 + 1 * 2 + 0, 1, 1, 2].item() == x[0, 1, 1, 2 * 1 + 0, 2 * 2 + 1].item()
    assert torch.equal(unpatchify(p), x)


def test_tile_starts_cover_and_end_at_edge():
    assert tile_starts(96, 32, 8) == [0, 24, 48, 64]
    assert tile_starts(32, 64, 8) == [0]


@pytest.mark.parametrize("ratio", [8, 1 / 8])
def test_blend_tiles_reassembles_a_local_map_exactly(ratio):
    """With a map that only looks at its own pixel (8x upsampling, or 8x8 average pooling), overlapping tiles
    blended by the ramps reproduce the whole-frame result: the tile geometry and weights are right."""
    x = torch.randn(2, 3, 2, 48, 80)
    if ratio == 8:
        def run(t):
            return t.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1) * 2 + 1
        tile, overlap = 16, 4
    else:
        def run(t):
            return torch.nn.functional.avg_pool3d(t, (1, 8, 8)) * 2 + 1
        tile, overlap = 32, 16
    assert torch.allclose(blend_tiles(run, x, tile, overlap), run(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_tiling_close_to_untiled(kind):
    """64x96 frames in 64 px tiles sharing 32 px, encode and decode, against the whole frame.

    Tiny random VAEs see far past a tile (about ten 3x3 convs at latent resolution and RMS norms that
    amplify border changes), so on 4x6 / 8x12 latents tiles differ noticeably; measured relative error
    0.06 (2.1) / 0.18 (2.2) for encode and 0.33 / 0.43 for decode; smaller tiles must be worse, and a tile
    covering the frame must be exact."""
    vae = random_vae(kind)
    x = video(f=1, h=64, w=96)  # tiling is spatial: one frame keeps the test fast
    small = 32 if kind == "wan2.1" else 48
    with torch.no_grad():
        full = vae.encode(x)
        dec_full = vae.decode(full)
        vae.enable_tiling(64, 32)
        tiled, dec_tiled = vae.encode(x), vae.decode(full)
        vae.enable_tiling(small, 16)
        tiled_small = vae.encode(x)
        vae.enable_tiling(128, 16)
        whole = vae.encode(x)
        vae.disable_tiling()
    assert tiled.shape == full.shape and dec_tiled.shape == dec_full.shape
    assert rel_err(tiled, full) < 0.25
    assert rel_err(dec_tiled, dec_full) < 0.5
    assert rel_err(tiled, full) < rel_err(tiled_small, full)
    assert torch.equal(whole, full)


def test_enable_tiling_rejects_misaligned_tiles():
    with pytest.raises(ValueError, match="multiples of the spatial stride 16"):
        random_vae("wan2.2").enable_tiling(100, 20)


def test_decode_frame_count_and_input_check():
    vae = random_vae("wan2.2")
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 48, 3, 2, 2))
    assert out.shape == (1, 3, 9, 32, 32)
    with pytest.raises(ValueError, match=re.escape("latents must be [B, 48, T, h, w], got (1, 16, 3, 2, 2)")):
        vae.decode(torch.randn(1, 16, 3, 2, 2))


def test_unreadable_or_foreign_files_fail_clearly(tmp_path):
    junk = tmp_path / "Wan2.1_VAE.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(ValueError, match="cannot be read as a PyTorch state dict"):
        load_vae(junk)
    other = tmp_path / "other.pth"
    torch.save({"blocks.0.weight": torch.zeros(1)}, other)
    with pytest.raises(ValueError, match=r"not a Wan VAE: encoder\.conv1\.weight is missing"):
        load_vae(other)
    with pytest.raises(FileNotFoundError, match="no such VAE file or folder"):
        load_vae(tmp_path / "missing.pth")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["wan2.1", "wan2.2"])
def test_bf16_on_gpu_close_to_fp32(kind):
    """The bf16 path (fp32-reduced RMS norms, fp32 latent normalisation) against the fp32 model on CUDA."""
    vae = random_vae(kind).cuda()
    x = small_video(kind, b=2, f=5).cuda()
    with torch.no_grad():
        ref = vae.encode(x)
        ref_video = vae.decode(ref)
        vae.to(torch.bfloat16)
        latents, out = vae.encode(x), vae.decode(ref)
    assert latents.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert rel_err(latents, ref) < 0.05
    assert rel_err(out.float(), ref_video) < 0.05
