"""Where a sweep's wall time goes: named spans of work, from the driver and from every Ray process.

With the environment variable COIN_RAY_PROFILE naming a file, `span(phase, ...)` appends one JSON line
{"phase", "start", "end", "pid", ...labels} per span to it; without it, a span costs one dict lookup. Ray
workers inherit the variable from the driver that started the local cluster, and the file is appended to
with single small writes (O_APPEND), so every process can write to it at once.

`wall_shares` turns the spans into a split of the wall time: at each instant the phases running share it
equally (two trials training at once: half each), an instant inside a trial with no finer span running is
that trial's start-up and Ray overhead, and an instant with nothing running is idle.
`benchmarks/sweep_profile.py` runs a sweep with it and prints the table.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any, Iterator

ENV = "COIN_RAY_PROFILE"
# the phases a profile reports, in the order of a sweep
PHASES = ("driver start", "data generation", "preprocessing", "base pretraining", "data loading",
          "trial start-up", "training", "evaluation", "reporting", "tracking", "idle")
TRIAL = "trial"  # a container span: a trial's time not covered by a finer span counts as "trial start-up"
_labels: dict[str, Any] = {}  # added to every span of this process (`label`)


def label(**labels: Any) -> None:
    """Labels for this process's next spans (a Ray worker runs one trial at a time: `label(trial=name)`)."""
    _labels.update(labels)


@contextlib.contextmanager
def span(phase: str, **labels: Any) -> Iterator[None]:
    """Record the block as `phase` (one of PHASES, or TRIAL) when profiling is on."""
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    start = time.time()
    try:
        yield
    finally:
        record_span(phase, start, time.time(), **labels)


def record_span(phase: str, start: float, end: float, **labels: Any) -> None:
    """Record a span measured elsewhere (e.g. from a process's creation time) when profiling is on."""
    path = os.environ.get(ENV)
    if path and start <= end:
        record(path, {"phase": phase, "start": start, "end": end, "pid": os.getpid(), **_labels, **labels})


def process_started() -> float:
    """When this process was created (epoch seconds)."""
    import psutil

    return psutil.Process().create_time()


def record(path: str, entry: dict[str, Any]) -> None:
    line = (json.dumps(entry, default=str) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_spans(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wall_shares(spans: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Seconds of the wall time [start, end] per phase (they sum to end - start). Before the first span the
    time is "driver start"; a phase nested in another of the same process (evaluation inside training)
    takes the time from its parent."""
    leaves = [s for s in spans if s["phase"] != TRIAL]
    trials = [s for s in spans if s["phase"] == TRIAL]
    cuts = sorted({start, end, *(t for s in spans for t in (s["start"], s["end"]) if start <= t <= end)})
    shares = dict.fromkeys(PHASES, 0.0)
    first = min((s["start"] for s in spans), default=end)
    for a, b in zip(cuts, cuts[1:]):
        mid, dt = (a + b) / 2, b - a
        active = [s for s in leaves if s["start"] <= mid < s["end"]]
        active = [s for s in active if not any(_inside(o, s) for o in active if o is not s)]  # innermost only
        running_trials = [t for t in trials if t["start"] <= mid < t["end"]]
        # a trial whose own work is running is counted through that work
        idle_trials = [t for t in running_trials if not any(s.get("trial") == t.get("trial") for s in active)]
        parts = [s["phase"] for s in active] + ["trial start-up"] * len(idle_trials)
        if not parts:
            parts = ["driver start" if mid < first else "idle"]
        for phase in parts:
            shares[phase] = shares.get(phase, 0.0) + dt / len(parts)
    return shares


def _inside(inner: dict[str, Any], outer: dict[str, Any]) -> bool:
    """`outer` is a different span of the same process enclosing `inner`."""
    return (outer["pid"] == inner["pid"] and outer["start"] <= inner["start"] and inner["end"] <= outer["end"]
            and (outer["start"], outer["end"]) != (inner["start"], inner["end"]))


def busy_seconds(spans: list[dict[str, Any]]) -> dict[str, float]:
    """Summed span seconds per phase (process-seconds: two trials training for 10 s at once are 20 s)."""
    out: dict[str, float] = {}
    for s in spans:
        out[s["phase"]] = out.get(s["phase"], 0.0) + s["end"] - s["start"]
    return out
