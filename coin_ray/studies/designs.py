"""Task-order designs for order-sensitivity studies (pure functions; no Ray).

- all: every permutation (n! orders; refused above `MAX_ALL_ORDERS`).
- latin: cyclic Latin square, n orders: each task once at each position.
- williams: balanced Latin square (Williams 1949): each task once at each position and immediately after
  every other task once; n orders for even n, 2n for odd n. The design for carry-over effects.
- random: N distinct random permutations (seeded).
- given: orders the user lists.
- optuna: not a fixed list; orders are decoded from Optuna's random keys (`decode_random_keys`).
Orders are returned sorted lexicographically by task index, i.e. depth-first over the prefix tree;
`schedule_for_sharing` turns that into the order trials start in.
"""
from __future__ import annotations

import itertools
import math
import random
from typing import Sequence

from coin_ray.errors import UserError

DESIGNS = ("all", "latin", "williams", "random", "optuna", "given")
MAX_ALL_ORDERS = 120


class DesignError(UserError):
    """A design that cannot be built from the given tasks or options."""


def _check_tasks(tasks: Sequence[str]) -> tuple[str, ...]:
    from coin_ray.tasks import validate_order

    tasks = validate_order(tasks)
    if len(tasks) < 2:
        raise DesignError(f"an order study needs at least 2 tasks, got {list(tasks)}: pass e.g. --tasks ScienceQA,TextVQA")
    return tuple(tasks)


