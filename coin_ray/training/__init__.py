"""Continual runs: per-worker stage loop, the Tune-free driver, the content-addressed stage store, hooks."""
from coin_ray.training.continual import RunSetupError, load_run_result, prepare_data, run_continual
from coin_ray.training.hooks import HookList, RunHooks, RunInfo, RunResult, StageReport
from coin_ray.training.store import StageStore, stage_key
from coin_ray.training.types import PreparedData

__all__ = [
    "HookList", "PreparedData", "RunHooks", "RunInfo", "RunResult", "RunSetupError", "StageReport", "StageStore",
    "load_run_result", "prepare_data", "run_continual", "stage_key",
]
