import json

import numpy as np
import pytest

from data.typed_config import ConfigError
from train.evaluate import flicker, load_suite, palette, palette_distance
from train.report import contact_sheet, loss_curve_svg


def test_suite_defaults_seeds_and_relative_image(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text("defaults: {size: 64x96, frames: 9}\n"
                     "prompts:\n"
                     "  - prompt: a red fox\n"
                     "    seeds: [1, 2]\n"
                     "  - a plain string prompt\n"
                     "  - prompt: with image\n"
                     "    image: cat.jpg\n"
                     "    guide: [3.0, 4.0]\n")
    entries = load_suite(suite)
    assert [e.prompt for e in entries] == ["a red fox", "a plain string prompt", "with image"]
    assert entries[0].seeds == [1, 2] and entries[1].seeds == [0]
    assert (entries[0].height, entries[0].width, entries[0].frames) == (64, 96, 9)
    assert entries[2].image == tmp_path / "cat.jpg" and entries[2].guide == (3.0, 4.0)


@pytest.mark.parametrize("entry, message", [
    ("  - prompt: ok\n  - prompt: bad\n    sedes: [1]\n", r"suite.yaml:3: unknown keys \['sedes'\]"),
    ("  - prompt: ok\n  - seeds: [1]\n", r"suite.yaml:3: each entry needs a non-empty 'prompt'"),
    ("  - prompt: ok\n    size: big\n", r"suite.yaml:2: size must be HEIGHTxWIDTH"),
    ("  - prompt: ok\n    seeds: [a]\n", r"suite.yaml:2: seeds must be a list of whole numbers"),
    ("  - prompt: ok\n    guide: strong\n", r"suite.yaml:2: guide must be"),
    ("  - prompt: ok\n    guide: [1, 2, 3]\n", r"suite.yaml:2: guide must be"),
    ("  - prompt: ok\n    solver: ddim\n", r"suite.yaml:2: solver must be one of unipc, euler, dpm\+\+"),
])
def test_bad_entry_names_its_line(tmp_path, entry, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text("prompts:\n" + entry)
    with pytest.raises(ConfigError, match=message):
        load_suite(suite)


def test_palette_and_flicker_match_their_definitions_per_pixel():
    """palette() works on channel planes for speed; here against the definition pixel by pixel (HSV
    saturation (max - min) / max, 0 for black; Rec. 601 luma), on random frames with black and white pixels."""
    frames = np.random.default_rng(0).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    frames[0, 0, 0] = 0
    frames[1, 2, 3] = 255
    pixels = frames.reshape(-1, 3).astype(np.float64)
    high, low = pixels.max(axis=1), pixels.min(axis=1)
    saturation = [(h - lo) / h if h > 0 else 0.0 for h, lo in zip(high, low)]
    expected = {"r": pixels[:, 0].mean(), "g": pixels[:, 1].mean(), "b": pixels[:, 2].mean(),
                "brightness": (pixels @ [0.299, 0.587, 0.114]).mean(), "saturation": np.mean(saturation) * 255,
                "warmth": (pixels[:, 0] - pixels[:, 2]).mean()}
    got = palette(frames)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    frame_luma = (frames.astype(np.float64) @ [0.299, 0.587, 0.114]).mean(axis=(1, 2))
    assert flicker(frames) == pytest.approx(np.abs(np.diff(frame_luma)).mean(), rel=1e-9)


def test_palette_warmth_and_flicker():
    warm = np.zeros((4, 8, 8, 3), np.uint8)
    warm[..., 0], warm[..., 2] = 200, 50
    cool = warm[..., ::-1].copy()
    assert palette(warm)["warmth"] == pytest.approx(150) and palette(cool)["warmth"] == pytest.approx(-150)
    assert palette_distance(palette(warm), palette(warm)) == 0
    steady = np.full((5, 4, 4, 3), 100, np.uint8)
    blinking = steady.copy()
    blinking[1::2] = 140
    assert flicker(steady) == 0 and flicker(blinking) == pytest.approx(40, rel=1e-3)


def test_contact_sheet_and_loss_curve(tmp_path):
    frames = np.zeros((9, 16, 24, 3), np.uint8)
    sheet = contact_sheet([("base", frames), ("step-10", frames + 255)], frames_per_row=5)
    # 16 px high frames are shown 8x (nearest), so a tiny render is at least 128 px high.
    assert sheet.size == (140 + 5 * 24 * 8, 2 * 16 * 8)
    assert sheet.getpixel((140, 130)) == (255, 255, 255) and sheet.getpixel((140, 2)) == (0, 0, 0)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"step": s, "loss": 1 / (s + 1), "expert": e})
                                 for s in range(5) for e in ("high_noise", "low_noise")))
    svg = loss_curve_svg(metrics)
    assert svg.count("<polyline") == 2 and "high_noise" in svg
    assert loss_curve_svg(tmp_path / "missing.jsonl") == ""


