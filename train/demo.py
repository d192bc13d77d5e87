"""The embedded default, end to end: `./launch.sh demo` (or `python -m train.demo`).

  1. writes a tiny random Wan model (tiny-t2v: both experts, VAE, UMT5, tokenizer) in the official
     release layout under outputs/demo/release (nothing is downloaded);
  2. renders the bundled procedural demo clips with captions and labels, all in one look to learn (a violet
     cast over diagonal bands; outputs/demo/clips);
  3. prepares them: labels, prompts, buckets, VAE latents and text embeddings (outputs/demo/cache);
  4. trains a LoRA for each expert from recipes/quickstart.yaml (outputs/quickstart), scoring one held-out
     clip every 50 steps (validation loss);
  5. renders a prompt suite with and without the adapters, writes contact sheets and report.html, and
     prints how much of the palette distance to the training clips the adapters close.

Every step reuses what an earlier run left (the release, the cache); training starts fresh unless
--resume is given. The same steps by hand are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

RECIPE = Path("recipes/quickstart.yaml")
SUITE = Path("recipes/demo_suite.yaml")


DEMO_GRADE = "mystyle"  # the look every demo clip shares, and that the adapters learn (data/demo_clips.py)


def say(message: str) -> None:
    print(f"[wanlora demo] {message}", flush=True)


def ensure_tiny_inputs(recipe_path: str | Path, fresh_clips: bool = False,
                       tell=lambda step, text: say(f"{step}/5 {text}")) -> bool:
    """What a tiny-* recipe trains on, made where missing: the tiny release (official layout, random
    transformers), the demo clips in dataset.root, and the cache (train.prepare). Returns False, doing
    nothing, for a recipe of a real model. fresh_clips: render the clips even when the folder exists."""
    from data.cache import INDEX_NAME
    from data.config import VALIDATION_FOLDER
    from data.demo_clips import render_demo_dataset
    from train.recipe import load_recipe
    from wan_model.release import load_release
    from wan_model.tiny_release import write_tiny_release

    recipe = load_recipe(recipe_path, check_release=False)
    if not recipe.preset.name.startswith("tiny-"):
        return False
    release_dir, clips_dir = Path(recipe.model.release), Path(recipe.dataset.root)
    cache = Path(recipe.dataset.cache_dir)
    caches = [cache] + ([cache / VALIDATION_FOLDER] if recipe.validation.enabled else [])
    prepared = all((c / INDEX_NAME).is_file() for c in caches)
    complete = release_dir.is_dir() and clips_dir.exists() and prepared
    if not complete and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Several processes would write the same files at once: make them once, in one process.
        raise FileNotFoundError(f"{recipe_path}: the tiny release, demo clips or cache are missing; make them once "
                                f"with `python train_lora.py {recipe_path} --max-steps 1` or ./launch.sh demo, then "
                                f"launch the processes")
    try:
        load_release(release_dir, recipe.preset.name)
        tell(1, f"tiny {recipe.preset.name} release already at {release_dir}")
    except (FileNotFoundError, ValueError):
        tell(1, f"writing a tiny random {recipe.preset.name} release (official layout) to {release_dir}")
        write_tiny_release(release_dir, recipe.preset.name, seed=recipe.training.seed)
    if fresh_clips or not clips_dir.exists():
        tell(2, f"rendering the demo clips (a shared '{DEMO_GRADE}' look) into {clips_dir}")
        render_demo_dataset(clips_dir, grade=DEMO_GRADE)
    if fresh_clips or not prepared:
        tell(3, f"preparing: labels, prompts, buckets, latents and text embeddings -> {cache}")
        from train.prepare import main as prepare_main
        if prepare_main([str(recipe_path)]) != 0:
            raise RuntimeError(f"preparing {recipe_path} failed")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="launch.sh demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=RECIPE)
    ap.add_argument("--suite", type=Path, default=SUITE)
    ap.add_argument("--resume", action="store_true", help="continue the last training run instead of a fresh one")
    args = ap.parse_args(argv)

    import torch

    from train.evaluate import Variant, evaluate, load_suite
    from train.recipe import load_recipe
    from wan_model.pipeline import load_pipeline

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, check_release=False)
    release_dir, clips_dir = Path(recipe.model.release), Path(recipe.dataset.root)
    if not ensure_tiny_inputs(args.recipe, fresh_clips=True):
        say(f"{args.recipe} is a recipe for {recipe.preset.name}; the demo runs the tiny-* presets only")
        return 1

    output_dir = Path(recipe.training.output_dir)
    if not args.resume and output_dir.exists():
        shutil.rmtree(output_dir)
    import train_lora
    from train.checkpoints import checkpoint_root, list_checkpoints
    from train.export import adapter_dir

    done = list_checkpoints(checkpoint_root(output_dir)) if args.resume else []
    finished = adapter_dir(output_dir, recipe.training.steps)
    if done and done[-1].name == finished.name and any(finished.glob("*.safetensors")):
        say(f"4/5 training finished earlier ({done[-1].name}, adapters exported); nothing left to train")
    else:
        say(f"4/5 training both experts' LoRAs ({recipe.training.steps} steps) -> {output_dir}")
        if train_lora.main([str(args.recipe)] + (["--resume"] if args.resume else [])) != 0:
            return 1

    steps = sorted((output_dir / "adapters").glob("step-*"))
    if not steps:
        say(f"no adapters were exported under {output_dir / 'adapters'}")
        return 1
    say(f"5/5 sampling the suite {args.suite} with and without the adapters of {steps[-1].name}")
    pipe = load_pipeline(release_dir, recipe.preset.name, device="cpu", dtype=torch.float32)
    variants = [Variant("base"), Variant(steps[-1].name, [steps[-1]], 1.0)]
    report = evaluate(pipe, load_suite(args.suite), variants, output_dir / "eval", run=output_dir,
                      clips_dir=clips_dir, identity={"release": str(release_dir.resolve())})
    summary = json.loads((output_dir / "eval" / "metrics.json").read_text())["summary"]
    adapter = summary["variants"].get(steps[-1].name, {})
    if "closed" in adapter:
        say(f"palette distance to the training clips: base {summary['variants']['base']['palette_distance']:.1f}, "
            f"with the adapters {adapter['palette_distance']:.1f}: the adapters close {adapter['closed']:.0%} of it")

    minutes = (time.perf_counter() - started) / 60
    say(f"done in {minutes:.1f} min. Outputs:")
    rows = [("tiny release (official layout)", release_dir), ("demo clips + captions", clips_dir),
            ("latent / text cache", Path(recipe.dataset.cache_dir)),
            ("dataset card", Path(recipe.dataset.cache_dir) / "dataset_card.md"),
            ("adapters, one file per expert", steps[-1]), ("adapter card", steps[-1] / "README.md"),
            ("checkpoints", output_dir / "checkpoints"), ("run summary (best step)", output_dir / "summary.json"),
            ("previews during training", output_dir / "samples"),
            ("TensorBoard logs", output_dir / "logs"), ("loss curve", output_dir / "metrics.jsonl"),
            ("samples and contact sheets", output_dir / "eval"), ("report", report)]
    for what, path in rows:
        print(f"  {what:32s} {path}")
    print("\nThe same by hand:\n"
          f"  python -m train.prepare {args.recipe}\n"
          f"  accelerate launch train_lora.py {args.recipe}\n"
          f"  python sample.py --release {release_dir} --prompt 'mystyle, a ball' --size 64x64 --frames 9 "
          f"--steps 8 --lora {steps[-1]}\n"
          f"  python sample.py evaluate --release {release_dir} --suite {args.suite} --adapters {steps[-1]} "
          f"--run {output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
