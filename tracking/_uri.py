"""Tracking URIs: make them absolute, check that they answer before training, find or create experiments,
and build the link a user opens to see an experiment's runs.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from coin_ray.redact import redact_text
from coin_ray.errors import UserError

if TYPE_CHECKING:
    from mlflow import MlflowClient

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
UI_ADDRESS = "http://127.0.0.1:5000"

__all__ = [
    "DEFAULT_TRACKING_URI",
    "TrackingUnavailableError",
    "check_tracking_uri",
    "experiment_runs_url",
    "get_or_create_experiment",
    "resolve_tracking_uri",
]


class TrackingUnavailableError(UserError, RuntimeError):
    """The tracking store cannot be used (server down, database folder not writable); raised before training."""


def _base_dir() -> Path:
    # Ray Tune moves a trial into its own folder; the driver's folder is what a relative URI meant.
    return Path(os.environ.get("TUNE_ORIG_WORKING_DIR") or os.getcwd())


def _sqlite_path(uri: str) -> str | None:
    """The file path of a sqlite URI (`sqlite:///rel.db`, `sqlite:////abs.db`), None for other URIs."""
    match = re.match(r"^sqlite:///(.*)$", uri)
    if not match:
        return None
    return match.group(1).split("?", 1)[0]


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI with a relative sqlite path made absolute (against the driver's working directory).

    Resolve on the driver and hand the result to trials: Ray Tune runs each trial in its own folder, where
    `sqlite:///mlflow.db` would silently open a second, empty database. Other URIs are returned as given.
    """
    uri = uri or DEFAULT_TRACKING_URI
    path = _sqlite_path(uri)
    if path is None or path == ":memory:" or path.startswith("/"):
        return uri
    return f"sqlite:///{(_base_dir() / path).resolve()}" + (uri[uri.index("?"):] if "?" in uri else "")


def check_tracking_uri(uri: str | None = None, timeout_s: float = 5) -> str:
    """Fail fast, before any training, when the tracking store cannot be used; return the resolved URI.

    - http(s): GET <uri>/health must answer 200 within `timeout_s`.
    - sqlite: the database folder must exist (it is created) and be writable; the schema is created once
      here, so trials starting together do not race to migrate a fresh database.
    Raises TrackingUnavailableError with the way out; the URI in its message is masked (coin_ray.redact).
    """
    resolved = resolve_tracking_uri(uri)
    shown = redact_text(resolved)
    if resolved.startswith(("http://", "https://")):
        import requests

        health = resolved.rstrip("/") + "/health"
        try:
            response = requests.get(health, timeout=timeout_s)
            ok, detail = response.status_code == 200, f"HTTP {response.status_code}"
        except requests.RequestException as error:
            ok, detail = False, type(error).__name__
        if not ok:
            raise TrackingUnavailableError(
                f"MLflow tracking server at {shown} did not answer ({detail} from {redact_text(health)} within {timeout_s:g} s): "
                f"start it with `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000` "
                f"or pass --tracking-uri sqlite:///mlflow.db to log to a local file")
        return resolved
    path = _sqlite_path(resolved)
    if path is not None and path != ":memory:":
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingUnavailableError(
                f"cannot create the folder {folder} of the MLflow database {shown} ({error}): "
                f"pass --tracking-uri sqlite:///<writable folder>/mlflow.db") from error
        if not os.access(folder, os.W_OK):
            raise TrackingUnavailableError(
                f"the folder {folder} of the MLflow database {shown} is not writable: "
                f"pass --tracking-uri sqlite:///<writable folder>/mlflow.db")
        from mlflow import MlflowClient

        try:
            MlflowClient(resolved).search_experiments(max_results=1)  # creates / migrates the schema once
        except Exception as error:  # a corrupt or foreign file: say which
            raise TrackingUnavailableError(
                f"cannot open the MLflow database {shown}: {redact_text(str(error))}; move the file away or pass another "
                f"--tracking-uri") from error
    return resolved


def sqlite_artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a sqlite-backed experiment live beside the database (not in whatever folder the process
    happened to start in): <db folder>/mlartifacts/<experiment>. None for other stores (the server decides)."""
    path = _sqlite_path(uri)
    if path is None or path == ":memory:":
        return None
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return (Path(path).parent / "mlartifacts" / safe).resolve().as_uri()


def get_or_create_experiment(client: "MlflowClient", uri: str, experiment: str) -> str:
    """The experiment's id, creating it (safe when several processes create it at once). A deleted
    experiment of that name is restored rather than shadowed."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(experiment)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(experiment, artifact_location=sqlite_artifact_location(uri, experiment))
    except MlflowException:  # created by another process in between
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise
        return found.experiment_id


def sweep_compare_url(tracking_uri: str | None, experiment: str, sweep_run_id: str) -> str | None:
    """Link to MLflow's compare page for the trial runs of one sweep (children of `sweep_run_id`): their params
    and metrics side by side, with parallel coordinates and box plots. None when the sweep has no trial run."""
    import json
    from urllib.parse import quote

    from mlflow import MlflowClient

    uri = tracking_uri or DEFAULT_TRACKING_URI
    client = MlflowClient(resolve_tracking_uri(uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{sweep_run_id}'",
                              max_results=1000)
    if not runs:
        return None
    base = redact_text(uri).rstrip("/") if uri.startswith(("http://", "https://")) else UI_ADDRESS
    ids = json.dumps(sorted(r.info.run_id for r in runs), separators=(",", ":"))
    experiments = json.dumps([found.experiment_id], separators=(",", ":"))
    return f"{base}/#/compare-runs?runs={quote(ids)}&experiments={quote(experiments)}"


def experiment_runs_url(tracking_uri: str | None, experiment: str) -> tuple[str | None, str]:
    """(command that starts the UI, link to the experiment's runs view).

    MLflow 3's UI otherwise opens on its GenAI overview, where nothing of this platform shows. For a
    tracking server the command is None (it is already running) and the link points at the server.
    Both are for printing, so credentials in the URI are masked (coin_ray.redact). Raises ValueError when the
    experiment does not exist.
    """
    from mlflow import MlflowClient

    uri = tracking_uri or DEFAULT_TRACKING_URI
    found = MlflowClient(resolve_tracking_uri(uri)).get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(f"experiment {experiment!r} does not exist in {redact_text(uri)}: run a sweep first or check "
                         f"--experiment / --tracking-uri")
    shown = redact_text(uri)
    if uri.startswith(("http://", "https://")):
        return None, f"{shown.rstrip('/')}/#/experiments/{found.experiment_id}/runs"
    return f"mlflow ui --backend-store-uri {shown}", f"{UI_ADDRESS}/#/experiments/{found.experiment_id}/runs"