def test_validation_curve_marks_each_experts_best_step(tmp_path):
    from train.report import validation_curve_svg

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s - 1, "steps_done": s, "validation": {"high_noise": {"loss": 2.0 - s / 100, "bands": {}},
                                                              "low_noise": {"loss": 1.0 + (s - 100) ** 2 / 1e4,
                                                                            "bands": {}}}}
            for s in (50, 100, 150)]
    metrics.write_text("\n".join([json.dumps({"step": 0, "loss": 1.0, "expert": "high_noise"})]
                                 + [json.dumps(r) for r in rows]))
    svg = validation_curve_svg(metrics)
    assert svg.count("<polyline") == 2 and svg.count("<circle") == 2
    assert "high_noise: best 0.5 at step 150" in svg and "low_noise: best 1 at step 100" in svg
    assert validation_curve_svg(tmp_path / "missing.jsonl") == ""


def test_summary_states_the_share_of_palette_distance_closed():
    from train.evaluate import summarise

    renders = {"a": {"variant": "base", "palette_distance_to_training": 80.0},
               "b": {"variant": "base", "palette_distance_to_training": 100.0},
               "c": {"variant": "step-2", "palette_distance_to_training": 30.0},
               "d": {"variant": "step-2", "palette_distance_to_training": 42.0}}
    out = summarise(renders, ["base", "step-2"])["variants"]
    assert out["base"]["palette_distance"] == 90.0 and "closed" not in out["base"]
    assert out["step-2"]["closed"] == pytest.approx(0.6)


