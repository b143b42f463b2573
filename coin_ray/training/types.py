"""Typed values that cross a boundary: what data preparation hands a run, and what a run hands its workers."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class PreparedData:
    """The preprocessed benchmark, as `prepare_data` returns it: one Parquet folder per task and split.

    `train_datasets` holds the small train splits already read into Ray's object store (a sweep reads them
    once on its driver, see `with_train_datasets`); big splits are absent there and stream from Parquet."""

    processed: str  # the preprocessed folder (manifest.json, <Task>/<split>/*.parquet)
    splits: Mapping[str, Mapping[str, str]]  # task -> {"train": folder, "test": folder}
    rows: Mapping[str, Mapping[str, int]]  # task -> {"train": rows, "test": rows}
    data_hash: str  # content hash of the preprocessed data (part of every stage key and run key)
    benchmark: str
    instructions: str
    images: str
    train_datasets: Mapping[str, Any] = field(default_factory=dict)
    # the model folder (or "tiny") every worker loads: model.source, or the model assembled from its parts under
    # <storage_path>/models/<hash>/ ("" = model.source). Its path and files are part of data_hash.
    model_source: str = ""

    @property
    def tasks(self) -> list[str]:
        return sorted(self.splits)

    def with_datasets(self, datasets: Mapping[str, Any]) -> "PreparedData":
        return replace(self, train_datasets=dict(datasets))

    def without_datasets(self) -> "PreparedData":
        """What a Train worker receives: its datasets arrive as shards, not inside the config."""
        return replace(self, train_datasets={})


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker of one continual run needs besides its data shards (the `train_loop_config`)."""

    experiment: dict[str, Any]  # ExperimentConfig.to_dict(): plain data, rebuilt on the worker
    data: PreparedData
    stage_rows: tuple[int, ...]  # training rows of each stage (current task plus replay)
    hooks_factory: Callable[[], Any] | None = None  # -> RunHooks, called on rank 0
    step_callbacks: tuple[Callable[..., None], ...] = ()  # called after every optimizer step (see worker.py)
    verbose: bool = False  # Ray's own logs at info level in the workers
