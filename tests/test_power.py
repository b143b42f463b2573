"""The seeds the order question needs: the noncentral-F power of the order ANOVA against a simulation of
studies with known variance components, and the analysis's statement where orders are not distinguishable."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from coin_ray.studies.analysis import analyse_orders
from coin_ray.studies.power import anova_power, power_statement, seeds_needed, variance_components

EFFECTS = np.array([-0.06, -0.02, 0.02, 0.06])  # four orders' true deviations from the grand mean
VAR_ORDERS = float((EFFECTS**2).sum() / (len(EFFECTS) - 1))
SEED_SD = 0.05


def _simulate(seeds: int, studies: int = 4000, seed: int = 0) -> np.ndarray:
    """`studies` hand-built studies: value = 0.5 + order effect + seed noise, shape (studies, orders, seeds)."""
    rng = np.random.default_rng(seed)
    return 0.5 + EFFECTS[None, :, None] + rng.normal(0, SEED_SD, size=(studies, len(EFFECTS), seeds))


def test_power_matches_a_simulation_of_studies_with_known_variance_components():
    for seeds in (2, 4, 7):
        values = _simulate(seeds)
        p = stats.f_oneway(*[values[:, i, :] for i in range(len(EFFECTS))], axis=1).pvalue
        simulated = float((p < 0.05).mean())
        analytic = anova_power(len(EFFECTS), seeds, VAR_ORDERS, SEED_SD**2)
        assert abs(simulated - analytic) < 0.03, (seeds, simulated, analytic)
    n = seeds_needed(len(EFFECTS), VAR_ORDERS, SEED_SD**2)
    assert anova_power(4, n, VAR_ORDERS, SEED_SD**2) >= 0.8 > anova_power(4, n - 1, VAR_ORDERS, SEED_SD**2)
    # and the simulated power at that many seeds is 80 % too
    values = _simulate(n, seed=1)
    p = stats.f_oneway(*[values[:, i, :] for i in range(len(EFFECTS))], axis=1).pvalue
    assert float((p < 0.05).mean()) > 0.77
    assert seeds_needed(4, 0.0, SEED_SD**2) is None  # no effect: nothing to size


def test_variance_components_recover_the_simulated_ones():
    values = _simulate(seeds=400, studies=1)[0]
    c = variance_components([list(row) for row in values])
    assert c.orders == 4 and c.seeds == 400
    assert math.isclose(c.var_seeds, SEED_SD**2, rel_tol=0.1)
    assert math.isclose(c.var_orders, VAR_ORDERS, rel_tol=0.25)
    assert variance_components([[0.5], [0.6]]) is None  # one seed per order: no seed variance


def test_the_analysis_reports_the_seeds_an_undistinguished_order_effect_needs():
    orders = [("A", "B"), ("B", "A")]
    values = {orders[0]: [0.45, 0.51], orders[1]: [0.53, 0.59]}  # F = 3.56 on (1, 2) df: p = 0.2
    trials = [{"order": o, "seed": s, "matrix": [[1.0, None], [0.5, 1.0]], "metrics": {"mfn": values[o][s]}}
              for o in orders for s in range(2)]
    variance = analyse_orders(trials, hours_per_stage=0.5).variance
    assert variance["p_value"] >= 0.05 and "NOT distinguishable" in variance["verdict"]
    c = variance_components([[t["metrics"]["mfn"] for t in trials if t["order"] == o] for o in orders])
    assert variance["seeds_needed"] == seeds_needed(2, c.var_orders, c.var_seeds)
    n = variance["seeds_needed"]
    # 2 orders of 2 tasks: 4 distinct stages per seed (A, A>B, B, B>A)
    assert f"needs {n} seeds per order: {2 * n} trials, {4 * n} stages, about {4 * n * 0.5:.2f} device-hours" in (
        variance["verdict"])
    assert "no order effect is observed" in power_statement(variance_components([[0.5, 0.6], [0.55, 0.55]]))
