"""Compare a sweep's trials from MLflow: a table sorted by a metric, matrix heatmaps and a summary plot.

    python tracking/report.py --experiment coin-ray-task-order [--tracking-uri sqlite:///mlflow.db]
                              [--sweep NAME] [--sort-by mfn] [--out report/]

Prints one row per trial (order, method, E, r, MFT, MFN, BWT, forgetting, gk_* when a judge ran), the sweep's
order-sensitivity tables (`analysis/*.csv` on the sweep run), and writes to --out: trials.csv, summary.png and
per trial <trial>.png (instruction and knowledge matrices side by side, and their gap).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coin_ray.evaluation.metrics import METRIC_NAMES

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run

METRIC_COLUMNS = (*METRIC_NAMES, "stages_reused")


class ReportError(ValueError):
    """Nothing to report (no such experiment or sweep); the message says what exists."""


def _sweep_runs(client: "MlflowClient", experiment_id: str) -> list["Run"]:
    from tracking._runs import ROLE_TAG

    runs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", max_results=1000,
                              order_by=["attributes.start_time DESC"])
    return list(runs)


def find_sweep(client: "MlflowClient", experiment_id: str, sweep: str | None) -> "Run | None":
    """The sweep run named `sweep`, or the most recently started one; None when the experiment has none.
    `sweep` may leave out the config-hash suffix the runner appends ("<name>-<6 hex digits>"): the most
    recent sweep of that name is taken."""
    runs = _sweep_runs(client, experiment_id)
    if sweep is None:
        return runs[0] if runs else None
    for run in runs:
        if run.info.run_name == sweep:
            return run
    for run in runs:  # newest first
        if re.fullmatch(re.escape(sweep) + r"-[0-9a-f]{6}", run.info.run_name or ""):
            return run
    names = sorted({r.info.run_name for r in runs})
    raise ReportError(f"no sweep named {sweep!r}; sweeps in this experiment: {', '.join(names) or 'none'}")


def trial_runs(client: "MlflowClient", experiment_id: str, sweep_run_id: str | None) -> list["Run"]:
    """The trial runs of a sweep (children of its run), or every trial run of the experiment."""
    from tracking._runs import PARENT_TAG, ROLE_TAG

    query = f"tags.`{ROLE_TAG}` = 'trial'"
    if sweep_run_id:
        query += f" and tags.`{PARENT_TAG}` = '{sweep_run_id}'"
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def trials_frame(runs: list["Run"]) -> "pd.DataFrame":
    """One row per trial run: contract params and final metrics (see tracking._tracker)."""
    import pandas as pd

    rows = []
    for run in runs:
        p, m = run.data.params, run.data.metrics
        row: dict[str, Any] = {"trial": run.info.run_name, "order": p.get("task_order", ""),
                               "seed": _number(p.get("seed")), "method": p.get("method", ""),
                               "num_experts": _number(p.get("num_experts")), "rank": _number(p.get("rank")),
                               "status": run.info.status, "run_id": run.info.run_id}
        row.update({k: m[k] for k in METRIC_COLUMNS if k in m})
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.dropna(axis=1, how="all") if not frame.empty else frame


def _number(text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def load_matrix(client: "MlflowClient", run_id: str, name: str, into: Path) -> dict[str, Any] | None:
    """A run's eval_matrix.json / knowledge_matrix.json, validated; None when the run has none."""
    from tracking.matrices import check_matrix_payload

    try:
        local = client.download_artifacts(run_id, name, str(into))
    except Exception:  # noqa: BLE001 - a run that stopped before its first stage has no matrix
        return None
    return check_matrix_payload(json.loads(Path(local).read_text()))


def analysis_tables(client: "MlflowClient", run_id: str, into: Path) -> dict[str, "pd.DataFrame"]:
    """The sweep run's `analysis/*.csv` tables (order-sensitivity summary), by name."""
    import pandas as pd

    try:
        names = [f.path for f in client.list_artifacts(run_id, "analysis") if f.path.endswith(".csv")]
    except Exception:  # noqa: BLE001
        return {}
    tables = {}
    for name in sorted(names):
        local = client.download_artifacts(run_id, name, str(into))
        tables[Path(name).stem] = pd.read_csv(local)
    return tables


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_")[:120] or "trial"


