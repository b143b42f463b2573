"""End-to-end sweeps through the real scripts: Ray Tune trials, one Ray Train worker each, MLflow sqlite.

Slow tier (`pytest -m slow`): each Tune trial starts a Train worker group (15-20 s on 2 cores)."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "train.max_steps=8", "--set", "model.pretrain_steps=0", "--set", "data.train_rows=48",
        "--set", "data.test_rows=8", "--set", "eval.batch_size=8"]


def _run(script: str, *args: str, cwd: Path, timeout: int = 900, env: dict | None = None
         ) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run([sys.executable, str(ROOT / "sweeps" / script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return proc


def _plan_json(proc: subprocess.CompletedProcess) -> dict:
    """The plan's last stdout line: one JSON object with the plan's keys."""
    from coin_ray.studies.plan import PLAN_KEYS

    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert tuple(last) == PLAN_KEYS, last
    return last


def _runs_in(uri: str, experiment: str) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


@pytest.mark.slow
def test_task_order_smoke_sweep_cache_and_mlflow(tmp_path):
    from mlflow import MlflowClient

    from coin_ray.evaluation import cl_metrics
    from coin_ray.training.accounting import STAGE_METRICS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--smoke-test", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
              "--experiment", "smoke", *TINY]
    # the plan: 6 orders of 3 tasks share their first stages; no trial starts, no MLflow run is written
    plan = _run("task_order.py", *common, "--plan", cwd=tmp_path)
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    assert _plan_json(plan) == {"trials": 6, "stages": 18, "to_train": 15, "in_store": 0,
                                "train_tokens": _plan_json(plan)["train_tokens"], "eval_answers": 360,
                                "device_hours": None}
    assert _plan_json(plan)["train_tokens"] > 15 * 128
    assert not (tmp_path / "runs" / "tune").exists() and _runs_in(uri, "smoke") == 0
    # a budget without any throughput to estimate it by is refused, with the way out
    budget = _run("task_order.py", *common, "--budget-hours", "100", cwd=tmp_path)
    assert budget.returncode == 2 and "--throughput" in budget.stderr, budget.stderr[-3000:]
    assert not (tmp_path / "runs" / "tune").exists() and _runs_in(uri, "smoke") == 0

    first = _run("task_order.py", *common, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stages trained: 15, stages reused from the stage store: 3" in first.stdout
    assert "mlflow ui --backend-store-uri" in first.stdout and "#/experiments/" in first.stdout
    # the first minutes: each first-time phase says when it starts and ends; Ray's lines that do not apply to
    # how the platform sizes its resources stay off (docs/first-run.md); the plan above prepared the data first
    assert "[coin-ray] benchmark generation: started" in plan.stderr and "preprocessing: done in" in plan.stderr
    for line in ("does not have any available CPUs", "PYTHON worker processes have been started",
                 "Progress bars disabled", "Loading SentenceTransformer model", "Configuration for experiment",
                 "tensorboard --logdir", "system metrics monitoring"):
        assert line not in first.stdout + first.stderr, line

    # the 3 stages shared by prefix are trained once and reused by the other order: saved, within the sweep
    cost = re.search(r"^device-hours: (\d+\.\d\d) trained, (\d+\.\d\d) saved by the stage store$", first.stdout, re.M)
    assert cost and float(cost[1]) > 0, first.stdout[-2000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("smoke")
    for run in client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''"):
        assert run.data.metrics["device_hours"] > 0
        for name in STAGE_METRICS:  # step = stage index; every trial trains at least its last stage
            history = client.get_metric_history(run.info.run_id, name)
            assert sorted(m.step for m in history) == [0, 1, 2], name
            assert next(m.value for m in history if m.step == 2) > 0, name
    first_matrices = {p.parent.name: json.loads(p.read_text())["matrix"]
                      for p in (tmp_path / "runs" / "runs").glob("*/result.json")}

    # a store that holds part of the study: the plan's to_train is what the run then trains
    store = tmp_path / "runs" / "stage_store"
    leaves = sorted(p for p in store.iterdir() if not p.name.startswith(".")
                    and len(json.loads((p / "meta.json").read_text())["material"]["prefix"]) == 3)[:2]
    partial_orders = {">".join(json.loads((p / "meta.json").read_text())["material"]["prefix"]) for p in leaves}
    for p in leaves:
        shutil.rmtree(p)
    # ... and a budget far below the estimate (from the stages the first run measured) is refused
    plan = _run("task_order.py", *common, "--plan", "--budget-hours", "1e-9", cwd=tmp_path)
    assert plan.returncode == 2 and "estimates" in plan.stderr, plan.stdout[-3000:] + plan.stderr[-3000:]
    partial = _plan_json(plan)
    assert partial["to_train"] == 2 and partial["in_store"] == 13 and partial["device_hours"] > 0

    profile = tmp_path / "profile.jsonl"
    second = _run("task_order.py", *common, cwd=tmp_path, env={"COIN_RAY_PROFILE": str(profile)})
    assert second.returncode == 0, second.stderr[-3000:]
    assert "stages trained: 2, stages reused from the stage store: 16" in second.stdout
    assert re.search(r"^device-hours: \d+\.\d\d trained, \d+\.\d\d saved by the stage store$", second.stdout, re.M)
    # a fully stored trial starts no Train worker group: only the two trials that lost a stage build a model
    spans = [json.loads(line) for line in profile.read_text().splitlines()]
    trials = {s["trial"] for s in spans if s["phase"] == "trial"}
    built = {s["trial"] for s in spans if s["phase"] == "trial start-up"}
    assert len(trials) == 6 and {t.split("-s0")[0] for t in built} == partial_orders, (trials, built)
    # ... and logs the same matrices as the run that trained them
    assert {p.parent.name: json.loads(p.read_text())["matrix"]
            for p in (tmp_path / "runs" / "runs").glob("*/result.json")} == first_matrices
    after = _run("task_order.py", *common, "--plan", cwd=tmp_path)
    assert after.returncode == 0 and _plan_json(after)["to_train"] == 0, after.stderr[-3000:]

    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 6, "a rerun must reopen runs, not duplicate them"
    sweep = parents[0]
    assert sweep.data.metrics["stages_reused"] == 16 and sweep.data.metrics["stages_trained"] == 2
    assert sweep.data.metrics["device_hours"] > 0 and sweep.data.metrics["device_hours_saved"] > 0
    orders = sorted(r.data.params["task_order"] for r in children)
    assert len(set(orders)) == 6 and all(o.count(">") == 2 for o in orders)
    child = next(c for c in children if c.data.params["task_order"] not in partial_orders)  # from the store
    path = client.download_artifacts(child.info.run_id, "eval_matrix.json", str(tmp_path / "from-store"))
    assert json.loads(Path(path).read_text())["matrix"] == first_matrices[child.info.run_name]
    assert child.data.tags["mlflow.parentRunId"] == sweep.info.run_id
    # where the results came from: the trials' environment on every trial run and on the sweep run
    env = {k: v for k, v in child.data.tags.items() if k.startswith("coin_ray.env.")}
    assert env["coin_ray.env.device"] == "cpu" and {"coin_ray.env.torch", "coin_ray.env.coin_ray"} <= set(env)
    assert all({k: v for k, v in r.data.tags.items() if k.startswith("coin_ray.env.")} == env for r in runs)
    path = client.download_artifacts(child.info.run_id, "eval_matrix.json", str(tmp_path))
    payload = json.loads(Path(path).read_text())
    assert payload["tasks"] == child.data.params["task_order"].split(">")
    expected = cl_metrics(payload["matrix"])
    for key in ("mft", "mfn", "bwt", "forgetting"):
        assert math.isclose(child.data.metrics[key], expected[key], abs_tol=1e-9), key
    history = client.get_metric_history(child.info.run_id, f"acc/{payload['tasks'][0]}")
    assert sorted({m.step for m in history}) == [0, 1, 2]
    # the embedded defaults turn the embedding judge on: every trial logs the knowledge matrix beside it
    for run in children:
        kpath = client.download_artifacts(run.info.run_id, "knowledge_matrix.json", str(tmp_path / run.info.run_id))
        knowledge = json.loads(Path(kpath).read_text())
        assert knowledge["tasks"] == run.data.params["task_order"].split(">")
        assert len(knowledge["matrix"]) == 3 and all(0.0 <= x <= 1.0 for row in knowledge["matrix"] for x in row)
        gk = cl_metrics(knowledge["matrix"])
        for key in ("mft", "mfn", "bwt", "forgetting"):
            assert math.isclose(run.data.metrics[f"gk_{key}"], gk[key], abs_tol=1e-9), key
        assert len(client.get_metric_history(run.info.run_id, f"gk/{knowledge['tasks'][0]}")) == 3

    # the same orders without the cache give the same final matrices
    uncached = _run("task_order.py", "--smoke-test", "--no-cache", "--no-tracking", "--storage-path",
                    str(tmp_path / "runs-uncached"), *TINY, cwd=tmp_path)
    assert uncached.returncode == 0, uncached.stderr[-3000:]
    assert "stages trained: 18, stages reused from the stage store: 0" in uncached.stdout
    # keyed by order (one seed): the folder names also carry the config hash, which takes in the data hash, and
    # the preprocessing hash records where the generated benchmark lies (another storage path here)
    def by_order(root):
        results = [json.loads(p.read_text()) for p in (root / "runs").glob("*/result.json")]
        return {">".join(r["order"]): r["matrix"] for r in results}

    cached_results, uncached_results = by_order(tmp_path / "runs"), by_order(tmp_path / "runs-uncached")
    assert len(cached_results) == 6
    assert cached_results and cached_results == uncached_results


@pytest.mark.slow
def test_bad_input_is_one_clear_line_before_any_trial(tmp_path):
    cases = [
        (["--tasks", "ScienceQA,Nope"], "unknown task"),
        (["--tasks", "ScienceQA"], "at least 2 tasks"),
        (["--design", "zigzag"], "unknown design 'zigzag'"),
        (["--design", "all", "--tasks", "ScienceQA,TextVQA,ImageNet,GQA,VizWiz,Grounding"], "williams"),
        (["--address", "127.0.0.1:1"], "does not answer"),
        (["--storage-path", "/proc/forbidden"], "not writable"),
    ]
    for args, message in cases:
        proc = _run("task_order.py", *args, "--no-tracking", cwd=tmp_path, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])



def _children(uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags], [r for r in runs
                                                                      if "mlflow.parentRunId" not in r.data.tags]


@pytest.mark.slow
def test_killed_sweep_resumes_without_duplicate_runs(tmp_path):
    import os
    import signal
    import time

    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--smoke-test", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "resume",
            *TINY]
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen([sys.executable, str(ROOT / "sweeps" / "task_order.py"), *args], cwd=tmp_path,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    results = tmp_path / "runs" / "runs"
    deadline = time.time() + 600
    while len(list(results.glob("*/result.json"))) < 2:
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "two trials did not finish in 10 minutes"
        time.sleep(1)
    # kill the driver and everything it started (its local Ray cluster included), as a crash would
    family = [driver.pid] + [c.pid for c in psutil.Process(driver.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    driver.wait()
    finished_before = len(list(results.glob("*/result.json")))
    assert finished_before < 6

    resumed = _run("task_order.py", *args, "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    children, parents = _children(uri, "resume")
    assert len(parents) == 1
    assert len(children) == 6, sorted(r.info.run_name for r in children)
    assert all(r.info.status == "FINISHED" for r in children), [(r.info.run_name, r.info.status) for r in children]
    assert len({r.data.params["task_order"] for r in children}) == 6
    assert len(list(results.glob("*/result.json"))) == 6


@pytest.mark.slow
def test_hparams_asha_sweep_frees_stopped_trials(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _run("hparams.py", "--smoke-test", "--num-samples", "4", "--experts", "1,2", "--ranks", "4,8",
                "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "hp", *TINY,
                cwd=tmp_path)
    # on 2 CPUs one trial runs at a time: a stopped trial that kept its worker would block the next forever
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children, parents = _children(uri, "hp")
    assert len(parents) == 1 and parents[0].data.metrics["trials"] == 4
    # a trial that repeats an earlier configuration (TPE may sample a point twice) is the same run: same
    # deterministic name, same stages from the store, one MLflow child run
    import csv

    from mlflow import MlflowClient

    table = MlflowClient(uri).download_artifacts(parents[0].info.run_id, "trials.csv", str(tmp_path))
    names = {row["trial"] for row in csv.DictReader(open(table))}
    assert len(children) == len(names) and {r.info.run_name for r in children} == names
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    # ASHA stops a trial when it reports its last stage (max_t): the run is complete by then, so FINISHED
    assert any(r.info.status == "FINISHED" for r in children)
    assert parents[0].data.metrics["trials_finished"] >= 1
    # the report of this study, not the order analysis (one fixed order)
    assert "Hyper-parameter study (mfn; higher is better)" in proc.stdout
    assert "Best configuration(s) by mfn:" in proc.stdout and "mfn by num_experts (rows) x rank" in proc.stdout
    assert "order analysis skipped: every finished trial trained the one order" in proc.stdout
    assert "Order sensitivity" not in proc.stdout
    logged = {f.path for f in MlflowClient(uri).list_artifacts(parents[0].info.run_id, "analysis")}
    assert {"analysis/search_space.csv", "analysis/best.csv", "analysis/per_config.csv",
            "analysis/experts_rank.csv", "analysis/experts_rank.png", "analysis/summary.txt"} <= logged
    rows = list(csv.DictReader(open(table)))
    stopped = [row for row in rows if row["status"] == "STOPPED"]
    assert all(row["partial"] == "True" and row["mfn"] == "" and int(row["stage_reached"]) < 3 for row in stopped)
    assert (parents[0].data.metrics["trials_partial"] == len(stopped)
            and ("Stopped early by the scheduler" in proc.stdout) == bool(stopped))
    for r in children:
        assert r.data.params["num_experts"] in {"1", "2"}
        assert int(r.data.params["rank"]) % int(r.data.params["num_experts"]) == 0


@pytest.mark.slow
def test_optuna_order_design_runs_permutations(tmp_path):
    proc = _run("task_order.py", "--design", "optuna", "2", "--tasks", "ScienceQA,ImageNet", "--no-tracking",
                "--storage-path", str(tmp_path / "runs"), *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in (tmp_path / "runs" / "runs").glob("*/result.json")]
    assert len(results) == 2
    for r in results:
        assert sorted(r["order"]) == ["ImageNet", "ScienceQA"]


ONE_ORDER = ["--design", "given", "--orders", "ScienceQA>TextVQA", "--tasks", "ScienceQA,TextVQA", "--seeds", "1"]


@pytest.mark.slow
def test_sweeps_that_differ_in_lr_keep_their_own_runs_and_a_rerun_adds_nothing(tmp_path):
    """Two sweeps on one storage path and one MLflow store, differing only in train.lr: two disjoint sets of
    trial runs, each holding its own lr, two runs/ folders; rerunning the first trains nothing and adds no run."""
    import sqlite3

    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [*ONE_ORDER, "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "ident",
              *TINY, "--set", "eval.judge=none"]
    first = _run("task_order.py", *common, "--set", "train.lr=0.004", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "stages trained: 2, stages reused from the stage store: 0" in first.stdout
    second = _run("task_order.py", *common, "--set", "train.lr=0.002", cwd=tmp_path)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "stages trained: 2, stages reused from the stage store: 0" in second.stdout  # nothing of the first

    children, parents = _children(uri, "ident")
    assert len(parents) == 2 and len({p.info.run_name for p in parents}) == 2
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {
        p.info.run_id for p in parents}
    assert sorted(c.data.params["lr"] for c in children) == ["0.002", "0.004"]
    assert len({c.data.tags["coin_ray.run_key"] for c in children}) == 2
    assert len({c.info.run_name for c in children}) == 2  # readable name + config hash
    assert all(c.info.run_name.startswith("ScienceQA>TextVQA-s0-") for c in children)
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "runs" / "runs").glob("*/result.json")}
    assert sorted(results) == sorted(c.info.run_name for c in children)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        runs_before = db.execute("select count(*) from runs").fetchone()[0]

    again = _run("task_order.py", *common, "--set", "train.lr=0.004", cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "stages trained: 0, stages reused from the stage store: 2" in again.stdout
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select count(*) from runs").fetchone()[0] == runs_before  # no run added
    children_again, parents_again = _children(uri, "ident")
    assert {c.info.run_id for c in children_again} == {c.info.run_id for c in children}
    assert all(c.info.status == "FINISHED" for c in children_again)
    client = MlflowClient(uri)
    for child in children_again:  # one point per stage: the rerun did not log the same stage twice
        assert len(client.get_metric_history(child.info.run_id, "acc/ScienceQA")) == 2


@pytest.mark.slow
def test_sweep_with_a_judge_that_is_down_finishes_without_knowledge_scores(tmp_path):
    import socket

    from mlflow import MlflowClient

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = f'{{base_url: "http://127.0.0.1:{port}/v1", model: judge, max_retries: 1, backoff_s: 0.01}}'
    proc = _run("task_order.py", *ONE_ORDER, "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
                "--experiment", "judge-down", *TINY, "--set", "eval.judge=llm", "--set", f"eval.judge_options={options}",
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no knowledge score for ScienceQA" in proc.stderr  # progress lines go to stderr (logging)
    children, parents = _children(uri, "judge-down")
    assert len(children) == 1 and children[0].info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED" and parents[0].data.metrics["trials_finished"] == 1
    metrics = children[0].data.metrics
    assert {"mft", "mfn", "bwt", "acc/ScienceQA", "acc/TextVQA"} <= set(metrics)
    assert not any(k.startswith(("gk_", "gk/", "avg_seen_gk")) for k in metrics)
    client = MlflowClient(uri)
    path = client.download_artifacts(children[0].info.run_id, "knowledge_matrix.json", str(tmp_path))
    assert json.loads(Path(path).read_text())["matrix"] == [[None, None], [None, None]]
    result = json.loads(next((tmp_path / "runs" / "runs").glob("*/result.json")).read_text())
    assert result["knowledge_matrix"] == [[None, None], [None, None]] and "gk_mfn" not in result["metrics"]


@pytest.mark.slow
def test_task_order_smoke_sweep_compares_methods(tmp_path):
    """--methods crosses the orders with the methods: every trial and stage carries its method, and the sweep
    run holds the per-method spread (analysis/methods.csv and its plot)."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # two of the smoke preset's tasks: 4 trials (its 3 tasks make 12, ~8 minutes on 2 busy cores)
    proc = _run("task_order.py", "--smoke-test", "--tasks", "ScienceQA,TextVQA", "--methods", "lora,olora",
                "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "methods", *TINY,
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 orders x 1 seeds/grid values x 2 methods = 4 trials" in proc.stdout
    # the two orders share no prefix, and a stage of one method is never served to the other
    assert "stages trained: 8, stages reused from the stage store: 0" in proc.stdout
    assert "Order robustness per method" in proc.stdout
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("methods")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    sweep = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.params["cl.method"] for r in children) == ["none", "none", "olora", "olora"]
    path = client.download_artifacts(sweep.info.run_id, "analysis/methods.csv", str(tmp_path))
    import pandas as pd

    table = pd.read_csv(path)
    assert list(table.columns) == ["method", "trials", "mean", "sd_orders", "sd_seeds", "min", "max"]
    assert sorted(table["method"]) == ["lora", "olora"] and list(table["trials"]) == [2, 2]
    assert (table["min"] <= table["mean"]).all() and (table["mean"] <= table["max"]).all()
    artifacts = [a.path for a in client.list_artifacts(sweep.info.run_id, "analysis")]
    assert "analysis/methods.png" in artifacts


