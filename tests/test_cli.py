"""The sweep scripts' flags: typed --set values, counts, designs, --orders, --metric, YAML, one-line errors.

Everything here fails or is decided before Ray is imported, so it is fast: the parse functions are driven
directly, and the real scripts run as subprocesses for the errors a user sees."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from coin_ray.config import ConfigError
from coin_ray.studies import cli
from coin_ray.studies.designs import DesignError, parse_design

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"sweep_script_{name}", ROOT / "sweeps" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


task_order = _script("task_order")
hparams = _script("hparams")


def _plan(*argv: str):
    return task_order.plan(task_order.parse_args(list(argv)))


def _config(*argv: str):
    return cli.build_base_config(task_order.parse_args(list(argv)), default_experiment="t")


def test_readme_set_examples_work():
    cfg = _config("--set", "train.lr=1e-3", "--set", "tuner.rank=32", "--set", "train.gradient_checkpointing=true",
                  "--set", "eval.judge_options={base_url: 'http://judge:8000/v1'}", "--set", "tracking.experiment=on")
    assert cfg.train.lr == 1e-3 and cfg.tuner.rank == 32 and cfg.train.gradient_checkpointing is True
    assert cfg.eval.judge_options == {"base_url": "http://judge:8000/v1"} and cfg.tracking.experiment == "on"


@pytest.mark.parametrize("pair, message", [
    ("tuner.rank=abc", "tuner.rank: expected an integer, got 'abc'"),
    ("train.gradient_checkpointing=1", "train.gradient_checkpointing: expected true or false, got 1"),
    ("train.gradient_checkpointing=yes", "train.gradient_checkpointing: expected true or false, got 'yes'"),
    ("train.max_steps=2.5", "train.max_steps: expected an integer, got 2.5"),
    ("tuner.rank=null", "tuner.rank: expected an integer, got None"),
])
def test_set_values_checked_against_field_types(pair, message):
    with pytest.raises(ConfigError) as e:
        _config("--set", pair)
    assert e.value.problems == [message]


@pytest.mark.parametrize("name", ["coin_llava7b", "coin_llava7b_hf"])
def test_shipped_config_parses(tmp_path, name):
    cfg = _config("--config", str(ROOT / "configs" / f"{name}.yaml"))
    assert cfg.train.lr == 2e-4 and cfg.train.epochs == 1.0 and cfg.tuner.rank == 128
    assert cfg.train.gradient_checkpointing is True and cfg.data.benchmark == "coin"
    if name == "coin_llava7b":  # CoIN's own start and recipe: Vicuna + CLIP + stage-1 projector
        assert cfg.model.source.endswith("vicuna-7b-v1.5") and cfg.model.projector.endswith("mm_projector.bin")
        assert cfg.model.vision_tower.endswith("clip-vit-large-patch14-336")
        assert (cfg.train.projector_lr, cfg.train.group_by_length) == (2e-5, True)
        assert cfg.train.batch_size * cfg.train.grad_accum * cfg.scaling.num_workers == 896


def test_yaml_config_values_are_typed(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  lr: 1e-3\ntuner:\n  rank: '24'\n  num_experts: 4\norder: [gqa, ImageNet]\n")
    cfg = _config("--config", str(path))
    assert cfg.train.lr == 1e-3 and cfg.tuner.rank == 24 and cfg.order == ("GQA", "ImageNet")
    path.write_text("train:\n  gradient_checkpointing: yes\n")
    with pytest.raises(ConfigError, match="train.gradient_checkpointing: expected true or false, got 'yes'"):
        _config("--config", str(path))


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--num-cpus", "0"], "--num-cpus must be >= 1, got 0"),
    (["--max-concurrent-trials", "0"], "--max-concurrent-trials must be >= 1, got 0"),
    (["--workers-per-trial", "-1"], "--workers-per-trial must be >= 0, got -1"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0, got -1"),
])
def test_counts_must_be_positive(argv, message):
    with pytest.raises(cli.UsageError, match=f"^{message}$"):
        _config(*argv)


@pytest.mark.parametrize("tokens, result", [(["latin"], ("latin", None)), (["random", "3"], ("random", 3)),
                                            (["optuna", "20"], ("optuna", 20)), (["given"], ("given", None))])
def test_parse_design(tokens, result):
    assert parse_design(tokens) == result


@pytest.mark.parametrize("tokens, fragment", [
    (["random"], "needs one count N >= 1"), (["random", "0"], "N must be >= 1, got 0"),
    (["optuna", "-2"], "N must be >= 1, got -2"), (["random", "x"], "whole number >= 1, got 'x'"),
    (["latin", "3"], "--design latin takes no count"), (["zigzag"], "unknown design 'zigzag'"),
])
def test_parse_design_refuses(tokens, fragment):
    with pytest.raises(DesignError, match=fragment):
        parse_design(tokens)


def test_design_given_takes_tasks_from_orders():
    # no --tasks: the default task set is all eight, but the orders name three
    cfg, _, kind, _, orders, _ = _plan("--design", "given", "--orders", "GQA>ImageNet>TextVQA;textvqa>gqa>imagenet")
    assert kind == "given" and cfg.order == ("GQA", "ImageNet", "TextVQA")
    assert orders == [("GQA", "ImageNet", "TextVQA"), ("TextVQA", "GQA", "ImageNet")]
    # with --tasks the orders must be permutations of them
    with pytest.raises(DesignError, match="permutations of"):
        _plan("--design", "given", "--tasks", "GQA,ImageNet", "--orders", "GQA>ImageNet>TextVQA")
    assert _plan("--design", "given", "--tasks", "ImageNet,GQA", "--orders", "GQA>ImageNet")[0].order == (
        "GQA", "ImageNet")


def test_orders_file_or_clear_error(tmp_path):
    path = tmp_path / "orders.txt"
    path.write_text("# two orders\nScienceQA>TextVQA\n\nTextVQA > ScienceQA\n")
    cfg, _, _, _, orders, _ = _plan("--design", "given", "--orders", str(path))
    assert orders == [("ScienceQA", "TextVQA"), ("TextVQA", "ScienceQA")] and cfg.order == ("ScienceQA", "TextVQA")
    for missing in (str(tmp_path / "nope.txt"), "orders.txt", "sub/orders"):
        with pytest.raises(cli.UsageError, match="no such file"):
            _plan("--design", "given", "--orders", missing)
    with pytest.raises(cli.UsageError, match="no orders in it"):
        _plan("--design", "given", "--orders", " ; ")
    with pytest.raises(cli.UsageError, match="--orders lists the orders of --design given"):
        _plan("--orders", "ScienceQA>TextVQA")


def test_unknown_task_in_orders_is_a_user_error():
    from coin_ray.errors import UserError

    with pytest.raises(UserError, match=r"unknown task\(s\) \['Nope'\]"):
        _plan("--design", "given", "--orders", "ScienceQA>Nope")


def test_metric_checked():
    from coin_ray.evaluation import cl_metrics
    from coin_ray.evaluation.metrics import CL_METRIC_NAMES

    # the valid metrics are exactly what a trial reports
    assert set(cl_metrics([[1.0, 0.2], [0.5, 1.0]], zero_shot=[None, 0.1])) == set(CL_METRIC_NAMES)
    _plan("--metric", "bwt")
    with pytest.raises(cli.UsageError, match="--metric .accuracy. is not a metric: use one of mft, mfn"):
        _plan("--metric", "accuracy")
    with pytest.raises(cli.UsageError, match="eval.zero_shot=true"):
        _plan("--metric", "fwt")
    assert _plan("--metric", "fwt", "--set", "eval.zero_shot=true")[0].eval.zero_shot
    with pytest.raises(cli.UsageError, match="needs a judge"):
        _plan("--metric", "gk_mfn", "--set", "eval.judge=none")


def test_scheme_storage_path_never_made_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="storage_path must be a local or mounted shared folder"):
        _config("--storage-path", "s3://bucket/runs")
    with pytest.raises(cli.UsageError, match="local or mounted shared folder"):
        cli.check_storage("gs://bucket/runs")
    assert list(tmp_path.iterdir()) == []  # no folder named "s3:" or "gs:"


def test_parse_list():
    assert cli.parse_list("--experts", "1, 2,4") == [1, 2, 4]
    assert cli.parse_list("--alphas", "8,16.5", float, minimum=None) == [8.0, 16.5]
    for text, fragment in (("1,x", "comma-separated whole numbers"), ("0,2", "--experts must be >= 1, got 0"),
                           (",", "at least one value")):
        with pytest.raises(cli.UsageError, match=fragment):
            cli.parse_list("--experts", text)


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "sweeps" / script), *args, "--no-tracking"], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script, args, message", [
    ("task_order.py", ["--set", "tuner.rank=abc"], "tuner.rank: expected an integer, got 'abc'"),
    ("task_order.py", ["--design", "given", "--orders", "ScienceQA>Nope"], "unknown task(s) ['Nope']"),
    ("task_order.py", ["--design", "random", "0"], "N must be >= 1, got 0"),
    ("task_order.py", ["--seeds", "0"], "--seeds must be >= 1"),
    ("task_order.py", ["--metric", "accuracy"], "is not a metric"),
    ("task_order.py", ["--design", "given", "--orders", "my_orders.txt"], "no such file"),
    ("task_order.py", ["--tracking-uri", "file:///tmp/mlruns"], "sqlite:///mlflow.db"),
    ("task_order.py", ["--storage-path", "s3://bucket/runs"], "local or mounted shared folder"),
    ("task_order.py", ["--config", "bad.yaml"], "flow sequence at line 3, column 10"),
    ("hparams.py", ["--num-samples", "0"], "--num-samples must be >= 1"),
    ("hparams.py", ["--experts", "0,2"], "--experts must be >= 1, got 0"),
    ("hparams.py", ["--ranks", "8,x"], "--ranks takes comma-separated whole numbers"),
    ("hparams.py", ["--lr", "1e-2"], "--lr takes a range LOW,HIGH"),
    ("hparams.py", ["--methods", "moelora,adapter"], "unknown method(s) ['adapter']"),
    ("task_order.py", ["--methods", "lora,sgd+replay"], "unknown method(s) ['sgd+replay']"),
    ("task_order.py", ["--methods", "lora,olora", "--set", "train.weight_decay=0.1"], "set train.weight_decay 0"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, script, args, message):
    (tmp_path / "bad.yaml").write_text("tuner:\n  rank: 16\n  alpha: [32\n")
    proc = _run(script, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert list(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written, nothing started


def test_methods_cross_the_order_design():
    *_, methods = _plan("--smoke-test", "--methods", "lora,olora,ewc+replay")
    assert methods == ["lora", "olora", "ewc+replay"]
    with pytest.raises(cli.UsageError, match="--design optuna searches orders of one method"):
        _plan("--design", "optuna", "4", "--methods", "lora,olora")


def test_default_study_is_a_williams_design_with_two_seeds():
    """The no-argument study can tell an order effect from seed noise: 4 tasks, 4 balanced orders, 2 seeds
    each; --smoke-test (a check) and --design optuna (one run per sampled order) default to one seed."""
    args = task_order.parse_args([])
    cfg, design, kind, count, orders, methods = task_order.plan(args)
    assert kind == "williams" and args.seeds == 2
    assert list(cfg.order) == ["GQA", "Grounding", "VQAv2", "OCRVQA"]
    assert len(orders) == 4
    for position in range(4):  # each task once at each position
        assert sorted(o[position] for o in orders) == sorted(cfg.order)
    assert task_order.parse_args(["--smoke-test"]).seeds == 1
    assert task_order.parse_args(["--design", "optuna", "4"]).seeds == 1
    assert task_order.parse_args(["--seeds", "3"]).seeds == 3
    assert hparams.parse_args([]).seeds == 1
