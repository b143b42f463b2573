"""Run identity and atomic files, without Ray: the config hash in names, run keys, result.json checked against
its key, torn JSON read as absent, and CL metrics over a knowledge matrix with cells the judge could not rate."""
from __future__ import annotations

import json
import os

import pytest

from coin_ray.config import ExperimentConfig
from coin_ray.identity import config_hash, run_key

ORDER = ["ScienceQA", "TextVQA", "ImageNet"]


def _cfg(**changes) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"order": ORDER, "storage_path": "/tmp/x", **changes})


@pytest.mark.parametrize("field, value", [
    ("train.lr", 0.004), ("tuner.rank", 8), ("model.hidden", 64), ("data.max_train_rows", 10),
    ("data.benchmark", "coin"), ("eval.judge", "none"), ("eval.batch_size", 7), ("scaling.num_workers", 2),
    ("train.seed", 3), ("order", ["TextVQA", "ScienceQA", "ImageNet"]),
])
def test_every_result_changing_field_changes_the_config_hash(field, value):
    extra = {"data.instructions": "/i", "data.images": "/m"} if field == "data.benchmark" else {}
    base = config_hash(_cfg().flatten(), "d1")
    assert config_hash(_cfg(**{field: value}, **extra).flatten(), "d1") != base
    assert config_hash(_cfg().flatten(), "d2") != base  # the data hash too


@pytest.mark.parametrize("field, value", [
    ("storage_path", "/elsewhere"), ("name", "other"), ("tracking.experiment", "e2"),
    ("tracking.tracking_uri", "sqlite:////tmp/other.db"), ("scaling.cpus_per_worker", 2.0),
    ("scaling.max_failures", 0), ("eval.max_predictions_logged", 3), ("use_stage_cache", False),
])
def test_where_and_how_logged_do_not_change_the_config_hash(field, value):
    assert config_hash(_cfg(**{field: value}).flatten(), "d") == config_hash(_cfg().flatten(), "d")


def test_trial_names_carry_the_config_hash_and_stay_readable():
    from coin_ray.studies.runner import trial_config

    base = _cfg().to_dict()
    a = trial_config(base, {"order": "TextVQA>ScienceQA>ImageNet", "seed": 1}, "d")
    again = trial_config(base, {"order": "TextVQA>ScienceQA>ImageNet", "seed": 1}, "d")
    other_lr = trial_config(_cfg(**{"train.lr": 0.004}).to_dict(), {"order": "TextVQA>ScienceQA>ImageNet", "seed": 1},
                            "d")
    assert a.name == again.name and a.name.startswith("TextVQA>ScienceQA>ImageNet-s1-")
    assert len(a.name.rsplit("-", 1)[1]) == 6 and a.name != other_lr.name
    hp = trial_config(base, {"order": "ScienceQA>TextVQA>ImageNet", "seed": 0, "hp.tuner.rank": 8}, "d")
    assert "-s0-rank=8-" in hp.name and hp.tuner.rank == 8
    assert run_key(a.name, a.flatten(), "d") != run_key(other_lr.name, other_lr.flatten(), "d")


def test_sweep_names_differ_with_the_config(tmp_path):
    from coin_ray.studies.runner import SweepSpec, sweep_key

    one = SweepSpec(name="s", base=_cfg(), param_space={}, sweep_params={"design": "all"})
    assert sweep_key(one, "d") == sweep_key(SweepSpec(name="s", base=_cfg(), param_space={},
                                                      sweep_params={"design": "all"}), "d")
    assert sweep_key(one, "d") != sweep_key(SweepSpec(name="s", base=_cfg(**{"train.lr": 0.004}), param_space={},
                                                      sweep_params={"design": "all"}), "d")
    assert sweep_key(one, "d") != sweep_key(SweepSpec(name="s", base=_cfg(), param_space={},
                                                      sweep_params={"design": "latin"}), "d")


def _write_result(cfg: ExperimentConfig, payload) -> None:
    folder = os.path.join(cfg.storage_path, "runs", cfg.name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "result.json"), "w") as f:
        f.write(payload if isinstance(payload, str) else json.dumps(payload))


