"""What a sweep will cost, before it starts (`--plan`, `--budget-hours`): its trials, the stage tree (which stages
will be trained, which the stage store already holds, which orders share by prefix), train tokens and eval answers
per stage from the prepared data, per-GPU memory from the preflight, and device-hours from the measured throughput
of comparable stored stages or a given one. The stages it counts are the run's own: the trial configs, stage keys
and store lookups a sweep computes to decide what to train."""
from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from coin_ray._files import read_json
from coin_ray.config import ExperimentConfig
from coin_ray.studies.runner import trial_config
from coin_ray.training.accounting import ACCOUNTING_KEY, devices_of
from coin_ray.training.continual import stage_parts, stage_schedule
from coin_ray.training.evaluate import stored_cell
from coin_ray.training.stages import run_device, stage_material, stage_prefixes, store_root, zero_shot_key
from coin_ray.training.store import StageStore, stage_key
from coin_ray.training.types import PreparedData

PLAN_KEYS = ("trials", "stages", "to_train", "in_store", "train_tokens", "eval_answers", "device_hours")


@dataclass
class PlannedStage:
    """One distinct stage of the study (a stage-store key)."""

    key: str
    prefix: tuple[str, ...]
    trials: int  # trials of the study that run it (more than one: shared by prefix)
    stored: bool  # in the stage store now
    examples: int  # rows trained (optimizer steps x rows per step)
    train_tokens: int
    eval_answers: int  # answers its evaluation row generates
    devices: float
    comparable: tuple  # what throughput is comparable across (see `comparable_key`)


@dataclass
class StudyPlan:
    trials: int
    slots: int  # stages over all trials (a shared prefix counted in every trial that runs it)
    stages: list[PlannedStage]  # distinct
    zero_shot_answers: int = 0  # zero-shot rows not yet in the store
    zero_shot_devices: float = 1.0
    tokens_per_s: float | None = None  # training throughput per trial (all its devices)
    answers_per_s: float | None = None  # evaluation throughput per trial
    throughput_source: str = ""
    memory: str | None = None
    sampled: bool = False  # trials drawn from a search space: the search may pick others
    orders: list[tuple[str, ...]] = field(default_factory=list)  # the distinct task orders of the trials
    notes: list[str] = field(default_factory=list)

    @property
    def to_train(self) -> list[PlannedStage]:
        return [s for s in self.stages if not s.stored]

    @property
    def train_tokens(self) -> int:
        return sum(s.train_tokens for s in self.to_train)

    @property
    def eval_answers(self) -> int:
        return sum(s.eval_answers for s in self.to_train) + self.zero_shot_answers

    @property
    def device_hours(self) -> float | None:
        """Training at `tokens_per_s` and, where a measured rate is known, evaluation at `answers_per_s`; None
        without a training throughput."""
        if not self.tokens_per_s:
            return None
        seconds = sum(s.train_tokens / self.tokens_per_s * s.devices for s in self.to_train)
        if self.answers_per_s:
            seconds += sum(s.eval_answers / self.answers_per_s * s.devices for s in self.to_train)
            seconds += self.zero_shot_answers / self.answers_per_s * self.zero_shot_devices
        return seconds / 3600

    def summary(self) -> dict[str, Any]:
        """The plan's JSON line (keys `PLAN_KEYS`)."""
        hours = self.device_hours
        return {"trials": self.trials, "stages": self.slots, "to_train": len(self.to_train),
                "in_store": len(self.stages) - len(self.to_train), "train_tokens": self.train_tokens,
                "eval_answers": self.eval_answers, "device_hours": None if hours is None else round(hours, 4)}

    def lines(self, name: str) -> list[str]:
        shared = sum(1 for s in self.stages if s.trials > 1)
        out = [f"[coin-ray] plan of sweep {name}: {self.trials} trials"
               + (" (drawn from the search space: the search may pick others)" if self.sampled else "")
               + f", {self.slots} stages, {len(self.stages)} distinct ({shared} shared between trials by prefix): "
                 f"{len(self.to_train)} to train, {len(self.stages) - len(self.to_train)} in the stage store",
               "stage tree (prefix: state, trials that run it, rows trained, train tokens, eval answers):"]
        for s in sorted(self.stages, key=lambda s: s.prefix):
            label = "  " * (len(s.prefix) - 1) + (s.prefix[-1] if s.prefix else "(zero-shot)")
            out.append(f"  {label:<40} {'in store' if s.stored else 'train':<8} x{s.trials:<3} "
                       f"rows {s.examples:<8} tokens {s.train_tokens:<11} answers {s.eval_answers}")
        out.append(f"to train: {self.train_tokens} train tokens, {self.eval_answers} eval answers"
                   + (f" ({self.zero_shot_answers} of them the zero-shot row)" if self.zero_shot_answers else ""))
        if self.memory:
            out.append(f"per-GPU memory: {self.memory}")
        hours = self.device_hours
        if hours is None:
            out.append("device-hours: unknown (no stored stage of this model, tuner, method and device has a measured "
                       "throughput): pass --throughput TOKENS_PER_S")
        else:
            out.append(f"device-hours: {hours:.2f} estimated at {self.tokens_per_s:.1f} train tokens/s"
                       + (f" and {self.answers_per_s:.2f} eval answers/s" if self.answers_per_s else
                          " (evaluation not included: no measured answers/s)") + f" ({self.throughput_source})")
        return out + [f"note: {n}" for n in self.notes]


