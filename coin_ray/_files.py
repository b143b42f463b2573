"""Small files that a later step reads (result.json, stages.json, eval cells, spool progress) are written
whole or not at all: into a temporary file beside the target, then renamed over it (`os.replace` is atomic on
one file system). A reader that still meets a torn or foreign file (written by an older version, or cut by a
full disk) gets None, as if the file were absent, and rebuilds it."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_json_atomic", "write_text_atomic"]


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


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1, default=str))


def read_json(path: str | os.PathLike) -> Any | None:
    """The decoded JSON of `path`, or None when it is absent, unreadable or not valid JSON (torn)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
