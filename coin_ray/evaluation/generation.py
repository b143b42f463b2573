"""Evaluate a model on one task's test split: batched greedy generation, the task scorer, the judge.

Sharded across Ray Train workers: rank r takes rows r, r + W, r + 2W, ... of the split, and the
per-example scores are gathered so every rank returns the same cell.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from coin_ray.tasks import get_task


def test_subset(split_dir: str | Path, task: str, max_rows: int | None, seed: int = 0) -> Any:
    """The `index` values of the test rows evaluated: all (None) when the split has at most `max_rows`, else a
    seeded random subset of `max_rows` (CoIN's "slim" sets are random): the same rows in every trial of a
    sweep, since `seed` is data.seed, not the trial's train.seed."""
    from coin_ray.training.data_order import derived_seed, split_indices, subset_indices

    if max_rows is None:
        return None
    indices = split_indices(split_dir)
    return None if max_rows >= len(indices) else set(subset_indices(indices, task, derived_seed(seed, "test"),
                                                                    max_rows).tolist())


def iter_test_batches(split_dir: str | Path, batch_size: int, rank: int = 0, world: int = 1,
                      max_rows: int | None = None, *, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Stream a preprocessed test split (Parquet written by `pipelines`) in batches, this rank's rows only;
    with `max_rows`, only the rows of `test_subset` (a seeded random subset)."""
    import pyarrow.dataset as pads

    import ray.data  # noqa: F401  (registers Ray's Arrow tensor extension types used by pixel_values)

    files = sorted(str(p) for p in Path(split_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {split_dir}: run pipelines/preprocess.py for this task first")
    dataset = pads.dataset(files, format="parquet")
    keep = None
    if max_rows is not None:
        task = dataset.to_table(columns=["task"]).column("task")
        keep = test_subset(split_dir, str(task[0]) if len(task) else "", max_rows, seed)
    position = 0
    pending: list[dict[str, Any]] = []
    for record_batch in dataset.to_batches(batch_size=max(batch_size * world, 64)):
        columns = {name: _column_values(record_batch.column(name)) for name in record_batch.schema.names}
        for i in range(record_batch.num_rows):
            if keep is not None and columns["index"][i] not in keep:
                continue
            if position % world == rank:
                pending.append({name: values[i] for name, values in columns.items()})
            position += 1
            if len(pending) == batch_size:
                yield _stack(pending)
                pending = []
    if pending:
        yield _stack(pending)


def _column_values(column: Any) -> list[Any]:
    import pyarrow as pa

    if isinstance(column.type, pa.ExtensionType):  # Ray's tensor extension (pixel_values)
        return list(column.to_numpy())
    if pa.types.is_list(column.type) and pa.types.is_floating(column.type.value_type):  # flattened patches
        return list(column.to_numpy(zero_copy_only=False))
    return column.to_pylist()


def _stack(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {name: [row[name] for row in rows] for name in rows[0]}


def evaluate_task(model: torch.nn.Module, processor: Any, task: str, split_dir: str | Path, *,
                  batch_size: int, device: torch.device, rank: int = 0, world: int = 1,
                  max_rows: int | None = None, subset_seed: int = 0, judge: Any = None,
                  max_predictions: int = 20, autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """One evaluation cell: mean task score in [0, 1] over the split, the mean judge score, judge failures, and
    up to `max_predictions` sample predictions.

    A knowledge score exists only when the judge rated every reply: with any failure (judge down, unparseable
    answer) `knowledge` is None and `knowledge_error` says why; the instruction score is kept either way."""
    from coin_ray.models import generate_batch
    from coin_ray.models.families import family_of

    extra = family_of(processor).extra_columns
    spec = get_task(task)
    rows: list[dict[str, Any]] = []
    model.eval()
    for batch in iter_test_batches(split_dir, batch_size, rank, world, max_rows, seed=subset_seed):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            replies = generate_batch(model, processor, [list(map(int, ids)) for ids in batch["input_ids"]],
                                     batch["pixel_values"], max_new_tokens=spec.max_new_tokens,
                                     **{c: batch[c] for c in extra})
        for i, reply in enumerate(replies):
            reference = json.loads(batch["reference"][i])
            rows.append({
                "question_id": str(batch["question_id"][i]),
                "question": batch["question"][i],
                "reference": reference,
                "prediction": reply,
                "score": float(spec.score(reply, reference)),
            })
    if judge is not None and rows:
        result = judge.score([spec.question_for_judge(r["question"]) for r in rows],
                             [_reference_text(r["reference"]) for r in rows], [r["prediction"] for r in rows])
        for r, s in zip(rows, result.scores):
            r["knowledge"] = s
            if s is None:
                r["knowledge_error"] = result.errors[0] if result.errors else "not judged"
    rows = _gather(rows, world)
    rows.sort(key=lambda r: r["question_id"])
    ids = [r["question_id"] for r in rows]
    if len(set(ids)) != len(ids):  # ranks must evaluate disjoint shards: a row counted twice biases the score
        dupes = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise RuntimeError(f"{task}: question ids {dupes} were evaluated more than once across {world} ranks; "
                           "test question ids must be unique within a split")
    scores = [r["score"] for r in rows]
    knowledge = [r.get("knowledge") for r in rows] if judge is not None else []
    failed = [r for r in rows if judge is not None and r.get("knowledge") is None]
    cell = {
        "task": task,
        "n": len(rows),
        "score": float(np.mean(scores)) if scores else None,
        "knowledge": float(np.mean(knowledge)) if knowledge and not failed else None,
        "knowledge_failures": len(failed),
        "predictions": [{**r, "task": task} for r in rows[:max_predictions]],
    }
    if failed:
        cell["knowledge_error"] = (f"the {getattr(judge, 'name', 'knowledge')} judge could not rate "
                                   f"{len(failed)} of {len(rows)} replies; first error: {failed[0]['knowledge_error']}")
    return cell


def _reference_text(reference: Any) -> str:
    """The ground truth as text for a knowledge judge: a Grounding box as CoIN writes it ("[x1, y1, x2, y2]",
    two decimals), the most common of several human answers, else the answer itself."""
    from coin_ray.tasks import format_box

    if isinstance(reference, (list, tuple)):
        if reference and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in reference):
            return format_box(reference)
        return str(max(set(reference), key=list(reference).count)) if reference else ""
    return str(reference)


def _gather(rows: list[dict[str, Any]], world: int) -> list[dict[str, Any]]:
    if world <= 1:
        return rows
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]
