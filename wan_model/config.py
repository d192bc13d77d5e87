"""Typed configs and presets for the Wan 2.2 models.

Every constant of the released models lives here, read from the official Wan-Video/Wan2.2 configs:
`wan/configs/shared_config.py` (text length, train timesteps, fps, frame count, negative prompt),
`wan/configs/wan_t2v_A14B.py`, `wan/configs/wan_i2v_A14B.py`, `wan/configs/wan_ti2v_5B.py`
(transformer shape, VAE, boundary, shift, steps, guidance) and the `config.json` files shipped in the
release folders (`in_dim`, `out_dim`, `model_type`). The `tiny-*` presets keep the same structure
at a size that runs on a CPU in milliseconds; tests and the embedded demo use them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

# wan/configs/shared_config.py: the default negative prompt of every official pipeline.
DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，"
    "形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

NUM_TRAIN_TIMESTEPS = 1000  # shared_config.py: num_train_timesteps
TEXT_LEN = 512  # shared_config.py: text_len; prompts are padded/cut to this many tokens


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of one Wan DiT; field names follow the release `config.json`."""

    model_type: str  # 't2v' | 'i2v' | 'ti2v'
    in_dim: int  # 16 (t2v), 36 (i2v: 16 noisy + 4 mask + 16 image latents), 48 (ti2v)
    out_dim: int
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096  # UMT5-XXL hidden size
    text_len: int = TEXT_LEN
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (frames, height, width) per token
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def __post_init__(self) -> None:
        if self.model_type not in ("t2v", "i2v", "ti2v"):
            raise ValueError(f"model_type must be 't2v', 'i2v' or 'ti2v', got {self.model_type!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for the 3-axis RoPE")

    @classmethod
    def from_json_dict(cls, raw: dict) -> "TransformerConfig":
        """Build from a release `config.json`; keys starting with '_' (class name, versions) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {k: v for k, v in raw.items() if not k.startswith("_")}
        # Released configs also carry keys with no effect in 2.2 (window_size, ...): ignore them.
        kept = {k: v for k, v in kept.items() if k in names}
        if "patch_size" in kept:
            kept["patch_size"] = tuple(kept["patch_size"])
        return cls(**kept)

    def to_json_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return {"_class_name": "WanModel", **out}


@dataclass(frozen=True)
class VAEConfig:
    """Shape of a Wan video VAE (`wan/modules/vae2_1.py`, `wan/modules/vae2_2.py`)."""

    kind: str  # 'wan2.1' | 'wan2.2'
    z_dim: int  # latent channels: 16 (2.1), 48 (2.2)
    base_dim: int  # encoder width: 96 (2.1), 160 (2.2)
    decoder_base_dim: int  # decoder width: 96 (2.1), 256 (2.2)
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    stride: tuple[int, int, int] = (4, 8, 8)  # (frames, height, width) pixels per latent
    checkpoint: str = "Wan2.1_VAE.pth"  # file name in the release folder

    def __post_init__(self) -> None:
        if self.kind not in ("wan2.1", "wan2.2"):
            raise ValueError(f"VAE kind must be 'wan2.1' or 'wan2.2', got {self.kind!r}")


@dataclass(frozen=True)
class TextEncoderConfig:
    """UMT5 encoder shape (`wan/modules/t5.py`, umt5_xxl: encoder only, no shared position bias)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    checkpoint: str = "models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer: str = "google/umt5-xxl"  # folder in the release


