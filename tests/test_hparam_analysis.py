"""The hyper-parameter report and the by-configuration grouping of the order analysis, on hand-built trials
(pure functions: pandas in, tables and figures out)."""
from __future__ import annotations

import math

import pytest

from coin_ray.studies.analysis import analyse_orders, order_skip_reason
from coin_ray.studies.hparam_analysis import (SearchParam, analyse_hparams, describe_space, format_hparams,
                                              hparam_figures, hparam_tables, pareto_front)
from coin_ray.studies.runner import trials_table

ORDER = ("ScienceQA", "TextVQA", "ImageNet")
SPACE = [SearchParam("hp.tuner.num_experts", "num_experts", "choice", values=(1, 2, 4, 8)),
         SearchParam("hp.tuner.rank", "rank", "choice", values=(8, 16, 32))]


def _trial(e, r, mfn=None, forgetting=None, seed=0, order=ORDER, lr=1e-3, stopped_after=None, sampled_lr=False):
    """A trial as runner.run_sweep returns it: finished with final metrics, or stopped after a stage."""
    sampled = {"hp.tuner.num_experts": e, "hp.tuner.rank": r, **({"hp.train.lr": lr} if sampled_lr else {})}
    row = {"name": f"{'>'.join(order)}-s{seed}-num_experts={e},rank={r},lr={lr:g}", "order": order, "seed": seed,
           "method": "moelora", "num_experts": e, "rank": r, "alpha": 2.0 * r, "lr": lr, "sampled": sampled,
           "n_stages": len(order), "stages_reused": 0}
    if stopped_after is not None:
        return {**row, "status": "STOPPED", "partial": True, "stage_reached": stopped_after, "matrix": None,
                "metrics": {}, "last_reported": {"stage": stopped_after - 1, "avg_seen_acc": 0.99}}
    n = len(order)
    first = mfn * n - (n - 1)  # the first task's final score; the others end at 1.0
    matrix = [[1.0 if j <= i else None for j in range(n)] for i in range(n)]
    matrix[-1][0] = first
    return {**row, "status": "TERMINATED", "partial": False, "stage_reached": n, "matrix": matrix, "last_reported": {},
            "metrics": {"mft": 1.0, "mfn": mfn, "bwt": -forgetting, "forgetting": forgetting}}


def test_report_groups_by_configuration_and_keeps_stopped_trials_apart():
    trials = [_trial(1, 32, 0.50, 0.30, seed=0), _trial(1, 32, 0.60, 0.20, seed=1),
              _trial(2, 16, 0.80, 0.10), _trial(2, 16, 0.80, 0.10),  # TPE sampled one point twice: one run
              _trial(4, 8, stopped_after=2)]
    table = trials_table(trials)
    stopped = table[table["partial"]]
    assert len(stopped) == 1 and stopped["stage_reached"].item() == 2 and stopped["n_stages"].item() == 3
    assert math.isnan(stopped["mfn"].item()) and stopped["last_avg_seen_acc"].item() == 0.99  # not a final metric

    a = analyse_hparams(table, SPACE, metric="mfn")
    assert a.best[["num_experts", "rank", "n_seeds"]].values.tolist() == [[2, 16, 1]]
    assert a.best["mfn"].item() == pytest.approx(0.80)
    e1 = a.per_config.set_index("num_experts").loc[1]
    assert e1["n_seeds"] == 2 and e1["mfn"] == pytest.approx(0.55) and e1["forgetting"] == pytest.approx(0.25)
    assert 4 not in set(a.per_config["num_experts"])  # the stopped trial is in none of the final-metric tables
    assert a.partial[["num_experts", "stage_reached"]].values.tolist() == [[4, 2]]
    assert a.experts_rank.loc[2, 16] == pytest.approx(0.80) and a.experts_rank.loc[1, 32] == pytest.approx(0.55)
    assert a.experts_rank_forgetting.loc[1, 32] == pytest.approx(0.25)
    assert a.by_param["num_experts"].set_index("num_experts")["n_trials"].to_dict() == {1: 2, 2: 1}
    assert a.importances is None
    assert any("importances skipped: 3 distinct finished trial(s)" in n for n in a.notes)
    assert any("1 stopped early by the scheduler" in n for n in a.notes)
    text = format_hparams(a)
    assert "Best configuration(s) by mfn" in text and "num_experts (rows) x rank (columns)" in text
    assert set(hparam_tables(a)) == {"search_space", "best", "per_config", "by_num_experts", "by_rank",
                                     "experts_rank", "experts_rank_forgetting", "partial_trials"}
    # one fixed order: the order analysis does not apply and says why in one line
    reason = order_skip_reason([t for t in trials if t["matrix"] is not None])
    assert reason.startswith("order analysis skipped") and "\n" not in reason and "--search-order" in reason


