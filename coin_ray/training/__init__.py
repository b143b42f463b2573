"""Continual runs: per-worker stage loop, the Tune-free driver, the content-addressed stage store, hooks.

The names below load on first use, so unpickling a `coin_ray.training.types` value (Ray Train's controller
does, for the run's config) imports neither torch nor the loop."""
from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "RunSetupError": "continual", "load_run_result": "continual", "prepare_data": "continual",
    "run_continual": "continual", "HookList": "hooks", "RunHooks": "hooks", "RunInfo": "hooks",
    "RunResult": "hooks", "StageReport": "hooks", "StageStore": "store", "stage_key": "store",
    "PreparedData": "types",
}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'coin_ray.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"coin_ray.training.{_HOME[name]}"), name)
    globals()[name] = value
    return value
