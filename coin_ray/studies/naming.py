"""Names built from values (trial names, MLflow run names, folders) that are safe for any value.

A value that is short and plain (`32`, `0.001`, `lora`, `tiny`) is written as it is; any other - a path such
as `/data/llava-1.5-7b-hf`, a long string, a list - becomes a short readable form (its last path component,
plain characters only, at most `READABLE_CHARS`) plus `~` and 6 hex digits of its hash, so two values never
share a label and no label holds a `/`, a space or anything else a file name or Tune's trial name refuses.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["READABLE_CHARS", "value_label"]

READABLE_CHARS = 24  # longest value written as it is
_PLAIN = re.compile(r"^[A-Za-z0-9_.+-]+$")


def value_label(value: Any) -> str:
    """`value` as it may appear in a name: itself when plain and short, else `<readable>~<hash6>`."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, (bool, int, float)) or value is None:
        text = str(value)
    if len(text) <= READABLE_CHARS and _PLAIN.match(text):
        return text
    tail = text.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    readable = re.sub(r"[^A-Za-z0-9_.+-]+", "_", tail).strip("_.")[:READABLE_CHARS - 8] or "value"
    return f"{readable}~{hashlib.sha256(text.encode()).hexdigest()[:6]}"
