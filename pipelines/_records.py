"""Reading CoIN instruction files: JSON parsing, record validation, image-path safety.

The driver parses the JSON listings; `validate_records` (field checks + one resolve and stat per image) runs
on chunks of records in Ray tasks during a pipeline run (`merge_chunks` joins their verdicts), or in one
loop for `plan`; decoding images is left to the encoding tasks. A bad record becomes a `Rejection`; a bad
*file* (invalid JSON, missing task folder) raises `PipelineInputError`, because no record of it can be trusted.

Internal fields never come from user data: the embedded-image reference of a HF dataset row sits under the key
`HF_IMAGE`, an object that no JSON text can produce as a key, so a user record cannot skip the image-root
check by naming a field.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from coin_ray.errors import UserError

# Kinds of bad records; `reason` carries the human explanation, `kind` is for machines and tests.
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
PATH_ESCAPE = "path_escape"
MISSING_FIELD = "missing_field"
EMPTY_ANSWER = "empty_answer"
MULTI_TURN = "multi_turn"
TRUNCATED = "truncated"
IMAGE_TOO_LARGE = "image_too_large"
INVALID_BOX = "invalid_box"
DUPLICATE_ID = "duplicate_id"

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000  # width x height above which an image is refused (about 64 Mpx)


class _InternalKey(str):
    """A record key set only by this package's own readers. It compares equal to no str that JSON can produce
    (equality and hash go by identity); being a str, it still sorts with a record's other keys."""

    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__


HF_IMAGE = _InternalKey("hf_image")  # (see the module docstring)

IMAGE_TOKEN = "<image>"
TEST_FILE_NAMES = ("test.json", "val.json")  # CoIN names the evaluation file either way


class PipelineInputError(UserError):
    """An input that stops the whole run (a missing task folder, a file that is not valid JSON)."""


@dataclass(frozen=True)
class Rejection:
    """One skipped record, written as a line of OUT/rejected.jsonl."""

    task: str
    split: str
    index: int  # position of the record in its source file (or row in its HF split)
    id: str | None
    kind: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "id": self.id, "index": self.index,
                "kind": self.kind, "reason": self.reason}


@dataclass
class SplitRecords:
    """Validated work items of one task/split plus what was rejected and what the content hash needs."""

    task: str
    split: str
    source: str  # the file or dataset the records came from
    items: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    fingerprint: list[Any] = field(default_factory=list)  # (image rel path, size, mtime_ns) per accepted item
    accepted: list[int] = field(default_factory=list)  # record index of each accepted item
    blocks: list[Any] = field(default_factory=list)  # items as Arrow tables in the Ray object store (Ray runs)

    @property
    def count(self) -> int:
        """Accepted items, whether held here (`items`) or in the object store (`blocks`)."""
        return len(self.accepted)


