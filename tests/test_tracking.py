"""MLflow tracking against a real sqlite store in a temporary folder: run hierarchy, the name contract
(params, per-stage metrics, final metrics, artifacts), resume without duplicates, failure status, concurrent
logging, the secret filter, the matrix artifact schema, the unreachable-server error and the report."""
from __future__ import annotations

import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from coin_ray.evaluation.metrics import cl_metrics
from coin_ray.training.hooks import RunInfo, RunResult, StageReport

ORDER = ("ScienceQA", "TextVQA", "ImageNet")
# R[i][j]: score on ORDER[j] after stage i; above the diagonal = not trained yet (still evaluated)
MATRIX = [[0.9, 0.1, 0.0], [0.5, 0.8, 0.05], [0.3, 0.6, 0.95]]
KNOWLEDGE = [[0.9, 0.4, 0.3], [0.8, 0.85, 0.35], [0.7, 0.8, 0.9]]
ZERO_SHOT = [0.2, 0.05, 0.0]


# ---- event helpers: the same events the continual run emits ------------------------------------------------
def run_info(name: str, order=ORDER, extra: dict | None = None) -> RunInfo:
    params = {"tuner.method": "moelora", "tuner.num_experts": 4, "tuner.rank": 16, "tuner.alpha": 32.0,
              "train.lr": 5e-4, "train.seed": 0, "order": json.dumps(list(order)),
              "eval.judge_options": json.dumps({"model": "judge-7b", "api_key": "sk-SECRET"}),
              "judge.api_key": "sk-SECRET", **(extra or {})}
    return RunInfo(name=name, order=tuple(order), params=params, benchmark="synthetic", data_hash="abc123")


def stage_report(k: int, matrix=MATRIX, knowledge=KNOWLEDGE, order=ORDER, reused=False) -> StageReport:
    preds = [{"task": t, "question_id": f"{t}-{n}", "prompt": "q", "prediction": "a", "reference": "a",
              "score": 1.0} for t in order for n in range(5)]
    return StageReport(stage=k, task=order[k], scores=dict(zip(order, matrix[k])),
                       knowledge=dict(zip(order, knowledge[k])) if knowledge else None,
                       train_losses=[(k * 10 + s, 2.0 - 0.1 * s) for s in range(10)], predictions=preds,
                       reused=reused, seconds=1.5)


def run_result(matrix=MATRIX, knowledge=KNOWLEDGE, zero_shot=ZERO_SHOT, order=ORDER, reused=(0,)) -> RunResult:
    metrics = dict(cl_metrics(matrix, zero_shot))
    if knowledge:
        metrics.update({f"gk_{k}": v for k, v in cl_metrics(knowledge).items()})
    return RunResult(order=tuple(order), matrix=matrix, zero_shot=zero_shot, knowledge_matrix=knowledge,
                     knowledge_zero_shot=None, metrics=metrics, stages_reused=tuple(reused))