def test_order_analysis_counts_seeds_within_a_configuration_only():
    other = ("TextVQA", "ScienceQA", "ImageNet")
    trials = [_trial(1, 32, 0.50, 0.3, seed=0), _trial(2, 16, 0.80, 0.1, seed=0),
              _trial(1, 32, 0.40, 0.3, seed=0, order=other), _trial(1, 32, 0.42, 0.3, seed=1, order=other)]
    res = analyse_orders(trials)
    counts = {(r.order, r.num_experts): r.n_seeds for r in res.per_order.itertuples()}
    assert counts == {(">".join(ORDER), 1): 1, (">".join(ORDER), 2): 1, (">".join(other), 1): 2}
    assert "configuration" in res.variance["verdict"] and res.variance["runs"] == 4
    assert any("differ in num_experts, rank, alpha besides the order" in n for n in res.notes)
    assert order_skip_reason(trials) is None


def test_importances_pareto_and_figures():
    from tracking.plots import figure_png

    space = [*SPACE, SearchParam("hp.train.lr", "lr", "float", low=1e-4, high=1e-2, log=True)]
    trials = []
    points = [(1, 8), (1, 16), (1, 32), (2, 8), (2, 16), (4, 8), (4, 32), (8, 16)]
    for (e, r), k in zip(points, [3, 6, 0, 5, 1, 7, 2, 4]):  # lr levels spread over the expert counts
        lr = 10 ** (-4 + 2 * k / 7)
        # MFN grows with the expert count, forgetting with the rank; lr does nothing
        trials.append(_trial(e, r, mfn=0.4 + 0.05 * e, forgetting=0.01 * r, lr=lr, sampled_lr=True))
    a = analyse_hparams(trials_table(trials), space, metric="mfn", pareto=True)
    imp = a.importances
    assert imp["mfn"].idxmax() == "hp.tuner.num_experts" and imp["forgetting"].idxmax() == "hp.tuner.rank"
    assert imp["mfn"].sum() == pytest.approx(1.0)
    assert len(a.by_param["lr"]) == 4  # 8 distinct lr values: 4 quantile bins
    # non-dominated (max MFN, min forgetting): the best MFN at each rank
    assert sorted(zip(a.pareto["num_experts"], a.pareto["rank"])) == [(4, 8), (8, 16)]
    figures = hparam_figures(a)
    assert set(figures) == {"experts_rank", "experts_rank_forgetting", "by_param", "importances", "pareto"}
    assert all(figure_png(f).startswith(b"\x89PNG") for f in figures.values())
    assert "Pareto front (mfn vs forgetting)" in format_hparams(a)


def test_pareto_front_of_a_lower_is_better_metric():
    import pandas as pd

    points = pd.DataFrame({"gk_forgetting": [0.1, 0.2, 0.3], "forgetting": [0.3, 0.1, 0.2]})
    front = pareto_front(points, "gk_forgetting", ascending=True)
    assert front.values.tolist() == [[0.2, 0.1], [0.1, 0.3]]


def test_describe_space_reads_tune_domains():
    import ray.tune as tune

    space = describe_space({"hp.tuner.rank": tune.choice([8, 16]), "hp.train.lr": tune.loguniform(1e-4, 1e-2),
                            "key.ScienceQA": tune.uniform(0.0, 1.0), "seed": tune.grid_search([0, 1]),
                            "hp.tuner.dropout": 0.1})
    assert space == [SearchParam("hp.tuner.rank", "rank", "choice", values=(8, 16)),
                     SearchParam("hp.train.lr", "lr", "float", low=1e-4, high=1e-2, log=True),
                     SearchParam("key.ScienceQA", "order", "float", low=0.0, high=1.0, log=False)]
