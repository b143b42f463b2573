"""The sweep (parent) run: opened once per sweep key (a rerun or `--resume` reopens it), holds the search
space as params, the table of all trials, sweep metrics (`stages_trained`, `stages_reused`, ...) and the
study's analysis (hyper-parameter report, order sensitivity) as CSV tables and PNG plots under `analysis/`.

These calls run on the driver, synchronously, with bounded retries (tracking._runs.call_with_retry).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from coin_ray.redact import redact_params, redact_text
from tracking._runs import (RETRY_BUDGET_S, call_with_retry, finite_metrics, log_params_idempotent,
                            open_keyed_run)
from tracking._uri import get_or_create_experiment, resolve_tracking_uri

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

SWEEP_TAG = "coin_ray.sweep"


def open_sweep_run(tracking_uri: str, experiment: str, sweep_name: str, params: Mapping[str, Any] | None = None,
                   tags: Mapping[str, str] | None = None, run_key: str | None = None) -> str:
    """The run id of the sweep's parent run (run name = sweep name), created or reopened (RUNNING).

    The run is found by `run_key` (tag `coin_ray.run_key`; default: a hash of the name and the params), so
    a sweep with other params is another run and a param never has two values. Secret-named params are
    dropped."""
    from mlflow import MlflowClient

    from coin_ray.identity import short_hash

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    params = redact_params(params or {})
    key = run_key or short_hash({"name": sweep_name, "params": params})
    all_tags = {SWEEP_TAG: sweep_name, **{k: str(v) for k, v in (tags or {}).items()}}
    deadline = time.monotonic() + RETRY_BUDGET_S
    experiment_id = call_with_retry(lambda: get_or_create_experiment(client, uri, experiment), "get experiment",
                                    deadline=deadline)
    run, _ = call_with_retry(lambda: open_keyed_run(client, experiment_id, sweep_name, key, parent_run_id=None,
                                                    role="sweep", tags=all_tags), "open sweep run", deadline=deadline)
    if params:
        call_with_retry(lambda: log_params_idempotent(client, client.get_run(run.info.run_id), params),
                        "log sweep params", deadline=deadline)
    OPEN_SWEEP_RUNS[run.info.run_id] = uri
    return run.info.run_id


# the sweep runs this process opened and has not closed (run id -> tracking URI): `fail_open_sweep_runs`
# ends them when the sweep script dies of an error, so no sweep run stays RUNNING
OPEN_SWEEP_RUNS: dict[str, str] = {}


def fail_open_sweep_runs(error: BaseException) -> None:
    """Close every sweep run this process left open as FAILED, with the error's first line as the tag
    `coin_ray.error`; a tracking store that does not answer is left as it is (the error is what to report)."""
    from mlflow import MlflowClient

    message = redact_text(next((line for line in str(error).splitlines() if line.strip()), type(error).__name__))
    for run_id, uri in list(OPEN_SWEEP_RUNS.items()):
        try:
            client = MlflowClient(uri)
            client.set_tag(run_id, "coin_ray.error", f"{type(error).__name__}: {message}"[:5000])
            client.set_terminated(run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - best effort while the script exits with the original error
            continue
        OPEN_SWEEP_RUNS.pop(run_id, None)


def log_sweep_artifacts(tracking_uri: str, run_id: str, trials: "pd.DataFrame | None" = None,
                        metrics: Mapping[str, float] | None = None,
                        figures: Mapping[str, "Figure"] | None = None,
                        tables: Mapping[str, "pd.DataFrame"] | None = None,
                        texts: Mapping[str, str] | None = None, step: int = 0,
                        tags: Mapping[str, str] | None = None) -> None:
    """Log the sweep's results on its run:

    - `trials` -> `trials.csv` (one row per trial) and `summary.png` (bars of mft/mfn/bwt/forgetting per trial,
      when those columns exist; rows marked `partial` are left out);
    - `metrics` -> run metrics (e.g. stages_trained, stages_reused, order_variance_share), non-finite skipped;
    - `figures` {name: Figure} -> `analysis/<name>.png`; `tables` {name: DataFrame} -> `analysis/<name>.csv`;
      `texts` {file name: text} -> `analysis/<file name>` (e.g. "summary.md");
    - `tags` -> run tags (e.g. the trials' `coin_ray.env.*`).
    tracking/report.py prints the `analysis/*.csv` tables of a sweep run. Text files (CSV, text) pass through
    `redact_text` (a URI in a table cell loses its credentials).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from tracking.plots import figure_png, summary_figure

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    if tags:
        from mlflow.entities import RunTag

        run_tags = [RunTag(k, str(v)) for k, v in tags.items()]
        call_with_retry(lambda: client.log_batch(run_id, tags=run_tags), "log sweep tags")
    if metrics:
        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in finite_metrics(metrics).items()]
        if batch:
            call_with_retry(lambda: client.log_batch(run_id, metrics=batch), "log sweep metrics")
    with tempfile.TemporaryDirectory(prefix="coin-ray-sweep-") as tmp:
        root = Path(tmp)
        files: list[tuple[Path, str | None]] = []

        def add(relative: str, data: bytes | str) -> None:
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(redact_text(data).encode() if isinstance(data, str) else data)
            files.append((path, str(Path(relative).parent) if "/" in relative else None))

        if trials is not None:
            add("trials.csv", trials.to_csv(index=False))
            label = "trial" if "trial" in trials.columns else ("order" if "order" in trials.columns else None)
            # final metrics only: a trial a scheduler stopped (`partial`) has none and is left out of the bars
            complete = trials[~trials["partial"].astype(bool)] if "partial" in trials.columns else trials
            try:
                add("summary.png", figure_png(summary_figure(complete, label=label or "trial")))
            except ValueError:  # no metric columns (every trial stopped early): the CSV says it all
                pass
        for name, fig in (figures or {}).items():
            add(f"analysis/{name}.png", figure_png(fig))
        for name, table in (tables or {}).items():
            add(f"analysis/{name}.csv", table.to_csv(index=True))
        for name, text in (texts or {}).items():
            add(f"analysis/{name}", text)
        for path, folder in files:
            call_with_retry(lambda: client.log_artifact(run_id, str(path), folder), f"log {path.name}")


def close_sweep_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """End the sweep run: FINISHED, or FAILED / KILLED when the sweep did not complete."""
    from mlflow import MlflowClient

    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    call_with_retry(lambda: client.set_terminated(run_id, status=status), "close sweep run")
    OPEN_SWEEP_RUNS.pop(run_id, None)
