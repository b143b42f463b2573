"""What the first minutes say: each first-time phase prints a start and an end line with counts and seconds;
Ray's lines that do not apply to how the platform sizes its resources are off at their source unless
--verbose. No Ray is started here (the sweep-level check is in tests/test_sweeps.py)."""
from __future__ import annotations

import logging
import re

import pytest

from coin_ray.phases import phase


def test_a_phase_says_when_it_starts_and_ends_with_counts_and_seconds():
    lines: list[str] = []
    with phase("benchmark generation", detail="8 tasks, 2560 records", total=3, unit="record",
               emit=lines.append) as p:
        for _ in range(3):
            p.update()
        p.done(f"{p.count} records")
    assert lines[0] == "benchmark generation: started (8 tasks, 2560 records)"
    assert re.fullmatch(r"benchmark generation: done in \d+\.\d s \(3 records\)", lines[1])
    lines.clear()
    with pytest.raises(ValueError), phase("base pretraining", emit=lines.append):
        raise ValueError("diverged")
    assert re.fullmatch(r"base pretraining: failed after \d+\.\d s \(ValueError\)", lines[1])


@pytest.fixture
def progress_lines():
    """The messages of the platform's progress logger (it does not propagate: its own stderr handler)."""
    from coin_ray.training.worker import progress

    progress("test: progress logger ready")  # creates the logger with its handler
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("coin_ray.progress")
    logger.addHandler(handler)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)


def test_synthetic_generation_is_a_phase(tmp_path, progress_lines):
    from coin_ray.training.continual import ensure_synthetic_benchmark

    ensure_synthetic_benchmark(tmp_path, train_rows=2, test_rows=1, image_size=24, seed=0)
    said = progress_lines()
    assert "benchmark generation: started (8 synthetic tasks, " in said
    assert re.search(r"benchmark generation: done in \d+\.\d s \(\d+ records\)", said)
    ensure_synthetic_benchmark(tmp_path, train_rows=2, test_rows=1, image_size=24, seed=0)
    assert progress_lines().count("benchmark generation: started") == 1  # the second time it is found, not generated


def test_a_stage_wait_is_announced_and_its_end_reported(tmp_path, progress_lines):
    import threading
    import time

    from coin_ray.training.store import StageStore

    store = StageStore(tmp_path)
    claim = store.claim("k" * 24)  # another trial holds the stage
    threading.Timer(0.6, claim.release).start()
    time.sleep(0.05)
    second = store.claim("k" * 24, poll_s=0.1)
    second.release()
    err = progress_lines()
    assert "waiting for stage kkkkkkkkkkkk: started (another trial is training it" in err
    assert re.search(r"waiting for stage kkkkkkkkkkkk: done in \d+\.\d s \(the other process stopped: taken over here", err)


def test_ray_lines_that_do_not_apply_are_off_at_their_source_unless_verbose(monkeypatch):
    from coin_ray.studies.quiet import quiet_ray_sources
    from coin_ray.training.worker import quiet_data_context, quiet_not_applicable

    for name in ("RAY_AIR_NEW_OUTPUT", "RAY_worker_maximum_startup_concurrency"):
        monkeypatch.delenv(name, raising=False)
    quiet_ray_sources(True, cpus=2)
    import os

    assert "RAY_AIR_NEW_OUTPUT" not in os.environ  # --verbose: Ray's defaults
    quiet_ray_sources(False, cpus=2, workers_per_trial=1)
    assert os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # no configuration box, no TensorBoard hint
    assert int(os.environ["RAY_worker_maximum_startup_concurrency"]) * 4 >= 2 * 4 + 2

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("ray.data.dataset")
    handler = Keep()
    logger.addHandler(handler)
    try:
        quiet_not_applicable(False)
        logger.warning("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will "
                       "hang unless more CPUs are freed up.")
        logger.warning("another warning")
        quiet_not_applicable(True)
        logger.warning("Warning: The Ray cluster currently does not have any available CPUs. (verbose)")
    finally:
        logger.removeHandler(handler)
    assert records == ["another warning", "Warning: The Ray cluster currently does not have any available CPUs. "
                                          "(verbose)"]

    from coin_ray.training.worker import quiet_ray_logs

    quiet_ray_logs(False)  # in a Train worker: the embedding judge's "Loading SentenceTransformer model from ..."
    assert not logging.getLogger("sentence_transformers.base.model").isEnabledFor(logging.INFO)
    quiet_ray_logs(True)
    assert logging.getLogger("sentence_transformers.base.model").isEnabledFor(logging.INFO)

    from ray.data import DataContext

    quiet_data_context()
    assert not DataContext.get_current().enable_progress_bars  # off a terminal: no bars ...


def test_ray_data_logs_in_every_process_of_a_local_ray_without_the_lines_that_do_not_apply(monkeypatch, capfd):
    """... and Ray Data's warning that says so, like its no-CPU warning, is off in every process of a local Ray:
    they configure Ray Data's loggers from RAY_DATA_LOGGING_CONFIG, which the driver sets before Ray starts."""
    import os

    from ray.data._internal.logging import configure_logging

    from coin_ray.studies.quiet import quiet_ray_sources

    for name in ("RAY_DATA_LOGGING_CONFIG", "RAY_DATA_LOG_ENCODING", "RAY_AIR_NEW_OUTPUT",
                 "RAY_worker_maximum_startup_concurrency"):
        monkeypatch.delenv(name, raising=False)
    quiet_ray_sources(False, cpus=2)
    try:
        configure_logging()  # what `import ray.data` does in each Ray process
        logging.getLogger("ray.data._internal.progress").warning("Progress bars disabled. To enable, set ...")
        logging.getLogger("ray.data.dataset").warning("Warning: The Ray cluster currently does not have any "
                                                      "available CPUs. The Dataset job will hang ...")
        logging.getLogger("ray.data.dataset").warning("a warning that applies")
        err = capfd.readouterr().err
    finally:
        os.environ.pop("RAY_DATA_LOGGING_CONFIG", None)
        configure_logging()  # Ray Data's default again
    assert "a warning that applies" in err
    assert "Progress bars disabled" not in err and "available CPUs" not in err
