"""Helpers shared by the checkpoint tests: tiny checkpoint folders of each family, saved with save_pretrained,
the config of a short continual run on one, and the check that every saved adapter is finite."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from coin_ray.config import ExperimentConfig

TINY = dict(hidden=64, intermediate=128)
ORDER = ["ScienceQA", "TextVQA"]


def save_tiny_checkpoint(folder: Path, dtype: torch.dtype, chat_template: str | None = None,
                         poisoned: bool = False, family: str = "llava") -> Path:
    """A checkpoint folder of `family`'s layout (llava: llava-1.5-hf's, LlavaForConditionalGeneration with its
    LlavaProcessor; qwen2_vl: Qwen2-VL-7B-Instruct's, Qwen2VLForConditionalGeneration with its image processor,
    tokenizer and chat_template.json), weights saved in `dtype` with save_pretrained. `poisoned`: one lm_head row
    is inf (a corrupt checkpoint), so every loss is NaN."""
    from coin_ray.models.families import FAMILIES

    model, processor = FAMILIES[family].build_tiny(**TINY)
    if poisoned:
        with torch.no_grad():
            model.lm_head.weight[7] = math.inf
    model.to(dtype).save_pretrained(folder)
    if chat_template is not None:
        processor.chat_template = chat_template
    processor.save_pretrained(folder)
    return folder


def continual_cfg(storage: Path, name: str, source: Path, **extra) -> ExperimentConfig:
    """Two stages of 6 steps on the synthetic benchmark, in-process (num_workers 0)."""
    return ExperimentConfig.from_dict({
        "order": ORDER, "name": name, "storage_path": str(storage), "scaling.num_workers": 0, "eval.judge": "none",
        "model.pretrain_steps": 0,
        "model.source": str(source), "train.max_steps": 6, "train.batch_size": 8, "train.lr": 0.004,
        "data.train_rows": 32, "data.test_rows": 8, "eval.batch_size": 8, "tuner.rank": 8, "tuner.num_experts": 2,
        **extra})


def finite_adapters(stages: list[dict]) -> bool:
    """Every stage's saved adapter weights exist and are finite."""
    from safetensors.torch import load_file

    from coin_ray.tuners import TUNER_WEIGHTS_NAME

    for s in stages:
        weights = load_file(str(Path(s["path"]) / "checkpoint" / "adapter" / TUNER_WEIGHTS_NAME))
        if not weights or not all(bool(torch.isfinite(t).all()) for t in weights.values()):
            return False
    return True
