"""Each continual-learning method through the real loop (in-process, two stages of a tiny VLM): what it
carries from stage to stage lives in the stage checkpoint, so a stage retrained from a stored previous stage
(resume, the stage cache) is the stage trained in one go."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coin_ray.config import ExperimentConfig
from coin_ray.methods import method_changes
from coin_ray.methods.ewc import FISHER_FILE
from coin_ray.tuners import TUNER_WEIGHTS_NAME


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    yield
    torch.set_num_threads(threads)


def _cfg(storage: Path, method: str, name: str) -> ExperimentConfig:
    return ExperimentConfig.from_dict({
        "order": ["ScienceQA", "TextVQA"], "name": name, "storage_path": str(storage), "scaling.num_workers": 0,
        "eval.judge": "none", "model.pretrain_steps": 0, "train.max_steps": 3, "train.batch_size": 8,
        "data.train_rows": 16, "data.test_rows": 8, "eval.batch_size": 8, "model.hidden": 32,
        "model.intermediate": 64, "model.vision_hidden": 32, "tuner.rank": 4, "cl.ewc_samples": 4,
        **method_changes(method)})


def _stages(storage: Path, name: str) -> list[dict]:
    return json.loads((storage / "runs" / name / "stages.json").read_text())


def _weights(stage: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(stage["path"]) / "checkpoint" / "adapter" / TUNER_WEIGHTS_NAME))


@pytest.mark.integration
@pytest.mark.parametrize("method", ["olora", "ewc", "lwf"])
def test_a_method_resumes_from_a_stored_stage_exactly(ray_cluster, tmp_path, method):
    from coin_ray.training import run_continual
    from coin_ray.training.store import StageStore

    first = run_continual(_cfg(tmp_path, method, "a"))
    s0, s1 = _stages(tmp_path, "a")
    w0, w1 = _weights(s0), _weights(s1)
    if method == "olora":  # stage 1 trained its own block; the first task's block is untouched
        a_names = [n for n in w0 if ".lora_A." in n]
        assert a_names and all(w0[n].shape[0] == 8 for n in a_names)
        assert all(torch.equal(w1[n][:4], w0[n][:4]) and not torch.equal(w1[n][4:], w0[n][4:]) for n in a_names)
    if method == "ewc":  # the Fisher accumulates: stage 1's holds stage 0's plus its own
        f0, f1 = (load_file(str(Path(s["path"]) / "checkpoint" / FISHER_FILE)) for s in (s0, s1))
        assert f0.keys() == f1.keys() == w0.keys() and all((f1[n] >= f0[n]).all() for n in f0)
        assert any((f1[n] > f0[n]).any() for n in f0)
    # stage 1 again, from the stored stage 0 (its state read back from the store): the same result
    StageStore(tmp_path / "stage_store").delete(s1["key"])
    again = run_continual(_cfg(tmp_path, method, "b"))
    assert again.stages_reused == (0,) and again.matrix == first.matrix
    assert all(torch.equal(_weights(_stages(tmp_path, "b")[1])[n], w1[n]) for n in w1)
