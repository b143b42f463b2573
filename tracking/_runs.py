"""Run-level MLflow plumbing shared by the trial tracker and the sweep run: retries, finding or reopening a run
by its deterministic name, idempotent params, batched writes. Params and tags are masked by
coin_ray.redact on their way out (the same rules as every other exit of the process).

Everything takes an `MlflowClient` and explicit run ids: no global active-run state, so threads and processes
can log to different runs at once.
"""
from __future__ import annotations

import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, TypeVar

from coin_ray.redact import redact, redact_params

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Run

log = logging.getLogger("tracking")
T = TypeVar("T")

ROLE_TAG = "coin_ray.role"  # "sweep" on a sweep (parent) run, "trial" on a trial (child) run
PARENT_TAG = "mlflow.parentRunId"
CONFLICT_TAG_PREFIX = "coin_ray.param_conflict."

# MLflow error codes that retrying cannot fix (a bad value, a missing run): everything else - connection
# errors, timeouts, 5xx, sqlite "database is locked" (TEMPORARILY_UNAVAILABLE) - is treated as transient.
PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS", "INVALID_STATE",
    "BAD_REQUEST", "MALFORMED_REQUEST", "INVALID_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "CUSTOMER_UNAUTHORIZED", "FEATURE_DISABLED", "ENDPOINT_NOT_FOUND",
})

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_PARAM_VALUE_LENGTH = 6000

def is_transient(error: BaseException) -> bool:
    """True when the same call may succeed later (server down, timeout, locked database)."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code not in PERMANENT_ERROR_CODES
    return isinstance(error, (OSError, TimeoutError, ConnectionError)) or type(error).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy"))


def call_with_retry(fn: Callable[[], T], what: str, attempts: int = 6, base_delay_s: float = 0.5,
                    max_delay_s: float = 10.0) -> T:
    """Call `fn`, retrying transient failures with exponential backoff (0.5, 1, 2, 4, 8 s by default).
    Permanent failures and the last transient one propagate."""
    delay = base_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as error:
            if attempt == attempts or not is_transient(error):
                raise
            log.warning("MLflow %s failed (%s: %s); retry %d/%d in %.1f s", what, type(error).__name__,
                        str(error)[:200], attempt, attempts - 1, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay_s)
    raise AssertionError("unreachable")


def param_value(value: Any) -> str:
    """How a config value is stored as an MLflow param (strings as is, the rest as JSON), cut to MLflow's limit."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:MAX_PARAM_VALUE_LENGTH]


def finite_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """Numeric, finite values only (MLflow would store NaN, but "no value" reads better than NaN in the UI)."""
    out = {}
    for key, value in values.items():
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


def chunked(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_metrics_batched(client: "MlflowClient", run_id: str, metrics: list["Metric"]) -> None:
    """One log_batch request per 1000 metrics (MLflow's batch limit)."""
    for chunk in chunked(metrics, MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def log_params_idempotent(client: "MlflowClient", run: "Run", params: Mapping[str, Any]) -> dict[str, str]:
    """Log params that the run does not hold yet; skip equal ones (a resumed run logs them again).

    MLflow params are immutable: a param that the run already holds with another value is kept, and the
    new value goes to a tag `coin_ray.param_conflict.<key>` with a warning, so the clash is visible without
    failing the run. Credentials in values are masked first (coin_ray.redact). Returns the conflicts
    {key: new value}."""
    from mlflow.entities import Param, RunTag

    existing = dict(run.data.params)
    new, conflicts = [], {}
    for key, value in redact_params(params).items():
        text = param_value(value)
        if key not in existing:
            new.append(Param(key, text))
        elif existing[key] != text:
            conflicts[key] = text
    run_id = run.info.run_id
    for chunk in chunked(new, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=chunk)
    if conflicts:
        log.warning("run %s already holds params %s with other values; the new values are kept as tags %s*",
                    run_id, sorted(conflicts), CONFLICT_TAG_PREFIX)
        tags = [RunTag(CONFLICT_TAG_PREFIX + k, v[:5000]) for k, v in conflicts.items()]
        for chunk in chunked(tags, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=chunk)
    return conflicts


def _name_filter(name: str) -> str:
    quote = "'" if "'" not in name else '"'
    return f"attributes.run_name = {quote}{name}{quote}" if quote not in name else ""


def find_runs(client: "MlflowClient", experiment_id: str, name: str, parent_run_id: str | None,
              role: str) -> list["Run"]:
    """Active runs named `name` with this role under `parent_run_id` (None: runs without a parent),
    oldest first."""
    clauses = [f"tags.`{ROLE_TAG}` = '{role}'"]
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    name_clause = _name_filter(name)
    if name_clause:
        clauses.append(name_clause)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], " and ".join(clauses), max_results=1000, page_token=token)
        runs += [r for r in page if r.info.run_name == name
                 and (parent_run_id is not None or PARENT_TAG not in r.data.tags)]
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def open_named_run(client: "MlflowClient", experiment_id: str, name: str, *, parent_run_id: str | None,
                   role: str, tags: Mapping[str, str] | None = None) -> tuple["Run", bool]:
    """Find the run by (experiment, parent, role, name) or create it; a FINISHED / FAILED / KILLED run is set
    back to RUNNING. Tag values are masked (coin_ray.redact). Returns (run, reopened).

    Two processes that open the same name at the same moment may both create one; each then re-reads the
    runs of that name and keeps the oldest (ties by id), deleting its own if it lost, so both end on one run.
    """
    tags = {k: str(v) for k, v in redact(dict(tags or {})).items()}
    runs = find_runs(client, experiment_id, name, parent_run_id, role)
    reopened = bool(runs)
    if runs:
        run = runs[0]
    else:
        all_tags = {ROLE_TAG: role, **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        created = client.create_run(experiment_id, tags=all_tags, run_name=name)
        runs = find_runs(client, experiment_id, name, parent_run_id, role)
        run = runs[0] if runs else created
        if run.info.run_id != created.info.run_id:
            client.delete_run(created.info.run_id)
            reopened = True
    if run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    if tags:
        from mlflow.entities import RunTag

        client.log_batch(run.info.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])
    return client.get_run(run.info.run_id), reopened
