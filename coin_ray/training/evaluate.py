"""One row of the evaluation matrix: every task of the order scored by the model as it stands after a stage.

Cells are cached per task inside the stage's store entry (a stage reused by another order is not
evaluated again); a cell whose judge failed is never cached, so a later run judges it again."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coin_ray.config import ExperimentConfig
from coin_ray.training.store import StageStore
from coin_ray.training.worker import WorkerRun, progress


@dataclass
class EvalRow:
    scores: dict[str, float | None]
    knowledge: dict[str, float | None] | None  # None when no judge runs
    predictions: list[dict[str, Any]] = field(default_factory=list)
    answers: int = 0  # answers generated here (cells not in the store)
    seconds: float = 0.0  # wall time of generating them
    saved_seconds: float = 0.0  # what the cells read from the store took when they were computed


def eval_cell_name(task: str, cfg: ExperimentConfig) -> str:
    judge = cfg.eval.judge
    opts = json.dumps(dict(cfg.eval.judge_options), sort_keys=True, default=str)
    # max_test_rows draws a seeded random subset (seed data.seed): both decide which rows are scored
    subset = f"random:{cfg.data.seed}" if cfg.data.max_test_rows is not None else ""
    tag = hashlib.sha256(f"{cfg.data.max_test_rows}{subset}:{judge}:{opts}".encode()).hexdigest()[:8]
    return f"{task}-{tag}"


def judge_failed(cell: dict[str, Any]) -> bool:
    """A cell whose knowledge score is missing because the judge failed (not because it has no rows)."""
    return bool(cell.get("knowledge_error") or cell.get("knowledge_failures"))


def stored_cell(entry_path: Path, task: str, cfg: ExperimentConfig, judged: bool) -> dict[str, Any] | None:
    """The stored evaluation cell of `task` under the entry at `entry_path`, or None when it must be computed
    (absent, or stored by an older version with judge failures: judged again)."""
    cell = StageStore.read_eval(entry_path, eval_cell_name(task, cfg))
    return None if cell is None or (judged and judge_failed(cell)) else cell


def add_cell(row: EvalRow, task: str, cell: dict[str, Any]) -> None:
    row.scores[task] = cell["score"]
    if row.knowledge is not None:
        row.knowledge[task] = cell.get("knowledge")
    row.predictions += cell.get("predictions", [])


def stored_row(entry_path: Path, cfg: ExperimentConfig, judged: bool) -> EvalRow | None:
    """The evaluation row of the stage at `entry_path` when every task's cell is stored, else None."""
    row = EvalRow(scores={}, knowledge={} if judged else None)
    for task in cfg.order:
        cell = stored_cell(entry_path, task, cfg, judged)
        if cell is None:
            return None
        row.saved_seconds += float(cell.get("seconds", 0.0))
        add_cell(row, task, cell)
    return row


def evaluate_row(run: WorkerRun, entry_path: Path) -> EvalRow:
    """Score every task of the order with the weights of the stage stored at `entry_path` (each rank scores a
    disjoint shard of the test rows; rank 0 holds the merged cell)."""
    from coin_ray.evaluation.generation import evaluate_task

    cfg, env = run.cfg, run.env
    row = EvalRow(scores={}, knowledge={} if run.judge is not None else None)
    for task in run.order:
        cell = stored_cell(entry_path, task, cfg, run.judge is not None)
        if cell is None:
            run.weights.ensure()
            started = time.perf_counter()
            cell = evaluate_task(run.model, run.processor, task, run.data.splits[task]["test"],
                                 batch_size=cfg.eval.batch_size, device=env.device, rank=env.rank,
                                 world=env.world, max_rows=cfg.data.max_test_rows, subset_seed=cfg.data.seed,
                                 judge=run.judge,
                                 max_predictions=cfg.eval.max_predictions_logged,
                                 autocast_dtype=run.autocast_dtype)
            cell["seconds"] = time.perf_counter() - started  # its cost, for the runs that reuse it
            row.answers += int(cell.get("n", 0))
            row.seconds += cell["seconds"]
            if env.rank == 0 and not judge_failed(cell):  # a failure is never cached: next run judges again
                StageStore.write_eval(entry_path, eval_cell_name(task, cfg), cell)
            if env.rank == 0 and cell.get("knowledge_error"):
                progress(f"{cfg.name}: no knowledge score for {task}: {cell['knowledge_error']}")
        else:
            row.saved_seconds += float(cell.get("seconds", 0.0))
        add_cell(row, task, cell)
    env.barrier()
    return row