@pytest.mark.integration
def test_the_joint_baseline_is_a_tagged_child_of_the_sweep_run(tmp_path):
    """--baselines joint adds one trial that trains once on the union of the tasks: in MLflow a child of the
    sweep's run, tagged coin_ray.baseline=joint, beside the order's trial (which carries no such tag)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = _run("task_order.py", *ONE_ORDER, "--baselines", "joint", "--storage-path", str(tmp_path / "runs"),
                "--tracking-uri", uri, "--experiment", "joint", "--set", "train.max_steps=2",
                "--set", "model.pretrain_steps=0", "--set", "data.train_rows=16", "--set", "data.test_rows=4",
                "--set", "eval.batch_size=4", "--set", "eval.judge=none", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    children, parents = _children(uri, "joint")
    assert len(parents) == 1 and len(children) == 2
    joint = [c for c in children if c.data.tags.get("coin_ray.baseline") == "joint"]
    assert len(joint) == 1 and joint[0].info.run_name.startswith("joint-s0-")
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    order = next(c for c in children if c is not joint[0])
    assert order.data.params["task_order"] == "ScienceQA>TextVQA" and "coin_ray.baseline" not in order.data.tags
    assert joint[0].data.metrics["bwt"] == 0 and joint[0].data.metrics["mft"] == joint[0].data.metrics["mfn"]
