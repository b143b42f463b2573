"""The image-bound stage of the pipeline: decode images and encode rows, one processor per Ray actor.

`Encoder` is the callable class given to `Dataset.map_batches`; it turns validated work items (see
_records.py) into the stored row schema. Images that fail to decode are not rows: they go to a
`RejectionSink` actor, which the driver drains into OUT/rejected.jsonl once the write finishes. An image above
`max_image_pixels` is refused from its header, before its pixels are decoded (`image_too_large`); PIL's own
decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays in force and counts as `image_too_large` too.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipelines._records import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TOO_LARGE, TRUNCATED, UNREADABLE_IMAGE

# Directory partition columns: written as OUT/<task>/<split>/ and dropped from the files by the writer
# (pyarrow drops partition columns), which is why `task` is kept as a separate, ordinary column.
PARTITION_COLUMNS = ["_dir_task", "_dir_split"]
TRAIN_COLUMNS = ["id", "task", "index", "input_ids", "labels", "pixel_values", "question", "answer"]
TEST_COLUMNS = ["question_id", "task", "index", "input_ids", "pixel_values", "question", "reference", "size"]


def stored_columns(model_source: str) -> dict[str, list[str]]:
    """The columns of each split kind for the model's family: LLaVA's are TRAIN_COLUMNS / TEST_COLUMNS; a
    family with more image columns (Qwen2-VL: image_grid_thw, mm_token_type_ids) adds them."""
    from coin_ray.models.families import family_for_source

    extra = list(family_for_source(model_source).extra_columns)
    return {"train": TRAIN_COLUMNS + extra, "test": TEST_COLUMNS + extra}


def load_processor(model_source: str, model_kwargs: dict[str, Any]) -> Any:
    """The model's processor only (tokenizer + image processor), without loading model weights."""
    import coin_ray.models as models

    if hasattr(models, "build_processor"):
        return models.build_processor(model_source, **model_kwargs)
    if model_source != "tiny":  # a checkpoint folder: its processor files suffice, weights stay on disk
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_source, local_files_only=True)
    return models.build_vlm(model_source, **model_kwargs)[1]  # tiny: building the model costs milliseconds


