"""`python -m train.prepare RECIPE.yaml`: check the whole recipe, then encode its dataset into the cache.

The recipe is validated first (experts, ranges, release files: train/recipe.py), so a mistake in the
training sections shows before an hour of encoding, not after. Then data.prepare.prepare runs on the
recipe's `model` and `dataset` sections with the release's VAE and text encoder, then on the held-out
clips of its `validation` section (into <cache_dir>/validation).
"""

from __future__ import annotations

import argparse
import sys

from data.config import PrepareConfig
from data.prepare import REPORT_NAME, build_encoders, prepare_all

from .recipe import load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="training recipe YAML")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe)
    config = PrepareConfig(model=recipe.model, dataset=recipe.dataset, validation=recipe.validation)
    vae, text_encoder = build_encoders(config.model, seed=config.dataset.seed)
    train, held = prepare_all(config, vae, text_encoder, progress=not args.no_progress)
    for what, report in (("training", train), ("held-out", held)):
        if report is not None:
            print(f"{args.recipe}: {what}: {len(report.used)} clips used, {len(report.skipped)} skipped, "
                  f"{report.encoded} encoded, {report.reused} reused; see {report.cache_dir / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    from .cli import run_cli

    sys.exit(run_cli(main))
