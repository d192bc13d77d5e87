"""The adapter card: README.md in every exported step folder, as LoRA repositories on the Hugging Face Hub
write it (YAML front matter with base_model / tags / instance_prompt, then prose), so the folder can be
uploaded as it is and a colleague knows what it is and how to load it.

What it states: the base model, the trigger phrase, each expert with its timestep range, rank and alpha,
the step, the dataset (clips used and skipped, label values, from the prepare report), the validation
loss at this step and the best validated step, preview frames (the training previews of this step, copied
in as preview-<i>.png), and how to load the adapter in our sampler, diffusers and ComfyUI.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import yaml

from data.prompts import LABEL_ORDER
from wan_model.files import atomic_write_text

from .validation import best_steps

CARD_NAME = "README.md"
# The official release each preset's adapters load into (its diffusers conversion has the suffix -Diffusers).
HUB_MODELS = {"t2v-A14B": "Wan-AI/Wan2.2-T2V-A14B", "i2v-A14B": "Wan-AI/Wan2.2-I2V-A14B",
              "ti2v-5B": "Wan-AI/Wan2.2-TI2V-5B"}
PIPELINES = {"t2v": "WanPipeline", "i2v": "WanImageToVideoPipeline", "ti2v": "WanPipeline"}
TASK_TAGS = {"t2v": ["text-to-video"], "i2v": ["image-to-video"], "ti2v": ["text-to-video", "image-to-video"]}


def dataset_summary(cache_dir: str | Path) -> dict:
    """Clips used and skipped and the label values of the used clips, from <cache_dir>/report.json."""
    path = Path(cache_dir) / "report.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text(encoding="utf-8"))
    used = [c for c in report["clips"] if c["status"] == "used"]
    labels = {name: Counter(c["labels"].get(name) for c in used if c["labels"].get(name)) for name in LABEL_ORDER}
    return {"used": len(used), "skipped": report.get("skipped", 0),
            "labels": {name: dict(counts.most_common()) for name, counts in labels.items() if counts}}


def _front_matter(fields: dict) -> str:
    return "---\n" + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True) + "---\n"


def write_adapter_card(step_dir: str | Path, *, preset, experts: list[dict], step: int, trigger: str,
                       dataset: dict, validation: list[dict], previews: list[Path], recipe_hash: str,
                       release: str | None = None) -> Path:
    """README.md in `step_dir` (module docstring).

    experts: [{"name", "range": (lo, hi), "rank", "alpha"}]; validation: the run's validation records
    ({"steps_done", "experts": {name: {"loss"}}}); previews: PNG frame strips of this step's previews;
    release: the release folder the run trained on (shown in the sampler command)."""
    step_dir = Path(step_dir)
    images = []
    for i, png in enumerate(previews):
        target = step_dir / f"preview-{i}.png"
        shutil.copyfile(png, target)
        images.append(target.name)
    hub = HUB_MODELS.get(preset.name)
    task = preset.task
    files = [f"{e['name']}.safetensors" for e in experts]
    fields = {"base_model": hub or f"wanlora {preset.name} (tiny random model, no hub release)",
              "library_name": "diffusers", "license": "apache-2.0",
              "tags": ["lora", "wan2.2", *TASK_TAGS[task], "wanlora", "template:sd-lora"]}
    if trigger:
        fields["instance_prompt"] = trigger
    if images:
        fields["widget"] = [{"text": trigger or "preview", "output": {"url": name}} for name in images]
    at_step = next((r for r in validation if r["steps_done"] == step), None)
    best = {name: (b["step"], b["loss"]) for name, b in best_steps(validation).items()}

    lines = [_front_matter(fields), f"# {trigger or 'wanlora'} LoRA for Wan 2.2 {preset.name}", "",
             f"Trained with wanlora to step {step} (recipe hash `{recipe_hash}`). "
             + (f"Put the trigger phrase **{trigger}** in the prompt." if trigger else "No trigger phrase."), "",
             "## Experts", "", "| file | expert | timesteps | rank | alpha | validation loss at this step | best validated step |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in experts:
        val = at_step["experts"].get(e["name"], {}).get("loss") if at_step else None
        b = best.get(e["name"])
        lines.append(f"| `{e['name']}.safetensors` | {e['name'].replace('_', ' ')} | [{e['range'][0]}, {e['range'][1]}) | "
                     f"{e['rank']} | {e['alpha']:g} | {'-' if val is None else f'{val:.4f}'} | "
                     f"{'-' if b is None else f'step {b[0]} ({b[1]:.4f})'} |")
    lines += ["", ("Each file adapts one expert of the model; the sampler switches experts by timestep "
                   "(high noise for t at or above the boundary), so each file goes on its own expert. "
                   if preset.is_moe else "The model has one expert, adapted by this file. ")
              + "`diffusers/` holds the same adapters under diffusers' module names.", ""]
    if dataset:
        lines += ["## Dataset", "", f"{dataset['used']} clips used, {dataset['skipped']} skipped at prepare time."]
        for name, counts in dataset.get("labels", {}).items():
            lines.append(f"- {name.replace('_', ' ')}: " + ", ".join(f"{v} ({n})" for v, n in counts.items()))
        lines.append("")
    if images:
        lines += ["## Previews at this step", ""] + [f"![preview {i}]({name})" for i, name in enumerate(images)] + [""]
    lines += ["## Use", "", "wanlora's sampler (this folder; each file's header names its expert):", "", "```bash",
              f"python sample.py --release {release or '/models/' + (hub or preset.name).split('/')[-1]} --lora {step_dir} "
              f"--prompt \"{trigger + ', ' if trigger else ''}a fox in snow\""
              + {"i2v": " --image first_frame.png", "ti2v": "  # --image FILE: from a first frame"}.get(task, ""),
              "```", ""]
    if hub:
        lines += ["diffusers:", "", "```python", "import torch", f"from diffusers import {PIPELINES[task]}", "",
                  f"pipe = {PIPELINES[task]}.from_pretrained(\"{hub}-Diffusers\", torch_dtype=torch.bfloat16).to(\"cuda\")"]
        # diffusers' `transformer` is the dense model or the high-noise expert, `transformer_2` the low-noise one.
        for f in files:
            into = ", load_into_transformer_2=True" if f == "low_noise.safetensors" else ""
            lines.append(f"pipe.load_lora_weights(\"{step_dir.name}/diffusers\", weight_name=\"{f}\", "
                         f"adapter_name=\"{f.split('.')[0]}\"{into})")
        lines += ["```", ""]
    lines += ["ComfyUI: copy the files into `ComfyUI/models/loras/` and put a *LoraLoaderModelOnly* node after each "
              "expert's model loader: " + ", ".join(f"`{f}` on the {f.split('.')[0].replace('_', ' ')} model"
                                                   for f in files) + ".", ""]
    return atomic_write_text(step_dir / CARD_NAME, "\n".join(lines))
