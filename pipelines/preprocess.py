"""CoIN instruction files + images -> tokenised Parquet per task/split + manifest.json (module and CLI).

    python pipelines/preprocess.py --instructions DATA/Instructions --images DATA/images \
        --tasks ScienceQA,Grounding --out runs/data [--model tiny|PATH] [--max-length 2048] \
        [--max-rows-per-split N] [--max-image-pixels N] [--textvqa-annotations FILE] [--force]
        [--hf-dataset TASK=PATH --hf-columns question=q,answer=a,image=img]

Layout of OUT (a contract with training and evaluation):
    OUT/<Task>/train/*.parquet   id, task, index, input_ids, labels, pixel_values, question, answer
    OUT/<Task>/test/*.parquet    question_id, task, index, input_ids, pixel_values, question, reference, size
    OUT/rejected.jsonl           one line per skipped record: task, split, id, index, kind, reason
    OUT/manifest.json            {"version": 1, "content_hash", "tasks": {T: {split: {"rows", "rejected", "bytes",
                                  "bytes_per_row", ...}}}, "bytes_per_row": {T: ...}, "config": {...}, ...}
Read the Parquet with `pipelines.load_split` (it selects the split's columns from the stored union schema).

The driver parses the JSON listings; Ray tasks validate chunks of records (field checks, image path and stat),
keeping the accepted items in the object store and sending the driver only verdicts and image fingerprints
(for the content hash). A rerun whose inputs and config hash to the manifest's `content_hash` returns the
existing manifest; otherwise one Ray task per block decodes and encodes its items, each worker process building
the processor once, and each task writes its block's Parquet file (encoded pixels never cross the object store). The
run is written to a temp folder beside OUT and renamed into place, so OUT is never half-written.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ray

from pipelines import _hf
from pipelines._annotations import TEXTVQA, load_textvqa_answers, with_textvqa_answers
from pipelines._encode import encode_items, prefetch_imports, stored_columns
from pipelines._hashing import ContentHasher
from pipelines._records import (DEFAULT_MAX_IMAGE_PIXELS, DUPLICATE_ID, PipelineInputError, SplitRecords,
                                duplicate_ids, from_portable, merge_chunks, read_json_list, split_files,
                                to_portable, validate_records)

MANIFEST_VERSION = 1  # layout of manifest.json and of OUT
ENCODING_VERSION = 1  # bump when the stored rows change for the same inputs (part of the content hash)
SPLITS = ("train", "test")
CHUNK_ROWS = 256  # most records per validation task; its accepted items are one block of the encoding stage
HASH_METHOD = ("sha256 over: instruction JSON bytes; HF dataset folder files (bytes if <= 16 MiB, else "
               "size+mtime); per accepted image (relative path, size, mtime_ns); model folder files (same rule); "
               "preprocessing config")


@dataclass(frozen=True)
class HFSource:
    """A task read from a local `datasets.save_to_disk` folder; `columns` maps CoIN fields to its columns."""

    path: Path
    columns: dict[str, str] = field(default_factory=lambda: dict(_hf.DEFAULT_COLUMNS))


@dataclass(frozen=True)
class Plan:
    """What a run would do, known before any image is decoded: validated items, rejections, content hash."""

    tasks: list[str]
    image_root: Path
    config: dict[str, Any]
    splits: list[SplitRecords]
    content_hash: str


def plan(
    instructions: str | Path | None,
    images: str | Path,
    tasks: Sequence[str] | str,
    *,
    model_source: str = "tiny",
    model_kwargs: Mapping[str, Any] | None = None,
    max_length: int = 2048,
    max_rows: int | None = None,
    hf_datasets: Mapping[str, HFSource] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    _validate: Callable[..., SplitRecords] = validate_records,
    textvqa_annotations: str | Path | None = None,
) -> Plan:
    """Read and validate every task's records and hash inputs + config (in this process, no Ray, no decoding;
    `preprocess` passes `_validate` to run the validation in Ray tasks instead).

    instructions: folder with <Task>/train.json and <Task>/test.json (or val.json); may be None when every
    task comes from `hf_datasets`. images: the image root every record path is relative to.
    max_rows: keep at most this many valid records per split (the first ones). max_image_pixels: images
    with more pixels (width x height) are rejected as image_too_large (part of the hash: it decides which
    rows survive). textvqa_annotations: the TextVQA annotation JSON; TextVQA test rows then carry its 10 human
    answers as their reference (`pipelines._annotations`).
    """
    task_names = _check_args(tasks, max_length, max_rows, max_image_pixels)
    hf_datasets = dict(hf_datasets or {})
    unknown_hf = sorted(set(hf_datasets) - set(task_names))
    if unknown_hf:
        raise PipelineInputError(f"--hf-dataset names task(s) {unknown_hf} that are not in --tasks {task_names}")
    if instructions is None and set(task_names) - set(hf_datasets):
        raise PipelineInputError(f"tasks {sorted(set(task_names) - set(hf_datasets))} need --instructions "
                                 "(only --hf-dataset tasks can do without)")
    image_root = Path(images).expanduser().resolve()
    if not image_root.is_dir():
        raise PipelineInputError(f"image root {image_root} is not a folder: pass --images DIR")
    config = {
        "model_source": model_source, "model_kwargs": dict(model_kwargs or {}), "max_length": max_length,
        "max_rows_per_split": max_rows, "tasks": task_names, "encoding_version": ENCODING_VERSION,
        "hf_columns": {t: s.columns for t, s in sorted(hf_datasets.items())},
        "max_image_pixels": max_image_pixels,
    }
    hasher = ContentHasher()
    hasher.add_json("config", config)
    if model_source != "tiny":
        hasher.add_tree("model", Path(model_source).expanduser())
    else:  # the tiny model's tokenizer is code, not files: its vocabulary decides the stored token ids
        from coin_ray.models import VOCAB_WORDS

        hasher.add_json("tiny_vocabulary", list(VOCAB_WORDS))
    answers = None
    if textvqa_annotations is not None and "TextVQA" in task_names:
        answers, raw = load_textvqa_answers(textvqa_annotations)
        hasher.add("textvqa_annotations", raw)
    splits = _read_tasks(task_names, instructions, image_root, hf_datasets, max_rows, hasher, _validate, answers)
    config.update(instructions=None if instructions is None else str(Path(instructions).expanduser().resolve()),
                  images=str(image_root), hf_datasets={t: str(s.path) for t, s in sorted(hf_datasets.items())})
    return Plan(task_names, image_root, config, splits, hasher.hexdigest())


def preprocess(
    instructions: str | Path | None,
    images: str | Path,
    tasks: Sequence[str] | str,
    out: str | Path,
    *,
    model_source: str = "tiny",
    model_kwargs: Mapping[str, Any] | None = None,
    max_length: int = 2048,
    max_rows: int | None = None,
    force: bool = False,
    hf_datasets: Mapping[str, HFSource] | None = None,
    batch_size: int = 16,
    num_actors: int | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    textvqa_annotations: str | Path | None = None,
) -> dict[str, Any]:
    """Preprocess `tasks` into `out` and return the manifest (reused as is when the content hash matches).

    Arguments as for `plan`; force: recompute even on a hash match; batch_size, num_actors (concurrent
    encoding tasks; default: one per CPU in the Ray cluster) tune speed only and are not part of the hash. Starts
    a local Ray if none is running, and stops what it started.
    """
    started = time.perf_counter()
    problems = [f"{name} must be >= 1, got {value}" for name, value in
                (("batch_size", batch_size), ("num_actors", num_actors)) if value is not None and value < 1]
    if problems:
        raise PipelineInputError("; ".join(problems))
    out = Path(out).expanduser().resolve()
    _check_out_is_ours(out)
    validator = _RayValidator()  # starts Ray (if none is running) once the inputs are read without error
    try:
        p = plan(instructions, images, tasks, model_source=model_source, model_kwargs=model_kwargs,
                 max_length=max_length, max_rows=max_rows, hf_datasets=hf_datasets,
                 max_image_pixels=max_image_pixels, _validate=validator, textvqa_annotations=textvqa_annotations)

        manifest_path = out / "manifest.json"
        if not force and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("content_hash") == p.content_hash and manifest.get("version") == MANIFEST_VERSION:
                print(f"[preprocess] inputs unchanged (content hash {p.content_hash[:12]}): reusing {out}",
                      file=sys.stderr)
                return manifest

        tmp = out.parent / f".{out.name}.tmp-{p.content_hash[:12]}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        from coin_ray.phases import phase

        rows = sum(s.count for s in p.splits)
        blocks = sum(len(s.blocks) for s in p.splits)
        with phase("preprocessing", detail=f"{len(p.tasks)} tasks, {rows} rows in {blocks} blocks, to {out}",
                   total=blocks, unit="block") as ph:
            encoder_rejections = _encode(p.splits, tmp, model_source, p.config["model_kwargs"], max_length,
                                         batch_size, num_actors or validator.cpus or 1, max_image_pixels,
                                         on_block=ph.update)
            rejected = sum(len(s.rejections) for s in p.splits) + len(encoder_rejections)
            ph.done(f"{rows - len(encoder_rejections)} rows encoded, {rejected} records rejected (see "
                    f"{out / 'rejected.jsonl'})" if rejected else f"{rows} rows encoded")
    finally:
        validator.close()
    rejections = [r.to_json() for s in p.splits for r in s.rejections] + encoder_rejections
    rejections.sort(key=lambda r: (p.tasks.index(r["task"]), SPLITS.index(r["split"]), r["index"]))
    with open(tmp / "rejected.jsonl", "w") as f:
        for r in rejections:
            f.write(json.dumps(r) + "\n")

    summary = _split_summary(p.splits, rejections, tmp)
    manifest = {
        "version": MANIFEST_VERSION,
        "content_hash": p.content_hash,
        "hash_method": HASH_METHOD,
        "tasks": summary,
        "bytes_per_row": {task: _per_row(sum(s["bytes"] for s in splits.values()),
                                         sum(s["rows"] for s in splits.values()))
                          for task, splits in summary.items()},
        "config": p.config,
        "columns": stored_columns(model_source),
        "rejected_file": "rejected.jsonl",
        "seconds": round(time.perf_counter() - started, 3),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _swap_into_place(tmp, out)
    return manifest


def _check_args(tasks: Sequence[str] | str, max_length: int, max_rows: int | None,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[str]:
    from coin_ray.tasks import TASK_NAMES, get_task

    given = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    problems, names = [], []
    if not given:
        problems.append(f"--tasks is empty: name one or more of {', '.join(TASK_NAMES)}")
    for name in given:
        try:
            names.append(get_task(name).name)  # canonical spelling: it names folders in and out
        except ValueError as e:
            problems.append(str(e))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"--tasks names {dupes} more than once: list each task once")
    if max_length < 1:
        problems.append(f"max_length must be >= 1, got {max_length}")
    if max_rows is not None and max_rows < 1:
        problems.append(f"max_rows must be >= 1 (or None for all rows), got {max_rows}")
    if isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int) or max_image_pixels < 1:
        problems.append(f"max_image_pixels must be an integer >= 1 (width x height), got {max_image_pixels!r}")
    if problems:
        raise PipelineInputError("; ".join(problems))
    return names


def _check_out_is_ours(out: Path) -> None:
    """Refuse to replace a folder this pipeline did not write (it would be deleted by the swap)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "manifest.json").is_file())):
        raise PipelineInputError(
            f"--out {out} exists and is not a preprocessing output (no manifest.json): choose a new folder or "
            "empty it; the pipeline only replaces folders it wrote")