def expand_space(param_space: dict[str, Any], num_samples: int, seed: int = 0) -> list[dict[str, Any]]:
    """The trial configs of a Tune param space: every combination of its grid_search values, `num_samples` times,
    each sampled domain drawn with a fixed seed (a search algorithm may then choose other values)."""
    import numpy as np

    grids = {k: v["grid_search"] for k, v in param_space.items() if isinstance(v, dict) and "grid_search" in v}
    rng = np.random.RandomState(seed)
    configs = []
    for _ in range(num_samples):
        for combo in itertools.product(*grids.values()):
            config = {}
            for k, v in param_space.items():
                config[k] = v.sample(random_state=rng) if hasattr(v, "sample") else v
            config.update(zip(grids, combo))
            configs.append(config)
    return configs


def is_sampled(param_space: dict[str, Any]) -> bool:
    return any(hasattr(v, "sample") for v in param_space.values())


def comparable_key(material: dict[str, Any], device_type: str) -> tuple:
    """Stages whose measured throughput predicts each other's: same model, tuner, method, device type."""
    return material.get("model.source"), material.get("tuner.method"), material.get("cl.method"), device_type


def task_tokens(prepared: PreparedData, task: str) -> float:
    """Mean tokens of a train row of `task` (its input_ids: the prompt with expanded image tokens and the
    answer; rows are stored unpadded)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    folder = Path(prepared.splits[task]["train"])
    table = pads.dataset(sorted(str(p) for p in folder.glob("*.parquet")), format="parquet").to_table(
        columns=["input_ids"])
    if table.num_rows == 0:
        return 0.0
    return float(pc.sum(pc.list_value_length(table["input_ids"])).as_py()) / table.num_rows


def build_plan(base: ExperimentConfig, param_space: dict[str, Any], num_samples: int, prepared: PreparedData,
               *, throughput: float | None = None) -> StudyPlan:
    """The plan of a sweep of `param_space` over `base` (see the module docstring)."""
    configs = [trial_config(base.to_dict(), c, prepared.data_hash) for c in expand_space(param_space, num_samples)]
    tokens_of: dict[str, float] = {}
    stages: dict[str, PlannedStage] = {}
    zero_shot: dict[str, tuple[float, int]] = {}
    stores: dict[Path, StageStore | None] = {}

    def store_of(cfg: ExperimentConfig) -> StageStore | None:
        root = store_root(cfg)
        if root not in stores:  # a store that does not exist holds nothing (and is not created by a plan)
            stores[root] = StageStore(root) if root.is_dir() else None
        return stores[root]

    def answers(cfg: ExperimentConfig, entry: Path | None) -> int:
        """Answers an evaluation row generates: the test rows of every task whose cell is not stored."""
        total = 0
        for task in cfg.order:
            if entry is not None and stored_cell(entry, task, cfg, cfg.eval.judge != "none") is not None:
                continue
            n = prepared.rows[task]["test"]
            total += n if cfg.data.max_test_rows is None else min(n, cfg.data.max_test_rows)
        return total

    slots = 0
    for cfg in configs:
        store = store_of(cfg)
        parts = stage_parts(cfg, prepared.rows)
        for prefix, stage_rows in zip(stage_prefixes(cfg), parts):
            slots += 1
            material = stage_material(cfg, prepared.data_hash, prefix, run_device(cfg))
            key = stage_key(material)
            if key in stages:
                stages[key].trials += 1
                continue
            entry = store.get(key) if store is not None else None
            n = sum(m for _, m, _ in stage_rows)
            _, per_step, steps = stage_schedule(cfg, prefix, n)
            for task, _, _ in stage_rows:
                if task not in tokens_of:
                    tokens_of[task] = task_tokens(prepared, task)
            mean_tokens = sum(m * tokens_of[t] for t, m, _ in stage_rows) / max(n, 1)
            examples = steps * per_step
            stages[key] = PlannedStage(key, prefix, 1, entry is not None, examples, round(examples * mean_tokens),
                                       answers(cfg, entry.path if entry else None), devices_of(cfg),
                                       comparable_key(material, run_device(cfg).type))
        if cfg.eval.zero_shot:
            zkey = zero_shot_key(cfg, prepared.data_hash)
            path = store.root / zkey if store is not None and (store.root / zkey / "meta.json").is_file() else None
            zero_shot.setdefault(zkey, (devices_of(cfg), answers(cfg, path)))
    plan = StudyPlan(trials=len(configs), slots=slots, stages=list(stages.values()),
                     zero_shot_answers=sum(a for _, a in zero_shot.values()),
                     zero_shot_devices=max([d for d, _ in zero_shot.values()], default=1.0),
                     sampled=is_sampled(param_space),
                     orders=list(dict.fromkeys(tuple(c.order) for c in configs if not c.train.joint)))
    wanted = {s.comparable for s in plan.stages}
    measured = measured_throughput([s for s in stores.values() if s is not None], wanted)
    if throughput is not None:
        plan.tokens_per_s, plan.throughput_source = throughput, "--throughput"
        plan.answers_per_s = measured[1]
    elif measured[0] is not None:
        plan.tokens_per_s, plan.answers_per_s = measured[0], measured[1]
        plan.throughput_source = f"measured on {measured[2]} comparable stored stages"
    if base.scaling.use_gpu:
        from coin_ray.models.memory import estimate_for_config

        plan.memory = estimate_for_config(base).line()
    if plan.sampled:
        plan.notes.append("a scheduler (ASHA) may stop trials early: the stages to train are an upper bound")
    return plan


def measured_throughput(stores: Sequence[Any], wanted: set[tuple]) -> tuple[float | None, float | None, int]:
    """(median train tokens/s, evaluation answers/s, stages measured) of the stored stages comparable to
    `wanted` (`comparable_key`), from their meta.json `accounting` and their evaluation cells' `seconds`."""
    rates: list[float] = []
    answers = seconds = 0.0
    for store in stores:
        for key, meta, _ in store.entries():
            accounting = meta.get(ACCOUNTING_KEY) or {}
            material = meta.get("material") or {}
            kind = "cpu" if accounting.get("device_kind") == "cpu" else "cuda"
            if comparable_key(material, kind) not in wanted or not accounting.get("train_tokens_per_s"):
                continue
            rates.append(float(accounting["train_tokens_per_s"]))
            for cell_path in (store.root / key / "eval").glob("*.json"):
                cell = read_json(cell_path)
                if isinstance(cell, dict) and cell.get("seconds"):
                    answers += float(cell.get("n", 0))
                    seconds += float(cell["seconds"])
    return (statistics.median(rates) if rates else None, answers / seconds if seconds > 0 else None, len(rates))


def budget_problem(plan: StudyPlan, hours: float) -> str | None:
    """The one line that refuses a sweep over `--budget-hours`, or None when the plan fits."""
    estimate = plan.device_hours
    ways = ("fewer seeds (--seeds) or tasks (--tasks), a smaller data.train_fraction or data.max_test_rows "
            "(--set data.train_fraction=0.1)")
    if estimate is None:
        return (f"--budget-hours {hours:g}: the plan cannot estimate device-hours (no stored stage of this model, "
                f"tuner, method and device has a measured throughput): pass --throughput TOKENS_PER_S (a measured "
                f"or published training throughput of one trial), or run a small pilot first")
    if estimate <= hours:
        return None
    return (f"--budget-hours {hours:g}: the plan estimates {estimate:.2f} device-hours for {len(plan.to_train)} "
            f"stages to train ({plan.throughput_source}); to bring it under, use {ways}, or a higher --throughput "
            f"if the measured one is not this cluster's")
