"""data/prepare.py end to end on the demo dataset (data.demo_clips): cache reuse, invalidation, corruption
repair, resume after an interruption, bad inputs skipped with reasons, the I2V image condition, the YAML
entry point and the real tiny VAE + UMT5 (wan_model.vae_io / wan_model.text_encoder)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from data.cache import LatentCache
from data.config import (BucketSettings, DatasetConfig, FilterSettings, ModelSource, PrepareConfig, WindowSettings,
                         load_prepare_config)
from data.demo_clips import DEMO_CLIPS, render_clip, render_demo_dataset
from data.prepare import prepare
from data.typed_config import ConfigError
from wan_model.config import PRESETS
from wan_model.media import write_mp4

# Demo clips here are 9 frames of 64 x 96 at 16 fps; one bucket size (aspect 1.5 -> 96 x 64), 9 frames.
BUCKETS = BucketSettings(base_area=64 * 96, aspects=(1.5, 1.0), frame_counts=(9,))
FILTERS = FilterSettings(min_width=32, min_height=32)


class StandInVAE(torch.nn.Module):
    """Deterministic stand-in for wan_model's VAE: latents = stride-pooled pixels projected to z channels.

    video [B, 3, F, H, W] -> mean, logvar [B, z, 1 + (F-1)/4, H/s, W/s]; counts calls; raises after
    `fail_after` calls (an interruption)."""

    def __init__(self, preset="tiny-t2v", fail_after: int | None = None):
        super().__init__()
        self.config = PRESETS[preset].vae
        self.proj = torch.nn.Parameter(torch.linspace(-1, 1, 3 * self.config.z_dim).view(self.config.z_dim, 3))
        self.calls, self.fail_after = 0, fail_after

    @property
    def stride(self):
        return self.config.stride

    @property
    def z_dim(self):
        return self.config.z_dim

    def encode_distribution(self, video):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("stand-in interruption")
        self.calls += 1
        st, sh, sw = self.stride
        first = video[:, :, :1]
        rest = video[:, :, 1:]
        if rest.shape[2]:
            rest = F.avg_pool3d(rest, (st, 1, 1))
        pooled = F.avg_pool3d(torch.cat([first, rest], 2), (1, sh, sw))  # [B, 3, F', H', W']
        mean = torch.einsum("zc,bcfhw->bzfhw", self.proj, pooled)
        return mean, torch.full_like(mean, -4.0)


class StandInText:
    """prompts -> context [B, 512, 8] (a hash of each word), zero past len = words + 1 (EOS); counts calls."""

    def __init__(self, dim=8):
        self.dim, self.calls = dim, 0

    def encode(self, prompts):
        self.calls += 1
        lens = torch.tensor([len(p.split()) + 1 for p in prompts])
        context = torch.zeros(len(prompts), 512, self.dim)
        for b, p in enumerate(prompts):
            for i, word in enumerate(p.split() + ["</s>"]):
                context[b, i] = torch.randn(self.dim, generator=torch.Generator().manual_seed(hash(word) % 2**31))
        return context, lens


def make_config(root, cache, preset="tiny-t2v", **dataset) -> PrepareConfig:
    ds = dict(root=str(root), cache_dir=str(cache), trigger="demo", buckets=BUCKETS, filters=FILTERS,
              prompt_variants=3)
    ds.update(dataset)
    return PrepareConfig(model=ModelSource(preset=preset, dtype="float32"), dataset=DatasetConfig(**ds))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """4 demo clips of 9 frames (2 captioned by sidecars, 2 by metadata.jsonl with user labels)."""
    return render_demo_dataset(tmp_path_factory.mktemp("demo") / "clips", num_clips=4, frames=9)


@pytest.fixture(scope="module")
def prepared(demo, tmp_path_factory):
    """One full prepare of the demo with stand-in encoders; later tests start from copies of its cache
    (measuring labels from pixels is the slow part on CPU, and labels.json keeps it)."""
    cache = tmp_path_factory.mktemp("prepared") / "cache"
    vae, text = StandInVAE(), StandInText()
    report = prepare(make_config(demo, cache), vae, text, progress=False)
    return cache, report, vae, text


@pytest.fixture
def dataset(demo, tmp_path):
    root = tmp_path / "clips"
    shutil.copytree(demo, root)
    return root


def copy_cache(prepared, tmp_path, labels_only=False):
    target = tmp_path / "cache"
    if labels_only:
        target.mkdir()
        shutil.copy(prepared[0] / "labels.json", target / "labels.json")
    else:
        shutil.copytree(prepared[0], target)
    return target


def test_demo_end_to_end_then_everything_reused(prepared, dataset, tmp_path):
    cache, report, vae, text = prepared
    assert len(report.used) == 4 and not report.skipped
    assert vae.calls == 4 and text.calls == 4 and report.encoded == 4
    entries = LatentCache(cache).entries
    assert {e["bucket"] for e in entries.values()} == {"96x64x9"}  # 96 x 64 is aspect 1.5
    tensors, meta = LatentCache(cache).read(next(iter(entries)))
    assert tensors["latent_mean"].shape == (16, 3, 8, 12)  # 9 frames -> 1 + 8/4 latent frames, 64/8 x 96/8
    assert tensors["context"].shape[0] == 3 and tensors["context_lens"].shape == (3,)
    assert tensors["context"].shape[1] == int(tensors["context_lens"].max())  # stored trimmed
    assert all(p == "" or p.startswith("demo, ") for p in meta["prompts"])
    assert meta["labels"]["source"]  # labels measured from pixels (and user ones from metadata.jsonl)
    saved = json.loads((cache / "report.json").read_text())
    assert saved["used"] == 4 and {c["status"] for c in saved["clips"]} == {"used"}
    card = (cache / "dataset_card.md").read_text()
    assert "| 96x64x9 | 4 |" in card and "camera motion" in card
    assert (cache / "contact_sheet.png").stat().st_size > 0

    cache = copy_cache(prepared, tmp_path)  # the dataset moved to another folder: same bytes, same keys
    vae2, text2 = StandInVAE(), StandInText()
    again = prepare(make_config(dataset, cache), vae2, text2, progress=False)
    assert vae2.calls == 0 and text2.calls == 0 and again.reused == 4 and again.encoded == 0


def test_changed_clip_or_setting_reencodes(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path)
    target = sorted(dataset.glob("*.mp4"))[0]
    frames = render_clip(DEMO_CLIPS[2], (64, 96), 9, seed=99)
    write_mp4(frames.permute(0, 2, 3, 1).numpy(), target, fps=16, crf=23)
    vae = StandInVAE()
    report = prepare(make_config(dataset, cache), vae, StandInText(), progress=False)
    assert vae.calls == 1 and report.reused == 3 and report.pruned == 1  # the old entry of that clip is gone
    assert len(LatentCache(cache).entries) == 4

    vae = StandInVAE()
    report = prepare(make_config(dataset, cache, trigger="other"), vae, StandInText(), progress=False)
    assert vae.calls == 4 and report.reused == 0 and report.pruned == 4


def test_corrupt_shard_is_reported_and_reencoded(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path)
    store = LatentCache(cache)
    shard = store.shard_path(sorted(store.entries)[0])
    shard.write_bytes(shard.read_bytes()[:100])
    vae = StandInVAE()
    report = prepare(make_config(dataset, cache), vae, StandInText(), progress=False)
    assert len(report.repaired) == 1 and "truncated" in report.repaired[0]
    assert vae.calls == 1 and LatentCache(cache).verify(sorted(store.entries)[0]) is None


def test_interrupted_prepare_resumes(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path, labels_only=True)
    with pytest.raises(KeyboardInterrupt):
        prepare(make_config(dataset, cache), StandInVAE(fail_after=2), StandInText(), progress=False)
    kept = LatentCache(cache)
    assert len(kept.entries) == 2 and all(kept.verify(k) is None for k in kept.entries)
    assert not list(cache.rglob("*.tmp"))
    vae = StandInVAE()
    report = prepare(make_config(dataset, cache), vae, StandInText(), progress=False)
    assert vae.calls == 2 and report.reused == 2


def test_bad_inputs_are_skipped_with_reasons(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path, labels_only=True)
    (dataset / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    (dataset / "broken.txt").write_text("a broken clip")
    short = render_clip(DEMO_CLIPS[0], (64, 96), 5, seed=5)  # 5 frames < the 9-frame bucket
    write_mp4(short.permute(0, 2, 3, 1).numpy(), dataset / "short.mp4", fps=16)
    (dataset / "short.txt").write_text("too short")
    (dataset / "empty.mp4").write_bytes((dataset / "short.mp4").read_bytes() + b"x")
    (dataset / "empty.txt").write_text("\n")
    (dataset / "latin.mp4").write_bytes((dataset / "short.mp4").read_bytes() + b"y")
    (dataset / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    tiny = render_clip(DEMO_CLIPS[1], (16, 16), 9, seed=6)
    write_mp4(tiny.permute(0, 2, 3, 1).numpy(), dataset / "tiny.mp4", fps=16)
    (dataset / "tiny.txt").write_text("too small")
    report = prepare(make_config(dataset, cache), StandInVAE(), StandInText(), progress=False)
    reasons = {c.clip_id: c.reason for c in report.skipped}
    assert "cannot decode" in reasons["broken.mp4"]
    assert "shorter than the shortest bucket (9 frames)" in reasons["short.mp4"]
    assert "empty" in reasons["empty.mp4"] and "not UTF-8" in reasons["latin.mp4"]
    assert "below the minimum 32x32" in reasons["tiny.mp4"]
    assert len(report.used) == 4
    saved = json.loads((cache / "report.json").read_text())
    assert {c["clip_id"]: c["reason"] for c in saved["clips"] if c["status"] == "skipped"} == reasons


def test_duplicates_and_low_scores_filtered(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path, labels_only=True)
    first = sorted(dataset.glob("*.mp4"))[0]
    shutil.copy(first, dataset / "copy.mp4")
    shutil.copy(first.with_suffix(".txt"), dataset / "copy.txt")
    config = make_config(dataset, cache, filters=FilterSettings(min_width=32, min_height=32,
                                                                               min_score=0.5))
    report = prepare(config, StandInVAE(), StandInText(), progress=False)
    reasons = {c.clip_id: c.reason for c in report.skipped}
    assert "byte-identical to" in reasons["copy.mp4"]
    assert "aesthetic score 0.400 is below" in reasons["clip_03_dark.mp4"]  # user score from metadata.jsonl


def test_i2v_image_condition_is_first_frame_then_zero_frames(prepared, dataset, tmp_path):
    cache = copy_cache(prepared, tmp_path, labels_only=True)
    vae = StandInVAE("tiny-i2v")
    prepare(make_config(dataset, cache, preset="tiny-i2v"), vae, StandInText(), progress=False)
    store = LatentCache(cache)
    tensors, meta = store.read(sorted(store.entries)[0])
    assert tensors["image_cond"].shape == tensors["latent_mean"].shape == (16, 3, 8, 12)
    from data.video import probe, read_frames, to_model_range
    info = probe(meta["path"])
    frames = read_frames(meta["path"], info.indices_at(16)[:9], (64, 96))
    video = to_model_range(frames)[None]
    cond = torch.zeros_like(video)
    cond[:, :, 0] = video[:, :, 0]
    expected = StandInVAE("tiny-i2v").encode_distribution(cond)[0][0]
    torch.testing.assert_close(tensors["image_cond"], expected)
    assert tensors["image_cond"][:, 1:].abs().max() < 1e-6  # later latent frames encode zeros, mid-grey (stand-in: 0)


def test_i2v_trains_on_clips_not_stills(prepared, dataset, tmp_path):
    """An I2V sample is conditioned on its own first frame: a one-frame bucket would give it the answer, so
    prepare for an I2V preset leaves frame count 1 out (a short clip is skipped, saying why), and frame
    counts of 1 alone are refused."""
    cache = copy_cache(prepared, tmp_path, labels_only=True)
    short = render_clip(DEMO_CLIPS[0], (64, 96), 5, seed=5)
    write_mp4(short.permute(0, 2, 3, 1).numpy(), dataset / "short.mp4", fps=16)
    (dataset / "short.txt").write_text("a short clip")
    buckets = dataclasses.replace(BUCKETS, frame_counts=(9, 1))
    t2v = prepare(make_config(dataset, tmp_path / "t2v", buckets=buckets), StandInVAE(), StandInText(),
                  progress=False)
    assert {c.clip_id: c.bucket for c in t2v.used}["short.mp4"].endswith("x1")  # T2V: its first frame, a still
    report = prepare(make_config(dataset, cache, preset="tiny-i2v", buckets=buckets), StandInVAE("tiny-i2v"),
                     StandInText(), progress=False)
    reasons = {c.clip_id: c.reason for c in report.skipped}
    assert "an I2V model trains on clips of 5 frames or more, not stills" in reasons["short.mp4"]
    assert "add a length 1 + 4k of at most 5" in reasons["short.mp4"] and len(report.used) == 4
    stills = dataclasses.replace(BUCKETS, frame_counts=(1,))
    with pytest.raises(ConfigError, match=r"frame_counts \[1\]: tiny-i2v trains on clips.*such as 9"):
        prepare(make_config(dataset, cache, preset="tiny-i2v", buckets=stills), StandInVAE("tiny-i2v"), StandInText(),
                progress=False)


def test_vae_of_another_kind_is_refused(dataset, tmp_path):
    with pytest.raises(ValueError, match="tiny-ti2v.*wan2.2 VAE latents, but the VAE given is 'wan2.1'"):
        prepare(make_config(dataset, tmp_path / "cache", preset="tiny-ti2v"), StandInVAE(), StandInText(),
                progress=False)


def test_yaml_recipe_reads_model_and_dataset_only(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny-t2v, dtype: float32}\n"
                      "dataset: {root: clips, trigger: fox, buckets: {frame_counts: [17]}}\n"
                      "experts: {high_noise: {whatever: 1}}\ntrain: {steps: 10}\n")
    config = load_prepare_config(recipe)
    assert config.dataset.trigger == "fox" and config.dataset.buckets.frame_counts == (17,)
    assert config.model.preset == "tiny-t2v" and config.dataset.caption_dropout == 0.05
    recipe.write_text("dataset: {root: clips, trigger_word: fox}\n")
    with pytest.raises(ConfigError, match="dataset.trigger_word is not a known key; did you mean 'trigger'"):
        load_prepare_config(recipe)
    recipe.write_text("dataset: {root: clips, label_dropout: 1.5}\n")
    with pytest.raises(ConfigError, match=r"label_dropout must be in \[0, 1\]"):
        load_prepare_config(recipe)
    for fps in (0, -16):  # 0 fell back to the model's rate silently
        recipe.write_text(f"dataset: {{root: clips, fps: {fps}}}\n")
        with pytest.raises(ConfigError, match="fps must be at least 1"):
            load_prepare_config(recipe)


def test_cli_with_a_tiny_release(demo, tmp_path):
    """The real loaders and models: wan_model.tiny_release writes a random-weight release in the official
    layout; `python -m data.prepare --release` loads its VAE (.pth) and UMT5 (+ tokenizer) and encodes."""
    from data.prepare import main
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    root = tmp_path / "clips"
    root.mkdir()
    shutil.copy(sorted(demo.glob("*.mp4"))[0], root / "clip.mp4")  # one clip keeps the real VAE cheap on CPU
    (root / "clip.txt").write_text("a slow pan across a stone wall\n")
    config = tmp_path / "prepare.yaml"
    config.write_text(f"model: {{preset: tiny-t2v, dtype: float32}}\n"
                      f"dataset: {{root: {root}, cache_dir: {tmp_path / 'cache'}, prompt_variants: 2, "
                      f"buckets: {{base_area: 6144, aspects: [1.5], frame_counts: [5]}}, "
                      f"filters: {{min_width: 32, min_height: 32}}}}\n")
    assert main([str(config), "--release", str(release), "--no-progress"]) == 0
    store = LatentCache(tmp_path / "cache")
    (key,) = store.entries
    tensors, meta = store.read(key)
    assert tensors["latent_mean"].shape == (16, 2, 8, 12)  # tiny 2.1 VAE: stride (4, 8, 8); 5 frames -> 2
    assert tensors["context"].shape[-1] == 32 and torch.isfinite(tensors["latent_mean"]).all()
    assert meta["settings"]["release"] == str(release.resolve())  # the weights are part of the cache key


def test_random_tiny_encoders_only_for_tiny_presets():
    from data.prepare import build_encoders

    vae, text = build_encoders(ModelSource(preset="tiny-ti2v", dtype="float32"), device="cpu")
    assert vae.config.kind == "wan2.2" and text.encode(["a fox"])[0].shape == (1, 512, 32)
    with pytest.raises(ValueError, match="needs its weights: set model.release"):
        build_encoders(ModelSource(preset="t2v-A14B"), device="cpu")


def test_windows_and_images(demo, tmp_path):
    """Two windows of one clip: two entries, prompts encoded once; an image goes to a 1-frame bucket."""
    from PIL import Image

    root = tmp_path / "clips"
    root.mkdir()
    first = sorted(demo.glob("*.mp4"))[0]
    shutil.copy(first, root / "clip.mp4")
    (root / "clip.txt").write_text("a clip\n")
    Image.fromarray(render_clip(DEMO_CLIPS[4], (64, 96), 1, seed=1)[0].permute(1, 2, 0).numpy()).save(root / "still.png")
    (root / "still.txt").write_text("a still\n")
    config = make_config(root, tmp_path / "cache", buckets=BucketSettings(base_area=64 * 96, aspects=(1.5,),
                                                                           frame_counts=(5, 1)),
                         windows=WindowSettings(mode="uniform", max_windows=2))
    vae, text = StandInVAE(), StandInText()
    report = prepare(config, vae, text, progress=False)
    by_id = {c.clip_id: c for c in report.used}
    assert by_id["clip.mp4"].bucket == "96x64x5" and len(by_id["clip.mp4"].entries) == 2
    assert by_id["still.png"].bucket == "96x64x1" and "camera_motion" not in by_id["still.png"].labels["source"]
    assert vae.calls == 3 and text.calls == 2  # 2 windows + 1 image; one text encoding per clip
    store = LatentCache(tmp_path / "cache")
    windows = sorted(store.read(k)[1]["frames"][0] for k in by_id["clip.mp4"].entries)
    assert windows == [0, 4]  # 9 frames, windows of 5 spread evenly: starts 0 and 4


def test_held_out_split_is_seeded_and_never_trained_on(demo, tmp_path, monkeypatch):
    """validation.fraction: the held-out clips are chosen by id and seed, cached apart, absent from training.
    Each clip is probed once: the split's usability check keeps its probe for prepare."""
    import collections
    import dataclasses

    import data.prepare
    from data.config import ValidationSettings
    from data.prepare import held_out_ids, prepare_all

    probed = collections.Counter()

    def counting_probe(path, _probe=data.prepare.probe):
        probed[str(path)] += 1
        return _probe(path)

    monkeypatch.setattr(data.prepare, "probe", counting_probe)

    ids = [f"clip{i}" for i in range(10)]
    assert held_out_ids(ids, 0.2, seed=0) == held_out_ids(list(reversed(ids)), 0.2, seed=0)
    assert len(held_out_ids(ids, 0.2, seed=0)) == 2
    assert len({frozenset(held_out_ids(ids, 0.2, seed=s)) for s in range(5)}) > 1  # the seed chooses
    assert len(held_out_ids(ids[:3], 0.01, seed=0)) == 1  # at least one
    assert len(held_out_ids(ids[:2], 0.9, seed=0)) == 1  # never all
    config = dataclasses.replace(make_config(demo, tmp_path / "cache"), validation=ValidationSettings(fraction=0.3))
    train, held = prepare_all(config, StandInVAE(), StandInText(), progress=False)
    train_ids = {c.clip_id for c in train.used}
    held_ids = {c.clip_id for c in held.used}
    assert held_ids and train_ids and not train_ids & held_ids
    assert held.cache_dir == tmp_path / "cache" / "validation"
    assert probed and set(probed.values()) == {1}, probed
    from data.dataset import CachedDataset

    assert {CachedDataset(tmp_path / "cache")[i]["clip_id"] for i in range(len(CachedDataset(tmp_path / "cache")))} \
        == train_ids


