"""Content-addressed stage store: a trained stage's checkpoint and evaluation rows, keyed by what fixed them.

A stage's result is fixed by (model, tuner, training config, seed, data hashes, task prefix). The same key
serves three things: resuming a crashed run (finished stages are found, not retrained), sharing prefixes
across the orders of a sweep (A>B>C and A>B>D train A and A>B once), and reruns of a sweep.

Layout under the store root::

    <root>/<key>/                  one finished stage (complete or absent, never torn)
        checkpoint/                adapter + trainable parts (safetensors + JSON), optimizer/scheduler state
        meta.json                  the key material, creation time, sha256 of every checkpoint file
        eval/<Task>.json           one evaluation cell (+ knowledge score, sample predictions), added lazily

Writes are atomic: a stage is written into ``<root>/.tmp-<key>-<uuid>`` and renamed into place. Trials that
run at the same time and need the same prefix do not both train it: the first takes a claim
(``<root>/.claim-<key>``, created exclusively, heartbeated while it trains) and the others wait for the entry;
a claim whose owner died is taken over. Should two writers still race (a stale claim taken over while its
owner was only slow), both produce identical results (fixed seeds) and the loser's rename fails and its copy
is discarded. Every read verifies the checksums in meta.json; a corrupt entry is
moved aside (``<root>/.corrupt-<key>-<uuid>``) and treated as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from coin_ray._files import read_json, write_json_atomic

STORE_VERSION = 1


def stage_key(material: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of everything that determines a stage's result (first 24 hex digits)."""
    from coin_ray.identity import short_hash

    return short_hash({"store_version": STORE_VERSION, **material})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StageEntry:
    key: str
    path: Path

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / "meta.json").read_text())


