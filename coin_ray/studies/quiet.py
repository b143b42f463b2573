"""Ray's start-up lines that do not apply to how the platform sizes its resources, turned off where Ray reads
its settings (unless `--verbose`, which keeps Ray's defaults); set before Ray starts, in the driver.

- Tune's configuration box ("Configuration for experiment ...", search algorithm, scheduler, number of
  trials) and its TensorBoard hint: the new console output prints them whatever the verbosity; the platform
  prints its own plan and one line per stage, so a sweep runs Tune's console output that verbosity 0 silences
  (`RAY_AIR_NEW_OUTPUT=0`).
- "N PYTHON worker processes have been started ... 4x the maximum expected startup concurrency": the
  raylet's expectation is one process per CPU, while each running trial is several mostly idle processes
  (Tune's trial actor, the Train controller, its workers, a dataset coordinator) next to one Ray Data task
  per CPU. A local Ray is told the startup concurrency that matches (`RAY_worker_maximum_startup_concurrency`,
  a Ray system setting the raylet reads at start; 4x it is what the platform can run at once).

- Ray Data's "Progress bars disabled" (off a terminal the platform turns the bars off) and "The Ray cluster
  currently does not have any available CPUs. The Dataset job will hang ..." (a trial's Train worker holds the
  CPU it was given, and the splits it materialises were sized for it: small ones are read into the object
  store once, big ones stream with a CPU kept for ingest, coin_ray.studies.cli.default_concurrency): Ray Data
  configures its loggers in every process from `RAY_DATA_LOGGING_CONFIG`; a local Ray's processes inherit the
  config written here (Ray Data's default with its progress logger at error level and `NotApplicable` on its
  console). In this process and a joined cluster's, `coin_ray.training.worker.quiet_ray_logs` does the same.

An environment variable the user set is left as it is. Info lines of libraries in Ray's processes ("Loading
SentenceTransformer model ...") are below the job's `ray.LoggingConfig` level (coin_ray.studies.cli.init_ray).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile

__all__ = ["NOT_APPLICABLE", "NotApplicable", "expected_processes", "quiet_ray_sources", "ray_data_logging_config"]

# Ray's warnings that do not apply to how the platform sizes its resources, by the logger that emits them
NOT_APPLICABLE = {"ray.data.dataset": ("Warning: The Ray cluster currently does not have any available CPUs",)}


class NotApplicable(logging.Filter):
    """Drops the records of `NOT_APPLICABLE` (on the loggers that emit them, or on Ray Data's console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        prefixes = NOT_APPLICABLE.get(record.name)
        return not (prefixes and str(record.msg).startswith(prefixes))

    @classmethod
    def install(cls, on: bool) -> None:
        """Put the filter on each logger of `NOT_APPLICABLE` in this process (`on`), or take it off."""
        for name in NOT_APPLICABLE:
            logger = logging.getLogger(name)
            for f in [f for f in logger.filters if isinstance(f, cls)]:
                logger.removeFilter(f)
            if on:
                logger.addFilter(cls())


def ray_data_logging_config() -> dict:
    """Ray Data's default logging config (ray/data/_internal/logging.py) with its progress logger at error
    level and `NotApplicable` on its console handler."""
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = json.loads(json.dumps(DEFAULT_CONFIG))
    config["filters"]["not_applicable"] = {"()": f"{__name__}.NotApplicable"}
    config["handlers"]["console"]["filters"] = [*config["handlers"]["console"].get("filters", []), "not_applicable"]
    config["loggers"]["ray.data._internal.progress"] = {"level": "ERROR", "propagate": True}
    return config


def expected_processes(cpus: int, workers_per_trial: int) -> int:
    """Python processes a sweep on `cpus` CPUs can hold at once: per running trial (at most one per CPU) its
    Tune actor, Train controller, dataset coordinator and workers, plus one Ray Data task per CPU."""
    return cpus * (3 + workers_per_trial) + cpus


def quiet_ray_sources(verbose: bool, *, cpus: int, workers_per_trial: int = 1, local: bool = True) -> None:
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if "RAY_DATA_LOGGING_CONFIG" not in os.environ and "RAY_DATA_LOG_ENCODING" not in os.environ:
        text = json.dumps(ray_data_logging_config(), indent=1, sort_keys=True)  # JSON is YAML
        path = os.path.join(tempfile.gettempdir(), f"coin-ray-ray-data-logging-{os.getuid()}.json")
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            f.write(text)
        os.replace(f"{path}.{os.getpid()}.tmp", path)
        os.environ["RAY_DATA_LOGGING_CONFIG"] = path
    if local:
        concurrency = max(cpus, math.ceil(expected_processes(cpus, workers_per_trial) / 4))
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(concurrency))
