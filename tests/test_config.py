"""Typed config: defaults validate, dotted/nested dicts build, every problem is reported at once."""
import pytest

from coin_ray.config import ConfigError, ExperimentConfig


def test_defaults_and_flatten():
    cfg = ExperimentConfig()
    flat = cfg.flatten()
    assert flat["tuner.method"] == "moelora"
    assert flat["order"] == '["ScienceQA", "TextVQA", "ImageNet"]'
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_dotted_and_nested_keys_merge():
    cfg = ExperimentConfig.from_dict({"tuner": {"rank": 32}, "tuner.num_experts": 8, "order": "GQA>VQAv2"})
    assert (cfg.tuner.rank, cfg.tuner.num_experts, cfg.order) == (32, 8, ("GQA", "VQAv2"))


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as e:
        ExperimentConfig.from_dict({"tuner.rank": 30, "tuner.num_experts": 4, "train.batch_size": 0,
                                    "order": ["ScienceQA", "Nope", "ScienceQA"], "tuner.bogus": 1})
    text = str(e.value)
    assert "unknown key tuner.bogus" in text
    assert "rank (30) must be divisible by tuner.num_experts (4): use rank=28" in text
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