def read_json_list(path: Path) -> tuple[list[Any], bytes]:
    """Parse a CoIN instruction file; returns the records and the raw bytes (for the content hash)."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise PipelineInputError(
            f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}; fix the file or "
            "regenerate it") from None
    except UnicodeDecodeError as e:
        raise PipelineInputError(f"{path}: not UTF-8 text ({e}); CoIN instruction files are UTF-8 JSON") from None
    if not isinstance(data, list):
        raise PipelineInputError(
            f"{path}: the top level must be a JSON list of records, got {type(data).__name__}")
    return data, raw


def split_files(instructions: Path, task: str, setting: str = "--instructions") -> dict[str, Path]:
    """{"train": path, "test": path} for one task folder; `val.json` is accepted for the test split.
    `setting`: how the user gave the folder, for the message (the CLI flag, or the config key of a sweep)."""
    folder = instructions / task
    if not folder.is_dir():
        raise PipelineInputError(
            f"task folder {folder} does not exist: {setting} must hold one folder per task "
            f"(<DIR>/{task}/train.json and test.json)")
    train = folder / "train.json"
    test = next((folder / n for n in TEST_FILE_NAMES if (folder / n).is_file()), None)
    missing = [str(p) for p, ok in ((train, train.is_file()), (folder / "test.json", test is not None)) if not ok]
    if missing:
        raise PipelineInputError(f"task {task}: missing {', '.join(missing)} (test.json may also be named val.json)")
    return {"train": train, "test": test}


def resolve_image(root: Path, rel: Any) -> tuple[Path | None, str | None, str | None]:
    """Resolve an image path under `root` (already resolved): (path, None, None) or (None, kind, reason).

    Absolute paths are refused outright; relative ones are resolved (following symlinks) and must stay
    inside the root, so `../x.jpg` and a symlink pointing out are both refused.
    """
    if not isinstance(rel, str) or not rel.strip():
        return None, MISSING_FIELD, f"field 'image' must be a non-empty path string, got {rel!r}"
    if os.path.isabs(rel) or rel.startswith("~"):
        return None, PATH_ESCAPE, (f"image path {rel!r} is absolute: image paths must be relative to the "
                                   f"image root {root}")
    resolved = (root / rel).resolve()
    if not resolved.is_relative_to(root):
        return None, PATH_ESCAPE, (f"image path {rel!r} resolves to {resolved}, outside the image root {root}: "
                                   "move the file under the root or fix the path")
    if not resolved.is_file():
        return None, MISSING_IMAGE, f"image file {rel!r} not found under the image root {root}"
    return resolved, None, None


def _train_fields(record: dict[str, Any]) -> tuple[str, str] | tuple[None, tuple[str, str]]:
    """(question, answer) of a LLaVA conversation record, or (None, (kind, reason))."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2:
        return None, (MISSING_FIELD, f"field 'conversations' must be a list of a human and a gpt turn, got {conv!r:.80}")
    if len(conv) > 2:
        return None, (MULTI_TURN, f"{len(conv)} conversation turns: only one question/answer pair per record is "
                                  "encoded; split multi-turn records into one record per question")
    human, gpt = conv
    if not (isinstance(human, dict) and human.get("from") == "human" and isinstance(human.get("value"), str)):
        return None, (MISSING_FIELD, "the first conversation turn must be {'from': 'human', 'value': <str>}")
    if not (isinstance(gpt, dict) and gpt.get("from") == "gpt" and isinstance(gpt.get("value"), str)):
        return None, (MISSING_FIELD, "the second conversation turn must be {'from': 'gpt', 'value': <str>}")
    question = human["value"].replace(IMAGE_TOKEN, "").strip()
    if not question:
        return None, (MISSING_FIELD, "the human turn holds no question text")
    answer = gpt["value"].strip()
    if not answer:
        return None, (EMPTY_ANSWER, "the gpt turn (answer) is empty")
    return question, answer


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (str, list, tuple, dict)) and not (
        value.strip() if isinstance(value, str) else value))


def duplicate_ids(records: list[Any], split: str) -> dict[int, int]:
    """Record index -> index of the earlier record with the same id (`id` in train files, `question_id` in
    test files) for every record whose id repeats one before it."""
    first: dict[str, int] = {}
    out: dict[int, int] = {}
    key = "id" if split == "train" else "question_id"
    for index, record in enumerate(records):
        if isinstance(record, dict) and record.get(key) is not None:
            seen = first.setdefault(str(record[key]), index)
            if seen != index:
                out[index] = seen
    return out