def test_grid_switches_once_per_variant_and_resumes_from_disk(tmp_path):
    """adapters x strengths x prompts x seeds on one loaded pipeline: one adapter switch per variant, each
    render timed; a second run reuses every render whose settings match, and re-renders only what changed."""
    import torch

    from tests.wan_model.test_pipeline import random_lora
    from train.evaluate import SuiteEntry, Variant, evaluate, grid_variants
    from wan_model.config import PRESETS
    from wan_model.lora_formats import META_EXPERT, save_lora
    from wan_model.pipeline import load_pipeline
    from wan_model.tiny_release import write_tiny_release

    pipe = load_pipeline(write_tiny_release(tmp_path / "release", "tiny-t2v"), device="cpu", dtype=torch.float32)
    cfg = PRESETS["tiny-t2v"].transformer
    adapters = []
    for i in range(2):
        folder = tmp_path / f"step-{i}"
        save_lora(random_lora(cfg, seed=i), folder / "low_noise.safetensors", {META_EXPERT: "low_noise"})
        adapters.append(folder)
    variants = [Variant("base")] + grid_variants(adapters, [0.5, 1.0])
    assert [v.name for v in variants] == ["base", "step-0@0.5", "step-0@1", "step-1@0.5", "step-1@1"]
    suite = [SuiteEntry(prompt=p, seeds=[0], height=32, width=32, frames=5, steps=2) for p in ("a fox", "a cat")]
    calls = {"switch": 0, "generate": 0}
    switch, generate = pipe.set_adapters, pipe.generate

    def counting_switch(*a, **k):
        calls["switch"] += 1
        return switch(*a, **k)

    def counting_generate(*a, **k):
        calls["generate"] += 1
        return generate(*a, **k)

    pipe.set_adapters, pipe.generate = counting_switch, counting_generate
    out = tmp_path / "eval"
    evaluate(pipe, suite, variants, out, progress=False)
    first = json.loads((out / "metrics.json").read_text())
    assert calls == {"switch": 5 + 1, "generate": 10}  # one per variant, then back to the base model
    assert len(first["switches"]) == 5 and all(r["seconds"] > 0 and not r["reused"] for r in first["renders"].values())
    assert first["timing"]["renders"] == 10 and "render s" in (out / "report.html").read_text()

    calls.update(switch=0, generate=0)
    evaluate(pipe, suite, variants, out, progress=False)
    again = json.loads((out / "metrics.json").read_text())
    assert calls == {"switch": 1, "generate": 0}  # nothing rendered, nothing switched
    assert all(r["reused"] for r in again["renders"].values())
    assert {k: v["palette"] for k, v in again["renders"].items()} == {k: v["palette"] for k, v in first["renders"].items()}

    calls.update(switch=0, generate=0)
    evaluate(pipe, suite, [Variant("base")] + grid_variants(adapters, [0.5, 0.8]), out, progress=False)
    assert calls["generate"] == 4  # step-0@0.8 and step-1@0.8, two prompts each
    # Strengths 0.5 and 0.8 (and 1) have files of their own: a dot in a name is no suffix.
    names = sorted(p.name for p in (out / "videos").glob("p0-s0-step-0@*.mp4"))
    assert names == ["p0-s0-step-0@0p5.mp4", "p0-s0-step-0@0p8.mp4", "p0-s0-step-0@1.mp4"]


def test_charts_skip_non_finite_losses():
    from train.report import curves_svg

    svg = curves_svg({"high_noise": [(0, 1.0), (1, float("nan")), (2, 0.5)]})
    assert "nan" not in svg and svg.count("<polyline") == 1
    assert curves_svg({"high_noise": [(0, float("nan"))]}) == ""


def test_best_validation_step_ignores_a_diverged_pass():
    from train.validation import best_steps

    history = [{"steps_done": 50, "experts": {"a": {"loss": float("nan")}}},
               {"steps_done": 100, "experts": {"a": {"loss": 2.0}}},
               {"steps_done": 150, "experts": {"a": {"loss": 1.5}}}]
    assert best_steps(history) == {"a": {"step": 150, "loss": 1.5}}


def test_card_of_a_low_noise_only_run_loads_it_into_the_low_noise_transformer(tmp_path):
    from train.adapter_card import write_adapter_card
    from wan_model.config import PRESETS

    card = write_adapter_card(tmp_path, preset=PRESETS["t2v-A14B"], step=10, trigger="mystyle",
                              experts=[{"name": "low_noise", "range": (0, 875), "rank": 32, "alpha": 32.0}],
                              dataset={}, validation=[], previews=[], recipe_hash="x").read_text()
    loads = [line for line in card.splitlines() if "load_lora_weights" in line]
    assert len(loads) == 1 and "low_noise.safetensors" in loads[0] and "load_into_transformer_2=True" in loads[0]
    assert "base_model: Wan-AI/Wan2.2-T2V-A14B" in card


def _tiny_pipe(tmp_path, preset="tiny-t2v"):
    import torch

    from wan_model.pipeline import load_pipeline
    from wan_model.tiny_release import write_tiny_release

    return load_pipeline(write_tiny_release(tmp_path / f"release-{preset}", preset), device="cpu",
                         dtype=torch.float32)


