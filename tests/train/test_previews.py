"""Preview videos during training (train/previews.py) through train_lora.py on a tiny release."""

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
