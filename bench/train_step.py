"""Time one LoRA training step of our Wan DiT and of diffusers + PEFT on the same shapes, in one run.

    python bench/train_step.py --preset t2v-A14B --size 480x832 --frames 81 --impl ours diffusers
    python bench/train_step.py --preset ti2v-5B --size 704x1280 --frames 121 --impl ours diffusers

Our model's speed options (wan_model/speed.py) are flags: --compile, --save-attention {none,all,every_k},
--fp8 {none,storage,matmul}, --attention, --offload blocks, and --memory-fraction caps the training steps
(24 GiB mode: 0.3034 of an H100's 79.1 GiB). The fastest A14B setting measured (docs/benchmarks.md):

    python bench/train_step.py --preset t2v-A14B --size 480x832 --frames 81 --impl ours --compile --save-attention all --fp8 matmul

Both models get random bf16 weights (built on the meta device, materialised on the GPU), LoRA of the
same rank on the same linears (self- and cross-attention q, k, v, o and both FFN linears; PEFT for
both), gradient checkpointing on every block, AdamW on the LoRA parameters only, MSE loss against a
random target. Reported per implementation: median s/step over the timed steps, peak GPU memory
(torch.cuda.max_memory_allocated), tokens/s and FLOP utilisation.

FLOP count (what the GPU must execute, per step; d = dim, L = video tokens, T = 512 text tokens,
f = ffn_dim, n = layers):
  forward per block = 2*L*(4d^2)            self-attention q, k, v, o
                    + 2*L*(2d^2) + 2*T*(2d^2) cross-attention q, o on video; k, v on text
                    + 2*L*(2*d*f)           FFN
                    + 4*L^2*d + 4*L*T*d     attention scores and weighted sums
  A step with checkpointing runs the block forward twice (once, then again to recompute), and the
  backward: frozen linears need only the input gradient (1x their forward), attention 2.5x its
  forward (flash-attention backward recomputes the scores). LoRA adds 3 * 2 * r * (in + out) per token
  per adapted linear (small). The reference figure of 14.6 s at 56% of a 780 TFLOP/s ceiling
  (6.4 PFLOP) matches this count.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import git_commit, memory_fraction_for, profiled_kernels  # noqa: E402
from wan_model.attention import set_attention_backend  # noqa: E402
from wan_model.config import PRESETS, TransformerConfig  # noqa: E402
from wan_model.speed import SpeedOptions, apply_speed_options, plan_speed  # noqa: E402

OUR_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
DIFFUSERS_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]


def step_flops(cfg: TransformerConfig, tokens: int, rank: int, checkpointing: bool = True) -> float:
    """Executed FLOPs of one training step (see the module docstring for the count)."""
    d, f, t, n = cfg.dim, cfg.ffn_dim, cfg.text_len, cfg.num_layers
    linear = 2 * tokens * (4 * d * d) + 2 * tokens * (2 * d * d) + 2 * t * (2 * d * d) + 2 * tokens * (2 * d * f)
    attn = 4 * tokens * tokens * d + 4 * tokens * t * d
    lora = 3 * 2 * rank * tokens * (8 * 2 * d + 2 * (d + f))
    forwards = 2 if checkpointing else 1
    return n * (linear * (forwards + 1) + attn * (forwards + 2.5) + lora)


def init_random_(model: nn.Module, std: float = 0.02) -> None:
    """Random weights in place: linears/convs N(0, std), biases 0, norm weights 1, modulation tables N(0, std)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or "modulation" in name or "scale_shift_table" in name:
                p.normal_(0.0, std)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def build_ours(cfg: TransformerConfig, device: torch.device, checkpointing: str) -> nn.Module:
    from wan_model.transformer import WanTransformer

    with torch.device("meta"):
        model = WanTransformer(cfg).to(torch.bfloat16)  # bf16 before materialising: no fp32 copy
    model = model.to_empty(device=device)
    init_random_(model)
    if checkpointing != "none":
        model.enable_gradient_checkpointing(True)
    return model


def build_diffusers(cfg: TransformerConfig, device: torch.device) -> nn.Module:
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    kwargs = dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                  in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                  ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
                  qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=1024)
    with torch.device("meta"):
        model = WanTransformer3DModel(**kwargs).to(torch.bfloat16)
    model = model.to_empty(device=device)
    # RoPE tables are non-persistent buffers, left empty by to_empty: build the module again on the GPU.
    with torch.device(device):
        model.rope = WanRotaryPosEmbed(cfg.head_dim, cfg.patch_size, 1024)
    init_random_(model)
    # As from_pretrained(torch_dtype=bfloat16) does: diffusers keeps these modules in float32.
    for name, module in model.named_modules():
        if any(part in model._keep_in_fp32_modules for part in name.split(".")):
            module.float()
    model.enable_gradient_checkpointing()
    return model