def build_report(tracking_uri: str, experiment: str, sweep: str | None = None, sort_by: str = "mfn",
                 out: str | Path | None = None) -> str:
    """The report as text; with `out`, also trials.csv, summary.png and one <trial>.png per trial there."""
    from tracking._uri import check_tracking_uri, experiment_runs_url, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):  # a server that is down: one clear line in seconds, not minutes
        check_tracking_uri(uri, timeout_s=5)  # (before the heavy imports below)
    from mlflow import MlflowClient

    from tracking.plots import figure_png, format_table, matrices_figure, summary_figure

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ReportError(f"experiment {experiment!r} does not exist in {tracking_uri}; experiments there: "
                          f"{', '.join(names) or 'none'}")
    sweep_run = find_sweep(client, found.experiment_id, sweep)
    runs = trial_runs(client, found.experiment_id, sweep_run.info.run_id if sweep_run else None)
    if not runs:
        raise ReportError(f"experiment {experiment!r} has no trial runs"
                          + (f" under sweep {sweep_run.info.run_name!r}" if sweep_run else ""))
    table = trials_frame(runs)
    if sort_by not in table.columns:
        raise ReportError(f"cannot sort by {sort_by!r}: the trials have {', '.join(map(str, table.columns))}")
    lines = [f"experiment {experiment}" + (f", sweep {sweep_run.info.run_name}" if sweep_run else "")
             + f": {len(runs)} trial(s), sorted by {sort_by} (scores in %)", "",
             format_table(table.drop(columns=["run_id"]), sort_by=sort_by)]
    with tempfile.TemporaryDirectory(prefix="coin-ray-report-") as tmp:
        if sweep_run is not None:
            for name, frame in analysis_tables(client, sweep_run.info.run_id, Path(tmp)).items():
                lines += ["", f"[{name}]", frame.to_string(index=False)]
        if out is not None:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            table.to_csv(folder / "trials.csv", index=False)
            try:
                (folder / "summary.png").write_bytes(figure_png(summary_figure(
                    table.sort_values(sort_by, na_position="last"), label="trial")))
            except ValueError:
                pass
            written = 0
            for run in runs:
                into = Path(tmp) / run.info.run_id
                instruction = load_matrix(client, run.info.run_id, "eval_matrix.json", into)
                if instruction is None:
                    continue
                knowledge = load_matrix(client, run.info.run_id, "knowledge_matrix.json", into)
                fig = matrices_figure(instruction["tasks"], instruction["matrix"],
                                      knowledge["matrix"] if knowledge else None, title=run.info.run_name)
                (folder / f"{_safe(run.info.run_name)}.png").write_bytes(figure_png(fig))
                written += 1
            lines += ["", f"wrote trials.csv, summary.png and {written} matrix figure(s) to {folder}"]
    command, url = experiment_runs_url(tracking_uri, experiment)
    lines += ["", f"look at the runs: {command + '  then open  ' if command else ''}{url}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from coin_ray.redact import redact_text
    from tracking._uri import DEFAULT_TRACKING_URI

    parser = argparse.ArgumentParser(description="Compare a sweep's trials logged to MLflow.")
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=DEFAULT_TRACKING_URI, help="default: %(default)s")
    parser.add_argument("--sweep", help="sweep (parent run) name; default: the most recent sweep")
    parser.add_argument("--sort-by", default="mfn", help="metric to sort by, best first (default: %(default)s)")
    parser.add_argument("--out", help="folder for trials.csv, summary.png and per-trial matrix heatmaps")
    args = parser.parse_args(argv)
    from tracking._uri import TrackingUnavailableError

    try:
        print(redact_text(build_report(args.tracking_uri, args.experiment, args.sweep, args.sort_by, args.out)))
    except (ReportError, TrackingUnavailableError) as error:
        print(f"error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
