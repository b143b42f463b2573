"""Content-addressed stage store: a trained stage's checkpoint and evaluation rows, keyed by what fixed them.

A stage's result is fixed by (model, tuner, training config, seed, data hashes, task prefix). The same key
serves three things: resuming a crashed run (finished stages are found, not retrained), sharing prefixes
across the orders of a sweep (A>B>C and A>B>D train A and A>B once), and reruns of a sweep.

Layout under the store root::

    <root>/<key>/                  one finished stage (complete or absent, never torn)
        checkpoint/                adapter + trainable parts (safetensors + JSON), optimizer/scheduler state
        meta.json                  the key material, creation time, sha256 of every checkpoint file, and what
                                   training it cost (`accounting`: examples, tokens, seconds, device kind)
        eval/<Task>.json           one evaluation cell (+ knowledge score, sample predictions), added lazily

Writes are atomic: a stage is written into ``<root>/.tmp-<key>-<uuid>`` and renamed into place. Trials that
run at the same time and need the same prefix do not both train it: the first takes a claim
(``<root>/.claim-<key>``, created exclusively, heartbeated while it trains) and the others wait for the entry;
a claim whose owner died is taken over. Should two writers still race (a stale claim taken over while its
owner was only slow), both produce identical results (fixed seeds) and the loser's rename fails and its copy
is discarded. Every read verifies the checksums in meta.json; a corrupt entry is
moved aside (``<root>/.corrupt-<key>-<uuid>``) and treated as a miss. A key folder without meta.json (left by a
crash) is moved aside by the next `put` of that key, so the key is reused, never poisoned. A read that fails
with a transient OSError (NFS hiccup) is retried a few times before it counts.

Upkeep (`prune`, `scan`; CLI: coin_ray/training/store_cli.py): entries are deleted by renaming them to
``<root>/.deleting-<key>-<uuid>`` first, so an interrupted prune never leaves a half-deleted key folder; an entry
with a live claim or touched within the grace period is never deleted.
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
from typing import Any, Callable, Iterator, TypeVar

from coin_ray._files import read_json, write_json_atomic

STORE_VERSION = 1
READ_ATTEMPTS = 4  # tries of a read that fails with a transient OSError
READ_RETRY_S = (0.05, 0.2, 0.5)  # sleeps between them
DEFAULT_GRACE_S = 600.0  # prune keeps entries created or given an evaluation cell this recently
LEFTOVER_PREFIXES = (".tmp-", ".corrupt-", ".stale-claim-", ".deleting-", ".torn-")
LEFTOVER_AGE_S = 3600.0  # leftovers younger than this may still be in use (a put in progress)
T = TypeVar("T")


def _transient(error: OSError) -> bool:
    """An OSError that a retry may cure (EIO, ESTALE, EAGAIN...), unlike a missing file or a refused access."""
    return not isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError))


def retry_read(read: Callable[[], T], attempts: int = READ_ATTEMPTS) -> T:
    """`read()`, retried with short sleeps while it fails with a transient OSError; the last error propagates."""
    for attempt in range(attempts):
        try:
            return read()
        except OSError as error:
            if attempt == attempts - 1 or not _transient(error):
                raise
            time.sleep(READ_RETRY_S[min(attempt, len(READ_RETRY_S) - 1)])
    raise AssertionError("unreachable")


def read_meta(path: Path) -> dict[str, Any] | None:
    """The meta.json of the entry folder `path`: None when there is none; ValueError when it is not a JSON
    object (corrupt); a transient OSError is retried (see `retry_read`)."""
    try:
        text = retry_read((path / "meta.json").read_text)
    except (FileNotFoundError, NotADirectoryError):
        return None
    meta = json.loads(text)
    if not isinstance(meta, dict):
        raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
    return meta


def meta_state(path: Path) -> tuple[str, dict[str, Any] | None, str | None]:
    """(state, meta, problem) of an entry folder: "ok" with its meta; "missing" (no meta.json: a crashed write
    or delete), "corrupt" (not a JSON object) or "unreadable" (an OSError that retrying did not cure), each
    with a one-line problem."""
    try:
        meta = read_meta(path)
    except ValueError as e:
        return "corrupt", None, f"meta.json is not valid ({e})"
    except OSError as e:
        return "unreadable", None, f"meta.json cannot be read ({type(e).__name__}: {e})"
    if meta is None:
        return "missing", None, "no meta.json (an interrupted write or prune)"
    return "ok", meta, None


@dataclass(frozen=True)
class StoreItem:
    """One folder of the store as `StageStore.scan` sees it. `problem` is None for a usable entry."""

    key: str
    meta: dict[str, Any] | None
    size: int  # bytes
    created: float  # meta's creation time (the folder's mtime when meta is unusable)
    active: float  # newest of: created, the folder's and its eval folder's mtimes (a new eval cell)
    problem: str | None = None
    state: str = "ok"  # see meta_state

    @property
    def prefix(self) -> str:
        material = (self.meta or {}).get("material") or {}
        return ">".join(material.get("prefix", [])) if isinstance(material, dict) else ""


@dataclass(frozen=True)
class Pruned:
    """One entry that `prune` deleted (or, in a dry run, would delete) and why."""

    key: str
    size: int
    reason: str


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
        try:
            meta = read_meta(path)
            if meta is None:
                return None
            for rel, digest in meta["files"].items():
                if retry_read(lambda: _sha256(path / rel)) != digest:
                    raise ValueError(f"checksum mismatch for {rel}")
        except OSError as e:
            if _transient(e):  # still failing after the retries: an I/O problem, not a corrupt entry
                raise OSError(e.errno, f"stage store: cannot read entry {key} under {self.root} ({e}); "
                                       "check the file system and rerun") from e
            return self._move_aside(key, e)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return self._move_aside(key, e)
        return StageEntry(key, path)

    def _move_aside(self, key: str, error: BaseException) -> None:
        aside = self.root / f".corrupt-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(self.root / key, aside)
        except OSError:
            pass
        print(f"[coin-ray] stage store: entry {key} failed verification ({error}); moved to {aside.name}, "
              "retraining")
        return None

    def _clear_torn(self, key: str) -> bool:
        """Move a key folder without meta.json (a crashed write or delete) out of the way, then delete it.
        True when one was cleared. A complete entry (meta.json present) is never touched."""
        path = self.root / key
        if not path.is_dir() or meta_state(path)[0] != "missing":
            return False
        torn = self.root / f".torn-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(path, torn)
        except OSError:  # another writer cleared or replaced it first
            return False
        print(f"[coin-ray] stage store: key folder {key} had no meta.json (an interrupted write or prune); "
              "removed it, the key is written again", flush=True)
        shutil.rmtree(torn, ignore_errors=True)
        return True

    def put(self, key: str, material: dict[str, Any], write_checkpoint: Callable[[Path], None],
            extra_meta: dict[str, Any] | None = None) -> StageEntry:
        """Write a stage: `write_checkpoint(dir)` fills the checkpoint folder; then checksum and rename.
        `extra_meta` joins meta.json (e.g. the stage's measured cost, `accounting`)."""
        from coin_ray._files import write_dir_atomic

        def fill(tmp: Path) -> None:
            (tmp / "checkpoint").mkdir()
            (tmp / "eval").mkdir()
            write_checkpoint(tmp / "checkpoint")
            files = {
                str(p.relative_to(tmp)): _sha256(p)
                for p in sorted((tmp / "checkpoint").rglob("*")) if p.is_file()
            }
            meta = {"key": key, "material": material, "created": time.time(), "files": files, **(extra_meta or {})}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

        # a torn key folder is cleared and the rename tried once more; otherwise another writer finished the
        # same stage first: theirs is kept (identical by construction)
        write_dir_atomic(self.root / key, fill, clear_torn=lambda: self._clear_torn(key))
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
        return take_claim(self.root / f".claim-{key}", lambda: self.get(key), poll_s=poll_s, stale_s=stale_s,
                          what=f"waiting for stage {key[:12]}", why="another trial is training it")

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
    def scan(self) -> list[StoreItem]:
        """Every key folder, oldest first: usable entries and broken ones (with `problem` set), never raising
        for one bad folder. Dot-folders (temporary, claims, leftovers) are not entries."""
        items = []
        for path in self.root.iterdir():
            if path.name.startswith("."):
                continue
            try:
                if not path.is_dir():
                    continue
                state, meta, problem = meta_state(path)
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                mtimes = [path.stat().st_mtime] + ([(path / "eval").stat().st_mtime] if (path / "eval").is_dir() else [])
            except FileNotFoundError:  # deleted or moved aside while we looked
                continue
            except OSError as e:
                state, meta, problem, size, mtimes = "unreadable", None, f"cannot be read ({e})", 0, [0.0]
            created = meta.get("created") if meta else None
            if not isinstance(created, (int, float)):
                created = mtimes[0]
                if state == "ok":
                    state, problem = "corrupt", "meta.json has no creation time"
            items.append(StoreItem(path.name, meta, size, float(created), max([float(created)] + mtimes),
                                   problem, state))
        return sorted(items, key=lambda i: (i.created, i.key))

    def entries(self) -> Iterator[tuple[str, dict[str, Any], int]]:
        """(key, meta, size in bytes) of every usable entry, oldest first (broken ones: see `scan`)."""
        for item in self.scan():
            if item.problem is None:
                yield item.key, item.meta, item.size

    def claimed(self, key: str, stale_s: float = 120.0) -> bool:
        """True while a live claim (see `claim`) holds `key`."""
        path = self.root / f".claim-{key}"
        return path.exists() and not _claim_is_stale(path, stale_s)

    def delete(self, key: str) -> bool:
        """Delete one entry: renamed to a dot-folder first (atomic), so a crash midway leaves no torn key folder
        and readers see it whole or gone. True when this call removed it."""
        gone = self.root / f".deleting-{key}-{uuid.uuid4().hex[:8]}"
        try:
            os.replace(self.root / key, gone)
        except FileNotFoundError:
            return False
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def prune(self, *, older_than_s: float | None = None, max_bytes: int | None = None,
              grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False) -> list[Pruned]:
        """Delete broken entries (no meta.json, corrupt meta.json), then entries created more than
        `older_than_s` ago, then the oldest until the store fits `max_bytes`. Never deleted: an entry a live
        claim holds, one created or given an evaluation cell within `grace_s`, one whose meta.json cannot be read
        right now (reported by `scan` instead). Leftover dot-folders older than an hour go too. With
        `dry_run`, nothing is deleted: the list says what would be. Returns the deleted entries, in order."""
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be > 0, got {max_bytes}")
        now = time.time()
        if not dry_run:
            for path in self.root.iterdir():
                try:
                    old = path.name.startswith(LEFTOVER_PREFIXES) and now - path.stat().st_mtime > LEFTOVER_AGE_S
                except FileNotFoundError:
                    continue
                if old and path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif old:
                    path.unlink(missing_ok=True)
        pruned: list[Pruned] = []
        kept: list[StoreItem] = []
        for item in self.scan():
            protected = item.state == "unreadable" or now - item.active < grace_s or self.claimed(item.key)
            if protected:
                kept.append(item)
            elif item.problem is not None:
                pruned.append(Pruned(item.key, item.size, f"broken: {item.problem}"))
            elif older_than_s is not None and now - item.created > older_than_s:
                pruned.append(Pruned(item.key, item.size, f"older than {older_than_s / 86400:g} days"))
            else:
                kept.append(item)
        if max_bytes is not None:
            total = sum(item.size for item in kept)
            for item in list(kept):
                if total <= max_bytes:
                    break
                if item.problem is None and now - item.active >= grace_s and not self.claimed(item.key):
                    pruned.append(Pruned(item.key, item.size, f"store above {max_bytes / 1e9:g} GB"))
                    total -= item.size
        if not dry_run:
            pruned = [p for p in pruned if self.delete(p.key)]
        return pruned


def take_claim(path: Path, ready: Callable[[], T | None], *, what: str, poll_s: float = 0.5,
               stale_s: float = 120.0, why: str = "another process holds it") -> "StageClaim | T":
    """The exclusive right to produce something (a stage, an assembled model), or what `ready()` returns once
    another process has produced it. `path` is the claim file, created exclusively and heartbeated; a claim
    whose owner died (same host, process gone) or stopped heartbeating for `stale_s` seconds is taken over.
    A wait is a phase (`coin_ray.phases`): "<what>: started (<why>; ...)" once it begins, "<what>: done in N s
    (...)" when it ends, e.g. what="waiting for stage K", why="another trial is training it"."""
    from coin_ray.phases import say

    announced = False
    waited = time.monotonic()

    def waited_for(outcome: str) -> None:
        if announced:
            say(f"{what}: done in {time.monotonic() - waited:.1f} s ({outcome})")

    while True:
        done = ready()
        if done is not None:
            waited_for("the other process finished it: reused")
            return done
        token = uuid.uuid4().hex
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _claim_is_stale(path, stale_s):
                try:  # only one of several waiters wins this rename; the others see the new claim
                    os.replace(path, path.parent / f".stale-{path.name.lstrip('.')}-{token[:8]}")
                except OSError:
                    pass
                continue
            if not announced:
                say(f"{what}: started ({why}; checked every {poll_s:g} s, taken over if it stops for {stale_s:g} s)")
                announced = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "token": token, "time": time.time()}, f)
        waited_for("the other process stopped: taken over here")
        return StageClaim(path, token, heartbeat_s=stale_s / 4)


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