def _read_tasks(task_names: list[str], instructions: str | Path | None, image_root: Path,
                hf_datasets: dict[str, HFSource], max_rows: int | None, hasher: ContentHasher,
                validate: Callable[..., SplitRecords] = validate_records,
                textvqa_answers: dict[str, list[str]] | None = None) -> list[SplitRecords]:
    from coin_ray.tasks import get_task

    sources: list[tuple[str, str, str, Any, Any]] = []  # every file is read (and may fail) before any validation
    for task in task_names:
        reference = get_task(task).reference_from_record
        if task in hf_datasets:
            source = hf_datasets[task]
            path = source.path.expanduser().resolve()
            hasher.add_tree(f"hf/{task}", path)
            for split, (hf_split, ds) in _hf.load_splits(path).items():
                records = list(_hf.records(path, hf_split, ds, split, source.columns))
                sources.append((task, split, f"{path}[{hf_split}]", records, reference))
        else:
            for split, path in split_files(Path(instructions).expanduser(), task).items():
                records, raw = read_json_list(path)
                hasher.add(f"json/{task}/{split}", raw)
                if task == TEXTVQA and split == "test":
                    records = with_textvqa_answers(records, textvqa_answers, str(path))
                sources.append((task, split, str(path), records, reference))
    out = []
    for task, split, source, records, reference in sources:
        repeats = duplicate_ids(records, split)
        if repeats:  # train ids only name rows (kept); a test question is scored once (the repeats rejected)
            print(f"[preprocess] warning: {len(repeats)} {split} records of {task} in {source} repeat an earlier "
                  f"record's {'id' if split == 'train' else 'question_id'} (first: record {min(repeats)}): "
                  + ("kept, each trains as its own example" if split == "train" else
                     f"rejected as {DUPLICATE_ID} (see rejected.jsonl), the first record of each id kept"),
                  file=sys.stderr)
        out.append(validate(task, split, source, records, image_root, reference, max_rows,
                            duplicates=repeats if split != "train" else None))
    for s in out:
        hasher.add_fingerprints(f"images/{s.task}/{s.split}", s.fingerprint)
    return out


