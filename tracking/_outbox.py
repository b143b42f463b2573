"""Asynchronous, ordered, retrying delivery of one run's MLflow writes, so a slow or dropped tracking server
never stalls training and never silently loses a metric.

Delivery policy (documented in the README as well):
- Every write (metric batch, tag batch, artifact, status) is queued in order and sent by one background thread;
  consecutive metric/tag writes are merged into log_batch requests of up to 1000 metrics / 100 tags.
- A transient failure (connection refused, timeout, 5xx, sqlite "database is locked") is retried with
  exponential backoff, 0.5 s doubling up to 30 s, for as long as the run lasts; later writes wait behind it,
  so order is kept. Delivery is at-least-once: a request that timed out after the server stored it is sent
  again (a metric point may then appear twice in its history, same step and value).
- A permanent failure (MLflow rejects the value) is logged as an error and counted in `rejected`; the
  remaining writes go on.
- At the end of the run `close(timeout_s)` waits for the queue to drain (the tracker waits 60 s by default).
  Whatever is still undelivered is written to a spool folder (JSON lines + artifact files; a sweep keeps it
  under its storage path) with a warning naming it; `replay_spool` sends it later: nothing is dropped without
  a trace. Replay records its progress after every write, so a replay that is interrupted and run again
  sends each write once; a line cut short (a crash while spooling) is skipped with a warning.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracking._runs import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH, call_with_retry, is_transient

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("tracking")


@dataclass
class Write:
    """One queued write. kind: "batch" (metrics [(key, value, timestamp_ms, step)], tags {k: v}),
    "artifact" (path = artifact path of a file, data = bytes), "artifact_dir" (local folder -> path),
    "status" (status = FINISHED / FAILED / RUNNING)."""

    kind: str
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    path: str = ""
    data: bytes = b""
    local_dir: str = ""
    status: str = ""


def send(client: "MlflowClient", run_id: str, write: Write) -> None:
    """Perform one write now (raises on failure)."""
    from mlflow.entities import Metric, RunTag

    if write.kind == "batch":
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in write.metrics]
        tags = [RunTag(k, v) for k, v in write.tags.items()]
        client.log_batch(run_id, metrics=metrics, tags=tags)
    elif write.kind == "artifact":
        folder, _, name = write.path.rpartition("/")
        with tempfile.TemporaryDirectory(prefix="coin-ray-artifact-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(write.data)
            client.log_artifact(run_id, str(local), folder or None)
    elif write.kind == "artifact_dir":
        client.log_artifacts(run_id, write.local_dir, write.path or None)
    elif write.kind == "status":
        if write.status == "RUNNING":
            client.update_run(run_id, status="RUNNING")
        else:
            client.set_terminated(run_id, status=write.status)
    else:  # pragma: no cover - internal misuse
        raise ValueError(f"unknown write kind {write.kind!r}")


def _merge(first: Write, queue: deque) -> tuple[Write, int]:
    """Merge the batch writes at the head of the queue into one request within MLflow's limits."""
    metrics, tags, taken = list(first.metrics), dict(first.tags), 1
    for nxt in list(queue)[1:]:
        if (nxt.kind != "batch" or len(metrics) + len(nxt.metrics) > MAX_METRICS_PER_BATCH
                or len(tags) + len(nxt.tags) > MAX_PARAMS_TAGS_PER_BATCH or set(tags) & set(nxt.tags)):
            break
        metrics += nxt.metrics
        tags.update(nxt.tags)
        taken += 1
    return Write("batch", metrics=metrics, tags=tags), taken


