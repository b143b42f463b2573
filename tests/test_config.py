"""Typed config: defaults validate, dotted/nested dicts build, every problem is reported at once."""
import json

import pytest

from coin_ray.config import ConfigError, ExperimentConfig


def test_defaults_and_flatten():
    cfg = ExperimentConfig()
    flat = cfg.flatten()
    assert flat["tuner.method"] == "moelora"
    assert flat["order"] == json.dumps(["GQA", "Grounding", "VQAv2", "OCRVQA"])  # the default study's tasks
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_the_embedded_default_is_the_dataclass_defaults_and_every_config_names_its_command():
    """configs/default.yaml spells out the dataclass defaults; each YAML under configs/ starts with the command
    that runs it; the smoke preset and a copied default YAML layer over the defaults without losing a field."""
    from coin_ray.config import CONFIG_DIR, dotted, load_yaml_file, preset

    assert ExperimentConfig.from_dict(preset("default")) == ExperimentConfig()
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# python "), (path.name, first)
        ExperimentConfig.from_dict(dotted(load_yaml_file(path)))  # every shipped config is valid
    smoke = ExperimentConfig.from_dict(preset("smoke"))
    assert smoke.eval.judge == "embedding" and smoke.model.pretrain_steps == 200 and len(smoke.order) == 3


def test_dotted_and_nested_keys_merge():
    cfg = ExperimentConfig.from_dict({"tuner": {"rank": 32}, "tuner.num_experts": 8, "order": "GQA>VQAv2"})
    assert (cfg.tuner.rank, cfg.tuner.num_experts, cfg.order) == (32, 8, ("GQA", "VQAv2"))


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"tuner.rank": 30, "tuner.num_experts": 4, "train.batch_size": 0,
                                    "order": ["ScienceQA", "Nope", "ScienceQA"], "tuner.bogus": 1})
    text = str(e.value)
    assert "unknown key tuner.bogus" in text
    assert "tuner.rank (30) must be divisible by tuner.num_experts (4): use rank=32" in text
    assert "train.batch_size must be >= 1, got 0" in text
    assert "unknown task(s) ['Nope']" in text
    assert "more than once" in text
    assert len(e.value.problems) >= 5


def test_replace_revalidates():
    cfg = ExperimentConfig()
    assert cfg.replace(**{"tuner.rank": 8, "name": "x"}).tuner.rank == 8
    with pytest.raises(ConfigError, match="top_k"):
        cfg.replace(**{"tuner.top_k": 9})


def test_coin_benchmark_needs_paths():
    with pytest.raises(ConfigError, match="data.instructions is required"):
        ExperimentConfig.from_dict({"data.benchmark": "coin"})


# --- typed values: every value is coerced to and checked against its field's declared type ---

from coin_ray.config import coerce_field, load_yaml_file, parse_override  # noqa: E402
from coin_ray.config import TrainConfig, TunerConfig  # noqa: E402


def test_values_coerced_to_declared_types():
    cfg = ExperimentConfig.from_dict({
        "train.lr": "1e-3",  # YAML 1.1 reads 1e-3 as a string
        "train.epochs": 2,  # an int is a float
        "tuner.rank": 32.0, "tuner.num_experts": "8",  # integral values are ints
        "train.gradient_checkpointing": "TRUE", "eval.zero_shot": False,
        "tuner.target_modules": ["q_proj", "v_proj"], "tuner.top_k": None,
        "eval.judge_options": None,  # a YAML key with nothing under it
        "order": "gqa>ImageNet",  # one case rule: the canonical spelling
    })
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert (cfg.tuner.rank, cfg.tuner.num_experts) == (32, 8) and isinstance(cfg.tuner.rank, int)
    assert cfg.train.gradient_checkpointing is True and cfg.eval.zero_shot is False
    assert cfg.tuner.target_modules == ("q_proj", "v_proj") and cfg.tuner.top_k is None
    assert cfg.eval.judge_options == {}
    assert cfg.order == ("GQA", "ImageNet")
    assert ExperimentConfig.from_dict({"tuner.target_modules": "q_proj, v_proj"}).tuner.target_modules == (
        "q_proj", "v_proj")


@pytest.mark.parametrize("key, value, message", [
    ("tuner.rank", "abc", "tuner.rank: expected an integer, got 'abc'"),
    ("tuner.rank", 2.5, "tuner.rank: expected an integer, got 2.5"),
    ("tuner.rank", True, "tuner.rank: expected an integer, got True"),
    ("tuner.rank", None, "tuner.rank: expected an integer, got None"),
    ("tuner.top_k", "two", "tuner.top_k: expected an integer or null, got 'two'"),
    ("train.lr", "fast", "train.lr: expected a number, got 'fast'"),
    ("train.lr", float("nan"), "train.lr: expected a number, got nan"),
    ("train.lr", [1], "train.lr: expected a number, got [1]"),
    ("train.gradient_checkpointing", 1, "train.gradient_checkpointing: expected true or false, got 1"),
    ("train.gradient_checkpointing", 0, "train.gradient_checkpointing: expected true or false, got 0"),
    ("train.gradient_checkpointing", "yes", "train.gradient_checkpointing: expected true or false, got 'yes'"),
    ("train.precision", 16, "train.precision: expected a string, got 16"),
    ("tuner.target_modules", [1, 2], "tuner.target_modules: expected a list of strings or null, got [1, 2]"),
    ("eval.judge_options", "base_url", "eval.judge_options: expected a mapping of keys to values, got 'base_url'"),
    ("use_stage_cache", "no", "use_stage_cache: expected true or false, got 'no'"),
    ("order", [1, 2], "order: expected a list of strings, got [1, 2]"),
])
def test_mistyped_value_is_one_problem_naming_field_value_and_type(key, value, message):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({key: value})
    assert e.value.problems == [message]
    assert str(e.value) == f"invalid configuration: {message}"  # one problem: one line


