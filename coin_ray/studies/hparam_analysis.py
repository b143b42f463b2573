"""What a hyper-parameter sweep found (pure functions over the trials table of `runner.trials_table`; no Ray,
no MLflow): the best configuration(s), the metric and forgetting by each searched parameter and by experts x
rank, Optuna's parameter importances, and the Pareto front of a multi-objective search.

Only finished trials enter these tables; trials a scheduler stopped (`partial`) are listed apart with the stage
they reached. Trials are grouped by their whole configuration (`analysis.CONFIG_COLUMNS`): only trials that
share it count as seeds of it, and a configuration sampled twice with one seed is one run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pandas as pd

from coin_ray.studies.analysis import CONFIG_COLUMNS
from coin_ray.studies.space import RANDOM_KEY_PREFIX as ORDER_KEY_PREFIX  # the random keys of a searched order

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Optuna's importances need a few distinct finished points to fit anything; below that it says so
MIN_IMPORTANCE_TRIALS = 4
# a numeric parameter with more distinct values than this (e.g. a log-uniform lr) is binned in its table
MAX_LEVELS = 6


class NoFinishedTrials(ValueError):
    """No finished trial has the metric the report compares."""


@dataclass(frozen=True)
class SearchParam:
    """One entry of a sweep's search space."""

    key: str  # the Tune key, e.g. "hp.tuner.rank" or "key.ScienceQA"
    column: str  # the trials-table column with the trial's value ("rank"; "order" for the order's keys)
    kind: str  # "choice" or "float"
    values: tuple = ()  # the choices
    low: float | None = None
    high: float | None = None
    log: bool = False

    def describe(self) -> str:
        if self.kind == "choice":
            return ", ".join(map(str, self.values))
        return f"{self.low:g} .. {self.high:g}" + (" (log)" if self.log else "")


def describe_space(param_space: dict[str, Any]) -> list[SearchParam]:
    """The searched entries of a Tune param space (`tune.choice`, `tune.uniform`, `tune.loguniform`); grid
    searches and constants are not searched and are left out."""
    out = []
    for key, domain in param_space.items():
        column = "order" if key.startswith(ORDER_KEY_PREFIX) else _column_of(key)
        if hasattr(domain, "categories"):
            out.append(SearchParam(key, column, "choice", values=tuple(domain.categories)))
        elif hasattr(domain, "lower") and hasattr(domain, "upper"):
            log = "log" in type(getattr(domain, "sampler", None)).__name__.lower()
            out.append(SearchParam(key, column, "float", low=float(domain.lower), high=float(domain.upper), log=log))
    return out


def _column_of(key: str) -> str:
    """"hp.tuner.rank" -> "rank": the trials table holds the trial's effective value under the short name."""
    short = key.split(".")[-1]
    return short if short in CONFIG_COLUMNS else key


def space_table(space: Sequence[SearchParam]) -> pd.DataFrame:
    return pd.DataFrame([{"param": p.key, "column": p.column, "kind": p.kind, "values": p.describe()}
                         for p in space], columns=["param", "column", "kind", "values"])


def lower_is_better(metric: str) -> bool:
    return metric.removeprefix("gk_") == "forgetting"


@dataclass
class HparamAnalysis:
    metric: str
    searched: list[str]  # trials-table columns of the searched parameters, in search-space order
    space: pd.DataFrame  # the search space (space_table)
    per_config: pd.DataFrame  # searched columns, n_seeds, metric mean/std, forgetting, trials
    best: pd.DataFrame  # the best configuration(s) by the metric (ties all kept)
    by_param: dict[str, pd.DataFrame]  # searched column -> value, n_trials, metric mean/std, forgetting mean
    experts_rank: pd.DataFrame | None  # mean metric, rows num_experts, columns rank
    experts_rank_forgetting: pd.DataFrame | None
    importances: pd.DataFrame | None  # param -> importance for the metric (and for forgetting)
    pareto: pd.DataFrame | None  # the non-dominated configurations (metric vs forgetting), --multi-objective
    per_config_points: pd.DataFrame | None  # every configuration's (metric, forgetting), for the Pareto plot
    partial: pd.DataFrame  # trials a scheduler stopped: configuration, stage_reached / n_stages, last value
    notes: list[str] = field(default_factory=list)