class _RayValidator:
    """`validate_records` over chunks of a split in Ray tasks, which keep the accepted items in the object store.

    The driver gets back only each chunk's verdicts (rejections, accepted indices, image fingerprints); with
    max_rows, chunks go out a wave at a time and stop once enough records are accepted. The first call
    starts a local Ray if none is running (`close` stops it) and has every worker process start importing
    the encoder's libraries, which overlaps with validation."""

    def __init__(self) -> None:
        self.cpus = 0
        self._own_ray = False

    def _start(self) -> None:
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
            self._own_ray = True
        # the cluster's CPUs, not the ones free this instant: right after other tasks finish, Ray's view of
        # free CPUs lags, and one sample would cap the whole run's concurrency (extra tasks simply queue)
        self.cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        for _ in range(self.cpus):  # one per worker process, most likely (each holds a CPU for a moment)
            _prefetch.remote()

    def close(self) -> None:
        if self._own_ray:
            ray.shutdown()
            self._own_ray = False

    def __call__(self, task: str, split: str, source: str, records: list[Any], image_root: Path, reference: Any,
                 max_rows: int | None, duplicates: dict[int, int] | None = None) -> SplitRecords:
        if not self.cpus:
            self._start()
        size = max(16, min(CHUNK_ROWS, math.ceil(len(records) / (4 * self.cpus))))
        starts = list(range(0, len(records), size))
        wave = len(starts) if max_rows is None else 2 * self.cpus
        metas: list[SplitRecords] = []
        blocks: list[Any] = []
        for w in range(0, len(starts), max(1, wave)):
            refs = [_validate_chunk.remote(task, split, source, to_portable(records[i:i + size]), image_root, i,
                                           {k: v for k, v in (duplicates or {}).items() if i <= k < i + size})
                    for i in starts[w:w + wave]]
            metas += ray.get([meta for meta, _ in refs])
            blocks += [block for _, block in refs]
            if max_rows is not None and sum(m.count for m in metas) >= max_rows:
                break
        merged, keep = merge_chunks(task, split, source, metas, max_rows)
        merged.blocks = [block if n == meta.count else _head.remote(block, n)
                         for block, meta, n in zip(blocks, metas, keep) if n]
        return merged


