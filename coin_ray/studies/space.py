"""The keys of a sweep's Tune search space, owned here: the scripts in sweeps/ build spaces with these
helpers, and the runner decodes a trial's sampled values with `decode` - nowhere else spells a key.

- `order`: the task order as "A>B>C" (a grid over a fixed design), or "joint": the multitask upper bound, one
  stage on the union of the tasks (`--baselines joint`);
- `key.<Task>`: one random key in [0, 1) per task; the order is the tasks sorted by key (how Optuna, which
  cannot sample permutations, searches orders);
- `seed`: the replicate (train.seed);
- `hp.<section.field>`: a searched config field, e.g. `hp.tuner.rank`;
- `method`: a continual-learning method by its `--methods` name (`lora`, `olora`, `ewc+replay`, ...), which
  sets the tuner, cl.method and replay (`coin_ray.methods.method_changes`);
- `alpha_per_rank`: alpha = this x rank for every trial (CoIN's ratio is 2), so rank is not confounded with
  the adapter scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from coin_ray.config import ExperimentConfig, divisible_rank

ORDER_KEY = "order"
SEED_KEY = "seed"
HP_PREFIX = "hp."
RANDOM_KEY_PREFIX = "key."
ALPHA_PER_RANK_KEY = "alpha_per_rank"
METHOD_KEY = "method"
JOINT = "joint"  # the `order` value of the joint multitask baseline (train.joint)


def hp(name: str) -> str:
    """The space key of a searched config field: hp("tuner.rank") -> "hp.tuner.rank"."""
    return HP_PREFIX + name


def random_keys(tune: Any, tasks: Sequence[str]) -> dict[str, Any]:
    """The random-key encoding of an order: one uniform key per task."""
    return {RANDOM_KEY_PREFIX + t: tune.uniform(0.0, 1.0) for t in tasks}


@dataclass(frozen=True)
class TrialChoice:
    """What Tune chose for one trial."""

    order: tuple[str, ...]
    seed: int
    hparams: dict[str, Any] = field(default_factory=dict)  # searched fields (dotted) as the trial trains them
    method: str | None = None  # the `--methods` name the space chose (None: the base config's method)
    changes: dict[str, Any] = field(default_factory=dict)  # every config change: hparams plus derived fields
    baseline: str | None = None  # "joint" for the multitask upper bound


def decode(config: Mapping[str, Any], cfg: ExperimentConfig) -> TrialChoice:
    """The order, seed and config changes of Tune's sampled `config` over the sweep's base `cfg`."""
    from coin_ray.studies.designs import decode_random_keys

    baseline = None
    if config.get(ORDER_KEY) == JOINT:
        order, baseline = tuple(cfg.order), JOINT
    elif ORDER_KEY in config:
        value = config[ORDER_KEY]
        order = tuple(value.split(">")) if isinstance(value, str) else tuple(value)
    elif any(k.startswith(RANDOM_KEY_PREFIX) for k in config):
        tasks = list(cfg.order)
        order = decode_random_keys(tasks, [config[RANDOM_KEY_PREFIX + t] for t in tasks])
    else:
        order = tuple(cfg.order)
    seed = int(config.get(SEED_KEY, cfg.train.seed))
    hparams = {k[len(HP_PREFIX):]: v for k, v in config.items() if k.startswith(HP_PREFIX)}
    method = str(config[METHOD_KEY]) if METHOD_KEY in config else None
    changes: dict[str, Any] = {}
    if method is not None:
        from coin_ray.methods import method_changes

        changes.update(method_changes(method, cfg.train.replay_per_task))
    # a MoELoRA rank must be divisible by the expert count (rank is the total rank r): a sampled pair takes the
    # next multiple (coin_ray.config.divisible_rank), and the trial's name says the rank it trains with
    tuner = hparams.get("tuner.method", changes.get("tuner.method", cfg.tuner.method))
    if tuner == "moelora" and ("tuner.num_experts" in hparams or "tuner.rank" in hparams):
        experts = int(hparams.get("tuner.num_experts", cfg.tuner.num_experts))
        hparams["tuner.rank"] = divisible_rank(int(hparams.get("tuner.rank", cfg.tuner.rank)), experts)
    changes.update(hparams)
    if baseline == JOINT:
        changes["train.joint"] = True
    if ALPHA_PER_RANK_KEY in config and "tuner.alpha" not in hparams:
        changes["tuner.alpha"] = float(config[ALPHA_PER_RANK_KEY]) * int(hparams.get("tuner.rank", cfg.tuner.rank))
    return TrialChoice(order=order, seed=seed, hparams=hparams, changes=changes, baseline=baseline, method=method)
