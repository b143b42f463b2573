"""The plan's pure parts: a Tune space expanded into trial configs, device-hours, the JSON line and the budget
line. The plan of a real sweep (stage keys, store lookups) runs in tests/test_sweeps.py (slow tier)."""
from __future__ import annotations

import ray.tune as tune

from coin_ray.studies.plan import PLAN_KEYS, PlannedStage, StudyPlan, budget_problem, expand_space


def _stage(key, prefix, stored=False, tokens=3_600_000, answers=7_200):
    return PlannedStage(key, prefix, 1, stored, 1000, tokens, answers, 2.0, ())


def test_a_space_expands_into_every_grid_cell_and_seeded_samples():
    space = {"seed": tune.grid_search([0, 1]), "order": tune.grid_search(["A>B", "B>A"]), "fixed": 3,
             "hp.rank": tune.choice([8, 16])}
    configs = expand_space(space, num_samples=2)
    assert len(configs) == 8 and all(c["fixed"] == 3 and c["hp.rank"] in (8, 16) for c in configs)
    assert {(c["seed"], c["order"]) for c in configs} == {(s, o) for s in (0, 1) for o in ("A>B", "B>A")}
    assert configs == expand_space(space, num_samples=2)  # seeded: the same plan every time


def test_device_hours_json_line_and_budget_refusals():
    plan = StudyPlan(trials=2, slots=4, stages=[_stage("a", ("A",), stored=True), _stage("b", ("A", "B")),
                                                _stage("c", ("B",))], orders=[("A", "B"), ("B", "A")])
    assert plan.device_hours is None
    line = plan.summary()
    assert tuple(line) == PLAN_KEYS and line == {"trials": 2, "stages": 4, "to_train": 2, "in_store": 1,
                                                 "train_tokens": 7_200_000, "eval_answers": 14_400,
                                                 "device_hours": None}
    refused = budget_problem(plan, 100)  # no throughput: refused, with the way out
    assert "cannot estimate" in refused and "--throughput TOKENS_PER_S" in refused
    plan.tokens_per_s, plan.throughput_source = 1000.0, "--throughput"
    # 2 stages x 3.6 M tokens / 1000 tokens/s x 2 devices = 4 device-hours (evaluation: no measured rate)
    assert plan.device_hours == 4.0 and plan.summary()["device_hours"] == 4.0
    plan.answers_per_s = 2.0  # + 2 x 7,200 answers / 2 per s x 2 devices = 4 more
    assert plan.device_hours == 8.0
    assert budget_problem(plan, 8.0) is None
    over = budget_problem(plan, 0.5)
    assert "estimates 8.00 device-hours" in over and "data.train_fraction" in over and "--seeds" in over
    assert "device-hours: 8.00 estimated at 1000.0 train tokens/s" in "\n".join(plan.lines("s"))
