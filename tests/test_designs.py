"""Order designs and the order-sensitivity analysis (pure functions)."""
import itertools
import math

import pytest

from coin_ray.studies.analysis import analyse_orders
from coin_ray.studies.designs import (DesignError, all_orders, build_design, decode_random_keys,
                                     distinct_prefixes, given_orders, latin_orders, random_orders, williams_orders)

T4 = ["ScienceQA", "TextVQA", "ImageNet", "GQA"]
T3 = T4[:3]


def _positions_balanced(orders, tasks):
    for pos in range(len(tasks)):
        column = [o[pos] for o in orders]
        assert sorted(column) == sorted(tasks * (len(orders) // len(tasks)))


def _carry_over_counts(orders):
    counts = {}
    for o in orders:
        for a, b in zip(o, o[1:]):
            counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def test_all_orders_prefix_counts():
    orders = all_orders(T3)
    assert len(orders) == 6 and distinct_prefixes(orders) == 15  # 18 stages, 15 distinct prefixes
    assert distinct_prefixes(all_orders(T4)) == 64 and len(all_orders(T4)) * 4 == 96
    # depth-first: orders sharing a prefix are adjacent
    assert orders[0][0] == orders[1][0]


def test_schedule_for_sharing():
    from coin_ray.studies.designs import schedule_for_sharing

    orders = all_orders(T3)
    assert schedule_for_sharing(orders, 1) == orders
    two = schedule_for_sharing(orders, 2)
    assert sorted(two) == sorted(orders)
    assert [o[0] for o in two] == [T3[0], T3[1], T3[2]] * 2  # trials started together begin differently


def test_all_refuses_large_and_suggests_williams():
    tasks = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding"]
    with pytest.raises(DesignError, match=r"720 orders.*williams"):
        all_orders(tasks)


def test_latin_each_task_once_per_position():
    orders = latin_orders(T4)
    assert len(orders) == 4
    _positions_balanced(orders, T4)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 8])
def test_williams_balanced_for_position_and_carry_over(n):
    tasks = ["ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA"][:n]
    orders = williams_orders(tasks)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    _positions_balanced(orders, tasks)
    counts = _carry_over_counts(orders)
    pairs = [(a, b) for a, b in itertools.permutations(tasks, 2)]
    expected = 1 if n % 2 == 0 else 2
    assert all(counts.get(p, 0) == expected for p in pairs), counts


def test_random_and_given_and_keys():
    r = random_orders(T4, 5, seed=1)
    assert len(set(r)) == 5 and r == random_orders(T4, 5, seed=1)
    with pytest.raises(DesignError, match="1 <= N <= 24"):
        random_orders(T4, 30)
    g = given_orders(None, ["GQA>ImageNet", "ImageNet>GQA"])
    assert g == [("GQA", "ImageNet"), ("ImageNet", "GQA")]
    with pytest.raises(DesignError, match="permutations"):
        given_orders(None, ["GQA>ImageNet", "ImageNet>VQAv2"])
    assert decode_random_keys(T3, [0.9, 0.1, 0.5]) == ("TextVQA", "ImageNet", "ScienceQA")
    with pytest.raises(DesignError, match="unknown design 'zigzag'"):
        build_design("zigzag", T3)
    with pytest.raises(DesignError, match="at least 2 tasks"):
        build_design("all", ["GQA"])


def _trial(order, seed, final_first):
    # 2 tasks: the first task ends at `final_first`, the second at 1.0
    m = [[1.0, None], [final_first, 1.0]]
    return {"order": order, "seed": seed, "matrix": m, "metrics": {"mfn": (final_first + 1.0) / 2}}


def test_analysis_separates_order_from_seed_noise():
    a, b = ("ScienceQA", "TextVQA"), ("TextVQA", "ScienceQA")
    clear = [_trial(a, 0, 0.8), _trial(a, 1, 0.82), _trial(b, 0, 0.2), _trial(b, 1, 0.22)]
    res = analyse_orders(clear)
    assert res.variance["p_value"] < 0.05 and "distinguishable" in res.variance["verdict"]
    assert res.variance["eta_squared"] > 0.95
    noisy = [_trial(a, 0, 0.8), _trial(a, 1, 0.2), _trial(b, 0, 0.79), _trial(b, 1, 0.21)]
    assert "NOT distinguishable" in analyse_orders(noisy).variance["verdict"]
    single = analyse_orders([_trial(a, 0, 0.8), _trial(b, 0, 0.2)])
    assert "cannot be separated" in single.variance["verdict"]
    # carry-over: ScienceQA right before TextVQA drops ScienceQA by 0.2 on average (1 - 0.8/0.82)
    assert math.isclose(res.carry_over.loc["ScienceQA", "TextVQA"], 1 - 0.81)
    assert math.isclose(res.position.loc["ScienceQA", "pos1"], 0.81)


def test_method_spread_separates_orders_from_seeds():
    from coin_ray.studies.analysis import METHOD_COLUMNS, analyse_methods

    a, b = ("ScienceQA", "TextVQA"), ("TextVQA", "ScienceQA")
    trials = [{**_trial(a, 0, 0.8), "method": "lora"}, {**_trial(a, 1, 0.6), "method": "lora"},
              {**_trial(b, 0, 0.2), "method": "lora"}, {**_trial(b, 1, 0.4), "method": "lora"},
              {**_trial(a, 0, 0.5), "method": "olora"}, {**_trial(b, 0, 0.5), "method": "olora"}]
    spread = analyse_methods(trials)
    table = spread.table.set_index("method")
    assert tuple(spread.table.columns) == METHOD_COLUMNS
    # lora: per-order mfn means 0.85 and 0.65 (sd 0.1414); seeds 0.05 either side of them (SS 0.01 on 2 df)
    lora = table.loc["lora"]
    assert lora["trials"] == 4 and math.isclose(lora["mean"], 0.75)
    assert math.isclose(lora["sd_orders"], math.sqrt(0.02)) and math.isclose(lora["sd_seeds"], math.sqrt(0.005))
    assert math.isclose(lora["min"], 0.65) and math.isclose(lora["max"], 0.85)
    olora = table.loc["olora"]
    assert olora["sd_orders"] == 0 and math.isnan(olora["sd_seeds"]) and "cannot be separated" in spread.verdicts["olora"]
    assert len(spread.per_order) == 4