def validate_records(task: str, split: str, source: str, records: Iterable[Any], image_root: Path,
                     reference: Callable[[dict[str, Any]], Any], max_rows: int | None = None,
                     start: int = 0, duplicates: dict[int, int] | None = None) -> SplitRecords:
    """Check each record of one split; accepted ones become work items for the encoding tasks.

    Train items carry (question, answer); test items carry (question, reference as JSON text, size).
    `reference` is the task's `reference_from_record`. A train answer of a box task (Grounding) must be a
    box (`coin_ray.tasks.box_problem`). With `max_rows`, reading stops after that many accepted records (a
    smoke run then costs what it uses). `start`: the source index of the first record (a chunk of a file).
    `duplicates` (`duplicate_ids`, test splits): records rejected as duplicate_id, since a test question is
    scored once.
    """
    from coin_ray.tasks import box_problem, get_task

    box_answers = get_task(task).answer_format == "box"
    out = SplitRecords(task, split, source)
    for index, record in enumerate(records, start):
        if max_rows is not None and len(out.items) >= max_rows:
            break
        rec_id = None
        if isinstance(record, dict):
            raw_id = record.get("id" if split == "train" else "question_id")
            rec_id = None if raw_id is None else str(raw_id)

        def reject(kind: str, reason: str) -> None:
            out.rejections.append(Rejection(task, split, index, rec_id, kind, reason))

        if not isinstance(record, dict):
            reject(MISSING_FIELD, f"record must be a JSON object, got {type(record).__name__}")
            continue
        item: dict[str, Any] = {"task": task, "split": split, "index": index, "answer": "", "reference": "",
                                "size": None}
        if split == "train":
            question, answer = _train_fields(record)
            if question is None:
                reject(*answer)
                continue
            problem = box_problem(answer) if box_answers else None
            if problem is not None:
                reject(INVALID_BOX, f"the answer {answer!r:.60} is not a box: {problem}")
                continue
            item.update(id=rec_id if rec_id is not None else f"{task}-{index}", question=question, answer=answer)
        else:
            if rec_id is None:
                reject(MISSING_FIELD, "field 'question_id' is missing")
                continue
            if duplicates and index in duplicates:
                reject(DUPLICATE_ID, f"question_id {rec_id!r:.60} repeats record {duplicates[index]}'s: a test "
                                     "question is scored once; the first record with the id is kept")
                continue
            text = record.get("text")
            if not isinstance(text, str) or not text.replace(IMAGE_TOKEN, "").strip():
                reject(MISSING_FIELD, f"field 'text' must be a non-empty question string, got {text!r:.80}")
                continue
            try:
                ref = reference(record)
            except (KeyError, ValueError, TypeError) as e:
                reject(MISSING_FIELD, f"no reference answer: {e}")
                continue
            if _is_empty(ref):
                reject(EMPTY_ANSWER, f"reference answer is empty ({ref!r})")
                continue
            size = record.get("size")
            if size is not None and not (isinstance(size, list) and len(size) == 2
                                         and all(isinstance(v, (int, float)) and v > 0 for v in size)):
                reject(MISSING_FIELD, f"field 'size' must be [width, height] in pixels, got {size!r:.80}")
                continue
            item.update(id=rec_id, question=text.replace(IMAGE_TOKEN, "").strip(), reference=json.dumps(ref),
                        size=None if size is None else [int(v) for v in size])
        path, kind, reason = _item_image(record, image_root, item)
        if path is None:
            reject(kind, reason)
            continue
        out.fingerprint.append(item.pop("fingerprint"))
        out.accepted.append(index)
        out.items.append(item)
    return out


def merge_chunks(task: str, split: str, source: str, chunks: Iterable[SplitRecords],
                 max_rows: int | None = None) -> tuple[SplitRecords, list[int]]:
    """Join the verdicts of consecutive chunks of one split, as `validate_records` over the whole would give.

    Returns the merged split (items and blocks are left to the caller) and, per chunk, how many of its
    accepted items to keep: with `max_rows`, the first `max_rows` accepted records overall, and only the
    rejections before the last of them (the single loop stops reading there).
    """
    out = SplitRecords(task, split, source)
    keep: list[int] = []
    for chunk in chunks:
        if max_rows is not None and out.count >= max_rows:  # the single loop stopped before this chunk
            keep.append(0)
            continue
        room = chunk.count if max_rows is None else min(chunk.count, max_rows - out.count)
        rejections = chunk.rejections
        if max_rows is not None and out.count + room >= max_rows:  # ... or stops inside it
            rejections = [r for r in rejections if r.index < chunk.accepted[room - 1]]
        out.rejections.extend(rejections)
        out.fingerprint.extend(chunk.fingerprint[:room])
        out.accepted.extend(chunk.accepted[:room])
        keep.append(room)
    return out, keep


def to_portable(records: Iterable[Any]) -> list[tuple[Any, Any]]:
    """Records as (record without `HF_IMAGE`, its value or None): safe to pickle into a Ray task, where the
    internal key would arrive as a different object and so be lost (see the module docstring)."""
    return [((r, None) if not isinstance(r, dict) or HF_IMAGE not in r else
             ({k: v for k, v in r.items() if k is not HF_IMAGE}, r[HF_IMAGE])) for r in records]


def from_portable(pairs: Iterable[tuple[Any, Any]]) -> list[Any]:
    """The records `to_portable` took apart, with `HF_IMAGE` set again where there was one."""
    return [record if hf_ref is None else {**record, HF_IMAGE: hf_ref} for record, hf_ref in pairs]


def _item_image(record: dict[str, Any], image_root: Path, item: dict[str, Any]) -> tuple[Any, str | None, str | None]:
    """Fill item['image'] (absolute path) or item['hf_image'] (a lazy reference to embedded bytes)."""
    hf_ref = record.get(HF_IMAGE)
    if hf_ref is not None:  # embedded image bytes in a HF dataset: loaded lazily by the encoder
        item.update(image="", hf_image=json.dumps(hf_ref), fingerprint=None)
        return hf_ref, None, None
    path, kind, reason = resolve_image(image_root, record.get("image"))
    if path is None:
        return None, kind, reason
    st = path.stat()
    item.update(image=str(path), hf_image="", fingerprint=(record["image"], st.st_size, st.st_mtime_ns))
    return path, None, None