def test_mistyped_section_is_not_also_checked_against_its_defaults():
    # rank=abc must not add "rank (16) must be divisible by num_experts (3)" about a value nobody wrote
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"tuner.rank": "abc", "tuner.num_experts": 3, "train.batch_size": 0})
    assert sorted(e.value.problems) == ["train.batch_size must be >= 1, got 0",
                                        "tuner.rank: expected an integer, got 'abc'"]


def test_direct_construction_is_type_checked_too():
    with pytest.raises(ConfigError, match="tuner.rank: expected an integer, got 'x'"):
        ExperimentConfig(tuner=TunerConfig(rank="x"))
    cfg = ExperimentConfig(order=["scienceqa", "GQA"], train=TrainConfig(lr=1))
    assert cfg.order == ("ScienceQA", "GQA")


def test_coerce_field_directly():
    assert coerce_field(TrainConfig, "max_steps", "1e3") == 1000
    assert coerce_field(TrainConfig, "lr", 3) == 3.0
    with pytest.raises(ConfigError, match=r"^invalid configuration: train.max_steps: expected an integer, got '1.5'$"):
        coerce_field(TrainConfig, "max_steps", "1.5", "train.")


def test_section_that_is_not_a_mapping_and_non_string_keys():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"tuner": 5, 3: "x", "nope.rank": 1})
    text = str(e.value)
    assert "tuner must be a mapping of its fields" in text and "got 5" in text
    assert "config keys must be strings, got 3" in text
    assert "unknown key 'nope.rank'" in text
    assert ExperimentConfig.from_dict({"tuner": None}).tuner == TunerConfig()  # an empty YAML section


def test_parse_override_types_by_field():
    assert parse_override("train.lr", "1e-3") == 1e-3
    assert parse_override("tracking.experiment", "on") == "on"  # a string field keeps the text as written
    assert parse_override("name", "007") == "007"
    assert parse_override("data.instructions", "null") is None  # Optional string
    assert parse_override("train.gradient_checkpointing", "yes") == "yes"  # then refused: true/false only
    assert parse_override("tuner.target_modules", "[q_proj, v_proj]") == ["q_proj", "v_proj"]
    assert parse_override("eval.judge_options", "{base_url: 'http://h:1/v1'}") == {"base_url": "http://h:1/v1"}
    with pytest.raises(ConfigError, match=r"--set eval.judge_options=\{a: \[\}: the value is not valid YAML"):
        parse_override("eval.judge_options", "{a: [}")


def test_yaml_file_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  lr: 1e-3\n  gradient_checkpointing: on\ntracking:\n  experiment: off\n")
    loaded = load_yaml_file(good)
    assert loaded["train"]["lr"] == 1e-3  # YAML 1.2 floats
    assert loaded["train"]["gradient_checkpointing"] == "on" and loaded["tracking"]["experiment"] == "off"
    bad = tmp_path / "bad.yaml"
    bad.write_text("tuner:\n  rank: 16\n  alpha: [32\ntrain:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=rf"{bad}, line \d+, column \d+: YAML syntax error"):
        load_yaml_file(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- tuner\n- train\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_yaml_file(top)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    assert load_yaml_file(empty) == {}


@pytest.mark.parametrize("uri", ["sqlite:///mlflow.db", "sqlite:////abs/m.db", "http://127.0.0.1:5000",
                                 "https://mlflow.example.org", "postgresql://db/mlflow",
                                 "postgresql+psycopg2://db/mlflow", "mysql://db/m", "databricks"])
def test_tracking_uri_schemes_accepted(uri):
    assert ExperimentConfig.from_dict({"tracking.tracking_uri": uri}).tracking.tracking_uri == uri


@pytest.mark.parametrize("uri, fragment", [("file:///tmp/mlruns", "file store"), ("./mlruns", "file store"),
                                           ("/tmp/mlruns", "file store"), ("ftp://host/x", "unknown scheme 'ftp'")])
def test_tracking_uri_file_store_and_unknown_schemes_refused(uri, fragment):
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"tracking.tracking_uri": uri})
    assert fragment in str(e.value) and "sqlite:///mlflow.db" in str(e.value)


@pytest.mark.parametrize("path", ["s3://bucket/runs", "gs://bucket/runs", "file:///tmp/runs"])
def test_scheme_storage_path_refused(path):
    with pytest.raises(ConfigError, match="storage_path must be a local or mounted shared folder"):
        ExperimentConfig.from_dict({"storage_path": path})


def test_every_user_error_is_one_type():
    from coin_ray.errors import UserError
    from coin_ray.studies.cli import UsageError
    from coin_ray.studies.designs import DesignError
    from coin_ray.tasks import InvalidOrderError, UnknownTaskError
    from coin_ray.training import RunSetupError
    from pipelines import PipelineInputError
    from tracking import TrackingUnavailableError

    for error in (ConfigError, UsageError, DesignError, InvalidOrderError, UnknownTaskError, RunSetupError,
                  PipelineInputError, TrackingUnavailableError):
        assert issubclass(error, UserError), error
    assert issubclass(TrackingUnavailableError, RuntimeError) and issubclass(ConfigError, ValueError)
