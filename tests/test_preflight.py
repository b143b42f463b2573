"""What a new user gets wrong is refused before Ray starts, in one line naming the flag or config key they
have: grids over folders, unknown grid keys, contradicting flags, model folders (family, prompt, truncated
weights), CoIN folders and annotation files, judge options, workers per trial; names built from any value are
safe; a sweep that dies closes its MLflow run; duplicate record ids are reported. No Ray here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _checkpoints import save_tiny_checkpoint
from coin_ray.config import AUTO_PROMPTS, ExperimentConfig
from coin_ray.errors import UserError
from coin_ray.studies.checks import check_before_ray
from coin_ray.studies.naming import value_label

ROOT = Path(__file__).resolve().parent.parent
FOLDER = "/data/llava-1.5-7b-hf"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny checkpoint folder of each family, saved with save_pretrained (fp32)."""
    root = tmp_path_factory.mktemp("ckpt")
    return {family: save_tiny_checkpoint(root / family, torch.float32, family=family)
            for family in ("llava", "qwen2_vl")}


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    # an address nobody answers on: a check that came after Ray's start would end in that error instead
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / script), *args, "--no-tracking",
                           "--address", "127.0.0.1:9"], cwd=cwd, capture_output=True, text=True, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, message: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--grid", "nosuch.key=1,2"], "--grid nosuch.key: unknown key 'nosuch.key'"),
    (["--grid", f"model.source=tiny,{FOLDER}"], "--grid model.source: a sweep prepares its data once"),
    (["--set", f"model.source={FOLDER}"], f"model.source '{FOLDER}' is not a local folder"),
    (["--methods", "olora", "--set", "tuner.method=moelora"],
     "--methods olora trains with tuner.method lora, but --set tuner.method=moelora"),
    (["--workers-per-trial", "0"], "--workers-per-trial 0: a sweep needs at least 1 Ray Train worker"),
    (["--set", "eval.judge_options.api_key=sk-do-not-echo"],
     "eval.judge_options is a mapping, set as a whole: --set 'eval.judge_options={base_url: ..., model: ..., "
     "api_key: ...}'"),
])
def test_bad_sweep_input_is_one_line_before_ray(tmp_path, args, message):
    line = _one_line_error(_run("task_order.py", "--smoke-test", *args, cwd=tmp_path), message)
    assert "sk-do-not-echo" not in line
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing started


def test_contradictions_are_refused():
    """--methods sets tuner.method / cl.method: another value given with --set or varied with --grid is
    refused; the same value, or what --methods leaves alone, is not."""
    from coin_ray.studies import cli

    task_order = _script("task_order")
    plan = lambda *argv: task_order.plan(task_order.parse_args(list(argv)))  # noqa: E731
    with pytest.raises(cli.UsageError, match="leave --methods out and --set cl.method=ewc"):
        plan("--methods", "ewc", "--set", "tuner.method=moelora")
    with pytest.raises(cli.UsageError, match="--grid tuner.method contradicts it"):
        plan("--methods", "lora,olora", "--grid", "tuner.method=lora,moelora")
    assert plan("--methods", "olora", "--set", "tuner.method=lora")[5] == ["olora"]
    assert plan("--methods", "lora", "--set", "tuner.rank=8")[5] == ["lora"]
    # hparams.py without --methods trains the config's method (the default moelora no longer overrides --set)
    hparams = _script("hparams")
    args = hparams.parse_args(["--set", "tuner.method=lora"])
    assert args.methods is None


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"preflight_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_names_from_any_value_are_safe_and_distinct():
    from coin_ray.studies.runner import trial_config

    assert [value_label(v) for v in ("tiny", 32, 0.001, "lora", True)] == ["tiny", "32", "0.001", "lora", "True"]
    label = value_label(FOLDER)
    assert label.startswith("llava-1.5-7b-hf~") and "/" not in label
    assert value_label("/other/llava-1.5-7b-hf") != label  # same folder name, another path: another hash
    long = value_label("x" * 300)
    assert len(long) <= 24 and "/" not in value_label(["q_proj", "v_proj"])
    base = ExperimentConfig.from_dict({"order": ["ScienceQA", "TextVQA"]}).to_dict()
    cfg = trial_config(base, {"hp.model.source": FOLDER, "seed": 0}, "d" * 12)
    assert "/" not in cfg.name and label in cfg.name and cfg.model.source == FOLDER


def test_model_prompt_auto_is_the_familys_own(folders):
    from coin_ray.models.families import FAMILIES

    assert all(AUTO_PROMPTS.get(n, "checkpoint") == f.prompts[0] for n, f in FAMILIES.items())
    default = ExperimentConfig()
    assert default.model.prompt == "auto" and default.flatten()["model.prompt"] == "vicuna_v1"  # tiny: as before
    assert ExperimentConfig.from_dict({"model.source": str(folders["llava"])}).model.resolved_prompt() == "vicuna_v1"
    qwen = default.replace(**{"model.source": str(folders["qwen2_vl"])})
    assert qwen.model.resolved_prompt() == "checkpoint" and qwen.flatten()["model.prompt"] == "checkpoint"
    check_before_ray(qwen)  # the default config accepts a Qwen2-VL folder
    with pytest.raises(UserError, match="run one sweep per value"):  # every trial trains on the one prepared data
        check_before_ray(default, grid={"model.source": ["tiny", str(folders["qwen2_vl"])]})
    explicit = ExperimentConfig.from_dict({"model.source": str(folders["qwen2_vl"]), "model.prompt": "vicuna_v1"})
    with pytest.raises(UserError, match="prompted with checkpoint only: set model.prompt checkpoint"):
        check_before_ray(explicit)
    no_template = ExperimentConfig.from_dict({"model.source": str(folders["llava"]), "model.prompt": "checkpoint"})
    with pytest.raises(UserError, match="holds no chat template"):
        check_before_ray(no_template)