def test_a_bad_adapter_is_a_user_error_naming_the_file_before_any_render(tmp_path):
    """A damaged adapter file, or one made for another model size, stops the evaluation before the first
    render with a user error (one `error:` line) naming the file; it was a traceback after the base renders."""
    import torch
    from safetensors.torch import save_file

    from train.cli import user_errors
    from train.evaluate import SuiteEntry, Variant, evaluate

    pipe = _tiny_pipe(tmp_path)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00not a safetensors file")
    other = tmp_path / "other.safetensors"
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.zeros(4, 5120),
               "blocks.0.self_attn.q.lora_B.weight": torch.zeros(5120, 4)}, str(other))
    suite = [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=1)]
    generate = pipe.generate
    calls = []
    pipe.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    for bad in (corrupt, other):
        with pytest.raises(user_errors()) as err:
            evaluate(pipe, suite, [Variant("base"), Variant("bad", [bad])], tmp_path / "eval", progress=False)
        assert str(bad) in str(err.value), err.value
        assert calls == []


def test_i2v_suite_without_a_readable_image_is_a_user_error_naming_the_fix(tmp_path):
    from train.cli import user_errors
    from train.evaluate import SuiteEntry, Variant, evaluate

    pipe = _tiny_pipe(tmp_path, "tiny-i2v")
    no_image = [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=1, line=3)]
    with pytest.raises(user_errors(), match=r"line 3.*image:"):
        evaluate(pipe, no_image, [Variant("base")], tmp_path / "eval", progress=False)
    missing = tmp_path / "nope.png"
    gone = [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=1, image=missing, line=4)]
    with pytest.raises(user_errors(), match=rf"line 4.*{missing}"):
        evaluate(pipe, gone, [Variant("base")], tmp_path / "eval", progress=False)


def test_strength_0_is_strength_0(tmp_path, monkeypatch):
    """`--strength 0` (the adapter switched off: must match the base render) was read as 1.0."""
    import train.evaluate as ev
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    suite = tmp_path / "suite.yaml"
    suite.write_text("prompts:\n  - a fox\n")
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    seen = {}
    monkeypatch.setattr(ev, "evaluate", lambda pipe, suite, variants, out, **k: seen.setdefault("v", variants))
    ev.main(["--release", str(release), "--suite", str(suite), "--adapters", str(adapter), "--strength", "0",
             "--device", "cpu", "--out", str(tmp_path / "eval")])
    assert [(v.name, v.strength) for v in seen["v"]] == [("base", 1.0), ("a", 0.0)]


def test_a_render_stopped_while_saving_is_not_reused_for_the_old_settings(tmp_path, monkeypatch):
    """Render with settings A; re-render the same file with settings B but stop before its sidecar is written
    (the new mp4 and sheet are on disk, the old sidecar still says A); ask for A again: the files hold B,
    so they must be rendered again, not reused."""
    import train.evaluate as ev
    from train.evaluate import SuiteEntry, Variant, evaluate

    pipe = _tiny_pipe(tmp_path)
    out = tmp_path / "eval"
    entry = lambda steps: [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=steps)]  # noqa
    evaluate(pipe, entry(1), [Variant("base")], out, progress=False)
    sheet_a = np.load(out / "videos" / "p0-s0-base.sheet.npy")
    write = ev.atomic_write_text

    def stop_at_sidecar(path, text):
        if str(path).endswith("p0-s0-base.json"):
            raise KeyboardInterrupt
        return write(path, text)

    monkeypatch.setattr(ev, "atomic_write_text", stop_at_sidecar)
    with pytest.raises(KeyboardInterrupt):
        evaluate(pipe, entry(3), [Variant("base")], out, progress=False)
    monkeypatch.setattr(ev, "atomic_write_text", write)
    assert not np.array_equal(np.load(out / "videos" / "p0-s0-base.sheet.npy"), sheet_a)
    evaluate(pipe, entry(1), [Variant("base")], out, progress=False)
    again = json.loads((out / "metrics.json").read_text())["renders"]["p0-s0-base"]
    assert not again["reused"]
    assert np.array_equal(np.load(out / "videos" / "p0-s0-base.sheet.npy"), sheet_a)


