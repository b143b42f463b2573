"""Run-level MLflow plumbing shared by the trial tracker and the sweep run: retries, finding or reopening a run
by its deterministic key (tag `coin_ray.run_key`), idempotent params, batched writes, and the secret filter
for params. Params and tags are masked by
coin_ray.redact on their way out.

Everything takes an `MlflowClient` and explicit run ids: no global active-run state, so threads and processes
can log to different runs at once.
"""
from __future__ import annotations

import json
import logging
import math
import re
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
RUN_KEY_TAG = "coin_ray.run_key"  # what a run is found by: a hash of its name and of everything its params hold

RETRY_BUDGET_S = 60.0  # the longest a run start (or a mark-failed) retries a tracking server that is down

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
                    max_delay_s: float = 10.0, deadline: float | None = None) -> T:
    """Call `fn`, retrying transient failures with exponential backoff (0.5, 1, 2, 4, 8 s by default), and
    not past `deadline` (a `time.monotonic()` value; several calls can share one). Permanent failures and the
    last transient one propagate."""
    delay = base_delay_s
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as error:
            late = deadline is not None and time.monotonic() + delay > deadline
            if attempt == attempts or late or not is_transient(error):
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


def log_params_idempotent(client: "MlflowClient", run: "Run", params: Mapping[str, Any]) -> list[str]:
    """Log params that the run does not hold yet; skip equal ones (a resumed run logs them again).

    A run is found by a key that hashes every param it holds (`RUN_KEY_TAG`), so the run found never holds a
    param with another value: that would be a bug in the key, and raises ValueError rather than mixing two
    configurations in one run. Returns the keys logged."""
    from mlflow.entities import Param

    existing = dict(run.data.params)
    new, clashes = [], []
    for key, value in redact_params(params).items():
        text = param_value(value)
        if key not in existing:
            new.append(Param(key, text))
        elif existing[key] != text:
            clashes.append(key)
    if clashes:
        raise ValueError(f"MLflow run {run.info.run_id} (key {run.data.tags.get(RUN_KEY_TAG)}) holds params "
                         f"{sorted(clashes)} with other values: its run key must cover every param")
    for chunk in chunked(new, MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run.info.run_id, params=chunk)
    return [p.key for p in new]


def find_runs(client: "MlflowClient", experiment_id: str, run_key: str, parent_run_id: str | None,
              role: str) -> list["Run"]:
    """Active runs tagged with `run_key` and this role under `parent_run_id` (None: runs without a parent),
    oldest first."""
    clauses = [f"tags.`{ROLE_TAG}` = '{role}'", f"tags.`{RUN_KEY_TAG}` = '{_checked_id(run_key)}'"]
    if parent_run_id:
        clauses.append(f"tags.`{PARENT_TAG}` = '{_checked_id(parent_run_id)}'")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], " and ".join(clauses), max_results=1000, page_token=token)
        runs += [r for r in page if r.data.tags.get(RUN_KEY_TAG) == run_key
                 and (parent_run_id is not None or PARENT_TAG not in r.data.tags)]
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _checked_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise ValueError(f"run keys and ids are hex digits, got {text!r}")
    return text


def open_keyed_run(client: "MlflowClient", experiment_id: str, name: str, run_key: str, *,
                   parent_run_id: str | None, role: str, tags: Mapping[str, str] | None = None) -> tuple["Run", bool]:
    """Find the run by (experiment, parent, role, run key) or create it (named `name`); a FINISHED / FAILED /
    KILLED run is set back to RUNNING. Returns (run, reopened).

    Two processes that open the same key at the same moment may both create one; each then re-reads the
    runs of that key and keeps the oldest (ties by id), deleting its own if it lost, so both end on one run.
    """
    tags = {k: str(v) for k, v in redact(dict(tags or {})).items()}
    runs = find_runs(client, experiment_id, run_key, parent_run_id, role)
    reopened = bool(runs)
    if runs:
        run = runs[0]
    else:
        all_tags = {ROLE_TAG: role, RUN_KEY_TAG: run_key, **tags}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        created = client.create_run(experiment_id, tags=all_tags, run_name=name)
        runs = find_runs(client, experiment_id, run_key, parent_run_id, role)
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
