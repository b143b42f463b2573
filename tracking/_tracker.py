"""`MlflowTracker`: the RunHooks consumer that turns one continual run's events into its MLflow trial run.

Names are a contract (README, "MLflow names"): params `task_order`, `method`, `num_experts`, `rank`, `alpha`,
`lr`, `seed`, `benchmark`, `data_hash` + the flattened config's result-changing fields (the others, such as
`storage_path`, are tags `coin_ray.setting.<key>`); tag `coin_ray.run_key`; per-stage metrics `acc/<Task>`, `gk/<Task>`,
`avg_seen_acc`, `avg_seen_gk`, `stage_seconds`, `stage_reused`, the cost `stage/*` (step = stage index;
coin_ray.training.accounting), `train/loss` (step = global optimizer step), `zero_shot/<Task>`,
`gk_zero_shot/<Task>`; final `mft`, `mfn`, `maa`, `bwt`, `forgetting`, `fwt`, `gk_*`, `stages_reused`,
`device_hours`, `device_hours_saved`; MLflow's `system/*` metrics unless `system_metrics` is off; artifacts `eval_matrix.{json,csv,png}`,
`knowledge_matrix.{json,csv,png}`, `matrices.png`, `predictions/stage_<k>_<Task>.jsonl`, `adapter/`; tag
`reused_stages`. Every param, tag and text artifact is masked by coin_ray.redact before it is queued.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from coin_ray.environment import environment_tags
from coin_ray.evaluation.metrics import mean_seen
from coin_ray.training.hooks import RunInfo, RunResult, StageReport
from tracking._outbox import Outbox, Write
from coin_ray.redact import redact, redact_params, redact_text
from tracking._runs import (RETRY_BUDGET_S, call_with_retry, finite_metrics,
                            log_params_idempotent, open_keyed_run)
from tracking._uri import get_or_create_experiment, resolve_tracking_uri
from tracking.matrices import matrix_csv, matrix_payload

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("tracking")

# contract param name -> flattened-config key it comes from
TEXT_ARTIFACTS = (".json", ".jsonl", ".csv", ".txt", ".md", ".yaml")  # masked like params (PNGs are not text)
CONTRACT_PARAMS = {"method": "tuner.method", "num_experts": "tuner.num_experts", "rank": "tuner.rank",
                   "alpha": "tuner.alpha", "lr": "train.lr", "seed": "train.seed"}


def default_spool_dir() -> Path:
    """Where undelivered writes are kept: $COIN_RAY_MLFLOW_SPOOL or ~/.coin_ray/mlflow_spool."""
    return Path(os.environ.get("COIN_RAY_MLFLOW_SPOOL") or Path.home() / ".coin_ray" / "mlflow_spool")


SETTING_TAG_PREFIX = "coin_ray.setting."  # config fields that cannot change a result: mutable tags


def trial_params(info: RunInfo) -> dict[str, Any]:
    """The params of a trial run: the contract names first, then the flattened config's result-changing
    fields, credentials masked (coin_ray.redact) (all covered by the run key, so a reopened run holds the same values)."""
    from coin_ray.identity import result_fields

    config = redact_params(result_fields(info.params))
    params: dict[str, Any] = {"task_order": ">".join(info.order), "benchmark": info.benchmark,
                              "data_hash": info.data_hash}
    for name, key in CONTRACT_PARAMS.items():
        if key in config:
            params[name] = config[key]
    if info.method:  # the --methods name (an O-LoRA trial trains a LoRA tuner: tuner.method alone says lora)
        params["method"] = info.method
    # the order is task_order ("A>B>C"), not also the config's JSON list: the compare page shows one column
    params.update({k: v for k, v in config.items() if k not in params and k != "order"})
    return params


BASELINE_TAG = "coin_ray.baseline"


def trial_setting_tags(info: RunInfo) -> dict[str, str]:
    """Tags `coin_ray.setting.<key>` for the config fields that do not change a result (storage path, ...)."""
    from coin_ray.identity import NON_RESULT_FIELDS

    settings = redact_params({k: v for k, v in info.params.items() if k in NON_RESULT_FIELDS and k != "name"})
    tags = {SETTING_TAG_PREFIX + k: str(v)[:5000] for k, v in settings.items()}
    if info.params.get("train.joint"):  # the multitask upper bound: no order of its own
        tags[BASELINE_TAG] = "joint"
    return tags


def predictions_jsonl(predictions: Sequence[Mapping[str, Any]], max_per_task: int) -> bytes:
    """JSON lines of sample predictions, at most `max_per_task` per task (in the order given)."""
    kept: dict[str, int] = {}
    lines = []
    for record in predictions:
        task = str(record.get("task", ""))
        if kept.get(task, 0) >= max_per_task:
            continue
        kept[task] = kept.get(task, 0) + 1
        lines.append(json.dumps(record, default=str, ensure_ascii=False))
    return ("\n".join(lines) + ("\n" if lines else "")).encode()


class MlflowTracker:
    """Log one continual run to its MLflow run (a child of the sweep run when `parent_run_id` is given).

    The run is found by (experiment, parent, run key) and reopened on resume, never duplicated; the key is
    `run_key`, by default `coin_ray.identity.run_key` of the run's name, config and data hash. Writes go
    through an asynchronous retrying outbox (tracking/_outbox.py: ordered, batched, retried with backoff,
    spooled to disk if still undelivered at the end), so a slow or dropped server does not stall training.
    Only `on_run_start` talks to MLflow synchronously: it fails before any training when the store is down.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, parent_run_id: str | None = None,
                 tags: Mapping[str, str] | None = None, log_models: bool = False, *,
                 max_predictions_per_task: int = 50, flush_timeout_s: float = 60.0,
                 spool_dir: str | Path | None = None, run_key: str | None = None,
                 system_metrics: bool = False) -> None:
        if not run_name:
            raise ValueError("MlflowTracker needs a deterministic, non-empty run_name (e.g. the trial name)")
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.tags = {k: str(v) for k, v in (tags or {}).items() if v is not None and v != ""}
        self.log_models = log_models
        self.max_predictions_per_task = max_predictions_per_task
        self.flush_timeout_s = flush_timeout_s
        self.spool_dir = Path(spool_dir) if spool_dir else default_spool_dir()
        self.run_key = run_key
        self.system_metrics = system_metrics
        self._monitor: Any = None
        self.run_id: str | None = None
        self.reopened = False
        self.spooled_to: Path | None = None
        self._client: MlflowClient | None = None
        self._outbox: Outbox | None = None
        self._order: tuple[str, ...] = ()
        self._joint = False
        self._rows: list[dict[str, float | None]] = []
        self._knowledge_rows: list[dict[str, float | None]] = []
        self._zero_shot: dict[str, float | None] | None = None
        self._knowledge_zero_shot: dict[str, float | None] | None = None
        self._logged: set[tuple[str, int, float]] = set()  # metric points the run already holds (resume)

    # ---- RunHooks ---------------------------------------------------------------------------------
    def on_run_start(self, info: RunInfo) -> None:
        """Open the run synchronously (at most `RETRY_BUDGET_S` of retries when the server is down)."""
        from mlflow import MlflowClient

        from coin_ray.identity import run_key

        self._order = tuple(info.order)
        self._joint = bool(info.params.get("train.joint"))  # one stage trains every task
        self._rows, self._knowledge_rows = [], []
        self.run_key = self.run_key or run_key(self.run_name, info.params, info.data_hash)
        client = self._client = MlflowClient(self.tracking_uri)
        deadline = time.monotonic() + RETRY_BUDGET_S
        experiment_id = call_with_retry(
            lambda: get_or_create_experiment(client, self.tracking_uri, self.experiment), "get experiment",
            deadline=deadline)
        tags = {**self.tags, **trial_setting_tags(info), **environment_tags(info.environment)}
        run, self.reopened = call_with_retry(
            lambda: open_keyed_run(client, experiment_id, self.run_name, self.run_key,
                                   parent_run_id=self.parent_run_id, role="trial", tags=tags), "open run",
            deadline=deadline)
        self.run_id = run.info.run_id
        call_with_retry(lambda: log_params_idempotent(client, client.get_run(self.run_id), trial_params(info)),
                        "log params", deadline=deadline)
        if self.reopened:
            self._logged = call_with_retry(lambda: self._existing_points(run.data.metrics), "read metrics",
                                           deadline=deadline)
        self._outbox = Outbox(client, self.run_id, self.spool_dir)
        if self.system_metrics:
            self._monitor = start_system_metrics(self.run_id, self.tracking_uri, resume=self.reopened)

    def on_zero_shot(self, scores: dict[str, float | None], knowledge: dict[str, float | None] | None) -> None:
        self._zero_shot, self._knowledge_zero_shot = dict(scores), (dict(knowledge) if knowledge else None)
        values = {f"zero_shot/{t}": v for t, v in scores.items()}
        values.update({f"gk_zero_shot/{t}": v for t, v in (knowledge or {}).items()})
        self._metrics(values, step=0)

    def on_stage_end(self, report: StageReport) -> None:
        k = report.stage
        seen = self._order if self._joint else self._order[: k + 1]
        values: dict[str, Any] = {f"acc/{t}": v for t, v in report.scores.items()}
        values["avg_seen_acc"] = mean_seen(report.scores, seen)
        if report.knowledge is not None:
            values.update({f"gk/{t}": v for t, v in report.knowledge.items()})
            values["avg_seen_gk"] = mean_seen(report.knowledge, seen)
        values.update(stage_seconds=report.seconds, stage_reused=float(report.reused), **report.cost)
        self._metrics(values, step=k)
        if report.train_losses:
            self._metrics_points([("train/loss", float(loss), int(step)) for step, loss in report.train_losses])
        self._rows = self._rows[:k] + [dict(report.scores)]
        if report.knowledge is not None:
            self._knowledge_rows = self._knowledge_rows[:k] + [dict(report.knowledge)]
        if report.predictions:
            self._artifact(f"predictions/stage_{k}_{report.task}.jsonl",
                           predictions_jsonl(report.predictions, self.max_predictions_per_task))
        self._matrix_artifacts("eval_matrix", self._matrix(self._rows), self._vector(self._zero_shot),
                               figure=False)
        if self._knowledge_rows:
            self._matrix_artifacts("knowledge_matrix", self._matrix(self._knowledge_rows),
                                   self._vector(self._knowledge_zero_shot), figure=False)

    def on_run_end(self, result: RunResult) -> None:
        from tracking.plots import figure_png, matrices_figure

        last = len(result.order) - 1
        self._metrics({**result.metrics, "stages_reused": float(len(result.stages_reused)),
                       "device_hours": result.device_hours, "device_hours_saved": result.device_hours_saved}, step=0)
        self._tags({"reused_stages": ",".join(str(s) for s in result.stages_reused)})
        self._matrix_artifacts("eval_matrix", result.matrix, result.zero_shot, figure=True)
        if result.knowledge_matrix:
            self._matrix_artifacts("knowledge_matrix", result.knowledge_matrix, result.knowledge_zero_shot,
                                   figure=True)
            fig = matrices_figure(result.order, result.matrix, result.knowledge_matrix,
                                  title=f"{self.run_name} (after stage {last})")
            self._artifact("matrices.png", figure_png(fig))
        if self.log_models and result.adapter_dir and Path(result.adapter_dir).is_dir():
            self._put(Write("artifact_dir", local_dir=str(result.adapter_dir), path="adapter"))
        self._finish("FINISHED")

    def on_run_failed(self, error: BaseException) -> None:
        if self._outbox is None:
            return
        self._tags({"coin_ray.error": f"{type(error).__name__}: {error}"[:5000]})
        self._finish("FAILED")

    # ---- helpers --------------------------------------------------------------------------------------
    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write reached MLflow (True) or the timeout passed (False)."""
        return self._outbox is None or self._outbox.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def _finish(self, status: str) -> None:
        if self._outbox is None:  # on_run_start never succeeded: nothing was opened
            return
        if self._monitor is not None:  # its last samples are logged before the run is closed
            self._monitor.finish()
            self._monitor = None
        self._put(Write("status", status=status))
        self.spooled_to = self._outbox.close(self.flush_timeout_s)
        self._outbox = None

    def _existing_points(self, latest: Mapping[str, float]) -> set[tuple[str, int, float]]:
        points = set()
        for key in latest:
            for m in self._client.get_metric_history(self.run_id, key):
                points.add((m.key, int(m.step), float(m.value)))
        return points

    def _put(self, write: Write) -> None:
        if self._outbox is None:
            raise RuntimeError("MlflowTracker: on_run_start must run first (it opens the MLflow run)")
        self._outbox.put(write)

    def _metrics(self, values: Mapping[str, Any], step: int) -> None:
        self._metrics_points([(k, v, step) for k, v in finite_metrics(values).items()])

    def _metrics_points(self, points: list[tuple[str, float, int]]) -> None:
        now = int(time.time() * 1000)
        fresh = [(k, v, now, s) for k, v, s in points if (k, s, v) not in self._logged]
        self._logged.update((k, s, v) for k, v, _, s in fresh)
        for start in range(0, len(fresh), 1000):
            self._put(Write("batch", metrics=fresh[start:start + 1000]))

    def _tags(self, tags: Mapping[str, str]) -> None:
        self._put(Write("batch", tags={k: str(v) for k, v in redact(dict(tags)).items()}))

    def _artifact(self, path: str, data: bytes) -> None:
        if path.endswith(TEXT_ARTIFACTS):
            data = redact_text(data.decode("utf-8", errors="replace")).encode()
        self._put(Write("artifact", path=path, data=data))

    def _matrix(self, rows: list[dict[str, float | None]]) -> list[list[float | None]]:
        return [[row.get(t) for t in self._order] for row in rows]

    def _vector(self, values: dict[str, float | None] | None) -> list[float | None] | None:
        return None if values is None else [values.get(t) for t in self._order]

    def _matrix_artifacts(self, name: str, matrix: Sequence[Sequence[float | None]],
                          zero_shot: Sequence[float | None] | None, figure: bool) -> None:
        payload = matrix_payload(self._order, matrix, zero_shot)
        self._artifact(f"{name}.json", json.dumps(payload, indent=1).encode())
        self._artifact(f"{name}.csv", matrix_csv(payload).encode())
        if figure:
            from tracking.plots import figure_png, matrix_figure

            title = "instruction following" if name == "eval_matrix" else "knowledge (judge)"
            fig = matrix_figure(payload["tasks"], payload["matrix"], payload["zero_shot"],
                                title=f"{title}: {self.run_name}")
            self._artifact(f"{name}.png", figure_png(fig))


def start_system_metrics(run_id: str, tracking_uri: str, resume: bool = False) -> Any:
    """MLflow's system metrics monitor on `run_id` (system/cpu_utilization_percentage, system/gpu_*, ...: every
    10 s, or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL), or None where psutil is missing (GPU metrics also need
    pynvml; MLflow leaves them out without it)."""
    try:
        import psutil  # noqa: F401 (MLflow's monitor needs it)
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        log.info("no system metrics on run %s: psutil is not installed", run_id)
        return None
    # MLflow gives its loggers a handler of their own at info level: the monitor's start/stop lines, four per
    # trial, would be all a sweep prints between its stage lines
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    monitor = SystemMetricsMonitor(run_id, resume_logging=resume, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def mark_run_failed(tracking_uri: str, experiment: str, run_key: str, parent_run_id: str | None = None,
                    error: BaseException | None = None, status: str = "FAILED") -> str | None:
    """Mark a trial's run (found by its key, `MlflowTracker.run_key`) FAILED when the trial died outside the
    tracker's reach (e.g. a Train worker crash), or KILLED (`status`) when a scheduler such as ASHA stopped it:
    only a run still RUNNING is changed, so a FINISHED run stays FINISHED. Returns the run id, or None when
    the run does not exist (the trial failed before opening it). Retries a down server for at most
    `RETRY_BUDGET_S` seconds, then raises."""
    from mlflow import MlflowClient

    from tracking._runs import find_runs

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    deadline = time.monotonic() + RETRY_BUDGET_S
    found = call_with_retry(lambda: client.get_experiment_by_name(experiment), "get experiment", deadline=deadline)
    if found is None:
        return None
    runs = call_with_retry(lambda: find_runs(client, found.experiment_id, run_key, parent_run_id, "trial"),
                           "find run", deadline=deadline)
    if not runs:
        return None
    run = runs[0]
    if run.info.status == "RUNNING":
        if error is not None:
            call_with_retry(lambda: client.set_tag(run.info.run_id, "coin_ray.error",
                                                   redact_text(f"{type(error).__name__}: {error}")[:5000]), "set tag",
                            deadline=deadline)
        call_with_retry(lambda: client.set_terminated(run.info.run_id, status=status), f"mark {status.lower()}",
                        deadline=deadline)
    return run.info.run_id