def analyse_hparams(table: pd.DataFrame, space: Sequence[SearchParam], metric: str = "mfn",
                    pareto: bool = False) -> HparamAnalysis:
    """The hyper-parameter report of a sweep's trials table. Raises NoFinishedTrials when no finished trial has
    the metric."""
    space = list(space)
    searched = list(dict.fromkeys(p.column for p in space))
    partial_mask = table["partial"].astype(bool) if "partial" in table.columns else pd.Series(False, table.index)
    errored = table["status"].eq("ERROR") if "status" in table.columns else pd.Series(False, table.index)
    if metric not in table.columns:
        raise NoFinishedTrials(f"no finished trial has the metric {metric!r}")
    finished = table[~partial_mask & ~errored & table[metric].notna()]
    if finished.empty:
        raise NoFinishedTrials(f"no finished trial has the metric {metric!r} (of {len(table)} trials)")
    config_cols = [c for c in CONFIG_COLUMNS if c in table.columns]
    seed = ["seed"] if "seed" in table.columns else []
    runs = finished.drop_duplicates(subset=config_cols + seed)  # one configuration and seed: one run
    has_forgetting = "forgetting" in runs.columns and runs["forgetting"].notna().any()
    ascending = lower_is_better(metric)

    values = {metric: (metric, "mean"), f"{metric}_std": (metric, "std")}
    if has_forgetting and metric != "forgetting":
        values["forgetting"] = ("forgetting", "mean")
    shown = [c for c in searched if c in runs.columns] or config_cols
    per_config = (runs.groupby(config_cols, dropna=False)
                  .agg(n_seeds=(seed[0] if seed else metric, "nunique" if seed else "count"), **values,
                       trials=("trial", lambda s: " ".join(s)) if "trial" in runs.columns else (metric, "count"))
                  .reset_index().sort_values(metric, ascending=ascending, kind="stable"))
    per_config = per_config[shown + [c for c in per_config.columns if c not in config_cols]]
    best_value = per_config[metric].iloc[0]
    best = per_config[np.isclose(per_config[metric], best_value)]

    by_param = {c: _by_param(runs, c, metric, has_forgetting) for c in searched if c in runs.columns}
    experts_rank = experts_rank_forgetting = None
    if {"num_experts", "rank"} <= set(searched):
        experts_rank = _pivot(runs, metric)
        if has_forgetting:
            experts_rank_forgetting = _pivot(runs, "forgetting")

    notes = [f"{len(finished)} of {len(table)} trials finished ({len(runs)} distinct runs, {len(per_config)} "
             f"configurations)" + (f"; {int(partial_mask.sum())} stopped early by the scheduler (partial: listed "
                                   f"apart, not in these tables)" if partial_mask.any() else "")]
    importances, note = _importances(runs, space, metric, has_forgetting)
    if note:
        notes.append(note)
    front = points = None
    if pareto:
        if has_forgetting and metric != "forgetting":
            points = per_config
            front = pareto_front(per_config, metric, ascending)
        else:
            notes.append("Pareto front skipped: the trials have no forgetting to trade the metric against")
    partial_cols = [c for c in ["trial", *shown, "seed", "status", "stage_reached", "n_stages", "last_avg_seen_acc"]
                    if c in table.columns]
    partial = table.loc[partial_mask, partial_cols].reset_index(drop=True)
    return HparamAnalysis(metric=metric, searched=searched, space=space_table(space), per_config=per_config,
                          best=best.reset_index(drop=True), by_param=by_param, experts_rank=experts_rank,
                          experts_rank_forgetting=experts_rank_forgetting, importances=importances,
                          pareto=front, per_config_points=points, partial=partial, notes=notes)


def _by_param(runs: pd.DataFrame, column: str, metric: str, has_forgetting: bool) -> pd.DataFrame:
    """The metric (and forgetting) by the values of one parameter, over every value of the others; a numeric
    parameter with many distinct values (a continuous range) is grouped in quantile bins."""
    levels = runs[column]
    if pd.api.types.is_numeric_dtype(levels) and levels.nunique() > MAX_LEVELS:
        levels = pd.qcut(levels, q=4, duplicates="drop").astype(str)
    agg = {"n_trials": (metric, "count"), metric: (metric, "mean"), f"{metric}_std": (metric, "std")}
    if has_forgetting and metric != "forgetting":
        agg["forgetting"] = ("forgetting", "mean")
    out = runs.assign(**{column: levels}).groupby(column, dropna=False).agg(**agg).reset_index()
    return out