def test_base_and_adapter_renders_share_the_noise_and_the_adapter_is_detached_after(tmp_path):
    """Same seed, same noise: an adapter at strength 0 renders the base video bit for bit; after the grid
    the pipeline is the base model again."""
    from tests.wan_model.test_pipeline import random_lora
    from train.evaluate import SuiteEntry, Variant, evaluate
    from wan_model.config import PRESETS
    from wan_model.lora_formats import save_lora
    from wan_model.pipeline import GenerationRequest

    pipe = _tiny_pipe(tmp_path)
    lora = tmp_path / "style.safetensors"
    save_lora(random_lora(PRESETS["tiny-t2v"].transformer, seed=0), lora, {})
    suite = [SuiteEntry(prompt="a fox", seeds=[3], height=32, width=32, frames=5, steps=2)]
    out = tmp_path / "eval"
    evaluate(pipe, suite, [Variant("base"), Variant("off", [lora], 0.0), Variant("on", [lora], 1.0)], out,
             progress=False)
    sheet = lambda v: np.load(out / "videos" / f"p0-s3-{v}.sheet.npy")  # noqa: E731
    assert np.array_equal(sheet("base"), sheet("off")) and not np.array_equal(sheet("base"), sheet("on"))
    request = GenerationRequest(prompt="a fox", seed=3, height=32, width=32, frames=5, steps=2)
    from wan_model.media import to_uint8_frames
    frames = to_uint8_frames(pipe.generate(request).video)
    assert np.array_equal(frames[[0, 1, 2, 3, 4]], sheet("base"))  # no adapter left attached


def test_renders_of_bf16_pipelines_name_their_float32_parameters(tmp_path):
    """A bf16 pipeline with its float32-read parameters kept (load_pipeline) renders other numbers than one
    with them rounded: the render settings say so, and renders made before are not reused."""
    import torch

    from train.evaluate import SuiteEntry, Variant, render_settings
    from wan_model.pipeline import load_pipeline
    from wan_model.tiny_release import write_tiny_release

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    entry = SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=2)
    bf16 = load_pipeline(release, device="cpu", dtype=torch.bfloat16)
    assert render_settings(bf16, entry, 0, Variant("base"))["float32_parameters"] is True
    fp32 = load_pipeline(release, device="cpu", dtype=torch.float32)
    assert "float32_parameters" not in render_settings(fp32, entry, 0, Variant("base"))
    for model in bf16.experts.values():
        model.to(torch.bfloat16)  # every parameter rounded, as pipelines loaded before 9ca32d9
    assert "float32_parameters" not in render_settings(bf16, entry, 0, Variant("base"))


def test_contact_sheet_rows_keep_their_own_shapes():
    """A training clip of one shape above renders of another (an image sets a render's shape): no frame is
    stretched to another row's shape; each sits unscaled (but for the common zoom) in its cell."""
    from train.report import contact_sheet

    wide = np.full((3, 8, 16, 3), 40, np.uint8)
    tall = np.full((3, 16, 8, 3), 200, np.uint8)
    sheet = np.asarray(contact_sheet([("clip", wide), ("render", tall)], frames_per_row=3))
    zoom = 16  # the smallest height, 8 px, shown at 128 px
    cell_h, cell_w, label = 16 * zoom, 16 * zoom, 140
    assert sheet.shape == (2 * cell_h, label + 3 * cell_w, 3)
    assert (sheet[:8 * zoom, label:label + 16 * zoom] == 40).all() and (sheet[8 * zoom:cell_h, label + 5] == 255).all()
    assert (sheet[cell_h:, label:label + 8 * zoom] == 200).all()
    assert (sheet[cell_h + 5, label + 8 * zoom:label + cell_w] == 255).all()


