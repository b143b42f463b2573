"""The real continual loop once, in the fast tier: two stages of a tiny model in-process (num_workers 0), so a
change to the loop is caught in under a minute. The Ray Train, data-parallel and crash-recovery paths run in
the integration tier (tests/test_training.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from coin_ray.config import ExperimentConfig
from coin_ray.evaluation import cl_metrics
from coin_ray.training.accounting import STAGE_METRICS


def test_two_stage_in_process_run_trains_evaluates_and_resumes(ray_cluster, tmp_path):
    from coin_ray.training import run_continual

    steps_seen = []
    reports = []

    class Recorder:  # a RunHooks consumer that keeps the stage reports
        def __getattr__(self, event):
            return (lambda report: reports.append(report)) if event == "on_stage_end" else (lambda *a, **k: None)

    cfg = ExperimentConfig.from_dict({
        "order": ["ScienceQA", "TextVQA"], "name": "fast-loop", "storage_path": str(tmp_path),
        "scaling.num_workers": 0, "eval.judge": "none", "eval.zero_shot": True, "model.pretrain_steps": 0,
        "train.max_steps": 3, "train.batch_size": 8, "data.train_rows": 16, "data.test_rows": 8,
        "eval.batch_size": 8, "model.hidden": 32, "model.intermediate": 64, "model.vision_hidden": 32,
        "tuner.rank": 4, "tuner.num_experts": 2})
    first = run_continual(cfg, step_callbacks=[lambda stage, step: steps_seen.append((stage, step))],
                          hooks_factory=Recorder)
    assert steps_seen == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # every optimizer step, per stage
    assert len(first.matrix) == 2 and all(len(row) == 2 for row in first.matrix)
    assert all(0.0 <= v <= 1.0 for row in first.matrix for v in row) and len(first.zero_shot) == 2
    expected = cl_metrics(first.matrix, zero_shot=first.zero_shot)
    assert all(math.isclose(first.metrics[k], expected[k]) for k in ("mft", "mfn", "bwt", "fwt"))
    run_dir = tmp_path / "runs" / "fast-loop"
    stages = json.loads((run_dir / "stages.json").read_text())
    assert [s["task"] for s in stages] == ["ScienceQA", "TextVQA"] and not any(s["reused"] for s in stages)
    for s in stages:
        losses = json.loads((Path(s["path"]) / "checkpoint" / "train_losses.json").read_text())
        assert [step for step, _ in losses] == [1, 2, 3] and all(math.isfinite(v) for _, v in losses)
    assert json.loads((run_dir / "result.json").read_text())["matrix"] == first.matrix
    # the same config under another name takes both stages from the store: nothing trains, same matrix
    again = run_continual(cfg.replace(name="fast-loop-again"),
                          step_callbacks=[lambda stage, step: steps_seen.append((stage, step))], hooks_factory=Recorder)
    assert again.stages_reused == (0, 1) and again.matrix == first.matrix and len(steps_seen) == 6
    # accounting: every stage/* metric; a trained stage's are positive (3 steps x 8 rows), a reused one cost 0
    # and saved what it cost (training and the evaluation cells it reads)
    trained, reused = reports[:2], reports[2:]
    for report in trained:
        assert set(report.cost) == set(STAGE_METRICS) and all(v > 0 for v in report.cost.values()), report.cost
        assert report.cost["stage/train_examples"] == 24
        assert report.cost["stage/train_tokens"] > report.cost["stage/train_examples"]
        assert report.cost["stage/eval_answers"] == 16  # 8 test rows of each of the 2 tasks
    for report in reused:
        assert report.cost["stage/device_hours"] == 0 and report.cost["stage/train_tokens"] == 0
    assert first.device_hours > 0 and first.device_hours_saved == 0
    assert again.device_hours == 0 and again.device_hours_saved >= sum(
        r.cost["stage/device_hours"] for r in trained)
    stored = json.loads((Path(stages[0]["path"]) / "meta.json").read_text())["accounting"]
    assert stored["train_tokens"] == trained[0].cost["stage/train_tokens"] and stored["device_kind"] == "cpu"
