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

An environment variable the user set is left as it is. The rest (Ray Data's "no available CPUs" warning, info
lines of libraries in Ray's workers) is handled per process: `coin_ray.training.worker.quiet_not_applicable`
and the job's `ray.LoggingConfig` (coin_ray.studies.cli.init_ray).
"""
from __future__ import annotations

import math
import os

__all__ = ["expected_processes", "quiet_ray_sources"]


def expected_processes(cpus: int, workers_per_trial: int) -> int:
    """Python processes a sweep on `cpus` CPUs can hold at once: per running trial (at most one per CPU) its
    Tune actor, Train controller, dataset coordinator and workers, plus one Ray Data task per CPU."""
    return cpus * (3 + workers_per_trial) + cpus


def quiet_ray_sources(verbose: bool, *, cpus: int, workers_per_trial: int = 1, local: bool = True) -> None:
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if local:
        concurrency = max(cpus, math.ceil(expected_processes(cpus, workers_per_trial) / 4))
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(concurrency))
