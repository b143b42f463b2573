"""Stage store: content keys, atomic writes, verification, races, pruning."""
import json
import os
import threading
import time

from coin_ray.training.store import StageStore, stage_key


def _write(payload):
    def write(directory):
        (directory / "w.bin").write_bytes(payload)
    return write


def _age(entry, seconds):
    """Make an entry look `seconds` old: its creation time and its folders' mtimes."""
    import os

    meta = json.loads((entry / "meta.json").read_text())
    meta["created"] -= seconds
    (entry / "meta.json").write_text(json.dumps(meta))
    for path in (entry, entry / "eval"):
        old = path.stat().st_mtime - seconds
        os.utime(path, (old, old))


def test_key_is_content(tmp_path):
    a = stage_key({"prefix": ["A"], "lr": 1e-3})
    assert a == stage_key({"lr": 1e-3, "prefix": ["A"]})
    assert a != stage_key({"prefix": ["A"], "lr": 2e-3})
    assert a != stage_key({"prefix": ["A", "B"], "lr": 1e-3})


def test_put_get_verify_and_corruption(tmp_path):
    store = StageStore(tmp_path)
    assert store.get("k1") is None
    entry = store.put("k1", {"x": 1}, _write(b"abc"))
    assert (entry.checkpoint / "w.bin").read_bytes() == b"abc"
    assert store.get("k1").meta()["material"] == {"x": 1}
    StageStore.write_eval(entry.path, "GQA-1", {"score": 0.5})
    assert StageStore.read_eval(entry.path, "GQA-1") == {"score": 0.5}
    (entry.checkpoint / "w.bin").write_bytes(b"abd")  # torn / corrupted
    assert store.get("k1") is None
    assert not (tmp_path / "k1").exists() and any(p.name.startswith(".corrupt-k1") for p in tmp_path.iterdir())


def test_concurrent_writers_leave_one_complete_entry(tmp_path):
    store = StageStore(tmp_path)
    errors = []

    def writer():
        try:
            store.put("race", {"x": 1}, _write(b"same"))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    assert store.get("race") is not None
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".corrupt")] == ["race"]


def test_prune_by_size_and_age(tmp_path):
    store = StageStore(tmp_path)
    for i in range(3):
        store.put(f"k{i}", {"i": i}, _write(b"x" * 1000))
    assert [k for k, _, _ in store.entries()] == ["k0", "k1", "k2"]
    assert store.prune(max_bytes=2500) == []  # every entry is within the grace period
    assert [p.key for p in store.prune(max_bytes=2500, grace_s=0, dry_run=True)] == ["k0"]
    assert (tmp_path / "k0").is_dir()  # a dry run deletes nothing
    removed = store.prune(max_bytes=2500, grace_s=0)
    assert [p.key for p in removed] == ["k0"] and removed[0].size >= 1000 and "above" in removed[0].reason
    _age(tmp_path / "k1", 10_000)
    assert [p.key for p in store.prune(older_than_s=5000)] == ["k1"]  # old enough to leave the grace period
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deleting-")]


def test_a_second_trainer_waits_for_the_claimed_stage_and_reuses_it(tmp_path):
    from coin_ray.training.store import StageClaim, StageEntry

    store = StageStore(tmp_path)
    claim = store.claim("k")
    assert isinstance(claim, StageClaim)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("x", store.claim("k", poll_s=0.05)))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the second trainer must wait while the stage is claimed"
    store.put("k", {}, _write(b"trained once"))
    claim.release()
    waiter.join(5)
    assert isinstance(got["x"], StageEntry) and (got["x"].checkpoint / "w.bin").read_bytes() == b"trained once"
    assert not (tmp_path / ".claim-k").exists()


def test_a_claim_whose_owner_died_is_taken_over(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from coin_ray.training.store import StageClaim

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".claim-k").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout),
                                                   "token": "old"}))
    claim = StageStore(tmp_path).claim("k", poll_s=0.05)
    assert isinstance(claim, StageClaim)
    assert json.loads((tmp_path / ".claim-k").read_text())["pid"] == os.getpid()
    claim.release()
    # a claim that stopped heartbeating is stale after stale_s even when its owner cannot be checked
    (tmp_path / ".claim-k").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "old"}))
    old = os.stat(tmp_path / ".claim-k").st_mtime - 10
    os.utime(tmp_path / ".claim-k", (old, old))
    assert isinstance(StageStore(tmp_path).claim("k", stale_s=5), StageClaim)


