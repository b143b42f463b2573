"""Continual runs with real Ray: in-process and on a Ray Train worker, checkpoints, resume, crash recovery."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from coin_ray.config import ExperimentConfig
from coin_ray.evaluation import cl_metrics
from coin_ray.training.stages import stage_seed

ORDER = ["ScienceQA", "TextVQA", "ImageNet"]


def test_stage_seed_depends_on_prefix_only():
    assert stage_seed(0, ("A", "B")) == stage_seed(0, ("A", "B"))
    assert stage_seed(0, ("A", "B")) != stage_seed(0, ("B", "A"))
    assert stage_seed(0, ("A",)) != stage_seed(1, ("A",))


def test_the_run_config_unpickles_without_torch_and_every_package_name_loads():
    """Ray Train's controller unpickles the run's WorkerConfig: that must not import torch (seconds per trial)."""
    import pickle
    import subprocess
    import sys

    from coin_ray.training.types import PreparedData, WorkerConfig

    config = pickle.dumps({"worker": WorkerConfig(
        experiment=_cfg("/tmp/x", "probe").to_dict(), stage_rows=(48,),
        data=PreparedData("p", {"ScienceQA": {"train": "t"}}, {"ScienceQA": {"train": 48}}, "h", "synthetic", "i", "m"))})
    probe = "import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); print(c['worker'].stage_rows, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], input=config, capture_output=True, check=True).stdout
    assert out.decode().split() == ["(48,)", "False"]
    import coin_ray.training as training

    assert all(getattr(training, name) is not None for name in training.__all__)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        training.nope


def _cfg(storage, name, workers=0, **extra):
    return ExperimentConfig.from_dict({
        "order": ORDER, "name": name, "storage_path": str(storage), "scaling.num_workers": workers, "eval.judge": "none",
        "model.pretrain_steps": 0,
        "train.max_steps": 6, "train.batch_size": 8, "data.train_rows": 48, "data.test_rows": 8,
        "eval.batch_size": 8, "model.hidden": 64, "model.intermediate": 128, "tuner.rank": 8,
        "tuner.num_experts": 2, **extra})


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    from coin_ray.training import prepare_data

    storage = tmp_path_factory.mktemp("shared-data")
    return storage, prepare_data(_cfg(storage, "prep"))


@pytest.mark.integration
def test_local_run_matrix_metrics_resume_and_checkpoint(prepared, tmp_path):
    from coin_ray.training import run_continual
    from coin_ray.tuners import load_tuner

    storage, data = prepared
    cfg = _cfg(storage, "local-a")
    first = run_continual(cfg, prepared=data)
    assert len(first.matrix) == 3 and all(len(r) == 3 for r in first.matrix)
    assert all(0.0 <= x <= 1.0 for row in first.matrix for x in row)
    expected = cl_metrics(first.matrix)
    for key in ("mft", "mfn", "maa", "bwt", "forgetting"):
        assert math.isclose(first.metrics[key], expected[key], rel_tol=1e-9), key
    assert first.stages_reused == ()
    # a rerun with the same content trains nothing and gives the same matrix
    again = run_continual(cfg.replace(name="local-b"), prepared=data)
    assert again.stages_reused == (0, 1, 2) and again.matrix == first.matrix
    # the stage-2 checkpoint loads into a fresh model and reproduces stage-2 outputs
    stages = json.loads((storage / "runs" / "local-a" / "stages.json").read_text())
    stage2 = stages[1]
    from coin_ray.models import build_vlm

    base, processor = build_vlm("tiny", **cfg.model.tiny_kwargs())
    load_tuner(base, f"{stage2['path']}/checkpoint/adapter")
    from coin_ray.evaluation.generation import evaluate_task

    cell = evaluate_task(base, processor, "TextVQA", data.splits["TextVQA"]["test"], batch_size=8,
                         device=torch.device("cpu"))
    assert math.isclose(cell["score"], first.matrix[1][1])


@pytest.mark.integration
def test_ray_train_worker_recovers_from_a_crash_with_the_same_matrix(prepared, tmp_path):
    from coin_ray.training import run_continual
    from coin_ray.training.faults import KillOnce

    storage, data = prepared
    plain = run_continual(_cfg(storage, "ray-plain", workers=1, use_stage_cache=False), prepared=data)
    assert len(plain.matrix) == 3
    assert math.isclose(plain.metrics["mfn"], cl_metrics(plain.matrix)["mfn"])
    marker = tmp_path / "killed-once"
    crashed = run_continual(_cfg(storage, "ray-crash", workers=1, use_stage_cache=False), prepared=data,
                            step_callbacks=[KillOnce(str(marker), stage=1, step=3)])
    assert marker.exists(), "the KillOnce step callback did not fire"
    assert crashed.matrix == plain.matrix
    assert 0 in crashed.stages_reused  # stage 0 came back from the run's own checkpoints after the restart


@pytest.mark.integration
def test_two_data_parallel_workers_with_grad_accum(prepared, tmp_path):
    """2 Ray Train workers on CPU (gloo), grad_accum 2: finite losses, a complete matrix, and every test row
    evaluated exactly once across the two ranks (disjoint shards merged)."""
    from pathlib import Path

    from coin_ray.training import run_continual
    from coin_ray.training.store import StageStore

    storage, data = prepared
    cfg = _cfg(storage, "ddp-2", workers=2, use_stage_cache=False, **{"train.grad_accum": 2,
                                                                       "scaling.max_failures": 0})
    result = run_continual(cfg, prepared=data)
    assert len(result.matrix) == 3 and all(v is not None and 0 <= v <= 1 for row in result.matrix for v in row)
    stages = json.loads((storage / "runs" / "ddp-2" / "stages.json").read_text())
    for s in stages:
        losses = json.loads((Path(s["path"]) / "checkpoint" / "train_losses.json").read_text())
        assert len(losses) == 6 and all(math.isfinite(loss) for _, loss in losses)
        for task in ORDER:
            (cell_file,) = (Path(s["path"]) / "eval").glob(f"{task}-*.json")
            cell = StageStore.read_eval(Path(s["path"]), cell_file.stem)
            assert cell["n"] == data.rows[task]["test"], (task, cell["n"])


@pytest.mark.integration
def test_a_judge_that_is_down_leaves_null_knowledge_and_nothing_cached(prepared, tmp_path):
    """The llm judge on a closed loopback port: the run finishes with its instruction matrix and metrics,
    knowledge cells are null with a reason, no gk_* metric, and no eval cell is cached; once a judge answers
    on that port, a rerun (stages reused) judges every cell."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from coin_ray.training import run_continual
    from coin_ray.training.evaluate import eval_cell_name
    from coin_ray.training.store import StageStore

    storage, data = prepared
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    options = {"base_url": f"http://127.0.0.1:{port}/v1", "model": "judge", "max_retries": 1, "backoff_s": 0.01}
    cfg = _cfg(storage, "judge-down", **{"eval.judge": "llm", "eval.judge_options": options})
    down = run_continual(cfg, prepared=data)
    assert len(down.matrix) == 3 and all(x is not None for row in down.matrix for x in row)
    assert down.knowledge_matrix == [[None] * 3] * 3
    assert "mfn" in down.metrics and not any(k.startswith("gk_") for k in down.metrics)
    stages = json.loads((storage / "runs" / "judge-down" / "stages.json").read_text())
    for stage in stages:
        for task in ORDER:
            assert not (Path(stage["path"]) / "eval" / f"{eval_cell_name(task, cfg)}.json").exists()

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's name
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "7"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", port), Judge)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        up = run_continual(cfg.replace(name="judge-up"), prepared=data)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert up.stages_reused == (0, 1, 2) and up.matrix == down.matrix and "gk_mfn" in up.metrics
    # every reply the judge rated scores 0.7; an empty reply scores 0 without asking it (see the llm judge)
    for k, stage in enumerate(stages):
        for j, task in enumerate(ORDER):
            cell = StageStore.read_eval(Path(stage["path"]), eval_cell_name(task, cfg))
            replies = [p["prediction"] for p in cell["predictions"]]
            assert len(replies) == cell["n"] == 8
            assert up.knowledge_matrix[k][j] == pytest.approx(sum(0.7 for r in replies if r.strip()) / 8)


