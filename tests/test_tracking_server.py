"""Integration tier: a real `mlflow server` on loopback, started and always killed by the test module.

Two trials log concurrently through MlflowTracker; MlflowClient then checks the hierarchy, params, per-stage
metric histories, artifacts, final metrics = cl_metrics of the logged matrix, one run per resumed trial, FAILED
status, and that a server that drops mid-run loses no metric (retried, or spooled and replayed).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coin_ray.evaluation.metrics import cl_metrics
from test_tracking import (KNOWLEDGE, MATRIX, ORDER, ZERO_SHOT, drive, history, run_info, run_result,
                                 runs_named, stage_report)

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server -w 1` on a loopback port; start() waits until /health answers."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, wait_s: float = 180) -> None:
        import requests

        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin), "server", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "-w", "1"]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer within {wait_s} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(15)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-server"), _free_port())
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture()
def fast_http(monkeypatch):
    """MLflow's own HTTP retries would wait minutes per request; the tracker's outbox retries instead."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # a loaded 2-core machine answers slowly


def _tracker(uri: str, experiment: str, name: str, parent: str | None, **kw):
    from tracking import MlflowTracker

    return MlflowTracker(uri, experiment, name, parent_run_id=parent, **kw)


def test_two_concurrent_trials_hierarchy_contract_and_resume(server, tmp_path):
    from mlflow import MlflowClient

    from tracking import check_tracking_uri, close_sweep_run, open_sweep_run

    uri = check_tracking_uri(server.uri)
    client = MlflowClient(uri)
    sweep_id = open_sweep_run(uri, "server", "sweep-1", params={"design": "all", "token": "t0p"})
    orders = [ORDER, tuple(reversed(ORDER))]
    names = [">".join(o) + "-s0" for o in orders]
    errors: list[BaseException] = []

    def trial(order, name):
        try:
            drive(_tracker(uri, "server", name, sweep_id), name, order=order)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=trial, args=a) for a in zip(orders, names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    close_sweep_run(uri, sweep_id)

    exp = client.get_experiment_by_name("server")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(names)
    assert client.get_run(sweep_id).data.params == {"design": "all", "token": "***"}  # masked, never the value
    for run, order in ((next(r for r in children if r.info.run_name == n), o) for n, o in zip(names, orders)):
        assert run.info.status == "FINISHED"
        assert run.data.params["task_order"] == ">".join(order)
        assert run.data.params["data_hash"] == "abc123"
        for j, task in enumerate(order):
            assert history(client, run.info.run_id, f"acc/{task}") == [(i, MATRIX[i][j]) for i in range(3)]
            assert history(client, run.info.run_id, f"gk/{task}") == [(i, KNOWLEDGE[i][j]) for i in range(3)]
        assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 30
        files = {f.path for f in client.list_artifacts(run.info.run_id)}
        assert {"eval_matrix.json", "eval_matrix.csv", "eval_matrix.png", "knowledge_matrix.json",
                "matrices.png", "predictions"} <= files
        local = client.download_artifacts(run.info.run_id, "eval_matrix.json", str(tmp_path / run.info.run_id))
        payload = json.loads(Path(local).read_text())
        assert payload["tasks"] == list(order) and payload["zero_shot"] == ZERO_SHOT
        for key, value in cl_metrics(payload["matrix"], payload["zero_shot"]).items():
            assert run.data.metrics[key] == pytest.approx(value)

    # a resumed trial (failed at stage 2, then rerun) leaves exactly one run, FINISHED
    name = "TextVQA>ScienceQA>ImageNet-s0"
    failed = _tracker(uri, "server", name, sweep_id)
    drive(failed, name, fail_at=2)
    assert client.get_run(failed.run_id).info.status == "FAILED"
    resumed = _tracker(uri, "server", name, sweep_id)
    drive(resumed, name)
    assert resumed.run_id == failed.run_id and len(runs_named(client, "server", name)) == 1
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert history(client, resumed.run_id, "acc/ScienceQA") == [(i, MATRIX[i][0]) for i in range(3)]


def test_server_drop_mid_run_loses_no_metric(server, fast_http, tmp_path):
    """One outage, two runs: `steady` keeps logging through it (its writes are retried and arrive once the
    server is back); `late` ends while the server is still down (its writes are spooled, then replayed)."""
    from mlflow import MlflowClient

    from tracking import TrackingUnavailableError, check_tracking_uri, replay_spool

    uri = server.uri
    client = MlflowClient(uri)
    spool = tmp_path / "spool"
    steady = _tracker(uri, "drop", "steady-run", None, flush_timeout_s=300, spool_dir=spool)
    late = _tracker(uri, "drop", "late-run", None, flush_timeout_s=3, spool_dir=spool)
    steady.on_run_start(run_info("steady-run"))
    late.on_run_start(run_info("late-run"))
    steady.on_stage_end(stage_report(0))
    assert steady.flush(120)

    server.stop()
    with pytest.raises(TrackingUnavailableError, match="did not answer"):
        check_tracking_uri(uri, timeout_s=2)
    started = time.monotonic()
    steady.on_stage_end(stage_report(1))  # queued: training does not wait for the server
    assert time.monotonic() - started < 5
    for k in range(3):
        late.on_stage_end(stage_report(k))
    late.on_run_end(run_result())
    assert late.spooled_to is not None and (late.spooled_to / "writes.jsonl").is_file()
    server.start()

    steady.on_stage_end(stage_report(2))
    steady.on_run_end(run_result())
    assert steady.spooled_to is None
    run = client.get_run(steady.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, steady.run_id, "acc/TextVQA") == [(i, MATRIX[i][1]) for i in range(3)]
    assert {s for s, _ in history(client, steady.run_id, "train/loss")} == set(range(30))  # at-least-once

    assert replay_spool(spool, uri) > 0
    run = client.get_run(late.run_id)
    assert run.info.status == "FINISHED"
    assert history(client, late.run_id, "acc/ImageNet") == [(i, MATRIX[i][2]) for i in range(3)]
    assert run.data.metrics["mfn"] == pytest.approx(cl_metrics(MATRIX, ZERO_SHOT)["mfn"])
    assert "eval_matrix.json" in {f.path for f in client.list_artifacts(late.run_id)}
    assert not late.spooled_to.exists()


def test_short_continual_run_logs_through_the_tracker(server, ray_cluster, tmp_path):
    """A real (tiny) continual run in-process, its events consumed by MlflowTracker via hooks_factory."""
    import functools

    from mlflow import MlflowClient

    from coin_ray.config import ExperimentConfig
    from coin_ray.training import run_continual
    from tracking import MlflowTracker, open_sweep_run

    order = ["ScienceQA", "TextVQA", "ImageNet"]
    cfg = ExperimentConfig.from_dict({
        "order": order, "name": "tiny-run", "storage_path": str(tmp_path), "scaling.num_workers": 0, "eval.judge": "none",
        "model.pretrain_steps": 0,
        "train.max_steps": 4, "train.batch_size": 8, "data.train_rows": 32, "data.test_rows": 8,
        "eval.batch_size": 8, "eval.zero_shot": True, "model.hidden": 64, "model.intermediate": 128,
        "tuner.rank": 8, "tuner.num_experts": 2})
    sweep_id = open_sweep_run(server.uri, "continual", "tiny-sweep")
    hooks = functools.partial(MlflowTracker, server.uri, "continual", cfg.name, parent_run_id=sweep_id)
    result = run_continual(cfg, hooks_factory=hooks)

    client = MlflowClient(server.uri)
    [run] = runs_named(client, "continual", "tiny-run")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == sweep_id
    assert run.data.params["task_order"] == ">".join(order)
    assert (run.data.params["num_experts"], run.data.params["rank"]) == ("2", "8")
    for j, task in enumerate(order):
        steps, values = zip(*history(client, run.info.run_id, f"acc/{task}"))
        assert steps == (0, 1, 2) and list(values) == pytest.approx([result.matrix[i][j] for i in range(3)])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) >= 3
    local = client.download_artifacts(run.info.run_id, "eval_matrix.json", str(tmp_path / "dl"))
    payload = json.loads(Path(local).read_text())
    assert payload["matrix"] == result.matrix and payload["zero_shot"] == result.zero_shot
    for key, value in cl_metrics(payload["matrix"], payload["zero_shot"]).items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert {f.path for f in client.list_artifacts(run.info.run_id, "predictions")} == {
        f"predictions/stage_{k}_{t}.jsonl" for k, t in enumerate(order)}


def test_a_trial_start_against_a_down_server_gives_up_within_the_retry_budget(tmp_path):
    """Down mid-sweep, before a trial opens its run: bounded retries (RETRY_BUDGET_S), then the error."""
    from tracking._runs import RETRY_BUDGET_S

    tracker = _tracker(f"http://127.0.0.1:{_free_port()}", "down", "never-opened", None, spool_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        tracker.on_run_start(run_info("never-opened"))
    elapsed = time.monotonic() - started
    assert elapsed < RETRY_BUDGET_S + 10, elapsed
    assert "Connection" in type(info.value).__name__ or "connect" in str(info.value).lower(), info.value
    tracker.on_run_failed(RuntimeError("x"))  # nothing was opened: nothing to close, nothing spooled
    assert not any(tmp_path.iterdir())
