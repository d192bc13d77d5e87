import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bad_recipe_prints_one_error_line_and_exits_2(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny-t2v}\ndataset: {root: clips}\ntraining: {stpes: 3}\n")
    for command in (["train_lora.py"], ["-m", "train.prepare"]):
        proc = subprocess.run([sys.executable, *command, str(recipe)], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().startswith("error: ")
        assert "training.stpes is not a known key; did you mean 'steps'" in proc.stderr
