"""A run whose every stage and evaluation cell is in the stage store, assembled without a worker: its matrix,
metrics, hook events (so its MLflow run) and result.json come from the store alone. A stage key fixes its
result, so this is the run the workers would have produced, without starting them (a Train worker group takes
15-20 s to start on 2 cores, and a 7B model minutes to load)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from coin_ray.config import ExperimentConfig
from coin_ray.environment import environment
from coin_ray.training.accounting import ACCOUNTING_KEY, StageCost, devices_of, stored_device_hours
from coin_ray.training.evaluate import EvalRow, stored_row
from coin_ray.training.hooks import HookList, RunHooks, RunResult
from coin_ray.training.loop import Progress, RunOutput
from coin_ray.training.stages import Stage, stage_keys, store_root, stored_losses, zero_shot_key
from coin_ray.training.store import StageEntry, StageStore
from coin_ray.training.types import PreparedData

STORED = "stored"  # the device kind of a stage nothing ran for


def stored_run(cfg: ExperimentConfig, data_hash: str) -> tuple[EvalRow | None, list[tuple[StageEntry, EvalRow]]] | None:
    """(zero-shot row or None, every stage's entry and evaluation row) when the store holds all of them, else
    None (the run needs its workers)."""
    root = store_root(cfg)
    if not root.is_dir():
        return None
    store = StageStore(root)
    judged = cfg.eval.judge != "none"
    zero = None
    if cfg.eval.zero_shot:
        path = store.root / zero_shot_key(cfg, data_hash)
        zero = stored_row(path, cfg, judged) if (path / "meta.json").is_file() else None
        if zero is None:
            return None
    stages = []
    for _, key in stage_keys(cfg, data_hash):
        entry = store.get(key)
        row = stored_row(entry.path, cfg, judged) if entry is not None else None
        if row is None:
            return None
        stages.append((entry, row))
    return zero, stages


def run_from_store(cfg: ExperimentConfig, prepared: PreparedData, *,
                   hooks_factory: Callable[[], RunHooks] | None = None,
                   report: Callable[[dict[str, Any]], None] | None = None) -> RunResult | None:
    """The run of `cfg` assembled from the store (the same events, in the same order, as the worker loop's),
    or None when something of it is not stored. `report(metrics)` is called after each stage (Tune's report)."""
    found = stored_run(cfg, prepared.data_hash)
    if found is None:
        return None
    zero, stages = found
    run_dir = Path(cfg.storage_path).resolve() / "runs" / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    out = RunOutput(cfg, prepared.data_hash, HookList([hooks_factory()] if hooks_factory else []), run_dir,
                    rank0=True, report=lambda metrics, _checkpoint: report(metrics) if report else None,
                    environment=stored_environment(cfg, [entry.meta() for entry, _ in stages]))
    out.start()
    try:
        devices = devices_of(cfg)
        if zero is not None:
            out.hooks.on_zero_shot(zero.scores, zero.knowledge)
        tally = Progress(tuple(cfg.order), zero, judged=cfg.eval.judge != "none", joint=cfg.train.joint)
        tally.add_zero_shot_cost(zero, devices, STORED)
        for entry, row in stages:
            cost = StageCost(devices, STORED, reused=True, saved_device_hours=stored_device_hours(entry.meta()))
            out.stage(tally, Stage(entry.key, entry, stored_losses(entry), reused=True, cost=cost), row,
                      started=time.time(), obtained_s=0.0)
        return out.result
    except BaseException as error:
        if out.result is None:
            out.hooks.on_run_failed(error)
        raise


def stored_environment(cfg: ExperimentConfig, metas: list[dict[str, Any]]) -> dict[str, str]:
    """The environment of a run assembled from the store: this process's libraries, and the device the stored
    stages were trained on (their accounting's device kind; "cpu" when none is recorded)."""
    kinds = {(m.get(ACCOUNTING_KEY) or {}).get("device_kind") for m in metas} - {None, "cpu"}
    env = environment("cpu")
    if len(kinds) == 1:
        env["device"] = f"{kinds.pop()} x {cfg.scaling.num_workers}"
    return env

