"""Reading preprocessed splits back for training and evaluation, streaming through Ray Data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pipelines._encode import TEST_COLUMNS, TRAIN_COLUMNS
from pipelines._records import PipelineInputError


def read_manifest(out: str | Path) -> dict[str, Any]:
    """OUT/manifest.json, or an error saying how to produce it."""
    path = Path(out).expanduser() / "manifest.json"
    if not path.is_file():
        raise PipelineInputError(f"{path} not found: run `python pipelines/preprocess.py ... --out {out}` first")
    return json.loads(path.read_text())


def load_split(out: str | Path, task: str, split: str, *, in_memory: bool = False) -> "ray.data.Dataset":  # noqa: F821
    """A lazy Ray Data dataset over OUT/<task>/<split>/ with that split's columns (see preprocess.py).

    Pass it to a TorchTrainer (`datasets={...}`) and iterate `get_dataset_shard(...).iter_torch_batches(
    collate_fn=train_collate_fn(pad_id))` in the workers: nothing is materialised on the driver.
    `in_memory=True` (small splits) reads the files here into one Arrow table in the object store instead: a
    MaterializedDataset, without the list/read tasks that cost seconds each on a small machine.
    """
    import ray.data

    manifest = read_manifest(out)
    splits = manifest["tasks"].get(task)
    if splits is None or split not in splits:
        have = {t: sorted(s) for t, s in manifest["tasks"].items()}
        raise PipelineInputError(f"{out} holds no {task}/{split} (it holds {have}): preprocess that task")
    if splits[split]["rows"] == 0:
        raise PipelineInputError(
            f"{task}/{split} in {out} has 0 rows ({splits[split]['rejected']} rejected): see "
            f"{Path(out) / manifest['rejected_file']}")
    # the manifest names the model family's columns (older manifests: LLaVA's)
    columns = manifest.get("columns", {}).get("train" if split == "train" else "test") or (
        TRAIN_COLUMNS if split == "train" else TEST_COLUMNS)
    folder = Path(out).expanduser() / task / split
    if in_memory:
        import pyarrow.dataset as pads

        files = sorted(str(p) for p in folder.glob("*.parquet"))
        return ray.data.from_arrow(pads.dataset(files, format="parquet").to_table(columns=list(columns)))
    return ray.data.read_parquet(str(folder), columns=columns)


def train_collate_fn(pad_id: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`iter_torch_batches(collate_fn=...)` for train rows: right-pads input_ids (pad_id) and labels (-100)."""
    from ray.data.collate_fn import NumpyBatchCollateFn

    class TrainCollate(NumpyBatchCollateFn):  # a callable class: Ray 2.47+ deprecates plain functions here
        def __init__(self, pad_id: int) -> None:
            self.pad_id = pad_id

        def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
            from coin_ray.models import collate_train

            return collate_train(batch, self.pad_id)

        def __reduce__(self):  # picklable although defined here (keeps ray.data out of import time)
            return train_collate_fn, (self.pad_id,)

    return TrainCollate(pad_id)