def test_weights_that_cannot_be_read_are_refused_from_their_header(folders, tmp_path):
    import shutil

    folder = shutil.copytree(folders["llava"], tmp_path / "llava")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a copy cut short
    cfg = ExperimentConfig.from_dict({"model.source": str(folder)})
    with pytest.raises(UserError, match=r"weights file model.safetensors cannot be read \(truncated: its tensors "
                                        rf"need {len(data)} bytes, the file has {len(data) // 2}\)"):
        check_before_ray(cfg)
    weights.write_bytes(data[:5])
    with pytest.raises(UserError, match="shorter than a safetensors header"):
        check_before_ray(cfg)
    weights.unlink()
    with pytest.raises(UserError, match="holds no weights"):
        check_before_ray(cfg)


def _coin(tmp_path: Path, **extra) -> ExperimentConfig:
    instr, images = tmp_path / "Instructions_Original", tmp_path / "images"
    for task in ("ScienceQA", "TextVQA"):
        (instr / task).mkdir(parents=True, exist_ok=True)
        (instr / task / "train.json").write_text("[]")
        (instr / task / "test.json").write_text("[]")
    images.mkdir(exist_ok=True)
    return ExperimentConfig.from_dict({"order": ["ScienceQA", "TextVQA"], "data.benchmark": "coin",
                                       "data.instructions": str(instr), "data.images": str(images), **extra})


def test_coin_folders_annotations_judge_and_workers_are_checked_naming_the_config_key(tmp_path):
    check_before_ray(_coin(tmp_path))
    with pytest.raises(UserError, match="data.instruction_style diverse: no Instructions_Diverse folder"):
        check_before_ray(_coin(tmp_path, **{"data.instruction_style": "diverse"}))
    with pytest.raises(UserError, match="data.images .*: no such folder"):
        check_before_ray(_coin(tmp_path, **{"data.images": str(tmp_path / "nope")}))
    with pytest.raises(UserError, match="task folder .*GQA does not exist: data.instructions must hold"):
        check_before_ray(_coin(tmp_path, order=["ScienceQA", "GQA"]))
    missing = tmp_path / "TextVQA_0.5.1_val.json"
    with pytest.raises(UserError, match=rf"^data.textvqa_annotations {missing}: cannot be read"):
        check_before_ray(_coin(tmp_path, **{"data.textvqa_annotations": str(missing)}))
    with pytest.raises(UserError, match=r"^eval.judge llm with eval.judge_options: invalid llm judge options: "
                                        r"base_url must start with http"):
        check_before_ray(_coin(tmp_path, **{"eval.judge": "llm",
                                            "eval.judge_options": {"base_url": "judge:8000", "model": "m"}}))
    with pytest.raises(UserError, match="^scaling.num_workers 0: a sweep needs at least 1"):
        check_before_ray(_coin(tmp_path, **{"scaling.num_workers": 0}))
    # a --grid value is checked like the base config's
    with pytest.raises(UserError, match="the 'llm' judge needs option"):
        check_before_ray(_coin(tmp_path), grid={"eval.judge": ["none", "llm"]})


def test_a_sweep_that_dies_closes_its_mlflow_run_failed(tmp_path):
    from mlflow import MlflowClient

    from coin_ray.studies import cli
    from tracking import open_sweep_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def main():
        open_sweep_run(uri, "exp", "sweep-x", params={"design": "all"})
        raise RuntimeError("Tune refused a trial name\nsecond line")

    with pytest.raises(RuntimeError):
        cli.run_main(main)
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("exp").experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.tags["coin_ray.error"] == "RuntimeError: Tune refused a trial name"


def test_duplicate_record_ids_are_reported_kept_in_train_rejected_in_test(tmp_path, capsys):
    from PIL import Image

    from pipelines import plan

    instr, images = tmp_path / "Instructions", tmp_path / "images"
    (instr / "ScienceQA").mkdir(parents=True)
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    turn = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A"}]
    train = [{"id": i, "image": "a.png", "conversations": turn} for i in (1, 2, 1, 1)]
    test = [{"question_id": i, "image": "a.png", "text": "What?", "answer": "A"} for i in (7, 7, 8)]
    (instr / "ScienceQA" / "train.json").write_text(json.dumps(train))
    (instr / "ScienceQA" / "test.json").write_text(json.dumps(test))
    p = plan(instr, images, ["ScienceQA"])
    train_split, test_split = p.splits
    assert train_split.count == 4 and not train_split.rejections
    assert test_split.count == 2 and [(r.index, r.kind) for r in test_split.rejections] == [(1, "duplicate_id")]
    err = capsys.readouterr().err
    assert "2 train records of ScienceQA" in err and "kept, each trains as its own example" in err
    assert "1 test records of ScienceQA" in err and "rejected as duplicate_id" in err


def test_trials_table_shows_every_varied_value():
    import pandas as pd

    from coin_ray.studies.lifecycle import display_varied

    table = pd.DataFrame({"order": ["A>B", "A>B"], "seed": [0, 0], "method": ["lora", "lora"], "rank": [8, 8],
                          "status": ["ERROR", "ERROR"], "hp.model.source": ["tiny", FOLDER],
                          "hp.tuner.rank": [8, 8]})
    shown = display_varied(table, ["order", "seed", "method", "rank", "status"])
    assert list(shown["source"]) == ["tiny", value_label(FOLDER)]  # the two failed trials are told apart
    assert "hp.tuner.rank" in shown and list(shown.columns).count("rank") == 1