def test_grid_defaults_to_the_models_size_takes_a_solver_and_checks_guidance_first(tmp_path):
    """No size in the suite: the model's sample_size; a solver key reaches the render (and its settings);
    a dense model's two guidance scales are an error naming the line, before any render."""
    from train.cli import user_errors
    from train.evaluate import SuiteEntry, Variant, evaluate, render_settings

    pipe = _tiny_pipe(tmp_path, "tiny-ti2v")
    suite = [SuiteEntry(prompt="a fox", seeds=[0], height=None, width=None, frames=5, steps=2, solver="dpm++")]
    out = tmp_path / "eval"
    evaluate(pipe, suite, [Variant("base")], out, progress=False)
    sidecar = json.loads(next((out / "videos").glob("*.json")).read_text())
    assert sidecar["settings"]["size"] == [64, 64] and sidecar["settings"]["solver"] == "dpm++"
    assert "solver" not in render_settings(pipe, SuiteEntry("a", [0], 64, 64), 0, Variant("base"))
    two = [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=1, guide=(3.0, 5.0), line=7)]
    with pytest.raises(user_errors(), match="line 7: guide \\[3.0, 5.0\\]: tiny-ti2v is one model"):
        evaluate(pipe, two, [Variant("base")], tmp_path / "eval2", progress=False)


def test_cards_of_image_conditioned_models_say_how_to_give_the_image(tmp_path):
    """The I2V card's command has --image (it failed without one); TI2V is tagged for both tasks and its
    card does not speak of expert switching."""
    from train.adapter_card import write_adapter_card
    from wan_model.config import PRESETS

    def card(preset, expert, t_range):
        return write_adapter_card(tmp_path, preset=PRESETS[preset], step=10, trigger="", dataset={},
                                  experts=[{"name": expert, "range": t_range, "rank": 32, "alpha": 32.0}],
                                  validation=[], previews=[], recipe_hash="x").read_text()

    i2v, ti2v = card("i2v-A14B", "low_noise", (0, 900)), card("ti2v-5B", "dense", (0, 1000))
    assert "--image first_frame.png" in i2v and "- image-to-video" in i2v
    assert "- text-to-video" in ti2v and "- image-to-video" in ti2v and "--image FILE" in ti2v
    assert "switches experts" not in ti2v and "one expert" in ti2v


def test_a_weight_difference_on_fp8_weights_is_refused_before_any_render(tmp_path):
    """A LoRA file's .diff on a block weight stored in fp8 cannot be applied: the grid says so, naming the
    file, before the base renders."""
    import torch
    from safetensors.torch import save_file

    from train.evaluate import SuiteEntry, Variant, evaluate
    from wan_model.config import PRESETS
    from wan_model.pipeline import load_pipeline
    from wan_model.sampling_speed import SamplingSpeed
    from wan_model.tiny_release import write_tiny_release

    pipe = load_pipeline(write_tiny_release(tmp_path / "release", "tiny-t2v"), device="cpu", dtype=torch.float32,
                         speed=SamplingSpeed(fp8_weights="storage"))
    dim = PRESETS["tiny-t2v"].transformer.dim
    lora = tmp_path / "diff.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(dim, dim)}, str(lora))
    rendered = []
    pipe.generate = lambda *a, **k: rendered.append(1)
    suite = [SuiteEntry(prompt="a fox", seeds=[0], height=32, width=32, frames=5, steps=1)]
    with pytest.raises(ConfigError, match=r"diff.safetensors: the difference for blocks.0.self_attn.q.weight"):
        evaluate(pipe, suite, [Variant("base"), Variant("d", [lora])], tmp_path / "eval", progress=False)
    assert not rendered