def add_lora(model: nn.Module, targets: list[str], rank: int) -> list[nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def speed_options(args) -> SpeedOptions:
    host = {"on": True, "off": False, "auto": "auto"}[args.host_checkpoints]
    return SpeedOptions(compile=args.compile, compiled_checkpoint=not args.no_compiled_checkpoint,
                        save_attention=args.save_attention,
                        save_attention_every=args.save_every, fp8_base=args.fp8, fp8_fast_accum=args.fp8_fast_accum,
                        attention_backend="auto" if args.attention == "fp8" else args.attention,
                        offload=args.offload, host_checkpoints=host, memory_gib=args.memory_gib)


def planned_speed(args, cfg: TransformerConfig, tokens: int, device) -> tuple[SpeedOptions, dict | None]:
    """The flags' speed options with "auto" resolved as the trainer does (train/loop.py): the plan's
    budget is --memory-gib, else what the device has; returns the options and the plan as a dict."""
    from train.loop import cuda_budget_bytes, host_available_gib

    options = speed_options(args)
    if not options.planned:
        return options, None
    if device.type == "cuda":
        budget = (cuda_budget_bytes(device) + torch.cuda.memory_reserved(device)) / 2**30
        total = torch.cuda.get_device_properties(device).total_memory / 2**30
        if args.memory_gib:  # the cap the steps run under (run_one applies it after the model is built)
            budget = min(budget, args.memory_gib)
        elif args.memory_fraction:
            budget = min(budget, args.memory_fraction * total)
    else:
        budget = args.memory_gib or host_available_gib()
    options, plan = plan_speed(options, cfg, tokens, budget, rank=args.rank, host_available_gib=host_available_gib())
    return options, dataclasses.asdict(plan)


def run_one(impl: str, args, cfg: TransformerConfig, latent_shape, device) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    plan = None
    tokens = math.prod(latent_shape[2:]) // math.prod(cfg.patch_size)
    if impl == "ours":
        model = build_ours(cfg, device, args.checkpointing)
        params = add_lora(model, OUR_TARGETS, args.rank)
        options, plan = planned_speed(args, cfg, tokens, device)
        apply_speed_options(model, options)
        if args.attention == "fp8":  # a bench lever, not a SpeedOptions choice (speed.py says why)
            set_attention_backend("fp8")
    else:
        model = build_diffusers(cfg, device)
        params = add_lora(model, DIFFUSERS_TARGETS, args.rank)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    if cuda:
        # The cap applies to the training step: the model was materialised (and offloaded) before it.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        setup_gib = torch.cuda.memory_allocated() / 2**30
        if args.memory_gib:
            args.memory_fraction = memory_fraction_for(args.memory_gib, device)
        if args.memory_fraction:
            torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    gen = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(latent_shape, generator=gen, device=device, dtype=torch.bfloat16)
    target = torch.randn(latent_shape, generator=gen, device=device, dtype=torch.bfloat16)
    context = torch.randn((1, cfg.text_len, cfg.text_dim), generator=gen, device=device, dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device=device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if impl == "ours":
                pred = model(latents, timestep, context)
            else:
                pred = model(hidden_states=latents, timestep=timestep, encoder_hidden_states=context,
                             return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    times = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    kernels = kernel_breakdown(step, args.profile) if cuda and args.profile else None
    flops = step_flops(cfg, tokens, args.rank, args.checkpointing != "none")
    if cuda and args.memory_fraction:
        torch.cuda.set_per_process_memory_fraction(1.0)
    result = dict(impl=impl, setup_gib=round(setup_gib, 2) if cuda else None, s_per_step=round(sec, 3),
                  step_times=[round(t, 3) for t in times],
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                  tokens_per_s=round(tokens / sec), tflops=round(flops / sec / 1e12, 1),
                  loss=float(loss), step_pflop=round(flops / 1e15, 3))
    if plan is not None:
        result.update(memory_plan=plan, speed=dataclasses.asdict(options))
    if kernels is not None:
        result["kernels"] = kernels
    return result


# Kernel name patterns -> where a step's GPU time goes (first match wins; names as torch.profiler reports them).
KERNEL_KINDS = [  # Inductor's kernels first: their names carry the ops they fuse (_scaled_mm, attention...)
    ("attention forward, 8-bit", ("_fp8_attention_kernel",)),
    ("compiled element-wise and quantisation (Triton)", ("triton_",)),
    ("attention backward", ("bprop", "flash_bwd", "attention_backward", "dgrad_kernel_dq", "_bwd")),
    ("attention forward", ("fprop", "flash_fwd", "fmha", "attention_forward")),
    ("fp8 GEMM", ("qqtst", "e4m3", "f8f8", "fp8")),
    ("other GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas")),
    ("optimizer", ("adam",)),
    ("copies and casts", ("copy", "cast", "Memcpy", "Memset", "fill")),
]


def kernel_kind(name: str) -> str:
    for kind, patterns in KERNEL_KINDS:
        if any(p.lower() in name.lower() for p in patterns):
            return kind
    return "other"


def kernel_breakdown(step, top: int) -> dict:
    """One more step under torch.profiler: GPU kernel time by kind (KERNEL_KINDS) and the `top` kernels,
    with the step's wall time under the profiler (the gap to the kernel sum is idle GPU time)."""
    events, wall = profiled_kernels(step)
    kinds: dict[str, float] = {}
    for e in events:
        kind = kernel_kind(e.key)
        kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total / 1e6
    return dict(wall_s=round(wall, 3), kernel_s=round(sum(kinds.values()), 3),
                by_kind={k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
                top=[dict(kernel=e.key[:160], kind=kernel_kind(e.key), calls=e.count,
                          ms=round(e.self_device_time_total / 1e3, 2)) for e in events[:top]])


def matmul_ceiling(device) -> float:
    """Measured bf16 matmul rate (TFLOP/s) on 8192^3 random operands: the denominator of utilisation."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--size", default="480x832", help="HxW in pixels")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--impl", nargs="+", default=["ours", "diffusers"], choices=["ours", "diffusers"])
    ap.add_argument("--checkpointing", default="full", choices=["full", "none"])
    # Speed options of our model (wan_model/speed.py's SpeedOptions); the defaults here are the plain path.
    ap.add_argument("--compile", action="store_true", help="torch.compile every block (ours)")
    ap.add_argument("--save-attention", default="none", choices=["none", "all", "every_k", "auto"],
                    help="keep self-attention outputs through checkpointing (ours); auto: the memory plan's choice "
                         "within --memory-gib (else the device's memory)")
    ap.add_argument("--save-every", type=int, default=2, help="k of --save-attention every_k")
    ap.add_argument("--fp8", default="none", choices=["none", "storage", "matmul", "matmul_dgrad"],
                    help="frozen block linears in e4m3 (ours)")
    ap.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "fp8", "cudnn_fp8"],
                    help="attention backend; fp8: 8-bit self-attention forward, bf16 backward; cudnn_fp8: cuDNN's "
                         "FP8 self-attention forward and backward")
    ap.add_argument("--fp8-fast-accum", action="store_true",
                    help="with --fp8 matmul / matmul_dgrad: fast accumulation in the forward FP8 GEMMs (the sampler's; "
                         "training's default keeps cuBLAS's promoted accumulation): speed.fp8_fast_accum")
    ap.add_argument("--no-compiled-checkpoint", action="store_true",
                    help="with --compile: the checkpoint around the compiled block in every block, not the compiled "
                         "checkpoint call in blocks that keep attention (speed.compiled_checkpoint: false)")
    ap.add_argument("--offload", default="none", choices=["none", "blocks"],
                    help="stream base weights from host memory (ours)")
    ap.add_argument("--label", default="", help="a name for this run in the JSON")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="cap this process's GPU memory during the training steps (24 GiB mode: 24/79.1)")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="cap the training steps at this many GiB (sets --memory-fraction from the card's size)")
    ap.add_argument("--host-checkpoints", nargs="?", const="on", default="off", choices=["off", "on", "auto"],
                    help="keep checkpointed block inputs in pinned host memory (ours); auto: the plan chooses "
                         "(with --save-attention auto)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after the timed steps, one more under torch.profiler: GPU time by kernel kind, top N kernels")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    # The allocator train_lora.py runs with, set before CUDA starts: with the default one the 720p auto plan
    # ran out of memory with 14.9 GiB reserved but unused (docs/benchmarks.md, the memory plan). Both rows.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    # CPU runs (with a tiny preset) only check that the script works; their numbers mean nothing.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset = PRESETS[args.preset]
    cfg = preset.transformer
    h, w = (int(v) for v in args.size.split("x"))
    latent_shape = (1, cfg.in_dim, *preset.latent_size(h, w, args.frames))
    ceiling = matmul_ceiling(device) if device.type == "cuda" else float("nan")
    results = []
    for impl in args.impl:
        try:
            r = run_one(impl, args, cfg, latent_shape, device)
        except torch.OutOfMemoryError as err:
            r = dict(impl=impl, error=f"out of memory: {str(err).splitlines()[0]}")
        except RuntimeError as err:
            r = dict(impl=impl, error=str(err).splitlines()[0][:300])
        finally:
            set_attention_backend("auto")  # --attention fp8 / cudnn_fp8 set it for our row only
        if "tflops" in r:
            r["utilisation"] = round(r["tflops"] / ceiling, 3)
        results.append(r)
        print(json.dumps(r), flush=True)
    summary = dict(label=args.label, preset=args.preset, speed=dataclasses.asdict(speed_options(args)),
                   attention=args.attention, size=args.size,
                   frames=args.frames, latent_shape=latent_shape,
                   rank=args.rank, checkpointing=args.checkpointing, memory_fraction=args.memory_fraction,
                   memory_gib=args.memory_gib, fp8_fast_accum=args.fp8_fast_accum,
                   matmul_ceiling_tflops=round(ceiling, 1), commit=git_commit(),
                   device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   torch=torch.__version__, results=results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
