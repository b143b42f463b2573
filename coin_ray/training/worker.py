"""Where a copy of the continual loop runs, and what it holds for the length of a run.

`WorkerEnv` is the difference between a Ray Train worker (num_workers >= 1) and the in-process mode
(num_workers = 0): rank, world size, device, its data shards, how it waits for the other ranks and how it
reports. `WorkerRun` is the run's working set (config, prepared data, store, model, judge, hooks), built once
per worker by the loop and passed to the stage, training and evaluation steps.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from coin_ray.config import ExperimentConfig

if TYPE_CHECKING:
    from coin_ray.training.hooks import HookList
    from coin_ray.training.store import StageEntry, StageStore
    from coin_ray.training.types import PreparedData

CONTROL_TIMEOUT_S = 7 * 24 * 3600  # a stage trained elsewhere may take days at 7B scale

# A step callback is called after every optimizer step of a stage being trained, as cb(stage=k, step=s)
StepCallback = Callable[..., None]


@dataclass
class WorkerEnv:
    """Where this copy of the loop runs: rank, world size, device, and how to read its data shard."""

    rank: int
    world: int
    device: torch.device
    get_shard: Callable[[str], Any]  # dataset name -> object with iter_torch_batches(...)
    in_ray_train: bool
    control_group: Any = None  # a gloo group with a long timeout for waits (see control_process_group)

    def barrier(self) -> None:
        """Wait for every rank. Runs on the control group: while rank 0 waits for a stage another trial is
        training, the other ranks wait here for as long as that takes, not for the default group's timeout."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.control_group)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if not self.in_ray_train:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if (
            checkpoint_dir is not None and self.rank == 0) else None
        ray.train.report(metrics, checkpoint=checkpoint)


def control_process_group() -> Any:
    """A gloo process group for the loop's own waits, with a timeout long enough to wait for a stage that
    another trial is training (torch.distributed's default is 30 minutes; NCCL's watchdog would end the run).
    Gradients and evaluation rows still travel on the default group. Every rank must call this once, at the
    same point."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))


def quiet_data_context() -> None:
    """Ray Data settings of this process: ordered (reproducible batches) and, off a terminal, no progress bars
    (Ray Data's warning that says so is off unless --verbose: `quiet_ray_logs`, `coin_ray.studies.quiet`)."""
    import sys

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = sys.stderr.isatty()


def quiet_not_applicable(verbose: bool) -> None:
    """Drop Ray's warnings that do not apply (`coin_ray.studies.quiet.NOT_APPLICABLE`) at the loggers that emit
    them in this process, unless `verbose`."""
    from coin_ray.studies.quiet import NotApplicable

    NotApplicable.install(not verbose)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (not the one at creation, which may be gone)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def progress(message: str) -> None:
    """One line of the run's progress (a stage's outcome, a wait, a judge problem) on stderr.

    Through `logging`, not print: a Ray Train worker's stdout reaches the driver twice, a log record once."""
    logger = logging.getLogger("coin_ray.progress")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[coin-ray] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    logger.info(message)


def quiet_ray_logs(verbose: bool) -> None:
    """Ray's own chatter in this process at warning level unless `verbose`: Ray Train logs every report with
    its full metric dict ("Reporting training result ..."), Ray Data every finished dataset, transformers a
    progress bar per checkpoint load."""
    level = logging.INFO if verbose else logging.WARNING
    # Ray Data's "Progress bars disabled" (its progress module logs nothing else above info)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.NOTSET if verbose else logging.ERROR)
    names = ["ray.data", "ray.train", "sentence_transformers"]  # ... and the embedding judge's "Loading ... model"
    try:  # Ray Train's reporting logger is named after its file
        from ray.train.v2._internal.execution import context

        names.append(context.__file__)
    except ImportError:
        pass
    for name in names:
        logging.getLogger(name).setLevel(level)
    quiet_not_applicable(verbose)
    if not verbose:  # transformers' "Loading weights" bar, once per trial
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def ray_train_env(verbose: bool = False) -> WorkerEnv:
    """The environment of a Ray Train worker (called inside the worker)."""
    import ray.train
    import ray.train.torch

    quiet_data_context()
    quiet_ray_logs(verbose)
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    return WorkerEnv(rank=ctx.get_world_rank(), world=world, device=ray.train.torch.get_device(),
                     get_shard=ray.train.get_dataset_shard, in_ray_train=True,
                     control_group=control_process_group() if world > 1 else None)


@dataclass
class LoadedWeights:
    """Which stage's trained weights the model holds. A reused stage is only selected; its weights are read
    from the store when the model is next used (a run resumed at stage 5 does not load stages 0-4)."""

    model: torch.nn.Module
    device: torch.device
    loaded: "StageEntry | None" = None  # None: the model holds the freshly initialised tuner
    selected: "StageEntry | None" = None

    def select(self, entry: "StageEntry") -> None:
        self.selected = entry

    def holds(self, entry: "StageEntry") -> None:
        """The model already holds exactly `entry`'s weights (it just trained them)."""
        self.loaded = self.selected = entry

    def ensure(self) -> None:
        if self.selected is not None and self.selected is not self.loaded:
            from safetensors.torch import load_file

            from coin_ray.training.stages import adapter_weights_file
            from coin_ray.tuners import load_trainable_state_dict

            load_trainable_state_dict(self.model, load_file(str(adapter_weights_file(self.selected)),
                                                            device=str(self.device)))
            self.loaded = self.selected


@dataclass
class WorkerRun:
    """One worker's working set for a continual run."""

    cfg: ExperimentConfig
    data: "PreparedData"
    stage_rows: tuple[int, ...]  # training rows of each stage (current task plus replay)
    env: WorkerEnv
    store: "StageStore"
    model: torch.nn.Module
    processor: Any
    judge: Any
    hooks: "HookList"
    run_dir: Path
    autocast_dtype: torch.dtype | None
    weights: LoadedWeights
    method: Any  # the continual-learning method (coin_ray.methods.base.Method)
    step_callbacks: list[StepCallback] = field(default_factory=list)

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.cfg.order)
