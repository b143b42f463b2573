"""Content hash of a preprocessing run: instruction files + images + preprocessing config.

What is hashed, and why:
- instruction JSON files and HF dataset folders' small files: their full bytes (they are small, and a
  one-character edit in an answer must invalidate the cache);
- images and other files above `FULL_BYTES_LIMIT` (model weights, big Arrow shards): (relative path, size,
  mtime_ns). Reading every byte of a 100 GB image tree on each run would cost longer than many
  preprocessing runs; an image replaced in place keeps neither its size nor its mtime in practice, and
  a copy that does not preserve mtimes only costs a recomputation (a false miss, never a false hit);
- the preprocessing config (model source and kwargs, max length, row cap, task list, pipeline version).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

FULL_BYTES_LIMIT = 16 * 1024 * 1024  # files up to this size are hashed by content, larger ones by stat


class ContentHasher:
    """A sha256 over tagged, length-prefixed parts, so no two different input sets can collide by concatenation."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def add(self, tag: str, payload: bytes) -> None:
        for part in (tag.encode(), payload):
            self._h.update(len(part).to_bytes(8, "little"))
            self._h.update(part)

    def add_json(self, tag: str, value: Any) -> None:
        self.add(tag, json.dumps(value, sort_keys=True, default=str).encode())

    def add_file(self, tag: str, path: Path) -> None:
        """Full bytes up to FULL_BYTES_LIMIT, (size, mtime_ns) above it."""
        st = path.stat()
        if st.st_size <= FULL_BYTES_LIMIT:
            self.add(tag, path.read_bytes())
        else:
            self.add_json(tag + ":stat", [st.st_size, st.st_mtime_ns])

    def add_tree(self, tag: str, root: Path) -> None:
        """Every regular file under `root`, in sorted order (a model or HF dataset folder)."""
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            self.add_file(f"{tag}/{path.relative_to(root).as_posix()}", path)

    def add_fingerprints(self, tag: str, rows: Iterable[Any]) -> None:
        self.add_json(tag, list(rows))

    def hexdigest(self) -> str:
        return self._h.hexdigest()