@pytest.mark.integration
def test_a_task_with_its_own_batch_size_trains_its_stage_with_it(prepared):
    """train.batch_size_per_task: TextVQA's stage trains 48 rows in batches of 16 (3 steps of one epoch), the
    ScienceQA stage before it in batches of 8 (6 steps); the stage key carries the stage's own batch size, so
    the ScienceQA stage is shared with a run without the per-task entry."""
    from coin_ray.training import run_continual
    from coin_ray.training.continual import stage_schedule
    from coin_ray.training.stages import stage_material

    storage, data = prepared
    both = ("ScienceQA", "TextVQA")
    common = {"order": list(both), "train.max_steps": 0, "train.epochs": 1}
    own = _cfg(storage, "own-batch", **common, **{"train.batch_size_per_task": {"TextVQA": 16}})
    steps: list[int] = []
    first = run_continual(own, prepared=data, step_callbacks=[lambda stage, step: steps.append(stage)])
    assert (steps.count(0), steps.count(1)) == (48 // 8, 48 // 16) and first.stages_reused == ()
    assert stage_schedule(own, both, 48) == (16, 16, 3) and stage_schedule(own, both[:1], 48) == (8, 8, 6)
    stages = json.loads((storage / "runs" / "own-batch" / "stages.json").read_text())
    losses = json.loads((Path(stages[1]["path"]) / "checkpoint" / "train_losses.json").read_text())
    assert [step for step, _ in losses] == [1, 2, 3]
    assert [stage_material(own, data.data_hash, p)["train.batch_size"] for p in (both[:1], both)] == [8, 16]

    steps.clear()
    plain = run_continual(_cfg(storage, "plain-batch", **common), prepared=data,
                          step_callbacks=[lambda stage, step: steps.append(stage)])
    assert plain.stages_reused == (0,) and steps == [1] * (48 // 8)  # TextVQA at batch 8: its own stage
