"""The sampler on tiny random releases written in the official layout (wan_model.tiny_release)."""

import pytest
import torch

from wan_model.conditioning import i2v_mask
from wan_model.pipeline import GenerationRequest, load_pipeline, snap_size
from wan_model.transformer import float32_parameter
from wan_model.config import PRESETS
from wan_model.solvers import make_solver
from wan_model.tiny_release import write_tiny_release


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {name: load_pipeline(write_tiny_release(root / name, name), device="cpu", dtype=torch.float32)
            for name in ("tiny-t2v", "tiny-i2v", "tiny-ti2v")}


def request(**kw):
    return GenerationRequest(**{"prompt": "a red fox in the snow", "seed": 3, "height": 32, "width": 32,
                                "frames": 5, "steps": 3, **kw})


def test_same_seed_same_video_other_seed_other_video(pipes):
    pipe = pipes["tiny-t2v"]
    a, b, c = (pipe.generate(request(seed=s)).video for s in (3, 3, 4))
    assert a.shape == (3, 5, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1


def expert_calls(pipe, req) -> tuple[list[tuple[str, float]], torch.Tensor]:
    """(expert, timestep) of every DiT call while rendering `req`, and the video."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: seen.append((name, float(args[1][0]))))
             for n, m in pipe.experts.items()]
    try:
        video = pipe.generate(req).video
    finally:
        for h in hooks:
            h.remove()
    return seen, video


def test_expert_switch_follows_the_boundary(pipes):
    pipe = pipes["tiny-t2v"]
    seen, _ = expert_calls(pipe, request(steps=6))
    timesteps = make_solver("unipc", steps=6, shift=PRESETS["tiny-t2v"].sample_shift).timesteps.tolist()
    assert [t for _, t in seen] == timesteps
    assert [n for n, _ in seen] == ["high_noise" if t >= 875 else "low_noise" for t in timesteps]
    assert {n for n, _ in seen} == {"high_noise", "low_noise"}


def test_guidance_scale_changes_output_and_negative_prompt_matters(pipes):
    pipe = pipes["tiny-t2v"]
    base = pipe.generate(request()).latents
    assert not torch.equal(base, pipe.generate(request(guide_scale=(1.0, 1.0))).latents)
    assert not torch.equal(base, pipe.generate(request(negative_prompt="blurry")).latents)


def test_i2v_needs_an_image_and_conditions_on_it(pipes):
    pipe = pipes["tiny-i2v"]
    with pytest.raises(ValueError, match="pass an image"):
        pipe.generate(request())
    img = torch.rand(3, 40, 48) * 2 - 1
    a = pipe.generate(request(image=img)).latents
    b = pipe.generate(request(image=-img)).latents
    assert not torch.equal(a, b)
    mask = i2v_mask(torch.zeros(1, 16, 3, 2, 2))[0]
    assert mask.shape == (4, 3, 2, 2) and mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()


def test_ti2v_keeps_the_image_latent_as_first_frame(pipes):
    pipe = pipes["tiny-ti2v"]
    img = torch.randint(0, 256, (3, 32, 32)).float() / 127.5 - 1  # 8-bit values, as read_image gives
    result = pipe.generate(request(image=img))
    image_latent = pipe.vae.encode(img[None, :, None])[0]  # at the image's own size the resize keeps it
    assert torch.allclose(result.latents[:, :1], image_latent, atol=1e-6)
    plain = pipe.generate(request())
    assert not torch.allclose(plain.latents[:, :1], image_latent, atol=1e-2)


def test_size_not_divisible_by_stride_is_rounded_with_warning():
    with pytest.warns(UserWarning, match="using 480x832x81"):
        assert snap_size(478, 840, 83, PRESETS["t2v-A14B"]) == (480, 832, 81)
    assert snap_size(704, 1280, 121, PRESETS["ti2v-5B"]) == (704, 1280, 121)


def random_lora(config, scale=0.5, seed=0):
    from wan_model.lora_formats import LoraModule, lora_targets

    g = torch.Generator().manual_seed(seed)
    return {name: LoraModule(down=torch.randn(4, i, generator=g) * scale, up=torch.randn(o, 4, generator=g) * scale,
                             alpha=4.0)
            for name, (i, o) in lora_targets(config).items() if name.startswith("blocks.")}


def test_lora_strength_zero_is_base_and_expert_metadata_routes(pipes, tmp_path):
    from wan_model.lora_formats import META_EXPERT, save_lora

    pipe = pipes["tiny-t2v"]
    cfg = PRESETS["tiny-t2v"].transformer
    path = save_lora(random_lora(cfg), tmp_path / "low_noise.safetensors", {META_EXPERT: "low_noise"})
    base = pipe.generate(request()).latents
    report = pipe.add_lora(path, strength=0.0)
    assert "-> low_noise" in report
    assert torch.equal(pipe.generate(request()).latents, base)
    pipe.set_adapters([path], strength=1.0)
    assert set(pipe._lora_sets) == {"low_noise"}  # the high-noise expert is untouched
    styled = pipe.generate(request()).latents
    assert not torch.allclose(styled, base, atol=1e-4)
    pipe.set_adapters([])
    assert torch.equal(pipe.generate(request()).latents, base)


def test_lora_for_another_expert_name_is_refused(pipes, tmp_path):
    from wan_model.lora_formats import META_EXPERT, save_lora

    path = save_lora(random_lora(PRESETS["tiny-ti2v"].transformer), tmp_path / "x.safetensors",
                     {META_EXPERT: "low_noise"})
    with pytest.raises(ValueError, match="has experts \\['dense'\\]"):
        pipes["tiny-ti2v"].add_lora(path)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="expert 'low_noise' was asked for, but tiny-ti2v has experts"):
        pipes["tiny-ti2v"].add_lora(damaged, expert="low_noise")  # refused before the file is read


def test_guidance_one_runs_the_conditional_branch_alone(pipes):
    """guide 1: one forward of batch 1 per step, and the same video as the two-branch CFG formula gives."""
    pipe = pipes["tiny-t2v"]
    batches = []
    hooks = [m.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
             for m in pipe.experts.values()]
    try:
        fast = pipe.generate(request(guide_scale=(1.0, 1.0))).latents
    finally:
        for h in hooks:
            h.remove()
    assert batches == [1, 1, 1]  # three steps, one branch each
    # Reference: both branches through the model, combined with guide 1 (= the conditional prediction).
    context, _ = pipe.encode_prompts(["a red fox in the snow", pipe.preset.negative_prompt])
    solver = make_solver("unipc", steps=3, shift=pipe.preset.sample_shift,
                         num_train_timesteps=pipe.preset.num_train_timesteps)
    shape = (16, 2, 4, 4)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i, t in enumerate(solver.timesteps.tolist()):
            model = pipe.experts[pipe.expert_for(t)]
            pred = model(latents[None].expand(2, *shape), torch.full((2,), float(t)), context)
            latents = solver.step(pred[1] + 1.0 * (pred[0] - pred[1]), i, latents)
    torch.testing.assert_close(fast, latents, rtol=1e-4, atol=1e-5)


def test_stacked_loras_add_their_deltas(pipes, tmp_path):
    """Two LoRAs on one expert with their own strengths equal one LoRA holding both updates (stacked ranks)."""
    from wan_model.lora_formats import META_EXPERT, LoraModule, save_lora

    pipe = pipes["tiny-t2v"]
    cfg = PRESETS["tiny-t2v"].transformer
    a, b = random_lora(cfg), random_lora(cfg, seed=1)
    pa = save_lora(a, tmp_path / "a.safetensors", {META_EXPERT: "low_noise"})
    pb = save_lora(b, tmp_path / "b.safetensors", {META_EXPERT: "low_noise"})
    pipe.set_adapters([])
    pipe.add_lora(pa, 1.0)
    pipe.add_lora(pb, 0.8)
    stacked = pipe.generate(request()).latents
    # One LoRA of rank ra + rb: down = [down_a; down_b], up = [up_a * s_a, up_b * s_b * 0.8] (alpha / rank folded).
    both = {}
    for name in a:
        ma, mb = a[name], b[name]
        ra, rb = ma.down.shape[0], mb.down.shape[0]
        up = torch.cat([ma.up * (ma.alpha / ra), mb.up * (0.8 * mb.alpha / rb)], dim=1)
        both[name] = LoraModule(down=torch.cat([ma.down, mb.down]), up=up, alpha=float(ra + rb))
    pc = save_lora(both, tmp_path / "both.safetensors", {META_EXPERT: "low_noise"})
    pipe.set_adapters([pc], 1.0)
    single = pipe.generate(request()).latents
    pipe.set_adapters([])
    base = pipe.generate(request()).latents
    assert not torch.allclose(stacked, base, atol=1e-4)
    torch.testing.assert_close(stacked, single, rtol=1e-4, atol=1e-5)


def test_resident_experts_are_never_moved_by_expert_offload(pipes):
    """Training previews: the experts being trained are `resident` (their placement is the trainer's); only
    the others are swapped in and out when offloading."""
    from wan_model.pipeline import WanPipeline

    base = pipes["tiny-t2v"]
    moves = []

    class Recording(torch.nn.Module):
        def __init__(self, inner, name):
            super().__init__()
            self.inner, self.name = inner, name

        def to(self, *args, **kwargs):
            moves.append(self.name)
            return super().to(*args, **kwargs)

        def forward(self, *args):
            return self.inner(*args)

    experts = {n: Recording(m, n) for n, m in base.experts.items()}
    pipe = WanPipeline(base.preset, experts, base.vae, base.text_encoder, device="cpu", dtype=torch.float32,
                       offload_experts=True, resident={"high_noise"})
    pipe.generate(request())
    assert "high_noise" not in moves
    assert pipe.expert_for(999) == "high_noise" and pipe.expert_for(0) == "low_noise"


@pytest.mark.parametrize("preset,image_hw,size,expected", [
    # I2V-A14B (wan/image2video.py): the area's side scaled by the aspect ratio, floored to even latent sizes.
    ("i2v-A14B", (768, 1024), (480, 832), (544, 720)), ("i2v-A14B", (720, 1280), (480, 832), (464, 832)),
    ("i2v-A14B", (1024, 1024), (480, 832), (624, 624)), ("i2v-A14B", (1080, 1920), (720, 1280), (720, 1280)),
    # TI2V-5B (wan/textimage2video.py, best_output_size on the 32-pixel grid).
    ("ti2v-5B", (720, 1280), (704, 1280), (704, 1248)), ("ti2v-5B", (768, 1024), (704, 1280), (800, 1088)),
    ("ti2v-5B", (1024, 1024), (704, 1280), (928, 960)), ("ti2v-5B", (1280, 720), (704, 1280), (1248, 704)),
])
def test_image_output_size_follows_the_official_generators(preset, image_hw, size, expected):
    """Values from the official formulas at the official area (480p / 720p / 704x1280): the video takes the
    image's aspect ratio within the area of the requested size; it is not stretched to that size."""
    from wan_model.image_size import image_output_size

    assert image_output_size(PRESETS[preset], image_hw, *size) == expected


def test_image_conditioned_videos_take_the_images_shape_or_exactly_the_size(pipes):
    """A 48x96 image at 32x32 (area 1024): I2V renders 16x32 (the image's 1:2, sides floored to even latent
    sizes as the official code does); fit_image=False renders 32x32 from the image's centre. A 96x48 image
    at 32x64: TI2V renders 64x32, its first latent frame the Lanczos cover-and-crop of the image."""
    from wan_model.image_size import lanczos_cover_crop

    img = torch.randint(0, 256, (3, 48, 96)).float() / 127.5 - 1
    i2v = pipes["tiny-i2v"].generate(request(image=img))
    assert i2v.video.shape[-2:] == (16, 32)
    exact = pipes["tiny-i2v"].generate(request(image=img, fit_image=False))
    assert exact.video.shape[-2:] == (32, 32)
    # The centre crop: the image's middle 48x48, whatever its sides hold.
    sides = img.clone()
    sides[:, :, :24] = -1
    sides[:, :, 72:] = 1
    assert torch.equal(pipes["tiny-i2v"].generate(request(image=sides, fit_image=False)).latents, exact.latents)
    ti2v = pipes["tiny-ti2v"]
    portrait = img.transpose(1, 2)
    result = ti2v.generate(request(image=portrait, height=32, width=64))
    assert result.video.shape[-2:] == (64, 32)
    first = ti2v.vae.encode(lanczos_cover_crop(portrait, 64, 32)[None, :, None])[0]
    torch.testing.assert_close(result.latents[:, :1], first, atol=1e-6, rtol=0)


def test_lanczos_cover_crop_is_pils_resize_and_centre_crop():
    import numpy as np
    from PIL import Image

    from wan_model.image_size import lanczos_cover_crop

    pixels = torch.randint(0, 256, (40, 70, 3), dtype=torch.uint8)
    out = lanczos_cover_crop(pixels.permute(2, 0, 1).float() / 127.5 - 1, 32, 32)
    resized = Image.fromarray(pixels.numpy()).resize((round(70 * 0.8), 32), Image.LANCZOS)  # covers 32x32
    left = (resized.width - 32) // 2
    expected = torch.from_numpy(np.array(resized.crop((left, 0, left + 32, 32)))).permute(2, 0, 1).float()
    assert torch.equal(out, expected / 127.5 - 1)


def test_dense_model_takes_one_guidance_scale(pipes):
    with pytest.raises(ValueError, match="one guidance scale"):
        pipes["tiny-ti2v"].generate(request(guide_scale=(3.0, 5.0)))


def test_boundary_timestep_is_the_official_float_comparison_on_whole_timesteps():
    """Official: t >= boundary * 1000 in floats, t whole. 0.875 and 0.900 are exact; 0.8754 sends 875 low."""
    assert PRESETS["t2v-A14B"].boundary_timestep == 875 and PRESETS["i2v-A14B"].boundary_timestep == 900
    for boundary in (0.8754, 0.7, 0.875, 0.9, 0.35):
        first_high = PRESETS["t2v-A14B"].replace(boundary=boundary).boundary_timestep
        assert first_high >= boundary * 1000 and not first_high - 1 >= boundary * 1000


def test_a_folder_on_one_expert_applies_its_file_and_a_second_merge_of_a_file_is_refused(tmp_path):
    """add_lora(folder, expert=X) applies X's file of an export folder, not every file on X; merging the same
    file twice (which would add it twice, where attaching it again replaces it) is an error."""
    from wan_model.lora_formats import META_EXPERT, save_lora

    pipe = load_pipeline(write_tiny_release(tmp_path / "release", "tiny-t2v"), device="cpu", dtype=torch.float32)
    cfg = PRESETS["tiny-t2v"].transformer
    for seed, expert in enumerate(("high_noise", "low_noise")):
        save_lora(random_lora(cfg, seed=seed), tmp_path / "step" / f"{expert}.safetensors", {META_EXPERT: expert})
    report = pipe.add_lora(tmp_path / "step", expert="high_noise")
    assert report.count("LoRA ") == 1 and "high_noise.safetensors" in report and report.endswith("-> high_noise")
    pipe.set_adapters([])
    path = tmp_path / "step" / "low_noise.safetensors"
    pipe.add_lora(path, merge=True)
    with pytest.raises(ValueError, match="already merged into the low_noise expert"):
        pipe.add_lora(path, strength=0.5, merge=True)


def test_bf16_sampler_keeps_the_float32_parameters_as_the_official_generator(tmp_path):
    """load_pipeline in bf16: the time embedding and projection, head, modulation tables and norm weights stay
    float32 (their released values), the block linears are bf16; the video is closer to the float32 one
    than with every parameter rounded to bf16."""
    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    req = request(steps=4)
    reference = load_pipeline(release, device="cpu", dtype=torch.float32).generate(req).latents
    pipe = load_pipeline(release, device="cpu", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in pipe.experts["low_noise"].named_parameters()}
    kept = ["blocks.0.modulation", "head.modulation", "time_projection.1.weight", "time_embedding.0.weight",
            "head.head.weight", "blocks.0.norm3.weight", "blocks.0.self_attn.norm_q.weight"]
    assert all(dtypes[n] == torch.float32 for n in kept), {n: dtypes[n] for n in kept}
    assert dtypes["blocks.0.self_attn.q.weight"] == dtypes["blocks.0.ffn.0.weight"] == torch.bfloat16
    assert sum(d == torch.float32 for d in dtypes.values()) == sum(map(float32_parameter, dtypes))
    from wan_model.transformer import keep_float32_parameters_  # the benches' way to the same dtypes
    cast = keep_float32_parameters_(load_pipeline(release, device="cpu").experts["low_noise"].to(torch.bfloat16))
    assert {n: p.dtype for n, p in cast.named_parameters()} == dtypes
    mixed = pipe.generate(req).latents
    for model in pipe.experts.values():
        model.to(torch.bfloat16)
    rounded = pipe.generate(req).latents

    def err(x):
        return ((x - reference).norm() / reference.norm()).item()

    print("relative error to float32:", err(mixed), "rounded:", err(rounded))
    assert err(mixed) < err(rounded), (err(mixed), err(rounded))


def test_lora_difference_tensors_add_to_their_parameters_and_come_off_exactly(tmp_path):
    """A lightx2v-style file (factors plus .diff_b on a block Linear and the head, .diff on a q norm, .diff_m on
    a modulation table): attached, the video is the one of the base model with those parameters edited by
    hand (strength x difference) and the factors attached; merged, the same; set_adapters([]) gives the base
    video bit for bit."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from wan_model.lora_formats import META_EXPERT, save_lora

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    cfg = PRESETS["tiny-t2v"].transformer
    g = torch.Generator().manual_seed(0)
    diffs = {"blocks.0.self_attn.q.bias": torch.randn(cfg.dim, generator=g) * 0.5,
             "blocks.1.self_attn.norm_q.weight": torch.randn(cfg.dim, generator=g) * 0.5,
             "blocks.0.modulation": torch.randn(1, 6, cfg.dim, generator=g) * 0.5,
             "head.head.bias": torch.randn(cfg.out_dim * 4, generator=g) * 0.5}
    factors = save_lora(random_lora(cfg, scale=0.2), tmp_path / "factors.safetensors", {META_EXPERT: "low_noise"})
    keys = {"head.head.bias": "head.head.diff_b", "blocks.0.modulation": "blocks.0.diff_m",
            "blocks.1.self_attn.norm_q.weight": "blocks.1.self_attn.norm_q.diff",
            "blocks.0.self_attn.q.bias": "blocks.0.self_attn.q.diff_b"}
    with safe_open(str(factors), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    tensors.update({"diffusion_model." + keys[p]: d for p, d in diffs.items()})
    path = tmp_path / "distilled.safetensors"
    save_file(tensors, str(path), metadata=header)

    pipe = load_pipeline(release, device="cpu", dtype=torch.float32)
    base = pipe.generate(request()).latents
    report = pipe.add_lora(path, strength=0.7)
    assert "4 parameter differences" in report and "not used" not in report
    attached = pipe.generate(request()).latents

    by_hand = load_pipeline(release, device="cpu", dtype=torch.float32)
    low = by_hand.experts["low_noise"]
    with torch.no_grad():
        for parameter, d in diffs.items():
            low.get_parameter(parameter).add_(0.7 * d)
    by_hand.add_lora(factors, strength=0.7)
    torch.testing.assert_close(attached, by_hand.generate(request()).latents, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(attached, base, atol=1e-3)

    pipe.set_adapters([])
    assert torch.equal(pipe.generate(request()).latents, base)
    pipe.add_lora(path, strength=0.7, merge=True)
    torch.testing.assert_close(pipe.generate(request()).latents, attached, rtol=1e-5, atol=1e-5)


def test_dpm_solver_pp_renders_from_timestep_1000_with_the_expert_switch(pipes):
    pipe = pipes["tiny-t2v"]
    seen, video = expert_calls(pipe, request(steps=4, solver="dpm++"))
    assert seen[0] == ("high_noise", 1000.0) and seen[-1][0] == "low_noise"
    assert all((name == "high_noise") == (t >= 875) for name, t in seen)
    assert torch.isfinite(video).all() and not torch.equal(video, pipe.generate(request(steps=4)).video)


def test_difference_files_switch_restack_and_refuse_a_merge_under_them_in_bf16(tmp_path):
    """bf16 pipeline (float32 head kept): file A (factors on head.head, whose attached weight is computed by a
    parametrization, plus a .diff on head.head's weight and a .diff_b on a bf16 block bias) and file B (a
    .diff_b on the same bias). Re-adding A replaces its strength; A and B stack; each state equals a fresh
    pipeline given the same adapters; set_adapters([]) is the base bit for bit; a merge under attached
    differences is refused (the next switch would undo it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from wan_model.lora_formats import LoraModule, lora_targets, save_lora

    release = write_tiny_release(tmp_path / "release", "tiny-t2v")
    cfg = PRESETS["tiny-t2v"].transformer
    g = torch.Generator().manual_seed(1)
    head_in, head_out = lora_targets(cfg)["head.head"]
    factors = {"head.head": LoraModule(down=torch.randn(2, head_in, generator=g),
                                       up=torch.randn(head_out, 2, generator=g), alpha=2.0)}
    a = save_lora(factors, tmp_path / "a.safetensors")
    with safe_open(str(a), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["diffusion_model.head.head.diff"] = torch.randn(head_out, head_in, generator=g) * 0.3
    tensors["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(cfg.dim, generator=g)
    save_file(tensors, str(a))
    b = tmp_path / "b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.randn(cfg.dim, generator=g)}, str(b))

    def fresh(*adapters):
        pipe = load_pipeline(release, device="cpu", dtype=torch.bfloat16)
        for path, strength in adapters:
            pipe.add_lora(path, strength)
        return pipe.generate(request()).latents

    pipe = load_pipeline(release, device="cpu", dtype=torch.bfloat16)
    assert pipe.experts["low_noise"].head.head.weight.dtype == torch.float32
    base = pipe.generate(request()).latents
    pipe.add_lora(a, 0.5)
    pipe.add_lora(a, 1.0)  # the same file again: its strength replaced, not added
    only_a = pipe.generate(request()).latents
    assert torch.equal(only_a, fresh((a, 1.0))) and not torch.equal(only_a, base)
    pipe.add_lora(b, 0.7)
    assert torch.equal(pipe.generate(request()).latents, fresh((a, 1.0), (b, 0.7)))
    with pytest.raises(ValueError, match="has attached LoRAs; merge before attaching"):
        pipe.add_lora(b, 0.7, merge=True)
    pipe.set_adapters([b], strength=0.7)
    assert torch.equal(pipe.generate(request()).latents, fresh((b, 0.7)))
    pipe.set_adapters([])
    assert torch.equal(pipe.generate(request()).latents, base)


def test_i2v_image_is_resized_bicubic_without_clamping(pipes, monkeypatch):
    """As wan/image2video.py: the bicubic resize's overshoot at sharp edges reaches the VAE (it was clamped)."""
    pipe = pipes["tiny-i2v"]
    seen = []
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda video: seen.append(video) or encode(video))
    img = -torch.ones(3, 8, 8)
    img[:, :, 4:] = 1.0  # a hard edge: bicubic upsampling overshoots past +-1 beside it
    pipe.generate(request(image=img, fit_image=False, steps=1))
    first = seen[0][0, :, 0]
    assert first.max() > 1.0 and first.min() < -1.0


def test_merging_a_file_that_is_attached_is_refused(tmp_path):
    """Attached, then merged: it would act twice (no differences involved)."""
    from wan_model.lora_formats import META_EXPERT, save_lora

    pipe = load_pipeline(write_tiny_release(tmp_path / "release", "tiny-t2v"), device="cpu", dtype=torch.float32)
    path = save_lora(random_lora(PRESETS["tiny-t2v"].transformer), tmp_path / "low.safetensors",
                     {META_EXPERT: "low_noise"})
    pipe.add_lora(path)
    with pytest.raises(ValueError, match="has attached LoRAs; merge before attaching"):
        pipe.add_lora(path, merge=True)
