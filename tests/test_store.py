"""Stage store: content keys, atomic writes, verification, races, pruning."""
import json
import threading

from coin_ray.training.store import StageStore, stage_key


def _write(payload):
    def write(directory):
        (directory / "w.bin").write_bytes(payload)
    return write


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
    removed = store.prune(max_bytes=2500)
    assert removed == ["k0"]
    meta = json.loads((tmp_path / "k1" / "meta.json").read_text())
    meta["created"] -= 10_000
    (tmp_path / "k1" / "meta.json").write_text(json.dumps(meta))
    assert store.prune(older_than_s=5000) == ["k1"]


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
