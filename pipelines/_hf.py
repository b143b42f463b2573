"""Tasks kept as local Hugging Face datasets: rows become CoIN-format records, then the same validation.

A column mapping names, for each CoIN field, the dataset column that holds it:
`question` (the human turn / test `text`), `answer`, `image`, and optionally `id`, `answer_bbox`, `size`
or any other CoIN test field. An `image` column may hold a path (relative to the image root, checked
like a JSON path) or an HF `Image` feature with embedded bytes, which the encoder actors read lazily.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from pipelines._records import HF_IMAGE, PipelineInputError

DEFAULT_COLUMNS = {"question": "question", "answer": "answer", "image": "image"}
SPLIT_NAMES = {"train": "train", "test": "test", "validation": "test", "val": "test"}


def parse_columns(text: str) -> dict[str, str]:
    """'question=q,answer=a,image=img' -> {'question': 'q', ...} (unmapped required fields keep their name)."""
    mapping = dict(DEFAULT_COLUMNS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise PipelineInputError(f"--hf-columns entry {part!r} must be FIELD=COLUMN, e.g. question=q")
        mapping[field.strip()] = column.strip()
    return mapping


def load_splits(path: Path) -> dict[str, Any]:
    """{"train": (hf split name, Dataset), "test": (...)} from a `save_to_disk` folder (a DatasetDict, or one
    Dataset, which is the train split)."""
    import datasets

    if not path.is_dir():
        raise PipelineInputError(f"HF dataset folder {path} does not exist: pass TASK=PATH of a save_to_disk folder")
    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise PipelineInputError(f"{path} is not a datasets.save_to_disk folder: {e}") from None
    if isinstance(loaded, datasets.Dataset):
        return {"train": ("train", loaded)}
    splits: dict[str, Any] = {}
    for name, ds in loaded.items():
        if name not in SPLIT_NAMES:
            continue
        if SPLIT_NAMES[name] in splits:
            raise PipelineInputError(f"{path}: splits {sorted(loaded)} map twice to {SPLIT_NAMES[name]!r}: keep one")
        splits[SPLIT_NAMES[name]] = (name, ds)
    if not splits:
        raise PipelineInputError(f"{path}: no split named one of {sorted(SPLIT_NAMES)} (found {sorted(loaded)})")
    return splits


def records(path: Path, hf_split: str, ds: Any, split: str, columns: dict[str, str]) -> Iterator[dict[str, Any]]:
    """CoIN-format records of one HF split (train: id/image/conversations; test: question_id/image/text/...)."""
    columns = dict(columns)
    if split == "test" and columns["answer"] not in ds.column_names:
        del columns["answer"]  # e.g. Grounding keeps answer_bbox instead; the task's reference check decides
    missing = sorted(set(columns.values()) - set(ds.column_names))
    if missing:
        raise PipelineInputError(
            f"{path} split {hf_split!r} has no column(s) {missing} (columns: {ds.column_names}): "
            "fix --hf-columns, e.g. question=q,answer=a,image=img")
    import datasets
    import pyarrow.compute as pc

    image_col = columns["image"]
    embedded = isinstance(ds.features[image_col], datasets.Image)
    has_bytes = None
    if embedded:  # only the validity bitmap of the bytes field is read here, not the image data
        has_bytes = pc.is_valid(pc.struct_field(ds.data.column(image_col), "bytes")).to_pylist()
    text_cols = [c for f, c in columns.items() if f != "image"]
    table = ds.data.select(sorted(set(text_cols)))
    paths = None
    if embedded:
        paths = pc.struct_field(ds.data.column(image_col), "path").to_pylist()
    elif image_col in ds.column_names:
        paths = ds.data.column(image_col).to_pylist()
    for row_index, row in enumerate(table.to_pylist()):
        value = {f: row.get(c) for f, c in columns.items() if f != "image"}
        record: dict[str, Any]
        if split == "train":
            record = {"conversations": [{"from": "human", "value": value.pop("question")},
                                        {"from": "gpt", "value": value.pop("answer")}]}
            record["id"] = value.pop("id", None)
        else:
            record = {"text": value.pop("question"), "question_id": value.pop("id", row_index)}
        record.update(value)  # other CoIN fields (answer_bbox, size, ...)
        if has_bytes is not None and has_bytes[row_index]:
            record[HF_IMAGE] = {"path": str(path), "split": hf_split, "row": row_index, "column": image_col}
        else:
            record["image"] = paths[row_index] if paths is not None else None
        yield record
