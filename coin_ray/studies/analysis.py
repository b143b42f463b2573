"""Order-sensitivity analysis of a sweep (pure functions over finished trials; no Ray, no MLflow).

Each trial is a dict with `order` (task names in training order), `seed`, `matrix` (matrix[i][j] = score on
order[j] after stage i), `metrics` (cl_metrics) and, in a sweep, the rest of its configuration (`method`,
`num_experts`, `rank`, `alpha`, `lr`). Trials are grouped by their whole configuration (`CONFIG_COLUMNS`) and
only trials that share it count as seeds of it. The analysis separates the order effect from seed noise: a
one-way ANOVA with the configuration as factor and seeds as replicates gives the share of variance between
configurations (eta squared) and a p-value; with one seed per configuration, the effect and noise cannot be
told apart, and it says so. When only the order varies, the factor is the order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from coin_ray.studies.designs import distinct_prefixes
from coin_ray.studies.power import power_statement, seeds_needed, variance_components


@dataclass
class OrderAnalysis:
    per_order: pd.DataFrame  # order, n_seeds, mean, std, min, max of the chosen metric
    variance: dict[str, Any]  # between/within variance, eta_squared, F, p_value, verdict
    task_spread: pd.DataFrame  # per task: final accuracy mean/min/max/std across orders
    position: pd.DataFrame  # task x position: mean final accuracy when the task is trained at that position
    carry_over: pd.DataFrame | None  # A (row) trained right before B (col): mean drop of A's score after B
    carry_over_gain: pd.DataFrame | None = None  # A right before B: B's just-learned score minus B's mean
    notes: list[str] = field(default_factory=list)


# what makes two trials the same configuration (the rest of a sweep's config is the same for every trial);
# trials that share all of these differ by their seed only
CONFIG_COLUMNS = ("order", "method", "num_experts", "rank", "alpha", "lr")


def configuration(trial: dict[str, Any]) -> dict[str, Any]:
    """The trial's configuration: its order joined by '>' and the other `CONFIG_COLUMNS` it carries."""
    out = {"order": ">".join(trial["order"])}
    out.update({c: trial[c] for c in CONFIG_COLUMNS[1:] if c in trial})
    return out


