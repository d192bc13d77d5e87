"""Sampler speed options (wan_model/sampling_speed.py) on the tiny T2V release: fp8 weights and attention
change the numbers a little, compiled blocks change nothing (LoRA switches included), and the command line
and the evaluation cache know about them."""

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from wan_model.config import PRESETS
from wan_model.fp8 import FP8Linear
from wan_model.lora_formats import META_EXPERT, LoraModule, lora_targets, save_lora
from wan_model.pipeline import GenerationRequest, load_pipeline
from wan_model.sampling_speed import SamplingSpeed
from wan_model.tiny_release import write_tiny_release


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("releases") / "tiny-t2v", "tiny-t2v")


@pytest.fixture(scope="module")
def eager(release):
    return load_pipeline(release, device="cpu", dtype=torch.float32)


def request(**kw):
    return GenerationRequest(**{"prompt": "a red fox in the snow", "seed": 3, "height": 32, "width": 32,
                                "frames": 5, "steps": 3, **kw})


def lora_file(path, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = {name: LoraModule(down=torch.randn(rank, i, generator=g) * 0.5,
                                up=torch.randn(o, rank, generator=g) * 0.5, alpha=4.0)
               for name, (i, o) in lora_targets(PRESETS["tiny-t2v"].transformer).items()
               if name.startswith("blocks.")}
    return save_lora(weights, path, {META_EXPERT: "low_noise"})


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_fp8_weights_and_attention_render_close_to_full_precision(release, eager, monkeypatch):
    import wan_model.attention

    calls = []
    monkeypatch.setattr(wan_model.attention, "fp8_attention",
                        lambda *qkv, inner=wan_model.attention.fp8_attention, **kw: calls.append(1) or inner(*qkv, **kw))
    pipe = load_pipeline(release, device="cpu", dtype=torch.float32,
                         speed=SamplingSpeed(fp8_weights="storage", fp8_attention=True))
    for model in pipe.experts.values():
        block_linears = [m for n, m in model.named_modules() if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)]
        assert block_linears and all(isinstance(m, FP8Linear) for m in block_linears)
    fp8 = pipe.generate(request()).latents
    assert len(calls) == 3 * PRESETS["tiny-t2v"].transformer.num_layers  # each step's self-attention in fp8
    assert torch.equal(fp8, pipe.generate(request()).latents)  # still deterministic per seed
    reference = eager.generate(request()).latents
    assert not torch.equal(fp8, reference)  # the options are really on
    assert rel(fp8, reference) < 0.05


def test_merging_a_lora_into_fp8_weights_is_refused(release, tmp_path):
    pipe = load_pipeline(release, device="cpu", dtype=torch.float32, speed=SamplingSpeed(fp8_weights="storage"))
    # Merging would need the bf16 weights the fp8 ones were made from; the error must name the flag to drop.
    with pytest.raises(ValueError, match="--merge"):
        pipe.add_lora(lora_file(tmp_path / "a.safetensors"), merge=True)


def test_compiled_blocks_follow_adapter_switches(release, eager, tmp_path):
    """Before LoRA slots, blocks compiled with no LoRA kept running without one after set_adapters (dynamo
    does not guard on hooks added later). Ranks 4 and 8: a new factor shape must reach the compiled code too."""
    import torch._dynamo.utils

    a, b = lora_file(tmp_path / "a.safetensors", seed=1), lora_file(tmp_path / "b.safetensors", rank=8, seed=2)
    compiled = load_pipeline(release, device="cpu", dtype=torch.float32, speed=SamplingSpeed(compile=True))
    captured = torch._dynamo.utils.counters["stats"]["calls_captured"]
    latents = {}
    for name, adapters in (("base", []), ("a", [a]), ("b", [b]), ("base again", [])):
        compiled.set_adapters(adapters)
        eager.set_adapters(adapters)
        latents[name] = compiled.generate(request()).latents
        torch.testing.assert_close(latents[name], eager.generate(request()).latents, rtol=1e-4, atol=1e-4)
    eager.set_adapters([])
    assert torch._dynamo.utils.counters["stats"]["calls_captured"] > captured  # the blocks really compiled
    assert rel(latents["a"], latents["base"]) > 1e-2 and rel(latents["b"], latents["base"]) > 1e-2
    assert rel(latents["a"], latents["b"]) > 1e-2
    torch.testing.assert_close(latents["base again"], latents["base"], rtol=0, atol=1e-6)


