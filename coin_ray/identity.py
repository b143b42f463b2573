"""Run identity: which configuration fields can change a result, and the hashes built from them.

A trial's result is fixed by its configuration minus the fields that only say where things are kept, how they
are logged or how many resources a worker gets (`NON_RESULT_FIELDS`), plus the content hash of its data. The
short form of that hash goes into the readable trial and sweep names (and so into the `runs/<trial>` folder);
the run key (name + hash) is the MLflow tag `coin_ray.run_key` by which trial runs are found. Two configs that
differ in anything else get different names, folders and runs; the same config gets the same ones again.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

__all__ = ["NON_RESULT_FIELDS", "config_hash", "result_fields", "run_key", "short_hash"]

# Flattened config keys that cannot change a trial's matrix or metrics. scaling.num_workers is not one: the
# data-parallel world changes the batches (the stage store keys on it too); the eval settings are not either
# (batch size changes padding in generation, the judge and its options change the knowledge scores).
NON_RESULT_FIELDS = frozenset({
    "name",  # derived from the identity, not part of it
    "storage_path", "use_stage_cache",  # where results are kept; cached and uncached runs give equal matrices
    "data.processed", "data.instructions", "data.images",  # paths: their content is in the data hash
    "data.materialize_below_mb",  # object store or streamed: same rows, same order
    "eval.max_predictions_logged",
    "scaling.cpus_per_worker", "scaling.gpus_per_worker", "scaling.max_failures",
    "tracking.tracking_uri", "tracking.experiment", "tracking.system_metrics",
})


def short_hash(material: Any, digits: int = 24) -> str:
    """sha256 of the canonical JSON of `material`, first `digits` hex digits."""
    blob = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:digits]


def result_fields(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened config's fields that can change a result."""
    return {k: v for k, v in flat.items() if k not in NON_RESULT_FIELDS}


def config_hash(flat: Mapping[str, Any], data_hash: str) -> str:
    """Hash of every result-changing field of a flattened config (`ExperimentConfig.flatten()`) and the data."""
    return short_hash({"config": result_fields(flat), "data_hash": data_hash})


def run_key(name: str, flat: Mapping[str, Any], data_hash: str) -> str:
    """The key a run is found by (MLflow tag `coin_ray.run_key`, result.json): its name and its config hash."""
    return short_hash({"name": name, "config_hash": config_hash(flat, data_hash)})