def _pivot(runs: pd.DataFrame, value: str) -> pd.DataFrame:
    pivot = runs.pivot_table(index="num_experts", columns="rank", values=value, aggfunc="mean")
    pivot.index.name, pivot.columns.name = "num_experts", "rank"
    return pivot


def pareto_front(points: pd.DataFrame, metric: str, ascending: bool = False) -> pd.DataFrame:
    """The rows no other row dominates on (metric: higher is better unless `ascending`; forgetting: lower is
    better), sorted by forgetting."""
    m = points[metric].to_numpy(float) * (-1 if ascending else 1)
    f = points["forgetting"].to_numpy(float)
    keep = [not np.any((m >= m[i]) & (f <= f[i]) & ((m > m[i]) | (f < f[i]))) for i in range(len(points))]
    return points[keep].sort_values("forgetting", kind="stable").reset_index(drop=True)


def _importances(runs: pd.DataFrame, space: Sequence[SearchParam], metric: str,
                 has_forgetting: bool) -> tuple[pd.DataFrame | None, str | None]:
    """fANOVA importances (`optuna.importance`) of the searched parameters for the metric and for forgetting,
    from an in-memory Optuna study of the finished runs with the search space's distributions."""
    params = [p for p in space if p.key in runs.columns]
    if not params:
        return None, "parameter importances skipped: the trials table has none of the sampled values"
    points = runs.dropna(subset=[p.key for p in params] + [metric]).drop_duplicates(
        subset=[p.key for p in params] + (["seed"] if "seed" in runs.columns else []))
    if len(points) < MIN_IMPORTANCE_TRIALS:
        return None, (f"parameter importances skipped: {len(points)} distinct finished trial(s), Optuna's "
                      f"importances need at least {MIN_IMPORTANCE_TRIALS}")
    varied = [p for p in params if points[p.key].nunique() > 1]
    if not varied:
        return None, "parameter importances skipped: every finished trial sampled the same values"
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.importance import FanovaImportanceEvaluator

    distributions = {p.key: CategoricalDistribution(list(p.values)) if p.kind == "choice"
                     else FloatDistribution(p.low, p.high, log=p.log) for p in varied}
    targets = [metric] + (["forgetting"] if has_forgetting and metric != "forgetting" else [])
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(directions=["maximize"] * len(targets))
        for _, row in points.iterrows():
            values = [float(row[t]) for t in targets]
            if not all(np.isfinite(values)):
                continue
            study.add_trial(optuna.trial.create_trial(
                params={p.key: _native(row[p.key], p) for p in varied}, distributions=distributions, values=values))
        out = {}
        for i, target in enumerate(targets):
            scores = optuna.importance.get_param_importances(
                study, evaluator=FanovaImportanceEvaluator(seed=0), target=lambda t, i=i: t.values[i])
            out[target] = {k: float(v) for k, v in scores.items()}
    finally:
        optuna.logging.set_verbosity(verbosity)
    table = pd.DataFrame(out)
    table.index.name = "param"
    return table.sort_values(metric, ascending=False), None


def _native(value: Any, param: SearchParam) -> Any:
    """A table cell as the value the distribution knows (a numpy number as the choice it equals)."""
    if param.kind == "float":
        return float(value)
    for choice in param.values:
        if choice == value:
            return choice
    raise ValueError(f"{param.key}: value {value!r} is not one of its choices {list(param.values)}")


def format_hparams(a: HparamAnalysis) -> str:
    """Plain-text report for the terminal and analysis/summary.txt."""
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    m = a.metric
    parts = [f"Hyper-parameter study ({m}; {'lower' if lower_is_better(m) else 'higher'} is better)",
             *[f"Note: {n}" for n in a.notes], "", "Search space:", a.space.to_string(index=False), "",
             f"Best configuration(s) by {m}:", a.best.to_string(index=False, float_format=fmt), "",
             "All configurations (mean over the seeds of each):", a.per_config.to_string(index=False, float_format=fmt)]
    for column, t in a.by_param.items():
        parts += ["", f"{m} by {column} (over every value of the other parameters):",
                  t.to_string(index=False, float_format=fmt)]
    if a.experts_rank is not None:
        parts += ["", f"{m} by num_experts (rows) x rank (columns):", a.experts_rank.to_string(float_format=fmt)]
    if a.experts_rank_forgetting is not None:
        parts += ["", "forgetting by num_experts (rows) x rank (columns):",
                  a.experts_rank_forgetting.to_string(float_format=fmt)]
    if a.importances is not None:
        parts += ["", "Parameter importances (Optuna fANOVA; share of the variance each explains):",
                  a.importances.to_string(float_format=fmt)]
    if a.pareto is not None:
        parts += ["", f"Pareto front ({m} vs forgetting):", a.pareto.to_string(index=False, float_format=fmt)]
    if not a.partial.empty:  # the trials section above the report lists them; here their configurations
        parts += ["", "Stopped early (partial, not in the tables above): " + "; ".join(
            " ".join(f"{c}={row[c]}" for c in a.searched if c in a.partial.columns and c != "order")
            + f" after stage {row['stage_reached']} of {row['n_stages']}" for _, row in a.partial.iterrows())]
    return "\n".join(parts)