def all_orders(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    tasks = _check_tasks(tasks)
    n = math.factorial(len(tasks))
    if n > MAX_ALL_ORDERS:
        raise DesignError(
            f"--design all with {len(tasks)} tasks is {n} orders (x seeds) - too many runs; use --design williams "
            f"({len(williams_orders(tasks))} orders, balanced for position and carry-over) or --design random N")
    return sorted(itertools.permutations(tasks), key=lambda o: [tasks.index(t) for t in o])


def latin_orders(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    tasks = _check_tasks(tasks)
    n = len(tasks)
    return _dfs_sorted([tuple(tasks[(i + j) % n] for j in range(n)) for i in range(n)], tasks)


def williams_orders(tasks: Sequence[str]) -> list[tuple[str, ...]]:
    tasks = _check_tasks(tasks)
    n = len(tasks)
    # first row 0, 1, n-1, 2, n-2, ...; each next row adds 1 mod n
    first, lo, hi = [0], 1, n - 1
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    rows = [[(x + i) % n for x in first] for i in range(n)]
    if n % 2 == 1:  # odd n needs the mirrored square too for first-order carry-over balance
        rows += [list(reversed(r)) for r in rows]
    return _dfs_sorted([tuple(tasks[x] for x in r) for r in rows], tasks)


def random_orders(tasks: Sequence[str], n: int, seed: int = 0) -> list[tuple[str, ...]]:
    tasks = _check_tasks(tasks)
    total = math.factorial(len(tasks))
    if n < 1 or n > total:
        raise DesignError(f"--design random N needs 1 <= N <= {total} (distinct orders of {len(tasks)} tasks), got N={n}")
    rng = random.Random(seed)
    seen: list[tuple[str, ...]] = []
    while len(seen) < n:
        order = tuple(rng.sample(list(tasks), len(tasks)))
        if order not in seen:
            seen.append(order)
    return _dfs_sorted(seen, tasks)


def given_orders(tasks: Sequence[str] | None, orders: Sequence[Sequence[str] | str]) -> list[tuple[str, ...]]:
    """Orders listed as "A>B>C" strings or sequences; all must be permutations of the same task set."""
    from coin_ray.tasks import validate_order

    parsed = [validate_order([t.strip() for t in o.split(">")] if isinstance(o, str) else o) for o in orders]
    if not parsed:
        raise DesignError("--design given needs at least one order: --orders 'ScienceQA>TextVQA;TextVQA>ScienceQA'")
    base = set(validate_order(tasks)) if tasks else set(parsed[0])  # canonical spelling on both sides
    bad = [">".join(o) for o in parsed if set(o) != base or len(o) != len(base)]
    if bad:
        raise DesignError(f"given orders must all be permutations of {sorted(base)}; these are not: {bad}")
    if len(base) < 2:
        raise DesignError("an order study needs at least 2 tasks")
    return list(dict.fromkeys(tuple(o) for o in parsed))


def decode_random_keys(tasks: Sequence[str], keys: Sequence[float]) -> tuple[str, ...]:
    """Random-key encoding: the order is the tasks sorted by their keys (ties broken by task position).
    Lets Optuna search permutations with n continuous parameters."""
    if len(keys) != len(tasks):
        raise DesignError(f"need one key per task: {len(tasks)} tasks, {len(keys)} keys")
    return tuple(t for _, _, t in sorted(zip(keys, range(len(tasks)), tasks)))


def parse_design(tokens: Sequence[str]) -> tuple[str, int | None]:
    """`--design KIND [N]` as (kind, N): random and optuna need a count N >= 1, the other designs take none."""
    if not tokens:
        raise DesignError(f"--design needs a design: one of {', '.join(DESIGNS)}")
    kind, rest = tokens[0], list(tokens[1:])
    if kind not in DESIGNS:
        raise DesignError(f"unknown design {kind!r}; valid designs: {', '.join(DESIGNS)}")
    if kind not in ("random", "optuna"):
        if rest:
            raise DesignError(f"--design {kind} takes no count, got {' '.join(rest)!r}")
        return kind, None
    example = f"--design {kind} {6 if kind == 'random' else 20}"
    if len(rest) != 1:
        raise DesignError(f"--design {kind} needs one count N >= 1: {example}")
    try:
        count = int(rest[0])
    except ValueError:
        raise DesignError(f"--design {kind} N: N must be a whole number >= 1, got {rest[0]!r} ({example})") from None
    if count < 1:
        raise DesignError(f"--design {kind} N: N must be >= 1, got {count} ({example})")
    return kind, count


def build_design(design: str, tasks: Sequence[str], *, n: int | None = None, seed: int = 0,
                 orders: Sequence[str] | None = None) -> list[tuple[str, ...]]:
    if design == "all":
        return all_orders(tasks)
    if design == "latin":
        return latin_orders(tasks)
    if design == "williams":
        return williams_orders(tasks)
    if design == "random":
        if n is None:
            raise DesignError("--design random needs a count: --design random 6")
        return random_orders(tasks, n, seed)
    if design == "given":
        return given_orders(tasks, orders or [])
    if design == "optuna":
        raise DesignError("--design optuna has no fixed list of orders; the sweep decodes them from Optuna's keys")
    raise DesignError(f"unknown design {design!r}; valid designs: {', '.join(DESIGNS)}")


def _dfs_sorted(orders: list[tuple[str, ...]], tasks: Sequence[str]) -> list[tuple[str, ...]]:
    return sorted(orders, key=lambda o: [list(tasks).index(t) for t in o])


def distinct_prefixes(orders: Sequence[Sequence[str]]) -> int:
    """Stages a prefix-sharing cache trains for these orders (e.g. all 6 orders of 3 tasks: 15 of 18)."""
    return len({tuple(o[: k + 1]) for o in orders for k in range(len(o))})


def schedule_for_sharing(orders: Sequence[Sequence[str]], concurrency: int) -> list[tuple[str, ...]]:
    """The order trials start in. One at a time: depth-first (as given), so each shared prefix is trained once
    and reused by the next trial. With several at once: round-robin over the first task, so trials running
    together start from different tasks instead of one of them waiting in the stage store for the other to
    train their shared first stage."""
    orders = [tuple(o) for o in orders]
    if concurrency <= 1:
        return orders
    groups: dict[str, list[tuple[str, ...]]] = {}
    for o in orders:
        groups.setdefault(o[0], []).append(o)
    queues = list(groups.values())
    out: list[tuple[str, ...]] = []
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out