def drive(tracker, name: str, stages=None, fail_at: int | None = None, order=ORDER, matrix=MATRIX,
          knowledge=KNOWLEDGE) -> None:
    tracker.on_run_start(run_info(name, order))
    tracker.on_zero_shot(dict(zip(order, ZERO_SHOT)), None)
    for k in range(len(order)) if stages is None else stages:
        if fail_at is not None and k == fail_at:
            tracker.on_run_failed(RuntimeError("worker died"))
            return
        tracker.on_stage_end(stage_report(k, matrix, knowledge, order))
    tracker.on_run_end(run_result(matrix, knowledge, order=order))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store per module (creating the schema costs seconds); tests use their own experiments."""
    from tracking import check_tracking_uri

    return check_tracking_uri(f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}")


@pytest.fixture()
def client(store):
    from mlflow import MlflowClient

    return MlflowClient(store)


def tracker_for(store: str, experiment: str, name: str, parent: str | None = None, **kw):
    from tracking import MlflowTracker

    return MlflowTracker(store, experiment, name, parent_run_id=parent, tags={"coin_ray.sweep": "s"},
                         flush_timeout_s=60, **kw)


def runs_named(client, experiment: str, name: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == name]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---- pure helpers ----------------------------------------------------------------------------------------------
def test_secret_keys_are_masked_including_inside_json_values():
    from tracking import is_secret_key, redact_params

    secret = ["api_key", "judge.apiKey", "HF_TOKEN", "keys", "db.password", "client_secret", "aws_access_key_id",
              "auth", "judge_options.headers", "Authorization", "session_cookie"]
    kept = ["num_experts", "tuner.rank", "tokenizer", "keyframe", "eval.judge", "author", "tracking.tracking_uri"]
    assert [k for k in secret if not is_secret_key(k)] == []
    assert [k for k in kept if is_secret_key(k)] == []
    out = redact_params({"tuner.num_experts": 4, "llm.api_key": "sk-1", "llm.password": None,
                         "eval.judge_options": json.dumps({"model": "m", "api_key": "sk-2", "nested": {"token": "t"}})})
    # keys stay (a reader sees that a value was set), values are ***; an unset secret stays unset
    assert out == {"tuner.num_experts": 4, "llm.api_key": "***", "llm.password": None,
                   "eval.judge_options": json.dumps({"api_key": "***", "model": "m", "nested": {"token": "***"}},
                                                    sort_keys=True)}
    assert "sk-" not in json.dumps(out)
    plain = json.dumps(["ScienceQA", "GQA"])  # JSON without secrets comes back byte for byte
    assert redact_params({"order": plain}) == {"order": plain}


def test_credentials_in_uris_queries_headers_and_nested_values_are_masked():
    from coin_ray.redact import redact, redact_text

    assert redact_text("postgresql://user:pw@db/mlflow") == "postgresql://***@db/mlflow"
    assert redact_text("https://user:p@ss@host/v1") == "https://***@host/v1"  # a raw "@" in the password
    assert redact_text("https://ghp_abc@github.com/x.git") == "https://***@github.com/x.git"
    assert redact_text("GET https://h/v1?token=abc&x=1 failed") == "GET https://h/v1?token=***&x=1 failed"
    assert redact_text("https://h/v1?x=1&api_key=zz") == "https://h/v1?x=1&api_key=***"
    assert redact_text("header Authorization: Bearer sk-123456") == "header Authorization: Bearer ***"
    for unchanged in ("sqlite:////tmp/a/mlflow.db", "http://127.0.0.1:5000", "mail me@example.com",
                      "https://h/v1?x=1&tokenizer=fast", "Basic setup done"):
        assert redact_text(unchanged) == unchanged
    options = {"base_url": "https://user:pw@host/v1", "model": "m", "auth": ["u", "p"],
               "headers": {"Authorization": "Bearer sk-1", "X-Title": "coin"}, "timeout_s": 5}
    assert redact({"eval": {"judge_options": options}}) == {"eval": {"judge_options": {
        "base_url": "https://***@host/v1", "model": "m", "auth": "***",
        "headers": {"Authorization": "***", "X-Title": "***"}, "timeout_s": 5}}}
    assert options["base_url"] == "https://user:pw@host/v1"  # a copy: the real value is still used to connect


def test_no_credential_reaches_mlflow_params_tags_or_artifacts(store, client, tmp_path):
    import pandas as pd

    from tracking import log_sweep_artifacts, open_sweep_run

    secret = "pw-SECRET-42"
    options = json.dumps({"model": "judge-7b", "base_url": f"https://user:{secret}@judge.example/v1?token={secret}",
                          "headers": {"Authorization": f"Bearer {secret}"}})
    sweep_id = open_sweep_run(store, "redact", "sweep-r",
                              params={"tracking.tracking_uri": f"postgresql://user:{secret}@db/mlflow",
                                      "eval.judge_options": options, "auth": secret},
                              tags={"note": f"see https://u:{secret}@host/x"})
    tracker = tracker_for(store, "redact", "r-s0", parent=sweep_id)
    tracker.on_run_start(run_info("r-s0", extra={"eval.judge_options": options}))
    tracker.on_zero_shot(dict(zip(ORDER, ZERO_SHOT)), None)
    tracker.on_run_failed(RuntimeError(f"judge at https://user:{secret}@judge.example/v1 refused"))
    log_sweep_artifacts(store, sweep_id, trials=pd.DataFrame(
        [{"trial": "r-s0", "judge": f"https://user:{secret}@judge.example/v1", "mfn": 0.5}]))
    for run_id in (sweep_id, tracker.run_id):
        run = client.get_run(run_id)
        assert secret not in json.dumps({**run.data.params, **run.data.tags})
    sweep = client.get_run(sweep_id).data
    assert sweep.params["tracking.tracking_uri"] == "postgresql://***@db/mlflow" and sweep.params["auth"] == "***"
    trial = client.get_run(tracker.run_id).data
    assert json.loads(trial.params["eval.judge_options"]) == {
        "model": "judge-7b", "base_url": "https://***@judge.example/v1?token=***", "headers": {"Authorization": "***"}}
    assert trial.tags["coin_ray.error"] == "RuntimeError: judge at https://***@judge.example/v1 refused"
    trials_csv = Path(client.download_artifacts(sweep_id, "trials.csv", str(tmp_path))).read_text()
    assert "https://***@judge.example/v1" in trials_csv and secret not in trials_csv


def test_printed_uris_and_log_lines_are_masked(store, caplog):
    import logging

    from tracking import TrackingUnavailableError, check_tracking_uri, experiment_runs_url, open_sweep_run

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_uri(f"http://user:pw-SECRET@127.0.0.1:{port}", timeout_s=2)
    assert "pw-SECRET" not in str(info.value) and f"http://***@127.0.0.1:{port}" in str(info.value)
    open_sweep_run(store, "redact-print", "s")
    command, _ = experiment_runs_url(store, "redact-print")  # nothing to mask: printed as given
    assert command == f"mlflow ui --backend-store-uri {store}"
    with caplog.at_level(logging.WARNING, logger="tracking"):
        logging.getLogger("tracking").warning("MLflow call to %s failed", "https://u:pw-SECRET@host/api")
    assert "pw-SECRET" not in caplog.text and "https://***@host/api" in caplog.text


def test_matrix_payload_schema_csv_and_errors():
    from tracking import matrix_csv, matrix_payload

    payload = matrix_payload(ORDER, [[0.5, None, float("nan")]], [0.1, 0.2, None])
    assert payload == {"tasks": list(ORDER), "matrix": [[0.5, None, None]], "zero_shot": [0.1, 0.2, None]}
    assert matrix_csv(payload).splitlines() == ["after_stage,ScienceQA,TextVQA,ImageNet", "zero_shot,0.1,0.2,",
                                                "0:ScienceQA,0.5,,"]
    with pytest.raises(ValueError, match=r"matrix\[0\]\[1\] = 50.0 is outside \[0, 1\]"):
        matrix_payload(ORDER, [[0.5, 50.0, None]])
    with pytest.raises(ValueError, match="row 0 of the matrix has 2 cells"):
        matrix_payload(ORDER, [[0.5, 0.1]])


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    from tracking import resolve_tracking_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TUNE_ORIG_WORKING_DIR", raising=False)
    assert resolve_tracking_uri("sqlite:///sub/mlflow.db") == f"sqlite:///{tmp_path.resolve()}/sub/mlflow.db"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert resolve_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_unreachable_server_gives_the_clear_error_quickly():
    from tracking import TrackingUnavailableError, check_tracking_uri

    with socket.socket() as s:  # a port that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as info:
        check_tracking_uri(f"http://127.0.0.1:{port}", timeout_s=2)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"MLflow tracking server at http://127.0.0.1:{port} did not answer" in message
    assert "mlflow server" in message and "--tracking-uri sqlite:///mlflow.db" in message


# ---- the tracker against sqlite ------------------------------------------------------------------------------
def test_trial_run_logs_the_name_contract(store, client, tmp_path):
    from tracking import open_sweep_run
    from tracking.matrices import check_matrix_payload

    sweep_id = open_sweep_run(store, "contract", "sweep-a", params={"design": "all", "llm.api_key": "x"})
    tracker = tracker_for(store, "contract", "ScienceQA>TextVQA>ImageNet-s0", parent=sweep_id)
    drive(tracker, "ScienceQA>TextVQA>ImageNet-s0")
    assert tracker.spooled_to is None

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == sweep_id
    assert run.data.tags["reused_stages"] == "0"
    p = run.data.params
    assert p["task_order"] == "ScienceQA>TextVQA>ImageNet"
    assert (p["method"], p["num_experts"], p["rank"], p["alpha"], p["lr"], p["seed"]) == (
        "moelora", "4", "16", "32.0", "0.0005", "0")
    assert (p["benchmark"], p["data_hash"]) == ("synthetic", "abc123")
    assert p["judge.api_key"] == "***" and "sk-SECRET" not in json.dumps(p)
    assert client.get_run(sweep_id).data.params == {"design": "all", "llm.api_key": "***"}
    # a continual-learning method on a LoRA tuner logs its --methods name, not the tuner's
    from dataclasses import replace

    from tracking._tracker import trial_params

    assert trial_params(replace(run_info("x"), method="olora"))["method"] == "olora"

    for j, task in enumerate(ORDER):
        assert history(client, tracker.run_id, f"acc/{task}") == [(i, MATRIX[i][j]) for i in range(3)]
        assert history(client, tracker.run_id, f"gk/{task}") == [(i, KNOWLEDGE[i][j]) for i in range(3)]
    assert [v for _, v in history(client, tracker.run_id, "avg_seen_acc")] == pytest.approx(
        [0.9, (0.5 + 0.8) / 2, (0.3 + 0.6 + 0.95) / 3])
    assert [s for s, _ in history(client, tracker.run_id, "train/loss")] == list(range(30))
    assert history(client, tracker.run_id, "zero_shot/TextVQA") == [(0, 0.05)]

    files = {f.path for f in client.list_artifacts(tracker.run_id)}
    assert {"eval_matrix.json", "eval_matrix.csv", "eval_matrix.png", "knowledge_matrix.json",
            "knowledge_matrix.csv", "knowledge_matrix.png", "matrices.png", "predictions"} <= files
    preds = {f.path for f in client.list_artifacts(tracker.run_id, "predictions")}
    assert preds == {f"predictions/stage_{k}_{t}.jsonl" for k, t in enumerate(ORDER)}
    local = Path(client.download_artifacts(tracker.run_id, "eval_matrix.json", str(tmp_path)))
    payload = check_matrix_payload(json.loads(local.read_text()))
    assert payload == {"tasks": list(ORDER), "matrix": MATRIX, "zero_shot": ZERO_SHOT}
    expected = cl_metrics(payload["matrix"], payload["zero_shot"])  # the logged matrix is the source of truth
    assert set(expected) == {"mft", "mfn", "maa", "bwt", "forgetting", "fwt"}
    for key, value in expected.items():
        assert run.data.metrics[key] == pytest.approx(value)
    k_local = Path(client.download_artifacts(tracker.run_id, "knowledge_matrix.json", str(tmp_path)))
    k_payload = json.loads(k_local.read_text())
    for key, value in cl_metrics(k_payload["matrix"]).items():
        assert run.data.metrics[f"gk_{key}"] == pytest.approx(value)
    lines = Path(client.download_artifacts(tracker.run_id, "predictions/stage_0_ScienceQA.jsonl",
                                           str(tmp_path))).read_text().splitlines()
    assert len(lines) == 15 and json.loads(lines[0])["task"] == "ScienceQA"


def test_resumed_trial_reopens_its_run_without_duplicate_points(store, client):
    from tracking import open_sweep_run

    sweep_id = open_sweep_run(store, "resume", "sweep-r", params={"design": "all"})
    assert open_sweep_run(store, "resume", "sweep-r", params={"design": "all"}) == sweep_id
    other = open_sweep_run(store, "resume", "sweep-r", params={"design": "williams"})  # another sweep: its own run
    assert other != sweep_id and client.get_run(other).data.params == {"design": "williams"}
    assert client.get_run(sweep_id).data.params == {"design": "all"}
    assert not any(t.startswith("coin_ray.param_conflict") for t in client.get_run(sweep_id).data.tags)

    name = "ImageNet>TextVQA>ScienceQA-s1"
    first = tracker_for(store, "resume", name, parent=sweep_id)
    drive(first, name, fail_at=2)  # stages 0 and 1 logged, then the worker died
    assert client.get_run(first.run_id).info.status == "FAILED"
    assert "worker died" in client.get_run(first.run_id).data.tags["coin_ray.error"]

    second = tracker_for(store, "resume", name, parent=sweep_id)
    drive(second, name)  # the resumed run replays stages 0, 1 from the stage store, then trains stage 2
    assert second.reopened and second.run_id == first.run_id
    assert len(runs_named(client, "resume", name)) == 1
    assert client.get_run(second.run_id).info.status == "FINISHED"
    assert history(client, second.run_id, "acc/ScienceQA") == [(i, MATRIX[i][0]) for i in range(3)]
    assert len(client.get_metric_history(second.run_id, "train/loss")) == 30

    third = tracker_for(store, "resume", name, parent=sweep_id)  # rerun of a FINISHED trial
    drive(third, name)
    assert third.run_id == first.run_id and len(runs_named(client, "resume", name)) == 1
    assert client.get_run(third.run_id).info.status == "FINISHED"


def test_mark_run_failed_only_touches_running_runs(store, client):
    from tracking import MlflowTracker, mark_run_failed

    assert mark_run_failed(store, "failed", "0123456789abcdef01234567") is None
    running = tracker_for(store, "failed", "crashed")
    running.on_run_start(run_info("crashed"))
    running.on_stage_end(stage_report(0))
    running.flush(30)
    assert mark_run_failed(store, "failed", running.run_key, error=RuntimeError("OOM")) == running.run_id
    assert client.get_run(running.run_id).info.status == "FAILED"
    done = tracker_for(store, "failed", "done")
    drive(done, "done")
    mark_run_failed(store, "failed", done.run_key)
    assert client.get_run(done.run_id).info.status == "FINISHED"
    with pytest.raises(ValueError, match="run_name"):
        MlflowTracker(store, "failed", "")


def test_concurrent_trials_on_one_sqlite_store_lose_no_metric(store, client):
    """Two trials in threads, each logging 3 stages of 400 loss points: every point arrives."""
    orders = [ORDER, tuple(reversed(ORDER))]
    trackers = [tracker_for(store, "concurrent", ">".join(o)) for o in orders]
    errors: list[BaseException] = []

    def trial(tracker, order):
        try:
            tracker.on_run_start(run_info(">".join(order), order))
            for k in range(3):
                report = stage_report(k, order=order)
                report = StageReport(**{**report.__dict__, "train_losses": [(k * 400 + s, 1.0 / (1 + s))
                                                                            for s in range(400)]})
                tracker.on_stage_end(report)
            tracker.on_run_end(run_result(order=order))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=trial, args=(t, o)) for t, o in zip(trackers, orders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for tracker, order in zip(trackers, orders):
        run = client.get_run(tracker.run_id)
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 1200
        for j, task in enumerate(order):
            assert [s for s, _ in history(client, tracker.run_id, f"acc/{task}")] == [0, 1, 2]
        assert run.data.metrics["mfn"] == pytest.approx(cl_metrics(MATRIX, ZERO_SHOT)["mfn"])


def test_sweep_artifacts_report_and_ui_link(store, client, tmp_path):
    import pandas as pd

    from tracking import close_sweep_run, experiment_runs_url, log_sweep_artifacts, open_sweep_run
    from tracking.plots import matrices_figure
    from tracking.report import build_report, main

    sweep_id = open_sweep_run(store, "report", "orders-3", params={"design": "all", "tasks": "A,B,C"})
    worse = [[0.9, 0.0, 0.0], [0.1, 0.8, 0.0], [0.0, 0.1, 0.9]]
    for order, matrix in ((ORDER, MATRIX), (tuple(reversed(ORDER)), worse)):
        drive(tracker_for(store, "report", ">".join(order) + "-s0", parent=sweep_id), ">".join(order) + "-s0",
              order=order, matrix=matrix)
    trials = pd.DataFrame([{"trial": "a", "order": ">".join(ORDER), "mft": 0.88, "mfn": 0.62},
                           {"trial": "b", "order": ">".join(reversed(ORDER)), "mft": 0.87, "mfn": 0.33}])
    spread = pd.DataFrame({"task": list(ORDER), "final_acc_std": [0.1, 0.2, 0.05]})
    log_sweep_artifacts(store, sweep_id, trials, metrics={"stages_trained": 5, "stages_reused": 1, "x": math.nan},
                        figures={"heat": matrices_figure(ORDER, MATRIX, KNOWLEDGE)}, tables={"task_spread": spread},
                        texts={"summary.md": "# order effect\n"})
    close_sweep_run(store, sweep_id)
    sweep = client.get_run(sweep_id)
    assert sweep.info.status == "FINISHED"
    assert sweep.data.metrics == {"stages_trained": 5.0, "stages_reused": 1.0}
    assert {f.path for f in client.list_artifacts(sweep_id)} >= {"trials.csv", "summary.png", "analysis"}
    assert {f.path for f in client.list_artifacts(sweep_id, "analysis")} == {
        "analysis/heat.png", "analysis/task_spread.csv", "analysis/summary.md"}

    text = build_report(store, "report", sort_by="mfn", out=tmp_path / "out")
    rows = [line for line in text.splitlines() if "-s0" in line]
    assert len(rows) == 2 and rows[0].lstrip().startswith("ScienceQA>TextVQA>ImageNet-s0")  # best mfn first
    assert "[task_spread]" in text and "final_acc_std" in text
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "summary.png" in written and "trials.csv" in written and len(written) == 4
    assert main(["--experiment", "nope", "--tracking-uri", store]) == 2

    command, url = experiment_runs_url(store, "report")
    exp_id = client.get_experiment_by_name("report").experiment_id
    assert command == f"mlflow ui --backend-store-uri {store}"
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs"
    # the compare page of exactly this sweep's trial runs; each shows its order once, as task_order
    from urllib.parse import unquote

    from tracking import sweep_compare_url

    kids = client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{sweep_id}'")
    compare = unquote(sweep_compare_url(store, "report", sweep_id))
    assert compare == (f"http://127.0.0.1:5000/#/compare-runs?runs={json.dumps(sorted(r.info.run_id for r in kids))}"
                       f"&experiments=[\"{exp_id}\"]").replace(", ", ",")
    assert len(kids) == 2 and all("order" not in r.data.params and ">" in r.data.params["task_order"] for r in kids)


# ---- run identity and tracking faults --------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_trials_of_two_configs_with_one_name_get_their_own_runs(store, client):
    """Runs are found by the key tag (name + config hash), not by name: another lr is another run, a rerun of
    the same config reopens its run, and no param ever holds two values."""
    name = "ScienceQA>TextVQA>ImageNet-s0"
    a = tracker_for(store, "keys", name)
    drive(a, name)
    b = tracker_for(store, "keys", name)
    b.on_run_start(run_info(name, extra={"train.lr": 0.004, "storage_path": "/tmp/b"}))
    b.on_run_end(run_result())
    again = tracker_for(store, "keys", name)
    drive(again, name)
    assert a.run_id != b.run_id and again.run_id == a.run_id and again.reopened
    assert a.run_key != b.run_key
    assert client.get_run(a.run_id).data.params["lr"] == "0.0005"
    run_b = client.get_run(b.run_id)
    assert run_b.data.params["lr"] == "0.004" and run_b.data.tags["coin_ray.run_key"] == b.run_key
    # where the results live is a setting (a tag), not part of the identity
    assert "storage_path" not in run_b.data.params and run_b.data.tags["coin_ray.setting.storage_path"] == "/tmp/b"
    assert len(runs_named(client, "keys", name)) == 2
    assert not any(t.startswith("coin_ray.param_conflict") for r in (a, b) for t in client.get_run(r.run_id).data.tags)


def test_retries_stop_at_their_deadline():
    from tracking._runs import call_with_retry

    calls = []

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("connection refused")

    started = time.monotonic()
    with pytest.raises(ConnectionError):
        call_with_retry(down, "probe", attempts=50, base_delay_s=0.2, deadline=started + 1.0)
    assert time.monotonic() - started < 1.5 and 2 <= len(calls) <= 4


def test_spool_skips_a_torn_line_and_replays_each_write_once(store, client, tmp_path, caplog):
    from mlflow.entities import Metric

    from tracking._outbox import Write, replay_spool, spool_writes

    tracker = tracker_for(store, "spool", "spooled-run")
    tracker.on_run_start(run_info("spooled-run"))
    tracker.on_run_end(run_result())
    spool = tmp_path / "spool"
    writes = [Write("batch", metrics=[("replayed/x", float(i), 1000 + i, i)]) for i in range(5)]
    folder = spool_writes(spool, tracker.run_id, writes[:4])
    with open(folder / "writes.jsonl", "a") as f:  # the spooling process died mid-line
        f.write('{"kind": "batch", "metr')
    spool_writes(spool, tracker.run_id, writes[4:])  # a later spooling keeps its line apart from the torn one
    (folder / "replayed").write_text("2")  # an earlier replay delivered two writes, then was interrupted
    client.log_batch(tracker.run_id, metrics=[Metric("replayed/x", float(i), 1000 + i, i) for i in range(2)])
    caplog.set_level("WARNING")
    assert replay_spool(spool, store) == 3
    assert history(client, tracker.run_id, "replayed/x") == [(i, float(i)) for i in range(5)]  # once each
    assert any("torn" in r.getMessage() and "line 5 of 6" in r.getMessage() for r in caplog.records)
    assert not folder.exists() and replay_spool(spool, store) == 0


def test_report_against_a_down_server_fails_fast_with_one_line(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    port = _closed_port()
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(root / "tracking" / "report.py"), "--experiment", "x",
                           "--tracking-uri", f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(root)})
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert elapsed < 15, elapsed
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow tracking server at") and "did not answer" in lines[0]


def test_sweep_against_a_down_server_stops_in_preflight_within_seconds(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(root / "sweeps" / "task_order.py"), "--smoke-test",
                           "--storage-path", str(tmp_path / "runs"), "--tracking-uri",
                           f"http://127.0.0.1:{_closed_port()}"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and "did not answer" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert elapsed < 20, elapsed
    assert not (tmp_path / "runs" / "tune").exists()  # no trial started


def test_a_trial_end_against_a_hanging_server_spools_within_its_flush_timeout(tmp_path):
    """A server that accepts connections and never answers: close() waits flush_timeout_s, not the request's
    30 s timeout, then spools every write (the one in flight included)."""
    from mlflow import MlflowClient

    from tracking._outbox import Outbox, Write

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        outbox = Outbox(MlflowClient(uri), "0123456789abcdef", tmp_path / "spool")
        for i in range(3):
            outbox.put(Write("batch", metrics=[("m", float(i), 1000 + i, i)]))
        started = time.monotonic()
        folder = outbox.close(timeout_s=1.0)
        elapsed = time.monotonic() - started
    finally:
        listener.close()
    assert elapsed < 8, elapsed
    assert folder == tmp_path / "spool" / "0123456789abcdef"
    assert len((folder / "writes.jsonl").read_text().splitlines()) == 3


def test_trial_run_records_cost_and_system_metrics_unless_turned_off(store, client, monkeypatch):
    """stage/* at step = stage index, the trial's device_hours and device_hours_saved, and MLflow's system/*
    metrics sampled while the run is open; tracking.system_metrics false records none."""
    from dataclasses import replace

    from coin_ray.training.accounting import STAGE_METRICS

    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    ids = {}
    for on in (True, False):
        tracker = tracker_for(store, "system", f"sys-{on}", system_metrics=on)
        tracker.on_run_start(run_info(f"sys-{on}"))
        for k in range(3):
            cost = {name: float(k + 1) for name in STAGE_METRICS}
            tracker.on_stage_end(replace(stage_report(k), cost=cost))
            time.sleep(0.4 if on else 0)
        tracker.on_run_end(replace(run_result(), device_hours=0.25, device_hours_saved=0.5))
        ids[on] = tracker.run_id
    for name in STAGE_METRICS:
        assert history(client, ids[True], name) == [(0, 1.0), (1, 2.0), (2, 3.0)]
    metrics = client.get_run(ids[True]).data.metrics
    assert (metrics["device_hours"], metrics["device_hours_saved"]) == (0.25, 0.5)
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert not [k for k in client.get_run(ids[False]).data.metrics if k.startswith("system/")]