def test_validation_root_must_not_be_the_training_folder(demo, tmp_path):
    import dataclasses

    from data.config import ValidationSettings
    from data.prepare import prepare_all

    for root in (demo, demo / "held-out", demo.parent):  # the same folder, one inside, one around
        config = dataclasses.replace(make_config(demo, tmp_path / "cache"), validation=ValidationSettings(root=str(root)))
        with pytest.raises(ValueError, match="would be trained on"):
            prepare_all(config, StandInVAE(), StandInText(), progress=False)


def test_a_copy_of_a_clip_lands_on_the_same_side_of_the_split(demo, tmp_path):
    """One clip under two names must not be trained on and held out at once (the split is by content)."""
    import dataclasses

    from data.config import ValidationSettings
    from data.prepare import prepare_all

    root = tmp_path / "clips"
    shutil.copytree(demo, root)
    first = sorted(root.glob("*.mp4"))[0]
    for seed in range(4):  # whichever side the content is drawn to, its copy follows
        copy = root / f"copy_{seed}{first.suffix}"
        shutil.copyfile(first, copy)
        (root / f"copy_{seed}.txt").write_text("a copied clip\n")
        config = dataclasses.replace(make_config(root, tmp_path / f"cache{seed}"),
                                     validation=ValidationSettings(fraction=0.3, seed=seed))
        train, held = prepare_all(config, StandInVAE(), StandInText(), progress=False)
        train_all = {c.clip_id for c in train.clips}
        held_all = {c.clip_id for c in held.clips}
        assert ({first.name, copy.name} <= train_all) or ({first.name, copy.name} <= held_all), seed
        copy.unlink()
        (root / f"copy_{seed}.txt").unlink()


