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