def test_render_cache_key_includes_the_numerics():
    """A render made with fp8 numbers must not be reused for a full-precision evaluation (and vice versa);
    compile is exact, so it may share renders."""
    from train.evaluate import SuiteEntry, Variant, render_settings

    @dataclass
    class Pipe:  # what render_settings reads of a pipeline
        speed: SamplingSpeed
        preset = PRESETS["tiny-t2v"]
        dtype = torch.bfloat16
        device = torch.device("cpu")
        experts = {"low_noise": SimpleNamespace(blocks=[SimpleNamespace(modulation=torch.zeros(1))])}

    def settings(**speed):
        return render_settings(Pipe(SamplingSpeed(**speed)), SuiteEntry("a fox", [0], 32, 32), 0, Variant("base"))

    plain = settings()
    assert "numerics" not in plain  # the default path keys as before: earlier evaluations stay reusable
    assert settings(fp8_weights="storage") != plain
    assert settings(fp8_attention=True) != plain
    assert settings(fp8_weights="storage") != settings(fp8_weights="matmul")
    assert settings(compile=True) == plain
    # FP8 matmul numbers changed at 069788e (fast accumulation, the FFN's scale before GELU): renders keyed
    # the earlier way are not reused, and the two accumulations do not share renders.
    before = {"fp8_weights": "matmul", "fp8_attention": False}
    assert settings(fp8_weights="matmul")["numerics"] != before
    assert settings(fp8_weights="matmul") != settings(fp8_weights="matmul", fp8_fast_accum=False)
    assert settings(fp8_weights="storage")["numerics"] == {"fp8_weights": "storage", "fp8_attention": False}


def test_sample_cli_speed_flags():
    from sample import build_parser
    from train.cli import speed_from_args

    base = ["--release", "r", "--prompt", "p"]
    assert speed_from_args(build_parser().parse_args(base)) == SamplingSpeed()
    assert speed_from_args(build_parser().parse_args(base + ["--fast"])) == SamplingSpeed.fast()
    assert speed_from_args(build_parser().parse_args(base + ["--fp8-weights", "storage", "--fp8-attention"])) == \
        SamplingSpeed(fp8_weights="storage", fp8_attention=True)
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(base + ["--fp8-weights", "bogus"])
    assert exit_info.value.code == 2  # argparse's usage error, not a traceback


def test_cli_refuses_merge_with_fp8_weights_before_loading():
    """Refused from the flags alone (a UsageError: one `error:` line), not after loading 28 GB of experts."""
    from sample import build_parser
    from train.cli import UsageError, speed_from_args

    args = build_parser().parse_args(["--release", "r", "--prompt", "p", "--fast", "--merge", "--device", "cpu"])
    with pytest.raises(UsageError, match="--merge"):
        speed_from_args(args)


def test_speed_options_refuse_an_expert_that_is_training():
    """Training previews pass the experts being trained; fp8 or compile there would freeze and quantise the
    LoRA under training, so prepare_expert refuses such a model (the default speed leaves it alone)."""
    from peft import LoraConfig, inject_adapter_in_model

    from wan_model.sampling_speed import prepare_expert
    from wan_model.transformer import WanTransformer

    model = WanTransformer(PRESETS["tiny-t2v"].transformer)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["ffn.0"]), model)
    assert prepare_expert(model, SamplingSpeed()) is model
    with pytest.raises(ValueError, match="trainable"):
        prepare_expert(model, SamplingSpeed(fp8_weights="storage"))
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a CUDA device that is absent")
def test_cli_names_a_missing_cuda_device():
    from sample import build_parser
    from train.cli import UsageError, speed_from_args

    with pytest.raises(UsageError, match="--device cuda"):
        speed_from_args(build_parser().parse_args(["--release", "r", "--prompt", "p", "--device", "cuda"]))