def hparam_tables(a: HparamAnalysis) -> dict[str, pd.DataFrame]:
    """The report's tables by file stem (analysis/<name>.csv on the sweep run)."""
    tables = {"search_space": a.space.set_index("param"), "best": a.best, "per_config": a.per_config,
              **{f"by_{c}": t.set_index(c) for c, t in a.by_param.items()}}
    for name in ("experts_rank", "experts_rank_forgetting", "importances", "pareto"):
        if getattr(a, name) is not None:
            tables[name] = getattr(a, name)
    if not a.partial.empty:
        tables["partial_trials"] = a.partial
    return tables


def hparam_figures(a: HparamAnalysis) -> dict[str, "Figure"]:
    """The report's plots by file stem (analysis/<name>.png): experts x rank heatmaps, the metric by each
    parameter, importances, the Pareto front."""
    from tracking.plots import table_heatmap

    m = a.metric
    figures: dict[str, Figure] = {}
    if a.experts_rank is not None:
        figures["experts_rank"] = table_heatmap(a.experts_rank, f"{m} by num_experts x rank")
    if a.experts_rank_forgetting is not None:
        figures["experts_rank_forgetting"] = table_heatmap(a.experts_rank_forgetting,
                                                           "forgetting by num_experts x rank", cmap="Reds")
    if a.by_param:
        figures["by_param"] = _by_param_figure(a)
    if a.importances is not None:
        figures["importances"] = table_heatmap(a.importances, "parameter importances (fANOVA)", cmap="Blues")
    if a.pareto is not None:
        figures["pareto"] = _pareto_figure(a)
    return figures


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _by_param_figure(a: HparamAnalysis) -> "Figure":
    m = a.metric
    fig = _figure(3.2 * len(a.by_param) + 0.6, 3.0)
    for k, (column, t) in enumerate(a.by_param.items()):
        ax = fig.add_subplot(1, len(a.by_param), k + 1)
        x = np.arange(len(t))
        has_f = "forgetting" in t.columns
        width = 0.4 if has_f else 0.7
        ax.bar(x - (width / 2 if has_f else 0), t[m], width, yerr=t[f"{m}_std"].fillna(0), label=m, color="tab:blue")
        if has_f:
            ax.bar(x + width / 2, t["forgetting"], width, label="forgetting", color="tab:red")
        ax.set_xticks(x, labels=[str(v) for v in t[column]], rotation=30, ha="right", fontsize=8)
        ax.set_xlabel(column)
        if k == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{m} and forgetting by each searched parameter (mean over the other parameters)", fontsize=9)
    return fig


def _pareto_figure(a: HparamAnalysis) -> "Figure":
    m = a.metric
    fig = _figure(5.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    pts, front = a.per_config_points, a.pareto
    ax.scatter(pts["forgetting"], pts[m], color="tab:gray", label="configuration")
    ax.plot(front["forgetting"], front[m], "o-", color="tab:red", label="Pareto front")
    label_cols = [c for c in a.searched if c in front.columns and c != "order"]
    for _, row in front.iterrows():
        ax.annotate(" ".join(f"{c}={row[c]:.3g}" if isinstance(row[c], float) else f"{c}={row[c]}"
                             for c in label_cols), (row["forgetting"], row[m]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("forgetting (lower is better)")
    ax.set_ylabel(f"{m} ({'lower' if lower_is_better(m) else 'higher'} is better)")
    ax.legend(fontsize=7)
    ax.set_title(f"{m} vs forgetting", fontsize=9)
    return fig
