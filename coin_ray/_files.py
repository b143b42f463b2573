"""Files and folders that a later step reads are written whole or not at all.

Small files that a later step reads (result.json, stages.json, eval cells, spool progress) are written
whole or not at all: into a temporary file beside the target, then renamed over it (`os.replace` is atomic on
one file system). A reader that still meets a torn or foreign file (written by an older version, or cut by a
full disk) gets None, as if the file were absent, and rebuilds it. Folders (a stage-store entry, the synthetic
benchmark, the pretrained base) are filled under a temporary name beside the target and renamed into place
(`write_dir_atomic`)."""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

__all__ = ["read_json", "write_dir_atomic", "write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` via a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_dir_atomic(target: str | os.PathLike, fill: Callable[[Path], None], *, replace: bool = False,
                     clear_torn: Callable[[], bool] | None = None) -> bool:
    """Fill a temporary folder `.tmp-<name>-<uuid>` beside `target` with `fill(folder)`, then rename it to
    `target`: a reader sees no folder or a whole one, and a crash leaves only the temporary folder.

    When `target` already exists: with `replace` it is removed first (a rebuild); otherwise another writer
    finished the same content first and theirs is kept, unless `clear_torn()` removes it as torn (then the
    rename is tried once more). Returns whether this call's folder was moved into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        fill(tmp)
        if replace and target.exists():
            shutil.rmtree(target)
        for attempt in range(2):
            try:
                os.rename(tmp, target)
                return True
            except OSError:
                if attempt or clear_torn is None or not clear_torn():
                    return False
        return False
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def read_json(path: str | os.PathLike) -> Any | None:
    """The decoded JSON of `path`, or None when it is absent, unreadable or not valid JSON (torn)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
