"""Save and load what a tuner trains: safetensors of the trainable parameters plus the tuner's JSON config.

A stage checkpoint is exactly `trainable_state_dict(model)`: adapters, routers and trainable non-adapter parts
(the projector; the whole LM under "full"). A fresh base model plus the folder reproduces the tuned model
bit for bit, and training continues from exactly the saved parameters.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from coin_ray.config import TunerConfig
from coin_ray.tuners._apply import TUNER_CONFIG_ATTR, apply_tuner

TUNER_CONFIG_NAME = "tuner_config.json"
TUNER_WEIGHTS_NAME = "tuner_weights.safetensors"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: tensor} of every parameter with requires_grad, in model order. Like
    nn.Module.state_dict the tensors share storage with the parameters: clone them to keep a snapshot."""
    return {name: param.detach() for name, param in model.named_parameters() if param.requires_grad}


def load_trainable_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy `state_dict` into the trainable parameters of `model`, strictly: the keys must be exactly the
    trainable parameter names and every shape must match. Values keep the parameters' device and dtype."""
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    missing = [name for name in params if name not in state_dict]
    unexpected = [name for name in state_dict if name not in params]
    mismatched = [
        f"{name}: saved {tuple(state_dict[name].shape)} vs model {tuple(param.shape)}"
        for name, param in params.items()
        if name in state_dict and state_dict[name].shape != param.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} with another shape (e.g. {mismatched[:3]})")
        raise ValueError(
            "the state dict must hold exactly the model's trainable parameters, but it has "
            + "; ".join(parts)
            + ": apply the same tuner (method, targets, rank, experts) to the same base model before loading"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state_dict[name])


def _check_tuner_config(tuner_config: dict[str, Any]) -> None:
    accepted = {"method", "trainable_modules", *TunerConfig.METHOD_FIELDS["moelora"]}
    unknown = sorted(set(tuner_config) - accepted)
    if "method" not in tuner_config or unknown:
        raise ValueError(
            f"tuner_config needs 'method' and only apply_tuner's arguments, got keys {sorted(tuner_config)}"
            + (f" (unknown: {unknown})" if unknown else "")
            + f": use keys among {sorted(accepted)}"
        )


def save_tuner(model: nn.Module, directory: str | Path, tuner_config: dict[str, Any] | None = None) -> Path:
    """Write `tuner_config.json` and `tuner_weights.safetensors` (the trainable parameters) into `directory`.

    `tuner_config` is apply_tuner's arguments ("method" plus keywords); default: what apply_tuner recorded on
    the model. Returns the directory.
    """
    if tuner_config is None:
        tuner_config = getattr(model, TUNER_CONFIG_ATTR, None)
        if tuner_config is None:
            raise ValueError(
                f"{type(model).__name__} carries no tuner config: call apply_tuner on it first, or pass "
                "tuner_config={'method': ..., ...}"
            )
    _check_tuner_config(tuner_config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu").contiguous() for name, t in trainable_state_dict(model).items()}
    save_file(tensors, str(directory / TUNER_WEIGHTS_NAME), metadata={"format": "pt", "producer": "coin_ray"})
    (directory / TUNER_CONFIG_NAME).write_text(json.dumps(tuner_config, indent=2, sort_keys=True) + "\n")
    return directory


def load_tuner(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the tuner described by `directory/tuner_config.json` to the fresh base `model` and load the saved
    trainable parameters into it (strictly). Returns the model (same object)."""
    directory = Path(directory)
    config_path, weights_path = directory / TUNER_CONFIG_NAME, directory / TUNER_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: pass a folder written by save_tuner")
    tuner_config = json.loads(config_path.read_text())
    _check_tuner_config(tuner_config)
    arguments = dict(tuner_config)
    method = arguments.pop("method")
    trainable = arguments.pop("trainable_modules", None)
    # folders written before options were recorded per method also hold the other methods' (unused) values
    used = TunerConfig.METHOD_FIELDS.get(method, ())
    apply_tuner(model, method, trainable_modules=trainable, **{k: v for k, v in arguments.items() if k in used})
    load_trainable_state_dict(model, load_file(str(weights_path)))
    return model
