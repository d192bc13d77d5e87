"""The Wan 2.2 diffusion transformer (official `wan/modules/model.py`, `WanModel`), batched.

One class serves the three released networks: T2V-A14B and I2V-A14B experts (dim 5120, 40 blocks,
in_dim 16 / 36) and TI2V-5B (dim 3072, 30 blocks, in_dim 48, per-token timesteps). Parameter names and
shapes are the released checkpoints' own, so an official state dict loads with `strict=True`
(`keymaps.py` converts diffusers / ComfyUI files). Wan 2.2 I2V has no CLIP image branch
(no `img_emb`, `k_img`, `v_img`): the image enters through the 36 input channels.

Forward, per sample (d = dim, L = F*H*W / prod(patch) video tokens, T = text_len = 512):
    x   = patch_embedding(latents)                                 [L, d]
    e   = time_embedding(sinusoid(t))                              [1 or L, d]       float32
    e0  = time_projection(e) -> 6 vectors                          [1 or L, 6, d]    float32
    c   = text_embedding(context zero-padded to T rows)            [T, d]
    per block, (shift, scale, gate, c_shift, c_scale, c_gate) = modulation + e0:
        x = x + gate   * self_attn(LN(x) * (1 + scale) + shift)         (3-axis RoPE on q, k)
        x = x + cross_attn(norm3(x), c)                                  (all T text rows, no mask)
        x = x + c_gate * ffn(LN(x) * (1 + c_scale) + c_shift)
    out = head(LN(x) * (1 + scale_h) + shift_h), (shift_h, scale_h) = head.modulation + e
Precision: the time embedding and projection, the modulation arithmetic, every norm and the head
run in float32 (the official autocast-float32 regions); the residual stream and the big linears
stay in the model dtype (bf16 in training), as diffusers' `WanTransformer3DModel` keeps them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Callable, ContextManager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint, noop_context_fn

from .attention import attention, prepare_attention
from .config import TransformerConfig
from .fp8 import FP8Linear, gelu_row_bound
from .offload import HostCheckpointInputs
from .rope import apply_rope, rope_tables

# Recompilations allowed for the blocks' shared code object before dynamo falls back to eager (`compile_blocks`).
RECOMPILE_LIMIT = 64


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """t: [...] -> [..., dim] float32: [cos(t w_0..w_{h-1}), sin(t w_0..w_{h-1})], w_i = 10000^(-i/h), h = dim/2.

    Official `sinusoidal_embedding_1d` (cos first); float32 as diffusers' `Timesteps(flip_sin_to_cos=True)`.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float().unsqueeze(-1) * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


# The linears the DiT runs through `linear_fp32`, which reads their weights directly: a PEFT LoRA layer wrapped
# around one is never called, so an adapter on it would not train (train/recipe.py refuses them as targets).
FLOAT32_LINEARS = ("head.head", "time_embedding.0", "time_embedding.2", "time_projection.1")


def float32_parameter(name: str) -> bool:
    """Whether parameter `name` is one the forward reads in float32 (the time embedding and projection, the
    head, the modulation tables, the norms' weights): loaded in float32, its value is the release's own.

    The released experts store float32 and the official generator keeps them so (autocast casts only the
    big matmuls' operands to bf16); diffusers keeps its time embedder, modulation tables and norms in
    float32 (`_keep_in_fp32_modules`). About 0.35 GB more than bf16 per A14B expert, 0.13 GB for TI2V-5B."""
    return (name.endswith("modulation") or name.startswith(("time_embedding.", "time_projection.", "head.head."))
            or any(f".{norm}." in name for norm in ("norm3", "norm_q", "norm_k")))


def keep_float32_parameters_(model: nn.Module) -> nn.Module:
    """Cast the parameters `float32_parameter` names to float32 in place (a model built or cast in bf16, as
    `checkpoint.load_transformer(keep_float32=True)` loads the sampler's); returns the model."""
    for name, param in model.named_parameters():
        if float32_parameter(name):
            param.data = param.data.float()
    return model