class Outbox:
    """The ordered queue of one run's writes and the thread that delivers them (see the module docstring)."""

    def __init__(self, client: "MlflowClient", run_id: str, spool_dir: str | Path,
                 base_delay_s: float = 0.5, max_delay_s: float = 30.0) -> None:
        self.client, self.run_id = client, run_id
        self.spool_dir = Path(spool_dir)
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self.queue: deque[Write] = deque()
        self.rejected = 0  # permanent failures
        self.retries = 0  # transient failures retried
        self.delivered = 0
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name=f"mlflow-outbox-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, write: Write) -> None:
        with self._cond:
            if self._closing:
                raise RuntimeError(f"the outbox of run {self.run_id} is closed: no writes after on_run_end")
            self.queue.append(write)
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self.queue) + (1 if self._busy else 0)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is delivered (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, timeout_s: float) -> Path | None:
        """Drain for up to `timeout_s`, stop the thread, spool what is left. Returns the spool folder or None."""
        self.flush(timeout_s)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=5)  # a request still in flight (server hanging) is spooled as well
        with self._cond:
            left = list(self.queue)
            self.queue.clear()
        if not left:
            return None
        folder = spool_writes(self.spool_dir, self.run_id, left)
        log.warning("MLflow: %d write(s) for run %s were not delivered (server unreachable); kept in %s - send "
                    "them with `python -m tracking.replay %s --tracking-uri <uri>`", len(left), self.run_id,
                    folder, self.spool_dir)
        return folder

    def _loop(self) -> None:
        delay = self.base_delay_s
        while True:
            with self._cond:
                while not self.queue and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                head = self.queue[0]
                write, taken = _merge(head, self.queue) if head.kind == "batch" else (head, 1)
                self._busy = True
            try:
                send(self.client, self.run_id, write)
                ok, transient = True, False
            except Exception as error:  # noqa: BLE001 - classified below
                ok, transient = False, is_transient(error)
                if transient:
                    self.retries += 1
                    log.warning("MLflow write to run %s failed (%s: %s); retrying in %.1f s", self.run_id,
                                type(error).__name__, str(error)[:200], delay)
                else:
                    self.rejected += 1
                    log.error("MLflow rejected a %s write to run %s: %s", write.kind, self.run_id, error)
            with self._cond:
                self._busy = False
                if ok or not transient:
                    for _ in range(min(taken, len(self.queue))):  # close() may have spooled them meanwhile
                        self.queue.popleft()
                    self.delivered += taken if ok else 0
                    delay = self.base_delay_s
                    self._cond.notify_all()
                    continue
                self._cond.notify_all()
                self._cond.wait(delay)  # woken early only by close()
                delay = min(delay * 2, self.max_delay_s)


def spool_writes(spool_dir: Path, run_id: str, writes: list[Write]) -> Path:
    """Append undelivered writes to <spool_dir>/<run_id>/writes.jsonl (artifact bytes as files beside it)."""
    folder = Path(spool_dir) / run_id
    (folder / "files").mkdir(parents=True, exist_ok=True)
    journal = folder / "writes.jsonl"
    torn = journal.is_file() and journal.stat().st_size > 0 and not journal.read_bytes().endswith(b"\n")
    with open(journal, "a") as out:
        if torn:  # an earlier spooling died mid-line: keep that line apart from the new ones
            out.write("\n")
        for n, write in enumerate(writes):
            record: dict[str, Any] = {"kind": write.kind, "metrics": write.metrics, "tags": write.tags,
                                      "path": write.path, "local_dir": write.local_dir, "status": write.status}
            if write.kind == "artifact":
                blob = folder / "files" / f"{time.time_ns()}-{n}"
                blob.write_bytes(write.data)
                record["data_file"] = str(blob)
            out.write(json.dumps(record) + "\n")
    return folder


def replay_spool(spool_dir: str | Path, tracking_uri: str) -> int:
    """Send every spooled write to its run, in order; a run's spool folder is removed once all of its writes
    went through; transient failures are retried with backoff. Returns the number of writes sent. Raises the
    first error that retrying did not fix (that write and the rest stay spooled).

    Each run folder's `replayed` file counts the lines already handled (written atomically after each one), so
    a second replay after an interruption starts where the first stopped: every write arrives once. A line
    that is not valid JSON (cut short when spooling crashed) is skipped with a warning."""
    from mlflow import MlflowClient

    from coin_ray._files import read_json, write_json_atomic

    if not Path(spool_dir).is_dir():
        return 0
    client = MlflowClient(tracking_uri)
    sent = 0
    for folder in sorted(p for p in Path(spool_dir).iterdir() if (p / "writes.jsonl").is_file()):
        lines = (folder / "writes.jsonl").read_text().splitlines()
        done = read_json(folder / "replayed")
        done = done if isinstance(done, int) and 0 <= done <= len(lines) else 0
        for n in range(done, len(lines)):
            try:
                record = json.loads(lines[n])
                write = Write(record["kind"], metrics=[tuple(m) for m in record["metrics"]], tags=record["tags"],
                              path=record["path"], local_dir=record["local_dir"], status=record["status"],
                              data=Path(record["data_file"]).read_bytes() if "data_file" in record else b"")
            except (ValueError, KeyError, TypeError, OSError) as error:
                log.warning("MLflow spool %s: line %d of %d is torn or not a spooled write (%s); skipped",
                            folder / "writes.jsonl", n + 1, len(lines), error)
            else:
                call_with_retry(lambda: send(client, folder.name, write), f"replay {write.kind} write")
                sent += 1
            write_json_atomic(folder / "replayed", n + 1)
        shutil.rmtree(folder)
    return sent