def test_an_i2v_split_holds_out_only_clips_prepare_can_use(demo, tmp_path):
    """The split is drawn among clips with a bucket: an I2V still (or a clip shorter than every bucket) drawn
    as the held-out clip left the validation set empty, and prepare failed with a traceback."""
    from data.config import ValidationSettings
    from data.prepare import held_out_ids, prepare_all

    root = tmp_path / "clips"
    shutil.copytree(demo, root)
    short = render_clip(DEMO_CLIPS[0], (64, 96), 3, seed=5)
    write_mp4(short.permute(0, 2, 3, 1).numpy(), root / "short.mp4", fps=16)
    (root / "short.txt").write_text("a short clip")
    ids = sorted(p.name for p in root.glob("*.mp4"))
    seed = next(s for s in range(50) if "short.mp4" in held_out_ids(ids, 0.2, s))  # drawn among every clip
    config = dataclasses.replace(make_config(root, tmp_path / "cache", preset="tiny-i2v"),
                                 validation=ValidationSettings(fraction=0.2, seed=seed))
    train, held = prepare_all(config, StandInVAE("tiny-i2v"), StandInText(), progress=False)
    assert held.used and not [c for c in held.clips if c.status == "skipped"]
    assert "short.mp4" in {c.clip_id for c in train.clips if c.status == "skipped"}


def test_a_split_does_not_draw_a_clip_its_metadata_score_filters_out(demo):
    """usable_media: a clip whose metadata score is below filters.min_score would be skipped by prepare, so a
    validation split does not draw it."""
    from data.prepare import training_buckets, usable_media
    from data.scan import scan_folder

    ds = make_config(demo, "unused").dataset
    strict = dataclasses.replace(ds, filters=FilterSettings(min_width=32, min_height=32, min_score=0.5))
    preset = PRESETS["tiny-t2v"]
    dark = next(item for item in scan_folder(demo, ds.metadata).items if item.clip_id == "clip_03_dark.mp4")
    assert dark.score == pytest.approx(0.4)
    assert usable_media(dark, ds, preset, training_buckets(ds, preset))
    assert not usable_media(dark, strict, preset, training_buckets(strict, preset))
