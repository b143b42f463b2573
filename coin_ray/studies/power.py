"""How many seeds the order question needs: the power of the sweep analysis's test, a one-way ANOVA of the
orders with the seeds as replicates, at the order effect a finished study (or a pilot) observed.

With `a` orders of `n` seeds each, F = MS_orders / MS_seeds follows a noncentral F(a - 1, a(n - 1), lambda)
with lambda = n (a - 1) var_orders / var_seeds, where var_orders = sum_i tau_i^2 / (a - 1) is the variance of the
orders' effects tau_i (their true means' deviations from the grand mean) and var_seeds the variance between
seeds of one order. A study estimates var_seeds by MS_within and var_orders by (MS_between - MS_within) / n0
(the method-of-moments estimate; n0 is the mean group size, corrected for unequal groups). Power is
P(F > F_crit(alpha)) under that noncentral F.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

TARGET_POWER, ALPHA = 0.8, 0.05
MAX_SEEDS = 200


def anova_power(orders: int, seeds: int, var_orders: float, var_seeds: float, alpha: float = ALPHA) -> float:
    """Power of the order ANOVA with `orders` x `seeds` runs when the order effects have variance `var_orders`
    and the seeds `var_seeds` (see the module docstring); nan below 2 orders or 2 seeds."""
    from scipy import stats

    if orders < 2 or seeds < 2:
        return math.nan
    df1, df2 = orders - 1, orders * (seeds - 1)
    if var_seeds <= 0:
        return 1.0 if var_orders > 0 else alpha
    crit = stats.f.ppf(1 - alpha, df1, df2)
    lam = seeds * (orders - 1) * var_orders / var_seeds
    return float(stats.ncf.sf(crit, df1, df2, lam)) if lam > 0 else alpha


def seeds_needed(orders: int, var_orders: float, var_seeds: float, power: float = TARGET_POWER,
                 alpha: float = ALPHA, max_seeds: int = MAX_SEEDS) -> int | None:
    """The fewest seeds per order (>= 2) at which the ANOVA reaches `power`; None when no effect is observed
    (var_orders <= 0) or more than `max_seeds` would be needed."""
    if var_orders <= 0:
        return None
    for n in range(2, max_seeds + 1):
        if anova_power(orders, n, var_orders, var_seeds, alpha) >= power:
            return n
    return None


@dataclass(frozen=True)
class VarianceComponents:
    orders: int
    seeds: float  # mean seeds per order
    var_orders: float  # clipped at 0: an order spread below the seed noise estimates no order effect
    var_seeds: float


def variance_components(groups: Sequence[Sequence[float]]) -> VarianceComponents | None:
    """Method-of-moments components of one value per run, grouped by order (see the module docstring); None
    without 2 orders and a second seed somewhere."""
    groups = [list(map(float, g)) for g in groups if len(g)]
    a, total = len(groups), sum(len(g) for g in groups)
    if a < 2 or total - a < 1:
        return None
    grand = sum(sum(g) for g in groups) / total
    means = [sum(g) / len(g) for g in groups]
    ms_between = sum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means)) / (a - 1)
    ms_within = sum((x - m) ** 2 for g, m in zip(groups, means) for x in g) / (total - a)
    n0 = (total - sum(len(g) ** 2 for g in groups) / total) / (a - 1)
    return VarianceComponents(a, total / a, max((ms_between - ms_within) / n0, 0.0), ms_within)


def power_statement(c: VarianceComponents, metric: str = "mfn", *, orders: int | None = None,
                    stages_per_seed: int | None = None, hours_per_stage: float | None = None) -> str:
    """What the observed effect needs: seeds per order at 80 % power, alpha 0.05, over `orders` (default: the
    study's) and what that costs in stages (`stages_per_seed`: distinct stages one seed of the design trains)
    and device-hours (`hours_per_stage`, measured)."""
    a = orders or c.orders
    sd_o, sd_s = math.sqrt(c.var_orders), math.sqrt(c.var_seeds)
    if c.var_orders <= 0:
        return (f"power: the orders' spread of {metric} is within seed noise (seed sd {sd_s:.3g}): no order effect "
                f"is observed, so no number of seeds can be sized from this study")
    n = seeds_needed(a, c.var_orders, c.var_seeds)
    now = anova_power(a, max(round(c.seeds), 2), c.var_orders, c.var_seeds)
    head = (f"power: the observed order effect ({metric} sd {sd_o:.3g} across orders vs {sd_s:.3g} across seeds) "
            f"is detected with power {now:.2f} by {round(c.seeds)} seeds over {a} orders")
    if n is None:
        return head + f"; reaching {TARGET_POWER:.0%} would take more than {MAX_SEEDS} seeds per order"
    cost = f"; {TARGET_POWER:.0%} power at alpha {ALPHA} needs {n} seeds per order: {a * n} trials"
    if stages_per_seed:
        cost += f", {stages_per_seed * n} stages"
        if hours_per_stage is not None:
            cost += f", about {stages_per_seed * n * hours_per_stage:.2f} device-hours at the measured cost per stage"
    return head + cost