def test_a_key_folder_without_meta_is_cleared_and_the_key_reused(tmp_path):
    store = StageStore(tmp_path)
    (tmp_path / "k" / "checkpoint").mkdir(parents=True)  # what a crash midway through deleting leaves
    (tmp_path / "k" / "checkpoint" / "w.bin").write_bytes(b"half")
    assert store.get("k") is None
    entry = store.put("k", {"x": 1}, _write(b"fresh"))
    assert (entry.checkpoint / "w.bin").read_bytes() == b"fresh" and store.get("k") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]
    (tmp_path / "z").mkdir()  # an empty key folder (rename replaces it) is fine too
    assert store.ensure_eval_dir("z", {}) == tmp_path / "z" / "eval" and store.get("z") is not None


def _broken_store(tmp_path):
    store = StageStore(tmp_path)
    for key in ("good", "old"):
        store.put(key, {"prefix": ["A"]}, _write(b"x" * 100))
    _age(tmp_path / "old", 30 * 86400)
    (tmp_path / "torn" / "checkpoint").mkdir(parents=True)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    for key in ("torn", "bad"):
        old = time.time() - 7200
        os.utime(tmp_path / key, (old, old))
    return store


def test_list_and_prune_report_broken_entries_and_go_on(tmp_path, capsys):
    from coin_ray.training.store_cli import main

    store = _broken_store(tmp_path / "stage_store")
    states = {i.key: i.state for i in store.scan()}
    assert states == {"good": "ok", "old": "ok", "torn": "missing", "bad": "corrupt"}
    assert [k for k, _, _ in store.entries()] == ["old", "good"]
    assert main(["list", "--storage-path", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    broken = [line for line in out if "BROKEN" in line]
    assert len(broken) == 2 and any(line.startswith("torn") and "no meta.json" in line for line in broken)
    assert any(line.startswith("bad") and "meta.json is not valid" in line for line in broken)

    assert main(["prune", "--storage-path", str(tmp_path), "--older-than-days", "7"]) == 0  # dry run
    out = capsys.readouterr().out
    assert "would remove 3 entries" in out and "--yes" in out
    assert {"would remove torn", "would remove bad", "would remove old"} <= {" ".join(l.split()[:3]) for l in out.splitlines()}
    assert sorted(p.name for p in (tmp_path / "stage_store").iterdir()) == ["bad", "good", "old", "torn"]
    assert main(["prune", "--storage-path", str(tmp_path), "--older-than-days", "7", "--yes"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "stage_store").iterdir()) == ["good"]


def test_prune_keeps_claimed_and_recent_entries(tmp_path):
    store = StageStore(tmp_path)
    for key in ("claimed", "recent", "idle"):
        store.put(key, {}, _write(b"x" * 100))
    for key in ("claimed", "idle"):
        _age(tmp_path / key, 3600)
    claim = store.claim("other")
    (tmp_path / ".claim-claimed").write_text((tmp_path / ".claim-other").read_text())  # a live claim (this pid)
    try:
        assert [p.key for p in store.prune(max_bytes=1, dry_run=True)] == ["idle"]
        StageStore.write_eval(tmp_path / "idle", "GQA-1", {"score": 1.0})  # a new cell: active again
        assert store.prune(max_bytes=1) == []
    finally:
        claim.release()
    assert sorted(k for k, _, _ in store.entries()) == ["claimed", "idle", "recent"]


def test_prune_refuses_a_size_of_zero(tmp_path, capsys):
    import pytest

    from coin_ray.training.store_cli import main

    store = StageStore(tmp_path / "stage_store")
    store.put("k", {}, _write(b"x"))
    for bad in ("0", "-1", "nan"):
        assert main(["prune", "--storage-path", str(tmp_path), "--max-gb", bad, "--yes"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --max-gb must be > 0") and "\n" not in err
    with pytest.raises(ValueError, match="max_bytes must be > 0"):
        store.prune(max_bytes=0)
    assert store.get("k") is not None


def test_transient_read_errors_are_retried_not_taken_as_corruption(tmp_path):
    import errno

    import pytest

    from coin_ray.training.store import retry_read

    calls = []

    def flaky():  # what an NFS hiccup looks like to a reader: EIO twice, then the data
        calls.append(1)
        if len(calls) < 3:
            raise OSError(errno.EIO, "Input/output error")
        return "data"

    assert retry_read(flaky) == "data" and len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):  # a missing file is an answer, not a hiccup: no retry
        retry_read(lambda: calls.append(1) or (tmp_path / "nope").read_text())
    assert len(calls) == 1
    with pytest.raises(OSError, match="Input/output"):  # a persistent error propagates after the tries
        retry_read(lambda: (_ for _ in ()).throw(OSError(errno.EIO, "Input/output error")))
