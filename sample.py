"""Render videos with a Wan 2.2 model, with or without LoRA adapters.

Generate one video (T2V-A14B, I2V-A14B or TI2V-5B, from an official release folder):

    python sample.py --release /models/Wan2.2-T2V-A14B --prompt "a red fox running through snow" \\
        --size 480x832 --frames 81 --seed 42 --lora outputs/run/adapters/step-00002000:1.0 --out outputs/fox

  --lora PATH[:STRENGTH][@EXPERT]  a LoRA file, or a folder of per-expert files (our export:
                                   high_noise.safetensors / low_noise.safetensors / dense.safetensors).
                                   A file that names its expert in its metadata (ours do) applies to
                                   that expert only; @high_noise / @low_noise forces it (on a step
                                   folder: that expert's file alone). Repeatable.
  --image IMG                      the first frame (I2V-A14B needs it; TI2V-5B uses it when given).
                                   --size is then the pixel area and the image's aspect ratio gives the
                                   shape, as the official generators do (--exact-size: a centred crop).

Compare adapters on a prompt suite (same seeds, base model first), writing a contact sheet PNG per
prompt and report.html:

    python sample.py evaluate --release DIR --suite recipes/demo_suite.yaml \\
        --adapters outputs/run/adapters/step-00001000 outputs/run/adapters/step-00002000 --run outputs/run

Speed: --fast (= --compile --fp8-weights matmul --fp8-attention) runs a CFG step of T2V-A14B 480p 1.63x
faster than diffusers on an H200 (3.90 s vs 6.36 s; TI2V-5B 704x1280x121 1.78x, 1.33 s vs 2.37 s; 069788e,
stale since cb1fb14 and 9ca32d9, not re-measured);
only --compile keeps the maths (speed options below). The first step of each clip shape compiles (~1 min).
Memory options: --offload-experts (one expert on the GPU at a time), --vae-tiling,
--text-encoder-device cpu. Few-step renders: --guide 1 runs the conditional branch alone (half the cost per
step); several --lora stack on an expert with their own strengths, e.g. a distilled 4-step LoRA beside a
style one: --lora fast.safetensors:1.0 --lora style/:0.8 --steps 4 --guide 1.
Mistakes (a missing or damaged LoRA, a strength like :abc, an unknown @EXPERT, a missing release folder, a
bad suite file) print one `error:` line with the fix and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH in pixels, e.g. 480x832; got {text!r}")
    return h, w


def parse_guide(text: str) -> tuple[float, float]:
    """'3.5' -> (3.5, 3.5); '3.0,4.0' -> (low-noise 3.0, high-noise 4.0)."""
    parts = [float(v) for v in text.split(",")]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise argparse.ArgumentTypeError(f"--guide takes one value or LOW,HIGH; got {text!r}")


def common_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--release", required=True, type=Path, help="official release folder (Wan2.2-T2V-A14B, ...)")
    ap.add_argument("--preset", default=None, help="model preset; default: detected from the release")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--offload-experts", action="store_true", help="keep the idle expert in host memory")
    ap.add_argument("--vae-tiling", action="store_true", help="decode in spatial tiles (less memory)")
    ap.add_argument("--text-encoder-device", default=None, help="e.g. cpu, to keep UMT5 off the GPU")
    ap.add_argument("--solver", default="unipc", choices=["unipc", "dpm++", "euler"],
                    help="unipc (the official default) or dpm++ (the official other option), on their official grids")
    ap.add_argument("--steps", type=int, default=None, help="default: the preset's (40 A14B, 50 5B)")
    ap.add_argument("--shift", type=float, default=None, help="default: the preset's sample shift")
    ap.add_argument("--guide", type=parse_guide, default=None, help="guidance: G or LOW,HIGH")
    from train.cli import add_speed_arguments
    add_speed_arguments(ap)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="sample.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(ap)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default=None,
                    help="default: the official negative prompt; '' is an empty one (diffusers' default; the "
                         "official generate.py reads '' as its default)")
    ap.add_argument("--image", type=Path, default=None, help="first frame for I2V / TI2V")
    ap.add_argument("--size", type=parse_size, default=None,
                    help="HEIGHTxWIDTH, e.g. 480x832; default: the model's (480x832 for A14B, 704x1280 for TI2V-5B). "
                         "With --image it is the pixel area, and the image's aspect ratio gives the shape, as the "
                         "official generators do")
    ap.add_argument("--exact-size", action="store_true",
                    help="with --image: render exactly --size from a centred crop of the image")
    ap.add_argument("--frames", type=int, default=None, help="1+4k; default: the preset's (81 / 121)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", action="append", default=[], help="PATH[:STRENGTH][@EXPERT]; repeatable")
    ap.add_argument("--merge", action="store_true", help="merge LoRAs into the weights (faster, no switching)")
    ap.add_argument("--out", type=Path, default=Path("outputs/samples/sample"),
                    help="output path without extension: writes .mp4 and .png")
    return ap


def load_release_pipeline(args, dtype):
    """The pipeline of `args.release`; a missing or wrong folder is a UsageError naming the fix."""
    from train.cli import UsageError, speed_from_args
    from wan_model.pipeline import load_pipeline

    if not args.release.is_dir():
        raise UsageError(f"--release {args.release}: no such folder; download e.g. Wan-AI/Wan2.2-T2V-A14B there "
                         f"(or run ./launch.sh demo for the tiny one in outputs/demo/release)")
    try:
        return load_pipeline(args.release, args.preset, device=args.device, dtype=dtype,
                             offload_experts=args.offload_experts, text_encoder_device=args.text_encoder_device,
                             vae_tiling=args.vae_tiling, speed=speed_from_args(args))
    except (ValueError, KeyError) as err:
        raise UsageError(f"--release {args.release}: {str(err).splitlines()[0]}") from None


def output_stem(out: Path) -> Path:
    """--out is a path without extension; save_video swaps the suffix for .mp4 / .png, so a name with a dot
    ('fox-0.5') keeps its dot by getting '.mp4' appended first ('fox-0.5.mp4'); 'fox.mp4' stays 'fox'."""
    return out if out.suffix.lower() in ("", ".mp4", ".png") else out.with_name(out.name + ".mp4")


def _release_preset(args):
    """The release's model preset from its config files alone; None when that cannot be told
    (load_release_pipeline then reports what is wrong with the folder)."""
    from wan_model.release import load_release

    try:
        return load_release(args.release, args.preset).preset
    except Exception:
        return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "evaluate":
        from train.evaluate import main as evaluate_main
        return evaluate_main(argv[1:])
    args = build_parser().parse_args(argv)
    from wan_model.lora_apply import parse_lora_spec
    from wan_model.media import save_video
    from wan_model.pipeline import GenerationRequest, snap_size

    from train.cli import UsageError
    from train.recipe import expert_names

    specs = []
    for spec in args.lora:  # checked before any weight is loaded
        try:
            path, strength, expert = parse_lora_spec(spec)
        except ValueError as err:
            raise UsageError(f"--lora: {err}") from None
        if not path.exists():
            raise UsageError(f"--lora {spec}: {path} does not exist; give a LoRA .safetensors file or an adapters "
                             f"step folder (PATH[:STRENGTH][@EXPERT])")
        specs.append((spec, path, strength, expert))
    image = None
    if args.image is not None:
        from wan_model.media import read_image
        try:
            image = read_image(args.image)
        except ValueError as err:
            raise UsageError(f"--image: {err}; give a PNG or JPEG file") from None
    if args.exact_size and image is None:
        raise UsageError("--exact-size sizes an image-conditioned video; give --image FILE, or drop --exact-size "
                         "(without an image the video is --size, on the model's grid)")
    preset = _release_preset(args)  # checks before minutes of weight loading
    task = preset.task if preset else None
    if image is None and task == "i2v":
        raise UsageError(f"--release {args.release} is an image-to-video model: give the first frame with "
                         f"--image FILE (a PNG or JPEG)")
    experts = expert_names(preset) if preset else None
    for spec, _, _, expert in specs:
        if experts and expert and expert not in experts:
            raise UsageError(f"--lora {spec}: @{expert}: this model has no expert {expert!r}; its experts are "
                             f"{', '.join(experts)}")
    if args.guide and task == "ti2v" and args.guide[0] != args.guide[1]:
        raise UsageError(f"--guide {args.guide[0]:g},{args.guide[1]:g}: TI2V-5B is one model (no experts); give "
                         f"one scale, e.g. --guide 5")
    dtype = getattr(torch, args.dtype)
    pipe = load_release_pipeline(args, dtype)
    for spec, path, strength, expert in specs:
        try:
            report = pipe.add_lora(path, strength, expert, merge=args.merge)
        except Exception as err:  # a damaged file (safetensors' own error type), another model's LoRA, ...
            if isinstance(err, (MemoryError, KeyboardInterrupt, torch.OutOfMemoryError)):
                raise
            hint = "" if isinstance(err, ValueError) else ("; not a readable .safetensors file: re-export or "
                                                           "re-download it")
            raise UsageError(f"--lora {spec}: {str(err).splitlines()[0]}{hint}") from None
        print(report)
    # --size on the model's grid, once (a warning when it moves); generate() then has nothing to snap
    height, width, frames = snap_size(*(args.size or pipe.preset.sample_size), args.frames or pipe.preset.frame_num,
                                      pipe.preset)
    request = GenerationRequest(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                                height=height, width=width, frames=frames, steps=args.steps,
                                shift=args.shift, guide_scale=args.guide, solver=args.solver, image=image,
                                fit_image=not args.exact_size)
    result = pipe.generate(request, progress=True)
    rendered = tuple(result.video.shape[-2:])
    if image is not None and not args.exact_size and rendered != (height, width):
        print(f"rendered {rendered[0]}x{rendered[1]}: the area of {height}x{width} at the image's aspect "
              f"ratio ({image.shape[-2]}x{image.shape[-1]}); --exact-size renders {height}x{width} from a "
              f"centred crop")
    mp4, png = save_video(result.video, output_stem(args.out), fps=pipe.preset.sample_fps)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    print(f"wrote {mp4} and {png} ({timing})")
    return 0


if __name__ == "__main__":
    from train.cli import run_cli

    raise SystemExit(run_cli(main))