class StageStore:
    """A folder of finished stages. Safe for concurrent readers and writers on one file system."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # ---- stages -------------------------------------------------------------------------------------
    def get(self, key: str) -> StageEntry | None:
        """The finished stage for `key`, verified, or None (a corrupt entry is moved aside)."""
        path = self.root / key
        if not (path / "meta.json").is_file():
            return None
        try:
            meta = json.loads((path / "meta.json").read_text())
            for rel, digest in meta["files"].items():
                if _sha256(path / rel) != digest:
                    raise ValueError(f"checksum mismatch for {rel}")
        except (OSError, ValueError, KeyError) as e:
            aside = self.root / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(path, aside)
            except OSError:
                pass
            print(f"[coin-ray] stage store: entry {key} failed verification ({e}); moved to {aside.name}, retraining")
            return None
        return StageEntry(key, path)

    def put(self, key: str, material: dict[str, Any], write_checkpoint: Callable[[Path], None]) -> StageEntry:
        """Write a stage: `write_checkpoint(dir)` fills the checkpoint folder; then checksum and rename."""
        tmp = self.root / f".tmp-{key}-{uuid.uuid4().hex}"
        (tmp / "checkpoint").mkdir(parents=True)
        (tmp / "eval").mkdir()
        try:
            write_checkpoint(tmp / "checkpoint")
            files = {
                str(p.relative_to(tmp)): _sha256(p)
                for p in sorted((tmp / "checkpoint").rglob("*")) if p.is_file()
            }
            meta = {"key": key, "material": material, "created": time.time(), "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            try:
                os.rename(tmp, self.root / key)
            except OSError:
                # Another writer finished the same stage first: keep theirs (identical by construction).
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = self.get(key)
        if entry is None:  # pragma: no cover - only if the winner's entry was corrupted meanwhile
            raise RuntimeError(f"stage store entry {key} vanished after writing under {self.root}")
        return entry

    # ---- claims: one trainer per stage --------------------------------------------------------------
    def claim(self, key: str, *, poll_s: float = 0.5, stale_s: float = 120.0) -> "StageClaim | StageEntry":
        """Take the right to train `key`, or wait for whoever holds it.

        Returns a `StageClaim` (train, `put`, then `release()` it; it heartbeats meanwhile) or, when another
        trial finished the stage while this one waited, that `StageEntry`. A claim whose owner died (same
        host, process gone) or stopped heartbeating for `stale_s` seconds is taken over, so a crash never
        blocks the stage forever."""
        path = self.root / f".claim-{key}"
        announced = False
        while True:
            entry = self.get(key)
            if entry is not None:
                return entry
            token = uuid.uuid4().hex
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if _claim_is_stale(path, stale_s):
                    try:  # only one of several waiters wins this rename; the others see the new claim
                        os.replace(path, self.root / f".stale-claim-{key}-{token[:8]}")
                    except OSError:
                        pass
                    continue
                if not announced:
                    print(f"[coin-ray] stage store: stage {key} is being trained by another trial; waiting for it",
                          flush=True)
                    announced = True
                time.sleep(poll_s)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": time.time()}, f)
            return StageClaim(path, token, heartbeat_s=stale_s / 4)

    def ensure_eval_dir(self, key: str, material: dict[str, Any]) -> Path:
        """An entry with no checkpoint (the zero-shot row of the base model): created if absent."""
        path = self.root / key
        if not (path / "meta.json").is_file():
            self.put(key, material, lambda d: None)
        return path / "eval"

    # ---- evaluation cells ---------------------------------------------------------------------------
    @staticmethod
    def read_eval(entry_path: Path, task: str) -> dict[str, Any] | None:
        cell = read_json(entry_path / "eval" / f"{task}.json")
        return cell if isinstance(cell, dict) else None

    @staticmethod
    def write_eval(entry_path: Path, task: str, cell: dict[str, Any]) -> None:
        (entry_path / "eval").mkdir(exist_ok=True)
        write_json_atomic(entry_path / "eval" / f"{task}.json", cell)

    # ---- housekeeping -------------------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        """(key, meta, size in bytes) of every finished entry, oldest first."""
        rows = []
        for path in self.root.iterdir():
            if path.name.startswith(".") or not (path / "meta.json").is_file():
                continue
            meta = json.loads((path / "meta.json").read_text())
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            rows.append((meta.get("created", 0.0), path.name, meta, size))
        for _, key, meta, size in sorted(rows, key=lambda r: r[0]):
            yield key, meta, size

    def prune(self, *, older_than_s: float | None = None, max_bytes: int | None = None) -> list[str]:
        """Delete entries older than `older_than_s`, then the oldest until the store fits `max_bytes`.
        Leftover temporary and corrupt folders are removed too. Returns the deleted keys."""
        removed: list[str] = []
        for path in self.root.iterdir():
            if path.name.startswith((".tmp-", ".corrupt-", ".stale-claim-")) and time.time() - path.stat().st_mtime > 3600:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        entries = list(self.entries())
        now = time.time()
        keep = []
        for key, meta, size in entries:
            if older_than_s is not None and now - meta.get("created", now) > older_than_s:
                shutil.rmtree(self.root / key, ignore_errors=True)
                removed.append(key)
            else:
                keep.append((key, size))
        if max_bytes is not None:
            total = sum(size for _, size in keep)
            for key, size in keep:
                if total <= max_bytes:
                    break
                shutil.rmtree(self.root / key, ignore_errors=True)
                removed.append(key)
                total -= size
        return removed


def _claim_is_stale(path: Path, stale_s: float) -> bool:
    try:
        age = time.time() - path.stat().st_mtime
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # being written right now, or garbage: judge by age alone
        return age > stale_s
    if owner.get("host") == socket.gethostname():
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            pass
    return age > stale_s


class StageClaim:
    """This process's right to train one stage; heartbeats (touches its file) until released."""

    def __init__(self, path: Path, token: str, heartbeat_s: float) -> None:
        self.path, self.token = path, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"stage-claim-{path.name}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