def linear_fp32(layer: nn.Linear, x: Tensor) -> Tensor:
    """`layer(x)` in float32 whatever the weights' dtype and any autocast around it."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)


def modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> Tensor:
    """LayerNorm(x) * (1 + scale) + shift in float32 (no affine), returned in x's dtype.

    x: [B, L, d]; shift, scale: [B, 1 or L, d] float32.
    """
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)
    return torch.addcmul(shift, normed, 1 + scale).to(x.dtype)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor) -> Tensor:
    """x + y * gate in float32, returned in x's dtype. x, y: [B, L, d]; gate: [B, 1 or L, d] float32.

    One mixed-dtype kernel: bf16 operands are widened on the fly (exact), not copied to float32 first."""
    return torch.addcmul(x, y, gate).to(x.dtype)


def unpatchify(x: Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> Tensor:
    """x: [B, L, pt*ph*pw*C] (features ordered pt, ph, pw, C) -> [B, C, F*pt, H*ph, W*pw], grid = (F, H, W)."""
    (f, h, w), (pt, ph, pw) = grid, patch
    x = x.view(x.shape[0], f, h, w, pt, ph, pw, channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(x.shape[0], channels, f * pt, h * ph, w * pw)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim, computed in float32 (official WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (weights upcast), returned in the input's dtype (official WanLayerNorm)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k over the full dim (official WanSelfAttention)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.sequence_parallel = None  # set by WanTransformer.enable_sequence_parallel (self-attention only)

    def forward(self, x: Tensor, context: Tensor | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x: [B, L, d]; context: [B, Lc, d] for cross-attention, None for self-attention;
        rope: (cos, sin) tables [1, L, 1, head_dim] rotating q and k. Returns [B, L, d]."""
        source = x if context is None else context
        q = self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))
        k = self.norm_k(self.k(source)).unflatten(-1, (self.num_heads, -1))
        v = self.v(source).unflatten(-1, (self.num_heads, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.sequence_parallel is not None:
            out = self.sequence_parallel.attention(q, k, v, attention)
        else:
            out = attention(q, k, v, self_attention=context is None,
                            scaling_state=getattr(self, "fp8_scaling", None))
        return self.o(out.flatten(2))


class WanBlock(nn.Module):
    """Self-attention, cross-attention and FFN, modulated by the timestep (official WanAttentionBlock)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        dim = cfg.dim
        self.eps = cfg.eps
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm3 = (FP32LayerNorm(dim, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm
                      else nn.Identity())
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: Tensor, e0: Tensor, context: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x: [B, L, d]; e0: [B, 1 or L, 6, d] float32; context: [B, text_len, d]. Returns [B, L, d]."""
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e0).unbind(2)
        x = gated_residual(x, self.self_attn(modulate(x, shift, scale, self.eps), rope=rope), gate)
        x = x + self.cross_attn(self.norm3(x), context)
        return gated_residual(x, self._ffn(modulate(x, c_shift, c_scale, self.eps)), c_gate)

    def _ffn(self, x: Tensor) -> Tensor:
        """self.ffn(x); when its second linear quantises its input to e4m3 (fp8 matmul), the row scale comes
        from max h before GELU (fp8.gelu_row_bound), so GELU runs once instead of twice per element."""
        up, gelu, down = self.ffn
        h = up(x)
        down_base = getattr(down, "base_layer", down)  # under a PEFT LoRA layer, which passes kwargs on
        if isinstance(down_base, FP8Linear) and down_base.quantizes_input:
            return down(gelu(h), x_amax=gelu_row_bound(h))
        return down(gelu(h))


class Head(nn.Module):
    """Final modulated LayerNorm and projection to patch pixels (official Head), in float32."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        """x: [B, L, d]; e: [B, 1 or L, d] float32 -> [B, L, prod(patch) * out_dim] float32."""
        shift, scale = (self.modulation.float().unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return linear_fp32(self.head, modulate(x.float(), shift, scale, self.eps))


# A checkpoint's context_fn: its (forward, recompute) context managers.
ContextFn = Callable[[], tuple[ContextManager, ContextManager]]


def _compile_failures() -> tuple[type[BaseException], ...]:
    """What dynamo raises when it cannot compile a function whole (fullgraph): a graph break, a backend
    failure, the recompile limit (a plain Exception in recent torch). Looked up when needed: importing dynamo
    here would slow every import of this module."""
    exc = torch._dynamo.exc
    return tuple(e for e in (getattr(exc, "TorchDynamoException", None), getattr(exc, "FailOnRecompileLimitHit", None))
                 if e is not None)


def checkpointed_block(block: WanBlock, x: Tensor, e0: Tensor, context: Tensor, rope: tuple[Tensor, Tensor],
                       context_fn: ContextFn) -> Tensor:
    """`block`'s uncompiled forward under non-reentrant checkpointing: what `compile_blocks` compiles for
    training blocks that keep their self-attention outputs, so that the recompute is compiled with the backward
    (see there). context_fn: the selective policy's (a partial, one object per policy)."""
    return checkpoint(block.eager_forward, x, e0, context, rope, use_reentrant=False, context_fn=context_fn)


class WanTransformer(nn.Module):
    """Wan 2.2 DiT with the official parameter names; see the module docstring for the maths."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanBlock(config) for _ in range(config.num_layers))
        self.head = Head(config)
        self._checkpoint_every = 0  # 0: off; n: recompute every n-th block in backward
        self.sequence_parallel = None  # a wan_model.sequence_parallel.SequenceParallel splits the tokens
        # Selective checkpointing: block index -> the checkpoint's context_fn (a zero-argument callable returning
        # its (forward, recompute) context managers, e.g. `speed.keep_self_attention`) or None (recompute all);
        # None here: plain. Blocks with one policy get one object (compiled checkpointing compiles once for it).
        self.checkpoint_context_fn: Callable[[int], ContextFn | None] | None = None
        self._compiled_checkpoint: Callable | None = None  # compile_blocks: the checkpointed call, compiled
        # Checkpointed block inputs kept in pinned host memory (`offload.HostCheckpointInputs`); None: on device.
        self.host_checkpoints: HostCheckpointInputs | None = None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official `WanModel.init_weights`: Xavier linears and patch embedding, N(0, 0.02) text and time
        embeddings, zero output projection; also resets norms (ones) and modulation tables (N(0, 1/dim)),
        so a model built on the meta device and materialised with `to_empty` gets sane weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in (*self.text_embedding, *self.time_embedding):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            block.modulation.normal_(0.0, self.config.dim**-0.5)
        self.head.modulation.normal_(0.0, self.config.dim**-0.5)

    def enable_gradient_checkpointing(self, enabled: bool = True, every: int = 1) -> None:
        """Recompute the activations of every `every`-th block in backward instead of storing them."""
        if every < 1:
            raise ValueError(f"gradient checkpointing: every must be >= 1 (1 = every block), got {every}")
        self._checkpoint_every = every if enabled else 0

    def enable_sequence_parallel(self, sp) -> None:
        """Split each sample's video tokens over the processes of `sp` (a `wan_model.sequence_parallel.
        SequenceParallel`; Ulysses self-attention); None: off."""
        self.sequence_parallel = sp
        for block in self.blocks:
            block.self_attn.sequence_parallel = sp

    def compile_blocks(self, checkpoint_call: bool = True, **compile_kwargs) -> None:
        """`torch.compile` every block in place (regional compilation; parameter names unchanged).

        The blocks share one compiled graph, which fuses the float32 norm, modulation, residual and RoPE
        element-wise work into few kernels. Call it after attaching LoRA layers; the first step pays the
        compilation (about a minute) and each new token-grid shape a recompilation. Only `forward` is
        compiled: module hooks (`offload.py`'s weight streaming) stay eager, around the compiled code.

        Every block of every model shares one code object, so its recompilations (token-grid shapes, grad mode
        for validation and previews, autocast state, a second expert's options) all count against dynamo's one
        recompile limit, 8 by default: past it dynamo runs the blocks eagerly, silently slower and with more
        memory than the activation plan counted (+49% in a GPU test). The limit is raised to
        RECOMPILE_LIMIT, never lowered.

        Checkpointed blocks that keep their self-attention outputs run a second compiled function in training,
        the checkpoint call itself (`checkpointed_block`): the recompute is then part of the compiled backward,
        where AOT's partitioner recomputes only what the backward uses. Around a compiled block, the checkpoint
        replays the whole forward graph, FFN down included, whose output no backward reads (4.6 TFLOP per A14B
        block at 480p). That compiled backward holds more FFN-width buffers at once than the old path's
        recompute and backward: memory_plan counts it (TRANSIENT_COMPILED_CALL_PER_TOKEN_FFN). Blocks that
        recompute self-attention keep the checkpoint around the compiled block: with attention recomputed
        inside it, the compiled backward held ten L x f buffers at once (H200, 4 A14B blocks at 480p: 22.71 GiB
        against 12.62 planned, docs/benchmarks.md), and those blocks are the memory plan's choice exactly when
        memory is short. Shapes are static in the compiled call (the checkpoint's higher-order op broke the
        graph on symbolic ones): each token grid compiles one or two graphs (block 0, whose input needs no
        gradient; the others). The whole checkpointed block must compile as one graph (fullgraph): where it
        cannot (a graph break, the recompile limit), the model warns and goes back to the checkpoint around the
        compiled block for good, rather than running the block uncompiled. Blocks with forward hooks
        (`offload: blocks` streams weights from them) or under sequence parallel keep the checkpoint around the
        compiled block. checkpoint_call False: every checkpointed block keeps the checkpoint around the compiled
        block (the memory plan's choice where the compiled call's transient costs more than it saves)."""
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in 2.7
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
        for block in self.blocks:
            block.eager_forward = block.forward
            block.forward = torch.compile(block.forward, **compile_kwargs)
        self._compiled_checkpoint = None if not checkpoint_call else torch.compile(
            checkpointed_block, **{**compile_kwargs, "dynamic": False, "fullgraph": True})

    def _checkpoint_compiled(self, block: WanBlock, x: Tensor, e0: Tensor, context: Tensor,
                             rope: tuple[Tensor, Tensor], context_fn: ContextFn) -> Tensor:
        """The compiled checkpoint call; where dynamo cannot compile it whole, a warning and, from then on, the
        checkpoint around the compiled block (dynamo fails before running anything, so nothing ran twice). A
        failure to compile its backward, built at the first backward, is raised there, as for the compiled
        blocks."""
        try:
            return self._compiled_checkpoint(block, x, e0, context, rope, context_fn)
        except _compile_failures() as exc:
            warnings.warn(f"compiled checkpointing failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                          "the blocks go back to the checkpoint around the compiled block, whose recompute also "
                          "replays FFN down", stacklevel=2)
            self._compiled_checkpoint = None
            return checkpoint(block, x, e0, context, rope, use_reentrant=False, context_fn=context_fn)

    def forward(self, latents: Tensor, timestep: Tensor, context: Tensor,
                context_lens: Tensor | None = None) -> Tensor:
        """Flow velocity prediction.

        latents: [B, in_dim, F, H, W] (i2v: noisy 16 + mask 4 + image latents 16 channels, in that order);
        timestep: [B] float train timesteps in [0, 1000], or [B, L] per token (ti2v: first-frame tokens 0),
            L = F*H*W / prod(patch_size);
        context: [B, L_text, text_dim] UMT5 embeddings, L_text <= text_len;
        context_lens: [B] real text lengths; rows past them are zeroed (None: all rows real).
        Returns [B, out_dim, F, H, W] in latents' dtype.
        """
        cfg = self.config
        grid = self._token_grid(latents)
        # Token-major memory: the transpose alone leaves [B, L, d] with the tokens contiguous, a layout that every
        # element-wise op of every block then keeps (the residual stream, its norms, the saved activations), so
        # each row reduction over d reads with a stride of L. One copy here instead.
        x = self.patch_embedding(latents.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2).contiguous()
        e, e0 = self._embed_time(timestep, latents.shape[0], x.shape[1])
        context = self._embed_text(context, context_lens)
        rope = rope_tables(grid, cfg.head_dim, x.device)
        # Picks each attention kernel for these lengths once, outside any compiled block.
        prepare_attention(x.shape[0], x.shape[1], (x.shape[1], cfg.text_len), cfg.num_heads, cfg.head_dim,
                          x.device)
        sp = self.sequence_parallel
        if sp is not None:  # this process keeps L/P tokens through the blocks (wan_model/sequence_parallel.py)
            x, rope = sp.shard(x), tuple(sp.shard(t) for t in rope)
            e = e if e.shape[1] == 1 else sp.shard(e)
            e0 = e0 if e0.shape[1] == 1 else sp.shard(e0)
        recompute = self._checkpoint_every and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and i % self._checkpoint_every == 0:
                context_fn = None if self.checkpoint_context_fn is None else self.checkpoint_context_fn(i)
                keep = self.host_checkpoints.keep(x) if self.host_checkpoints else contextlib.nullcontext()
                # The compiled call for blocks that keep self-attention only (compile_blocks says why).
                compiled = (context_fn is not None and self._compiled_checkpoint is not None and sp is None
                            and not (block._forward_pre_hooks or block._forward_hooks))
                with keep:
                    x = (self._checkpoint_compiled(block, x, e0, context, rope, context_fn) if compiled else
                         checkpoint(block, x, e0, context, rope, use_reentrant=False,
                                    context_fn=context_fn or noop_context_fn))
            else:
                x = block(x, e0, context, rope)
        out = self.head(x, e)
        if sp is not None:
            out = sp.gather(out)
        return unpatchify(out, grid, cfg.patch_size, cfg.out_dim).to(latents.dtype)

    def _token_grid(self, latents: Tensor) -> tuple[int, int, int]:
        """(F, H, W) of the token grid; checks channels and divisibility by the patch size."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[1] != cfg.in_dim:
            raise ValueError(f"WanTransformer ({cfg.model_type}): latents must be [B, {cfg.in_dim}, F, H, W], "
                             f"got {tuple(latents.shape)}"
                             + ("; i2v input is cat([noisy 16, mask 4, image 16]) on channels"
                                if cfg.model_type == "i2v" else ""))
        sizes = latents.shape[2:]
        if any(n % p for n, p in zip(sizes, cfg.patch_size)):
            raise ValueError(f"WanTransformer: latent (F, H, W) {tuple(sizes)} is not divisible by the "
                             f"patch size {cfg.patch_size}; crop or resize the video to a multiple")
        return tuple(n // p for n, p in zip(sizes, cfg.patch_size))

    def _embed_time(self, timestep: Tensor, batch: int, tokens: int) -> tuple[Tensor, Tensor]:
        """timestep: [B] or [B, L] -> e: [B, 1 or L, d], e0: [B, 1 or L, 6, d], both float32.

        A [B] timestep stays one vector per sample, broadcast over tokens (the official code expands it
        to [B, L, 6, d]; same values, L times the memory)."""
        if timestep.ndim == 1:
            timestep = timestep[:, None]
        if timestep.ndim != 2 or timestep.shape[0] != batch or timestep.shape[1] not in (1, tokens):
            raise ValueError(f"WanTransformer: timestep must be [B]={batch} or [B, L]=[{batch}, {tokens}] "
                             f"(one per video token), got {tuple(timestep.shape)}")
        # Per-token timesteps hold few distinct values (TI2V: 0 for the clean first frame, t elsewhere), so
        # the float32 MLP runs once per value and the rows are gathered: per token it was 9% of a TI2V-5B
        # CFG step at 704x1280x121 (two [L, d] x [d, 6d] float32 matmuls on CUDA cores; docs/benchmarks.md).
        values, index = torch.unique(timestep, return_inverse=True) if timestep.shape[1] > 1 else (timestep, None)
        emb = sinusoidal_embedding(values, self.config.freq_dim)
        e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], emb)))
        e0 = linear_fp32(self.time_projection[1], F.silu(e))
        if index is not None:
            e, e0 = e[index], e0[index]
        return e, e0.unflatten(-1, (6, self.config.dim))

    def _embed_text(self, context: Tensor, context_lens: Tensor | None) -> Tensor:
        """context: [B, L_text, text_dim] -> [B, text_len, d]: rows past context_lens zeroed, zero-padded
        to text_len, then text_embedding (padded rows become text_embedding(0), as the weights expect)."""
        cfg = self.config
        if context.ndim != 3 or context.shape[2] != cfg.text_dim or context.shape[1] > cfg.text_len:
            raise ValueError(f"WanTransformer: context must be [B, L_text <= {cfg.text_len}, {cfg.text_dim}], "
                             f"got {tuple(context.shape)}; cut prompts to text_len tokens")
        if context_lens is not None:
            real = torch.arange(context.shape[1], device=context.device) < context_lens.to(context.device)[:, None]
            context = context.masked_fill(~real[..., None], 0)
        context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))
