"""End-to-end sweeps through the real scripts: Ray Tune trials, one Ray Train worker each, MLflow sqlite.

Slow tier (`pytest -m slow`): each Tune trial starts a Train worker group (15-20 s on 2 cores)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train.max_steps=8", "--set", "model.pretrain_steps=0", "--set", "data.train_rows=48",
        "--set", "data.test_rows=8", "--set", "eval.batch_size=8"]


def _run(script: str, *args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    return proc


@pytest.mark.slow
def test_task_order_smoke_sweep_cache_and_mlflow(tmp_path):
    from mlflow import MlflowClient

    from coin_ray.evaluation import cl_metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--smoke-test", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
              "--experiment", "smoke", *TINY]
    first = _run("task_order.py", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stages trained: 15, stages reused from the stage store: 3" in first.stdout
    assert "mlflow ui --backend-store-uri" in first.stdout and "#/experiments/" in first.stdout

    second = _run("task_order.py", *common, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stages trained: 0, stages reused from the stage store: 18" in second.stdout

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6, "a rerun must reopen runs, not duplicate them"
    sweep = parents[0]
    assert sweep.data.metrics["stages_reused"] == 18 and sweep.data.metrics["stages_trained"] == 0
    orders = sorted(r.data.params["task_order"] for r in children)
    assert len(set(orders)) == 6 and all(o.count(">") == 2 for o in orders)
    child = children[0]
    assert child.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    path = client.download_artifacts(child.info.run_id, "eval_matrix.json", str(tmp_path))
    payload = json.loads(Path(path).read_text())
    assert payload["tasks"] == child.data.params["task_order"].split(">")
    expected = cl_metrics(payload["matrix"])
    for key in ("mft", "mfn", "bwt", "forgetting"):
        assert math.isclose(child.data.metrics[key], expected[key], abs_tol=1e-9), key
    history = client.get_metric_history(child.info.run_id, f"acc/{payload['tasks'][0]}")
    assert sorted({m.step for m in history}) == [0, 1, 2]

    # the same orders without the cache give the same final matrices
    uncached = _run("task_order.py", "--smoke-test", "--no-cache", "--no-tracking", "--storage-path",
                    str(tmp_path / "runs-uncached"), *TINY, cwd=tmp_path)
    assert uncached.returncode == 0, uncached.stderr[-3000:]
    assert "stages trained: 18, stages reused from the stage store: 0" in uncached.stdout
    cached_results = {p.parent.name: json.loads(p.read_text())["matrix"]
                      for p in (tmp_path / "runs" / "runs").glob("*/result.json")}
    uncached_results = {p.parent.name: json.loads(p.read_text())["matrix"]
                        for p in (tmp_path / "runs-uncached" / "runs").glob("*/result.json")}
    assert cached_results and cached_results == uncached_results


@pytest.mark.slow
def test_bad_input_is_one_clear_line_before_any_trial(tmp_path):
    cases = [
        (["--tasks", "ScienceQA,Nope"], "unknown task"),
        (["--tasks", "ScienceQA"], "at least 2 tasks"),
        (["--design", "zigzag"], "unknown design 'zigzag'"),
        (["--design", "all"], "williams"),
        (["--address", "127.0.0.1:1"], "does not answer"),
        (["--storage-path", "/proc/forbidden"], "not writable"),
    ]
    for args, message in cases:
        proc = _run("task_order.py", *args, "--no-tracking", cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])