@ray.remote(num_cpus=0)
class RejectionSink:
    """Collects rejections from every encoder actor; keyed by record so a retried batch is counted once."""

    def __init__(self) -> None:
        self._rows: dict[tuple[str, str, int], dict[str, Any]] = {}

    def add(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._rows[(row["task"], row["split"], row["index"])] = row

    def drain(self) -> list[dict[str, Any]]:
        return sorted(self._rows.values(), key=lambda r: (r["task"], r["split"], r["index"]))


class ImageTooLarge(ValueError):
    """An image with more pixels than allowed (ours or PIL's decompression-bomb limit)."""


def _decode(data: bytes | str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Any:
    """An RGB PIL image from a path or bytes, fully decoded now (PIL is lazy; corrupt tails show at load).
    Raises ImageTooLarge, from the header alone, when width x height is above `max_pixels`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, above data.max_image_pixels "
                                    f"({max_pixels})")
            image.load()
            return image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"PIL refuses it as a possible decompression bomb ({e})") from None


class _HFImages:
    """Lazily opened HF datasets (memory-mapped), so embedded image bytes never pass through the driver."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Any] = {}

    def get(self, ref: dict[str, Any]) -> bytes:
        key = (ref["path"], ref["split"])
        if key not in self._open:
            import datasets

            loaded = datasets.load_from_disk(ref["path"])
            self._open[key] = (loaded[ref["split"]] if isinstance(loaded, datasets.DatasetDict) else loaded).data
        cell = self._open[key].column(ref["column"])[ref["row"]].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if not isinstance(data, bytes):
            raise ValueError(f"column {ref['column']!r} row {ref['row']} holds no image bytes")
        return data


class Encoder:
    """map_batches callable: work items (pyarrow batch) -> stored rows (pyarrow table)."""

    def __init__(self, model_source: str, model_kwargs: dict[str, Any], max_length: int, sink: Any = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
        from PIL import Image

        import coin_ray.models as models

        from coin_ray.models.families import family_of

        self._models = models
        self.processor = load_processor(model_source, model_kwargs)
        self._family = family_of(self.processor)
        self._columns = ["pixel_values", *self._family.extra_columns]
        self.max_length = max_length
        self.max_image_pixels = max_image_pixels
        self.sink = sink
        self._hf = _HFImages()
        probe = models.encode_prompt_batch(self.processor, ["probe"], [Image.new("RGB", (8, 8))])
        # per-row shapes, for all-rejected batches
        self._empty = {c: tuple(np.asarray(probe[c][0]).shape) for c in self._columns}

    def _load(self, item: dict[str, Any]) -> Any:
        return _decode(self._hf.get(json.loads(item["hf_image"])) if item["hf_image"] else item["image"],
                       self.max_image_pixels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        table, rejected = self.encode(batch)
        if rejected:
            ray.get(self.sink.add.remote(rejected))
        return table

    def encode(self, batch: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
        """(stored rows, rejections) of one batch of work items; the actor-free core of `__call__`."""
        items = batch.to_pylist()
        rejected: list[dict[str, Any]] = []
        images: dict[int, Any] = {}
        for i, item in enumerate(items):
            try:
                images[i] = self._load(item)
            except ImageTooLarge as e:
                rejected.append(_rejection(item, IMAGE_TOO_LARGE,
                                           f"image {item['image'] or 'embedded in the HF dataset'} is too large: "
                                           f"{e}; downscale it or raise data.max_image_pixels "
                                           "(--max-image-pixels)"))
            except Exception as e:  # noqa: BLE001 - any decode failure rejects this one record, not the run
                rejected.append(_rejection(item, UNREADABLE_IMAGE,
                                           f"image {item['image'] or 'embedded in the HF dataset'} cannot be "
                                           f"decoded ({type(e).__name__}: {e})"))
        rows: list[dict[str, Any]] = []
        images_out: dict[str, list[np.ndarray]] = {c: [] for c in self._columns}
        train = [i for i in images if items[i]["split"] == "train"]
        if train:
            enc = self._models.encode_train_batch(
                self.processor, [items[i]["question"] for i in train], [items[i]["answer"] for i in train],
                [images[i] for i in train], self.max_length, on_overflow="flag")
            for k, i in enumerate(train):
                if not enc["valid"][k]:
                    rejected.append(_rejection(items[i], TRUNCATED,
                                               f"the prompt alone is >= max_length ({self.max_length}) tokens, so no "
                                               "answer token fits: raise --max-length"))
                    continue
                rows.append(_row(items[i], id=items[i]["id"], input_ids=enc["input_ids"][k], labels=enc["labels"][k],
                                 answer=items[i]["answer"]))
                for c in self._columns:
                    images_out[c].append(enc[c][k])
        test = [i for i in images if items[i]["split"] != "train"]
        if test:
            enc = self._models.encode_prompt_batch(
                self.processor, [items[i]["question"] for i in test], [images[i] for i in test])
            for k, i in enumerate(test):
                rows.append(_row(items[i], question_id=items[i]["id"], input_ids=enc["input_ids"][k],
                                 reference=items[i]["reference"], size=items[i]["size"]))
                for c in self._columns:
                    images_out[c].append(enc[c][k])
        return _to_table(rows, self._family.arrow_columns(images_out, self._empty)), rejected


def _rejection(item: dict[str, Any], kind: str, reason: str) -> dict[str, Any]:
    return {"task": item["task"], "split": item["split"], "id": item["id"], "index": item["index"],
            "kind": kind, "reason": reason}


def _row(item: dict[str, Any], **values: Any) -> dict[str, Any]:
    row = {"_dir_task": item["task"], "_dir_split": item["split"], "task": item["task"], "index": item["index"],
           "question": item["question"], "id": None, "question_id": None, "labels": None, "answer": None,
           "reference": None, "size": None}
    row.update(values)
    return row


_LIST_I32 = pa.list_(pa.int32())
_SCHEMA_NO_PIXELS = pa.schema([
    ("_dir_task", pa.string()), ("_dir_split", pa.string()), ("task", pa.string()), ("index", pa.int64()),
    ("id", pa.string()), ("question_id", pa.string()), ("input_ids", _LIST_I32), ("labels", _LIST_I32),
    ("question", pa.string()), ("answer", pa.string()), ("reference", pa.string()), ("size", _LIST_I32),
])


def _to_table(rows: list[dict[str, Any]], image_columns: dict[str, Any]) -> pa.Table:
    """The stored rows: the fixed columns, then the family's image columns (LLaVA: pixel_values only, as a
    fixed-shape tensor column)."""
    columns = {}
    for f in _SCHEMA_NO_PIXELS:
        values = [r[f.name] for r in rows]
        if f.type == _LIST_I32:
            values = [None if v is None else np.asarray(v, dtype=np.int32) for v in values]
        columns[f.name] = pa.array(values, type=f.type)
    columns.update(image_columns)
    return pa.table(columns)