def test_a_result_is_loaded_only_for_its_own_config(tmp_path):
    from coin_ray.training.continual import NoRunResult, load_run_result

    cfg = _cfg(storage_path=str(tmp_path), name="trial-a")
    result = {"order": ORDER, "matrix": [[1.0]], "zero_shot": None, "knowledge_matrix": None,
              "knowledge_zero_shot": None, "metrics": {"mft": 1.0}, "stages_reused": [], "adapter_dir": None}
    with pytest.raises(NoRunResult, match="no finished result"):
        load_run_result(cfg, "d")
    _write_result(cfg, '{"order": ["ScienceQA"], "matr')  # torn: a crash mid-write by an old version
    with pytest.raises(NoRunResult, match="torn"):
        load_run_result(cfg, "d")
    other = cfg.replace(**{"train.lr": 0.004})  # same name (folder), another config: never its result
    _write_result(cfg, {**result, "run_key": run_key(other.name, other.flatten(), "d")})
    with pytest.raises(NoRunResult, match="another config"):
        load_run_result(cfg, "d")
    with pytest.raises(NoRunResult, match="another config"):
        load_run_result(cfg, "other-data")
    _write_result(cfg, {**result, "run_key": run_key(cfg.name, cfg.flatten(), "d")})
    assert load_run_result(cfg, "d").metrics == {"mft": 1.0}


def test_atomic_json_leaves_no_temp_file_and_torn_json_reads_as_absent(tmp_path):
    from coin_ray._files import read_json, write_json_atomic

    target = tmp_path / "deep" / "stages.json"
    write_json_atomic(target, [{"stage": 0}])
    write_json_atomic(target, [{"stage": 0}, {"stage": 1}])
    assert read_json(target) == [{"stage": 0}, {"stage": 1}]
    assert [p.name for p in target.parent.iterdir()] == ["stages.json"]
    target.write_text('[{"stage": 0}, {"sta')
    assert read_json(target) is None and read_json(tmp_path / "missing.json") is None
    target.write_bytes(b"\xff\xfe")
    assert read_json(target) is None


def test_knowledge_metrics_only_where_every_needed_cell_was_judged():
    from coin_ray.training.evaluate import judge_failed as _judge_failed
    from coin_ray.training.loop import final_metrics as _final_metrics

    matrix = [[0.9, 0.1], [0.5, 0.8]]
    full = _final_metrics(matrix, None, [[0.7, 0.2], [0.6, 0.9]], None)
    assert {"mft", "gk_mft", "gk_bwt"} <= set(full)
    partial = _final_metrics(matrix, None, [[0.7, None], [None, 0.9]], None)  # the judge failed on a cell
    assert "mft" in partial and not any(k.startswith("gk_") for k in partial)
    above = _final_metrics(matrix, None, [[0.7, None], [0.6, 0.9]], [None, None])  # above the diagonal: fine
    assert "gk_mfn" in above and "gk_fwt" not in above
    assert _judge_failed({"knowledge": None, "knowledge_error": "down"})
    assert _judge_failed({"knowledge": 0.5, "knowledge_failures": 2})  # stored by an older version
    assert not _judge_failed({"knowledge": 0.5, "knowledge_failures": 0})


def test_a_method_in_the_space_names_the_trial_and_keys_its_stages():
    from coin_ray.studies.runner import trial_config
    from coin_ray.training.stages import stage_material

    base = _cfg().to_dict()
    trial = {"order": "TextVQA>ScienceQA>ImageNet", "seed": 0}
    olora = trial_config(base, {**trial, "method": "olora"}, "d")
    ewc = trial_config(base, {**trial, "method": "ewc+replay"}, "d")
    assert "-olora-" in olora.name and (olora.tuner.method, olora.cl.method) == ("lora", "olora")
    assert (ewc.cl.method, ewc.train.replay_per_task) == ("ewc", 20) and "-ewc+replay-" in ewc.name
    lora = trial_config(base, {**trial, "method": "lora"}, "d")
    keys = {stage_material(c, "d", ("TextVQA",))["tuner.method"] for c in (olora, lora)}
    assert keys == {"lora"}  # same tuner: the cl method and its options tell the stages apart
    material = stage_material(olora, "d", ("TextVQA",))
    assert material["cl.method"] == "olora" and material["olora.tasks"] == 3 and "cl.method" not in stage_material(
        lora, "d", ("TextVQA",))
