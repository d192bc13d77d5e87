"""Time adapter switches in the sampler at a released model's size: what `sample.py evaluate` pays per variant.

    python bench/adapter_switch.py --preset t2v-A14B --rank 32 --adapters 3

Both experts are built with random bf16 weights on the GPU (as a release loads them); `--adapters` random
LoRA sets of our export format (one rank-`rank` file per expert on the ten block linears, bf16, with the
expert in the header) are written to a temporary folder. The pipeline then switches base -> set 1 -> set 2
-> ... -> base twice over (`WanPipeline.set_adapters`: hooks detached and attached, the factors stacked
and copied to the device; the base weights are never reloaded or re-cast). Reported per switch: seconds
(synchronised), first pass (files read from disk) and second (files already read). The VAE and text
encoder play no part in a switch and are not built.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import device_fields, emit  # noqa: E402
from bench.sample import build_expert  # noqa: E402
from wan_model.config import PRESETS  # noqa: E402
from wan_model.lora_formats import META_EXPERT, LoraModule, lora_targets, save_lora  # noqa: E402
from wan_model.pipeline import WanPipeline  # noqa: E402


def random_adapter(cfg, rank: int, seed: int) -> dict[str, LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return {name: LoraModule(down=(torch.randn(rank, i, generator=g) * 0.01).bfloat16(),
                             up=(torch.randn(o, rank, generator=g) * 0.01).bfloat16(), alpha=float(rank))
            for name, (i, o) in lora_targets(cfg).items() if name.startswith("blocks.")}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="t2v-A14B", choices=sorted(PRESETS))
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["high_noise", "low_noise"] if preset.is_moe else ["dense"]
    experts = {name: build_expert(preset.transformer, device, seed=i) for i, name in enumerate(names)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        sets = []
        for k in range(args.adapters):
            folder = Path(tmp) / f"step-{k}"
            for i, name in enumerate(names):
                save_lora(random_adapter(preset.transformer, args.rank, 10 * k + i), folder / f"{name}.safetensors",
                          {META_EXPERT: name})
            sets.append(folder)
        file_gb = sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / len(sets) / 1e9
        pipe = WanPipeline(preset, experts, torch.nn.Identity(), None, device=device, dtype=torch.bfloat16)
        passes = []
        for _ in range(2):
            seconds = []
            for target in sets + [None]:
                sync()
                start = time.perf_counter()
                pipe.set_adapters([] if target is None else [target], 1.0)
                sync()
                seconds.append(round(time.perf_counter() - start, 3))
            passes.append(seconds)
    emit(dict(preset=args.preset, rank=args.rank, adapter_sets=args.adapters, gb_per_set=round(file_gb, 3),
              switch_s_first_pass=passes[0], switch_s_second_pass=passes[1], **device_fields()), args.json)


if __name__ == "__main__":
    main()