@dataclass(frozen=True)
class ModelPreset:
    """One released model: its networks plus the facts its official pipeline uses."""

    name: str
    task: str  # 't2v' | 'i2v' | 'ti2v'
    transformer: TransformerConfig
    vae: VAEConfig
    text_encoder: TextEncoderConfig
    # MoE: timesteps t >= boundary * 1000 go to the high-noise expert. None for the dense 5B.
    boundary: float | None
    # Sub-folders of the release holding each expert, highest noise first; ('',) is the release root.
    expert_folders: tuple[str, ...]
    sample_shift: float
    sample_steps: int
    guide_scale: tuple[float, float]  # (low-noise expert, high-noise expert); equal for dense
    sample_fps: int
    frame_num: int
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
    text_len: int = TEXT_LEN
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    # The sampler's default (height, width): 480p for A14B (one of its official sizes, the recipes' training
    # size); TI2V-5B was trained at 704x1280 (wan/configs: SUPPORTED_SIZES 'ti2v-5B': 704*1280, 1280*704).
    sample_size: tuple[int, int] = (480, 832)

    @property
    def is_moe(self) -> bool:
        return self.boundary is not None

    @property
    def boundary_timestep(self) -> int | None:
        """First train timestep of the high-noise expert: 0.875 * 1000 = 875; 0.900 * 1000 = 900. The official
        rule compares t >= boundary * 1000 in floats on whole sampling timesteps, which is t >= this ceiling."""
        return None if self.boundary is None else math.ceil(self.boundary * self.num_train_timesteps)

    @property
    def latent_stride(self) -> tuple[int, int, int]:
        """Pixels per transformer token: VAE stride times patch size (4x16x16 for A14B, 4x32x32 for 5B)."""
        v, p = self.vae.stride, self.transformer.patch_size
        return (v[0] * p[0], v[1] * p[1], v[2] * p[2])

    def latent_size(self, height: int, width: int, frames: int) -> tuple[int, int, int]:
        """(frames, height, width) of a clip's VAE latent: the VAE keeps frame 0 and folds each following
        stride[0] frames into one latent frame; 480x832x81 through the 2.1 VAE -> (21, 60, 104)."""
        v = self.vae.stride
        return ((frames - 1) // v[0] + 1, height // v[1], width // v[2])

    def video_tokens(self, height: int, width: int, frames: int) -> int:
        """Transformer tokens of one clip: 480x832x81 on A14B -> 21 x 30 x 52 = 32,760."""
        latent = self.latent_size(height, width, frames)
        return math.prod(n // k for n, k in zip(latent, self.transformer.patch_size))

    def replace(self, **changes) -> "ModelPreset":
        return dataclasses.replace(self, **changes)


WAN21_VAE = VAEConfig(kind="wan2.1", z_dim=16, base_dim=96, decoder_base_dim=96, stride=(4, 8, 8),
                      checkpoint="Wan2.1_VAE.pth")
WAN22_VAE = VAEConfig(kind="wan2.2", z_dim=48, base_dim=160, decoder_base_dim=256, stride=(4, 16, 16),
                      checkpoint="Wan2.2_VAE.pth")
UMT5_XXL = TextEncoderConfig()

# A14B experts: dim 5120, ffn 13824, 40 heads of 128, 40 layers (wan_t2v_A14B.py / wan_i2v_A14B.py).
_A14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
# TI2V-5B: dim 3072, ffn 14336, 24 heads of 128, 30 layers (wan_ti2v_5B.py).
_5B = dict(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30)
_MOE_FOLDERS = ("high_noise_model", "low_noise_model")

# Tiny shapes with the same structure. head_dim 16 splits as RoPE 8 (frames) + 4 (height) + 4 (width).
_TINY = dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=32)
TINY_VAE21 = VAEConfig(kind="wan2.1", z_dim=16, base_dim=8, decoder_base_dim=8, stride=(4, 8, 8),
                       checkpoint="Wan2.1_VAE.pth")
TINY_VAE22 = VAEConfig(kind="wan2.2", z_dim=48, base_dim=8, decoder_base_dim=12, stride=(4, 16, 16),
                       checkpoint="Wan2.2_VAE.pth")
TINY_UMT5 = TextEncoderConfig(vocab_size=384, dim=32, dim_attn=32, dim_ffn=64, num_heads=2, num_layers=2)

PRESETS: dict[str, ModelPreset] = {
    "t2v-A14B": ModelPreset(
        name="t2v-A14B", task="t2v",
        transformer=TransformerConfig(model_type="t2v", in_dim=16, out_dim=16, **_A14B),
        vae=WAN21_VAE, text_encoder=UMT5_XXL, boundary=0.875, expert_folders=_MOE_FOLDERS,
        sample_shift=12.0, sample_steps=40, guide_scale=(3.0, 4.0), sample_fps=16, frame_num=81),
    "i2v-A14B": ModelPreset(
        name="i2v-A14B", task="i2v",
        transformer=TransformerConfig(model_type="i2v", in_dim=36, out_dim=16, **_A14B),
        vae=WAN21_VAE, text_encoder=UMT5_XXL, boundary=0.900, expert_folders=_MOE_FOLDERS,
        sample_shift=5.0, sample_steps=40, guide_scale=(3.5, 3.5), sample_fps=16, frame_num=81),
    "ti2v-5B": ModelPreset(
        name="ti2v-5B", task="ti2v",
        transformer=TransformerConfig(model_type="ti2v", in_dim=48, out_dim=48, **_5B),
        vae=WAN22_VAE, text_encoder=UMT5_XXL, boundary=None, expert_folders=("",),
        sample_shift=5.0, sample_steps=50, guide_scale=(5.0, 5.0), sample_fps=24, frame_num=121,
        sample_size=(704, 1280)),
}
PRESETS.update({
    "tiny-t2v": PRESETS["t2v-A14B"].replace(
        name="tiny-t2v", transformer=TransformerConfig(model_type="t2v", in_dim=16, out_dim=16, **_TINY),
        vae=TINY_VAE21, text_encoder=TINY_UMT5, sample_steps=4, frame_num=9, sample_size=(64, 64)),
    "tiny-i2v": PRESETS["i2v-A14B"].replace(
        name="tiny-i2v", transformer=TransformerConfig(model_type="i2v", in_dim=36, out_dim=16, **_TINY),
        vae=TINY_VAE21, text_encoder=TINY_UMT5, sample_steps=4, frame_num=9, sample_size=(64, 64)),
    "tiny-ti2v": PRESETS["ti2v-5B"].replace(
        name="tiny-ti2v", transformer=TransformerConfig(model_type="ti2v", in_dim=48, out_dim=48, **_TINY),
        vae=TINY_VAE22, text_encoder=TINY_UMT5, sample_steps=4, frame_num=9, sample_size=(64, 64)),
})


def get_preset(name: str) -> ModelPreset:
    """Look up a preset by name; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