@ray.remote(num_returns=2)
def _validate_chunk(task: str, split: str, source: str, portable: list[Any], image_root: Path,
                    start: int, duplicates: dict[int, int] | None = None) -> tuple[SplitRecords, Any]:
    import pyarrow as pa

    from coin_ray.tasks import get_task
    from pipelines._encode import ITEM_SCHEMA

    checked = validate_records(task, split, source, from_portable(portable), image_root,
                               get_task(task).reference_from_record, start=start, duplicates=duplicates)
    table = pa.Table.from_pylist(checked.items, schema=ITEM_SCHEMA)
    checked.items = []
    return checked, table


@ray.remote
def _prefetch() -> None:
    prefetch_imports()


@ray.remote
def _head(table: Any, n: int) -> Any:
    return table.slice(0, n)


def _encode(splits: list[SplitRecords], tmp: Path, model_source: str, model_kwargs: dict[str, Any],
            max_length: int, batch_size: int, workers: int,
            max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
            on_block: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One Ray task per accepted block (the blocks the validation tasks left in the object store), at most
    `workers` at once: each encodes its block and writes its Parquet file, so encoded pixels never cross the
    object store and only small summaries come back. Returns the encoder's rejections. Needs a running Ray."""
    blocks = [b for s in sorted(splits, key=lambda s: SPLITS.index(s.split)) for b in s.blocks]
    settings = {"model_source": model_source, "model_kwargs": model_kwargs, "max_length": max_length,
                "max_image_pixels": max_image_pixels, "out": str(tmp), "batch_size": batch_size}
    pending: list[Any] = []
    summaries: list[dict[str, Any]] = []
    for block in blocks:
        if len(pending) >= workers:
            done, pending = ray.wait(pending, num_returns=1)
            summaries += [s for result in ray.get(done) for s in result]
            if on_block is not None:
                on_block(len(done))
        pending.append(_encode_block.remote(block, **settings))
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        summaries += [s for result in ray.get(done) for s in result]
        if on_block is not None:
            on_block(len(done))
    return [r for summary in summaries for r in json.loads(summary["rejected"])]


@ray.remote(num_cpus=1)
def _encode_block(items: Any, **settings: Any) -> list[dict[str, Any]]:
    return encode_items(items, **settings)


def _per_row(nbytes: int, rows: int) -> float | None:
    return round(nbytes / rows, 1) if rows else None


def _split_summary(splits: list[SplitRecords], rejections: list[dict[str, Any]], tmp: Path) -> dict[str, Any]:
    """Per task/split: kept rows (read from the Parquet footers), rejected count and kinds, source, Parquet
    bytes and bytes per row (None for no rows)."""
    import pyarrow.parquet as pq

    summary: dict[str, Any] = {}
    for s in splits:
        folder = tmp / s.task / s.split
        folder.mkdir(parents=True, exist_ok=True)  # an all-rejected split still has its folder
        files = sorted(folder.glob("*.parquet"))
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in files)
        nbytes = sum(p.stat().st_size for p in files)
        kinds: dict[str, int] = {}
        for r in rejections:
            if r["task"] == s.task and r["split"] == s.split:
                kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
        summary.setdefault(s.task, {})[s.split] = {
            "rows": rows, "rejected": sum(kinds.values()), "rejected_kinds": kinds, "source": s.source,
            "bytes": nbytes, "bytes_per_row": _per_row(nbytes, rows)}
    return summary


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` with renames: at every instant one complete output exists under some name."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _parse_hf(values: list[str], columns: str | None) -> dict[str, HFSource]:
    mapping = _hf.parse_columns(columns or "")
    sources = {}
    for value in values:
        task, sep, path = value.partition("=")
        if not sep or not task or not path:
            raise PipelineInputError(f"--hf-dataset {value!r} must be TASK=PATH, e.g. ScienceQA=/data/sqa_hf")
        sources[task.strip()] = HFSource(Path(path.strip()), mapping)
    return sources


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instructions", help="folder holding <Task>/train.json and test.json (or val.json)")
    parser.add_argument("--images", required=True, help="image root; record image paths are relative to it")
    parser.add_argument("--tasks", required=True, help="comma-separated task names, e.g. ScienceQA,Grounding")
    parser.add_argument("--out", required=True, help="output folder (Parquet per task/split + manifest.json)")
    parser.add_argument("--model", default="tiny", help="'tiny' or a local checkpoint folder (its processor is used)")
    parser.add_argument("--model-kwargs", default="{}", help='JSON kwargs for the tiny model, e.g. \'{"image_size": 336}\'')
    parser.add_argument("--max-length", type=int, default=2048, help="max tokens per training row (answers are cut)")
    parser.add_argument("--max-rows-per-split", type=int, default=None, help="keep the first N valid records per split")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="reject images with more pixels (width x height) as image_too_large (default: %(default)d)")
    parser.add_argument("--textvqa-annotations", default=None, metavar="FILE",
                        help="TextVQA annotation JSON: TextVQA test rows are scored against its 10 human answers")
    parser.add_argument("--force", action="store_true", help="recompute even when the content hash matches")
    parser.add_argument("--hf-dataset", action="append", default=[], metavar="TASK=PATH",
                        help="read TASK from a datasets.save_to_disk folder (repeatable)")
    parser.add_argument("--hf-columns", default=None, metavar="FIELD=COL,...",
                        help="CoIN field -> HF column, e.g. question=q,answer=a,image=img,id=qid")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per encoder batch")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="concurrent encoding tasks (default: one per CPU in the Ray cluster)")
    args = parser.parse_args(argv)
    try:
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as e:
            raise PipelineInputError(f"--model-kwargs is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(model_kwargs, dict):
            raise PipelineInputError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        manifest = preprocess(
            args.instructions, args.images, args.tasks, args.out, model_source=args.model,
            model_kwargs=model_kwargs, max_length=args.max_length, max_rows=args.max_rows_per_split,
            force=args.force, hf_datasets=_parse_hf(args.hf_dataset, args.hf_columns),
            batch_size=args.batch_size, num_actors=args.num_actors, max_image_pixels=args.max_image_pixels,
            textvqa_annotations=args.textvqa_annotations)
    except PipelineInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for task, splits in manifest["tasks"].items():
        for split, info in splits.items():
            print(f"{task:<10} {split:<5} rows={info['rows']:<7} rejected={info['rejected']}")
    print(f"manifest: {Path(args.out) / 'manifest.json'} (content hash {manifest['content_hash'][:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
