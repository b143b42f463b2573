"""Continual-learning methods as plugins: one module each, registered here by name (`cl.method`).

    method = build_method(cfg)        # Sequential, OLoRA, EWC or LwF (coin_ray.methods.base.Method)

The names a sweep's `--methods` takes pair a tuner with a method: `lora`, `moelora`, `full` are plain
sequential tuning of that tuner; `olora`, `ewc`, `lwf` run on LoRA; `<name>+replay` adds replay of the past
tasks (train.replay_per_task: the base config's value, or DEFAULT_REPLAY_PER_TASK when that is 0).
"""
from __future__ import annotations

from typing import Any

from coin_ray.config import CL_METHODS, METHODS, ExperimentConfig
from coin_ray.methods.base import Method, Sequential
from coin_ray.methods.ewc import EWC
from coin_ray.methods.lwf import LwF
from coin_ray.methods.olora import OLoRA

# cl.method -> the class; coin_ray.config.CL_METHODS names the same methods (a test keeps them equal)
REGISTRY: dict[str, type] = {"none": Sequential, "olora": OLoRA, "ewc": EWC, "lwf": LwF}

CL_ON_TUNER = "lora"  # the tuner the sweep names olora, ewc and lwf train on
METHOD_NAMES = (*METHODS, *(m for m in CL_METHODS if m != "none"))
REPLAY_SUFFIX = "+replay"
DEFAULT_REPLAY_PER_TASK = 20

__all__ = ["DEFAULT_REPLAY_PER_TASK", "METHOD_NAMES", "Method", "REGISTRY", "build_method", "method_changes",
           "method_label", "parse_methods"]


def build_method(cfg: ExperimentConfig) -> Method:
    return REGISTRY[cfg.cl.method](cfg)


def parse_methods(text: str) -> list[str]:
    """The names of a `--methods` value ("lora,olora,ewc+replay"); ValueError naming the unknown ones."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n.removesuffix(REPLAY_SUFFIX) not in METHOD_NAMES]
    if unknown or not names:
        raise ValueError(f"--methods: unknown method(s) {unknown or [text]}; valid: {', '.join(METHOD_NAMES)}, "
                         f"each optionally with {REPLAY_SUFFIX}")
    if len(set(names)) != len(names):
        raise ValueError(f"--methods names a method more than once: {text}")
    return names


def method_changes(name: str, replay_per_task: int = 0) -> dict[str, Any]:
    """The config changes (dotted keys) of a `--methods` name over a base config whose train.replay_per_task
    is `replay_per_task`."""
    base = name.removesuffix(REPLAY_SUFFIX)
    changes: dict[str, Any] = ({"tuner.method": base, "cl.method": "none"} if base in METHODS
                               else {"tuner.method": CL_ON_TUNER, "cl.method": base})
    if name.endswith(REPLAY_SUFFIX):
        changes["train.replay_per_task"] = replay_per_task or DEFAULT_REPLAY_PER_TASK
    return changes


def method_label(cfg: ExperimentConfig) -> str:
    """The `--methods` name of a config: its tuner, or its cl method (with the tuner when that is not LoRA),
    plus "+replay" when it replays."""
    if cfg.cl.method == "none":
        label = cfg.tuner.method
    else:
        label = cfg.cl.method if cfg.tuner.method == CL_ON_TUNER else f"{cfg.cl.method}({cfg.tuner.method})"
    return label + (REPLAY_SUFFIX if cfg.train.replay_per_task > 0 else "")
