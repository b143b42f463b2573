"""The model a run trains: the base VLM (tiny from config, optionally instruction-pretrained, or a local
checkpoint folder) in its resolved dtype, with the tuner applied and float32 master weights."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coin_ray.config import ExperimentConfig


def resolved_precision(cfg: ExperimentConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(base dtype, autocast dtype or None) of this run on `device`."""
    from coin_ray.models._precision import resolve_autocast, resolve_dtype

    base = resolve_dtype(cfg.model.dtype, device)
    return base, resolve_autocast(cfg.train.precision, base, device)


def build_base(cfg: ExperimentConfig, storage_path: Path, device: torch.device | None = None,
               source: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The base VLM: tiny from config (optionally instruction-pretrained, cached under <storage>/base), or a
    local checkpoint folder (`source`: the one the driver resolved, e.g. an assembled model's; default
    model.source); held in `model.dtype` as resolved for `device` (CPU when None)."""
    from coin_ray.models import build_vlm
    from coin_ray.models._precision import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, device or torch.device("cpu"))
    source = source or cfg.model.source
    tiny = source == "tiny"
    kwargs = cfg.model.tiny_kwargs() if tiny else {"dtype": dtype}
    model, processor = build_vlm(source, **kwargs)
    if tiny and cfg.model.pretrain_steps > 0:
        from coin_ray.synthetic.base import pretrain_base

        pretrain_base(model, processor, storage_path / "base", cfg.model.pretrain_steps, cfg.model.pretrain_lr,
                      cfg.model.seed, image_size=cfg.data.image_size, max_length=cfg.data.max_length)
    if tiny and dtype != torch.float32:
        model.to(dtype)
    return model, processor


def build_model(cfg: ExperimentConfig, storage_path: Path, device: torch.device | None = None,
                source: str | None = None) -> tuple[torch.nn.Module, Any]:
    """The base VLM with the tuner applied - the one the continual method builds on (`Method.tuner`; adapter
    init seeded by train.seed: part of the replicate); every trainable parameter is a float32 master weight
    whatever the base dtype."""
    from coin_ray.methods import build_method
    from coin_ray.models._precision import fp32_master_weights
    from coin_ray.tuners import apply_tuner

    model, processor = build_base(cfg, storage_path, device, source)
    torch.manual_seed(cfg.train.seed)
    tuner, options = build_method(cfg).tuner()
    apply_tuner(model, tuner, **options)
    fp32_master_weights(model)
    return model, processor