def distinct_runs(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials less repeats: a search that samples one configuration twice with one seed ran one run."""
    seen: set = set()
    out = []
    for t in trials:
        key = (tuple(sorted(configuration(t).items(), key=lambda kv: kv[0])), t.get("seed", 0))
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def varying_columns(configs: pd.DataFrame) -> list[str]:
    """The configuration columns that take more than one value across `configs` (rows of `configuration`)."""
    return [c for c in CONFIG_COLUMNS if c in configs.columns and configs[c].nunique(dropna=False) > 1]


def order_skip_reason(trials: Sequence[dict[str, Any]]) -> str | None:
    """One line saying why the order analysis does not apply (every trial trained one order), else None."""
    orders = {">".join(t["order"]) for t in trials}
    if len(orders) == 1:
        return (f"order analysis skipped: every finished trial trained the one order {orders.pop()} (orders vary "
                f"with hparams.py --search-order or with a task_order.py design of several orders)")
    return None


def _final_scores(trial: dict[str, Any]) -> dict[str, float]:
    order, matrix = trial["order"], trial["matrix"]
    return {t: matrix[-1][j] for j, t in enumerate(order) if matrix[-1][j] is not None}


def analyse_orders(trials: Sequence[dict[str, Any]], metric: str = "mfn", alpha: float = 0.05,
                   hours_per_stage: float | None = None) -> OrderAnalysis:
    """The order analysis; where orders are not distinguishable from seed noise, the verdict says how many seeds
    would make them so and what that costs (`hours_per_stage`: the study's measured device-hours per stage)."""
    if not trials:
        raise ValueError("no finished trials to analyse")
    trials = distinct_runs(trials)
    per_seed = distinct_prefixes(list(dict.fromkeys(tuple(t["order"]) for t in trials)))
    rows = [{**configuration(t), "seed": t.get("seed", 0), "value": t["metrics"].get(metric)} for t in trials]
    df = pd.DataFrame(rows).dropna(subset=["value"])
    # grouped by the whole configuration; the table shows the order and whatever else varies
    shown = ["order"] + [c for c in varying_columns(df) if c != "order"]
    df["config"] = df[shown].astype(str).agg(" ".join, axis=1)
    per_order = (df.groupby(shown, dropna=False)["value"]
                 .agg(n_seeds="count", mean="mean", std="std", min="min", max="max")
                 .reset_index().sort_values("mean", ascending=False))
    others = shown[1:]
    variance = _anova(df, alpha, factor="order" if not others else "configuration", metric=metric,
                      stages_per_seed=per_seed, hours_per_stage=hours_per_stage)
    notes = [variance["verdict"]]
    if others:
        notes.append(f"the configurations differ in {', '.join(others)} besides the order: the effect measured is "
                     f"that of the whole configuration, not of the order alone")

    tasks = sorted({t for tr in trials for t in tr["order"]})
    finals = pd.DataFrame([{**_final_scores(tr), "order": ">".join(tr["order"])} for tr in trials])
    spread = pd.DataFrame({
        "task": tasks,
        "mean": [finals[t].mean() for t in tasks],
        "min": [finals[t].min() for t in tasks],
        "max": [finals[t].max() for t in tasks],
        "std": [finals[t].std(ddof=0) for t in tasks],
    })
    spread["range"] = spread["max"] - spread["min"]

    n = max(len(tr["order"]) for tr in trials)
    pos = pd.DataFrame(np.nan, index=tasks, columns=[f"pos{p + 1}" for p in range(n)])
    acc: dict[tuple[str, int], list[float]] = {}
    for tr in trials:
        fs = _final_scores(tr)
        for p, t in enumerate(tr["order"]):
            if t in fs:
                acc.setdefault((t, p), []).append(fs[t])
    for (t, p), vals in acc.items():
        pos.loc[t, f"pos{p + 1}"] = float(np.mean(vals))

    carry, gain = _carry_over(trials, tasks)
    return OrderAnalysis(per_order=per_order, variance=variance, task_spread=spread, position=pos,
                         carry_over=carry, carry_over_gain=gain, notes=notes)


METHOD_COLUMNS = ("method", "trials", "mean", "sd_orders", "sd_seeds", "min", "max")


@dataclass
class MethodSpread:
    table: pd.DataFrame  # METHOD_COLUMNS, one row per method
    verdicts: dict[str, str]  # method -> its order ANOVA's verdict
    per_order: pd.DataFrame  # method, order, value (the mean over seeds): what the spread plot shows


def analyse_methods(trials: Sequence[dict[str, Any]], metric: str = "mfn", alpha: float = 0.05) -> MethodSpread:
    """Order robustness per method: over each method's trials, the mean of `metric`; sd_orders, the standard
    deviation (ddof 1) of the per-order means over seeds (the spread across orders); sd_seeds, the pooled
    standard deviation of the seeds within an order (sqrt of the ANOVA's within mean square; NaN with one seed
    per order); min and max of the per-order means; and the one-way ANOVA verdict with the order as factor."""
    trials = distinct_runs(trials)
    df = pd.DataFrame([{"method": t.get("method", ""), "order": ">".join(t["order"]), "seed": t.get("seed", 0),
                        "value": t["metrics"].get(metric)} for t in trials]).dropna(subset=["value"])
    rows, verdicts, per_order = [], {}, []
    for method, group in df.groupby("method", sort=True):
        means = group.groupby("order")["value"].mean()
        variance = _anova(group.assign(config=group["order"]), alpha, factor="order", metric=metric)
        verdicts[str(method)] = variance["verdict"]
        rows.append({"method": method, "trials": len(group), "mean": group["value"].mean(),
                     "sd_orders": means.std(ddof=1) if len(means) > 1 else np.nan,
                     "sd_seeds": variance.get("seed_std", np.nan), "min": means.min(), "max": means.max()})
        per_order += [{"method": method, "order": o, "value": v} for o, v in means.items()]
    return MethodSpread(table=pd.DataFrame(rows, columns=list(METHOD_COLUMNS)), verdicts=verdicts,
                        per_order=pd.DataFrame(per_order, columns=["method", "order", "value"]))


def format_methods(spread: MethodSpread, metric: str = "mfn") -> str:
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    return "\n".join([f"Order robustness per method ({metric}; sd_orders: spread of the per-order means, sd_seeds: "
                      "seed noise within an order):", spread.table.to_string(index=False, float_format=fmt),
                      *[f"  {m}: {v}" for m, v in spread.verdicts.items()]])


def _anova(df: pd.DataFrame, alpha: float, factor: str = "order", metric: str = "mfn", **cost: Any) -> dict[str, Any]:
    """One-way ANOVA of df["value"] with df["config"] as the factor (its levels are called `factor`s). An order
    effect it cannot tell from seed noise comes with the seeds it would need (`studies.power`; `cost`: the
    stages per seed and device-hours per stage of that statement)."""
    groups = [g["value"].to_numpy(float) for _, g in df.groupby("config")]
    k, n = len(groups), len(df)
    out: dict[str, Any] = {"orders": k, "runs": n}
    if k < 2:
        out["verdict"] = f"only one {factor}: no {factor} effect can be measured"
        return out
    grand = df["value"].mean()
    ss_between = sum(len(g) * (g.mean() - grand) ** 2 for g in groups)
    ss_within = sum(((g - g.mean()) ** 2).sum() for g in groups)
    ss_total = ss_between + ss_within
    out.update(ss_between=float(ss_between), ss_within=float(ss_within),
               eta_squared=float(ss_between / ss_total) if ss_total > 0 else float("nan"))
    if n - k <= 0:
        out["verdict"] = (f"one seed per {factor}: the {factor} effect cannot be separated from seed noise; "
                          "rerun with --seeds 2 or more" if factor == "order" else
                          f"one seed per {factor}: the {factor} effect cannot be separated from seed noise")
        return out
    ms_between = ss_between / (k - 1)
    ms_within = ss_within / (n - k)
    from scipy import stats

    f = ms_between / ms_within if ms_within > 0 else float("inf")
    p = float(stats.f.sf(f, k - 1, n - k)) if np.isfinite(f) else 0.0
    out.update(F=float(f), p_value=p, seed_std=float(np.sqrt(ms_within)))
    share = f"{100 * out['eta_squared']:.0f}% of variance between {factor}s"
    out["verdict"] = (f"{factor} effect distinguishable from seed noise (F={f:.2f}, p={p:.3g}, {share})" if p < alpha
                      else f"{factor} differences are NOT distinguishable from seed noise (F={f:.2f}, p={p:.3g}, "
                           f"{share})")
    components = variance_components(groups)
    if components is not None:
        out.update(var_orders=components.var_orders, var_seeds=components.var_seeds)
        if p >= alpha and factor == "order":  # not a bare "no": what the question would need
            out["power"] = power_statement(components, metric, **cost)
            out["seeds_needed"] = seeds_needed(components.orders, components.var_orders, components.var_seeds)
            out["verdict"] += "; " + out["power"]
    return out


def _carry_over(trials: Sequence[dict[str, Any]], tasks: list[str]) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    drop: dict[tuple[str, str], list[float]] = {}
    learned: dict[tuple[str, str], list[float]] = {}
    diag: dict[str, list[float]] = {}
    for tr in trials:
        order, m = tr["order"], tr["matrix"]
        for i, t in enumerate(order):
            if m[i][i] is not None:
                diag.setdefault(t, []).append(m[i][i])
        for i in range(len(order) - 1):
            a, b = order[i], order[i + 1]
            if m[i][i] is not None and m[i + 1][i] is not None:
                drop.setdefault((a, b), []).append(m[i][i] - m[i + 1][i])
            if m[i + 1][i + 1] is not None:
                learned.setdefault((a, b), []).append(m[i + 1][i + 1])
    if not drop:
        return None, None
    carry = pd.DataFrame(np.nan, index=tasks, columns=tasks)
    gain = pd.DataFrame(np.nan, index=tasks, columns=tasks)
    for (a, b), vals in drop.items():
        carry.loc[a, b] = float(np.mean(vals))
    for (a, b), vals in learned.items():
        gain.loc[a, b] = float(np.mean(vals) - np.mean(diag[b]))
    return carry, gain


def format_analysis(a: OrderAnalysis, metric: str = "mfn") -> str:
    """Plain-text report for the terminal."""
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    parts = [f"Order sensitivity ({metric}, mean over the seeds of each configuration):",
             a.per_order.to_string(index=False, float_format=fmt), "", "Verdict: " + a.variance["verdict"],
             *[f"Note: {n}" for n in a.notes[1:]], "",
             "Final accuracy per task across orders:", a.task_spread.to_string(index=False, float_format=fmt), "",
             "Final accuracy by training position (rows: task):", a.position.to_string(float_format=fmt)]
    if a.carry_over is not None:
        parts += ["", "Carry-over: drop of A's score when B is trained right after A (rows A, cols B):",
                  a.carry_over.to_string(float_format=fmt)]
    return "\n".join(parts)


def joint_gaps(trials: Sequence[dict[str, Any]], joint: Sequence[dict[str, Any]], metric: str = "mfn") -> pd.DataFrame:
    """Each order's gap to the joint multitask bound: per order (mean over its seeds) the `metric`, the joint
    bound's `metric` (mean over the joint trials' seeds) and their difference (order minus joint: negative
    = below the bound), plus the same for the final per-task scores' mean (mfn)."""
    bound = {m: float(np.nanmean([t["metrics"].get(m, np.nan) for t in joint])) for m in (metric, "mfn")}
    rows = []
    for order, group in pd.DataFrame([{"order": ">".join(t["order"]), "value": t["metrics"].get(metric, np.nan),
                                       "mfn": t["metrics"].get("mfn", np.nan)} for t in trials]).groupby("order"):
        row = {"order": order, metric: group["value"].mean(), f"joint_{metric}": bound[metric],
               f"gap_{metric}": group["value"].mean() - bound[metric]}
        if metric != "mfn":
            row.update(mfn=group["mfn"].mean(), joint_mfn=bound["mfn"], gap_mfn=group["mfn"].mean() - bound["mfn"])
        rows.append(row)
    return pd.DataFrame(rows).sort_values(f"gap_{metric}", ascending=False).reset_index(drop=True)


def format_joint_gaps(gaps: pd.DataFrame, metric: str = "mfn") -> str:
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    return (f"Gap to the joint multitask bound ({metric}; order minus joint, negative = below the bound):\n"
            + gaps.to_string(index=False, float_format=fmt))
