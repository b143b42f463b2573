"""MLflow tracking for coin-ray: the sweep / trial run hierarchy, evaluation matrices, plots and reports.

`MlflowTracker` consumes the continual run's events (coin_ray.training.hooks.RunHooks); the sweep functions
manage the parent run; `tracking/report.py` compares a sweep's trials. Names logged are a contract: see
tracking/_tracker.py and the README section "MLflow names". Importing this package does not import MLflow:
names are loaded on first use.
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# MLflow's own HTTP client retries a failed request up to 7 times with exponential backoff (minutes) and waits
# 120 s for an answer. The retries are tracking's own (bounded: tracking._runs.RETRY_BUDGET_S and the outbox),
# so one request fails fast; a value the user set wins.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

_EXPORTS = {
    "MlflowTracker": "tracking._tracker",
    "mark_run_failed": "tracking._tracker",
    "trial_params": "tracking._tracker",
    "open_sweep_run": "tracking._sweep",
    "log_sweep_artifacts": "tracking._sweep",
    "close_sweep_run": "tracking._sweep",
    "DEFAULT_TRACKING_URI": "tracking._uri",
    "TrackingUnavailableError": "tracking._uri",
    "check_tracking_uri": "tracking._uri",
    "resolve_tracking_uri": "tracking._uri",
    "experiment_runs_url": "tracking._uri",
    "sweep_compare_url": "tracking._uri",
    "redact": "coin_ray.redact",
    "redact_params": "coin_ray.redact",
    "redact_text": "coin_ray.redact",
    "is_secret_key": "coin_ray.redact",
    "replay_spool": "tracking._outbox",
    "matrix_payload": "tracking.matrices",
    "matrix_csv": "tracking.matrices",
    "check_matrix_payload": "tracking.matrices",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tracking' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
