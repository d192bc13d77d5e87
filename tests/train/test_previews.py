"""Preview videos during training (train/previews.py) through train_lora.py on a tiny release."""

from pathlib import Path

import yaml

import train_lora
from tests.train.test_checkpoints import _tiny_run


def test_previews_render_at_the_interval_with_the_live_adapters(tmp_path):
    recipe = _tiny_run(tmp_path, steps=4, out="run")
    body = yaml.safe_load(recipe.read_text())
    body["training"].update(sample_every=2, sample_prompts=["mystyle, a red ball"], sample_size=[32, 32, 5],
                            sample_steps=2, phase_steps=1, save_every=0)
    recipe.write_text(yaml.safe_dump(body))
    assert train_lora.main([str(recipe)]) == 0
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-00000002", "step-00000004"]
    first, last = (samples / step / "0.png" for step in ("step-00000002", "step-00000004"))
    assert (samples / "step-00000002" / "0.mp4").stat().st_size > 0
    # Both experts trained between the previews: the same seed renders a different video.
    assert first.read_bytes() != last.read_bytes()
    assert (tmp_path / "run" / "recipe.yaml").read_text() == recipe.read_text()
    # Training went on after each preview: adapters of step 4 exist for both experts.
    for expert in ("high_noise", "low_noise"):
        assert (tmp_path / "run" / "adapters" / "step-00000004" / f"{expert}.safetensors").is_file()


def test_i2v_recipe_on_a_fresh_folder_makes_its_inputs_and_previews_from_a_held_out_clip(tmp_path):
    """The quickstart recipe switched to tiny-i2v, every path new: train_lora.py writes the tiny release, the
    demo clips and the cache (training and held-out), trains, and its I2V previews take their first frame
    from the held-out clip (issue 15: this once stopped at the first preview with a traceback)."""
    from pathlib import Path

    from data.cache import LatentCache

    body = yaml.safe_load((Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml").read_text())
    body["model"].update(preset="tiny-i2v", release=str(tmp_path / "release"))
    body["dataset"].update(root=str(tmp_path / "clips"), cache_dir=str(tmp_path / "cache"))
    body["training"].update(steps=4, phase_steps=2, save_every=0, sample_every=4, sample_size=[64, 64, 5],
                            sample_steps=2, output_dir=str(tmp_path / "run"))
    body["validation"].update(every=2)
    recipe = tmp_path / "i2v.yaml"
    recipe.write_text(yaml.safe_dump(body))
    assert train_lora.main([str(recipe)]) == 0
    assert (tmp_path / "release" / "Wan2.1_VAE.pth").is_file() and any((tmp_path / "clips").glob("*.mp4"))
    held = LatentCache(tmp_path / "cache" / "validation")
    assert len(held.entries) == 1 and "image_cond" in held.read(next(iter(held.entries)))[0]
    assert (tmp_path / "run" / "samples" / "step-00000004" / "0.mp4").stat().st_size > 0
    card = (tmp_path / "run" / "adapters" / "step-00000004" / "README.md").read_text()
    assert "image-to-video" in card and "preview-0.png" in card


def test_i2v_previews_without_a_first_frame_are_refused_before_step_0(tmp_path):
    import pytest

    from data.typed_config import ConfigError
    from train.recipe import load_recipe

    recipe = _tiny_run(tmp_path, steps=4, out="run")
    body = yaml.safe_load(recipe.read_text())
    body["model"]["preset"] = "tiny-i2v"
    body["training"].update(sample_every=2, sample_prompts=["a red ball"])
    recipe.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="sample_image"):
        load_recipe(recipe, check_release=False)
    body["training"]["sample_image"] = str(tmp_path / "missing.png")
    recipe.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="not a file"):
        load_recipe(recipe, check_release=False)
    body["training"]["sample_image"] = "relative/missing.png"  # the message names where it looked
    recipe.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match=rf"looked for {Path.cwd() / 'relative' / 'missing.png'}"):
        load_recipe(recipe, check_release=False)
