"""The image-bound stage of the pipeline: decode images and encode rows, one processor per Ray worker process.

`encode_items` is what each encoding Ray task runs (one block of validated work items, an Arrow table of
`ITEM_SCHEMA`); it keeps one `Encoder` per worker process, and `encode_block`
turns a block into the stored row schema batch by batch and writes it as one Parquet file. Images that fail to decode are not rows: they come back with the block's summary, which the driver writes into
OUT/rejected.jsonl. An image above
`max_image_pixels` is refused from its header, before its pixels are decoded (`image_too_large`); PIL's own
decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays in force and counts as `image_too_large` too.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
from pipelines._records import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_TOO_LARGE, TRUNCATED, UNREADABLE_IMAGE

TRAIN_COLUMNS = ["id", "task", "index", "input_ids", "labels", "pixel_values", "question", "answer"]
TEST_COLUMNS = ["question_id", "task", "index", "input_ids", "pixel_values", "question", "reference", "size"]
# A validated work item (`validate_records`), as the validation tasks hand it to the encoding stage.
ITEM_SCHEMA = pa.schema([
    ("task", pa.string()), ("split", pa.string()), ("index", pa.int64()), ("id", pa.string()),
    ("question", pa.string()), ("answer", pa.string()), ("reference", pa.string()), ("size", pa.list_(pa.int64())),
    ("image", pa.string()), ("hf_image", pa.string()),
])


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
    """Work items (pyarrow batch) -> stored rows (pyarrow table) + rejections, with one processor."""

    def __init__(self, model_source: str, model_kwargs: dict[str, Any], max_length: int,
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
        self._hf = _HFImages()
        probe = models.encode_prompt_batch(self.processor, ["probe"], [Image.new("RGB", (8, 8))])
        # per-row shapes, for all-rejected batches
        self._empty = {c: tuple(np.asarray(probe[c][0]).shape) for c in self._columns}

    def _load(self, item: dict[str, Any]) -> Any:
        return _decode(self._hf.get(json.loads(item["hf_image"])) if item["hf_image"] else item["image"],
                       self.max_image_pixels)

    def encode(self, batch: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
        """(stored rows, rejections) of one batch of work items (no Ray needed)."""
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


def encode_block(encoder: Encoder, items: pa.Table, out: Path, batch_size: int) -> list[dict[str, Any]]:
    """Encode one block of work items `batch_size` rows at a time and write each task/split's rows as one
    Parquet file, OUT/<task>/<split>/part-<index of its first item>.parquet (the same name on a retry);
    returns per file {task, split, rows, bytes, rejected (JSON list of rejections)}."""
    import pyarrow.parquet as pq

    summaries = []
    keys = items.select(["task", "split"]).to_pylist()
    for task, split in dict.fromkeys((k["task"], k["split"]) for k in keys):
        group = items.filter(pa.compute.and_(pa.compute.equal(items["task"], task),
                                             pa.compute.equal(items["split"], split)))
        tables, rejected = [], []
        for start in range(0, group.num_rows, batch_size):
            table, bad = encoder.encode(group.slice(start, batch_size))
            tables.append(table)
            rejected += bad
        folder = out / task / split
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{group['index'][0].as_py():09d}.parquet"
        table = pa.concat_tables(tables)
        pq.write_table(table, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        summaries.append({"task": task, "split": split, "rows": table.num_rows, "bytes": path.stat().st_size,
                          "rejected": json.dumps(rejected)})
    return summaries


_WORKER_ENCODER: dict[str, Encoder] = {}  # this worker process's Encoder, keyed by its settings
_PREFETCH: list[Any] = []  # the thread started by `prefetch_imports` in this process, if any


def prefetch_imports() -> None:
    """Start importing the encoder's libraries (torch, transformers: seconds) in a background thread of this
    worker process, once, so the encoding tasks that follow in the same process find them imported (an import
    in progress makes theirs wait, by Python's import lock). `preprocess` sends one such task per CPU as it
    starts, to overlap the imports with validating the records."""
    if not _PREFETCH:
        import threading

        def load() -> None:
            import coin_ray.models  # noqa: F401

        _PREFETCH.append(threading.Thread(target=load, name="prefetch-imports", daemon=True))
        _PREFETCH[0].start()


def encode_items(items: pa.Table, *, model_source: str, model_kwargs: dict[str, Any], max_length: int,
                 max_image_pixels: int, out: str, batch_size: int) -> list[dict[str, Any]]:
    """One encoding task's work (one whole block): `encode_block` with this worker process's
    Encoder, built on its first task and reused by every later one (a run pays that start-up once per
    process, not once per task). Returns the small per-file summaries."""
    key = json.dumps([model_source, model_kwargs, max_length, max_image_pixels], sort_keys=True)
    encoder = _WORKER_ENCODER.get(key)
    if encoder is None:
        _WORKER_ENCODER.clear()
        encoder = _WORKER_ENCODER[key] = Encoder(model_source, model_kwargs, max_length,
                                                 max_image_pixels=max_image_pixels)
    return encode_block(encoder, items, Path(out), batch_size)


def _rejection(item: dict[str, Any], kind: str, reason: str) -> dict[str, Any]:
    return {"task": item["task"], "split": item["split"], "id": item["id"], "index": item["index"],
            "kind": kind, "reason": reason}


def _row(item: dict[str, Any], **values: Any) -> dict[str, Any]:
    row = {"task": item["task"], "index": item["index"],
           "question": item["question"], "id": None, "question_id": None, "labels": None, "answer": None,
           "reference": None, "size": None}
    row.update(values)
    return row


_LIST_I32 = pa.list_(pa.int32())
_SCHEMA_NO_PIXELS = pa.schema([
    ("task", pa.string()), ("index", pa.int64()),
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
