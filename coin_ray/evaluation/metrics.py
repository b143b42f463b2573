"""Continual-learning summary metrics, computed from the evaluation matrix (pure functions).

R[i][j] is the score on task j (training order) after training stage i, for T tasks: rows are
stages, columns are tasks, both 0-based here. Cells on and below the diagonal must hold scores;
cells above it (tasks not trained yet) may be None or NaN. Scores may be fractions or percents:
nothing is rescaled, and every metric comes out in the units it went in.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

Matrix = list[list[float]]


def _cell_value(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{where} must be a number, None or NaN, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, None or NaN, got {value!r}") from None
    if math.isinf(number):
        raise ValueError(f"{where} is {number}: scores must be finite (use None or NaN for 'not evaluated')")
    return number


def _checked_matrix(matrix: Sequence[Sequence[float | None]]) -> Matrix:
    """The matrix as floats (NaN = missing), after checking that it is square and that every cell
    on or below the diagonal holds a score. Accepts nested lists or a 2-D numpy array."""
    if isinstance(matrix, (str, bytes)):
        raise ValueError(f"the evaluation matrix must be a list of rows, got the string {matrix!r}")
    rows = [row for row in matrix]
    if not rows:
        raise ValueError("the evaluation matrix is empty (shape (0, 0)): it needs one row per "
                         "training stage and one column per task")
    size = len(rows)
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes, Mapping)) or not hasattr(row, "__len__"):
            raise ValueError(f"row {i} of the evaluation matrix must be a list of scores, got {row!r}")
    lengths = [len(row) for row in rows]
    if any(length != size for length in lengths):
        shape = f"({size}, {lengths[0]})" if len(set(lengths)) == 1 else f"{size} rows of lengths {lengths}"
        raise ValueError(f"the evaluation matrix must be square (T stages x T tasks), got {shape}: "
                         f"every row needs {size} cells; put None in cells of tasks not trained yet")
    values = [[_cell_value(cell, f"R[{i}][{j}]") for j, cell in enumerate(row)] for i, row in enumerate(rows)]
    missing = [f"R[{i}][{j}]" for i in range(size) for j in range(i + 1) if math.isnan(values[i][j])]
    if missing:
        raise ValueError(f"cells on and below the diagonal must hold scores (task j is evaluated after "
                         f"every stage i >= j), but {', '.join(missing)} of the {size}x{size} matrix "
                         f"are missing (None/NaN)")
    return values


def _mean(values: Sequence[float]) -> float:
    """Mean; NaN for an empty sequence (a mean over no tasks is undefined, not 0)."""
    return math.fsum(values) / len(values) if values else math.nan


def _forgetting(values: Matrix) -> list[float]:
    last = len(values) - 1
    return [max(values[stage][task] for stage in range(task, last)) - values[last][task]
            for task in range(last)]


def per_task_forgetting(matrix: Sequence[Sequence[float | None]]) -> list[float]:
    """Chaudhry forgetting of each task but the last: f_j = max_{j <= l < T} R[l][j] - R[T][j].

    With 1-based stages (R[T] = the final row); the maximum runs over the rows from
    the one that trained task j up to the one before the last (Mammoth also includes the last row,
    which clips negative values to 0; this definition keeps them). Returns T-1 values, for tasks
    0..T-2 in training order; the last task has no forgetting and gets no entry. Positive = forgot.
    """
    return _forgetting(_checked_matrix(matrix))


# The final metrics of a run: the keys of cl_metrics (a test keeps them equal), then the same of the knowledge
# matrix (gk_*). The one list the sweep flags, the trials tables and the MLflow report use.
CL_METRIC_NAMES = ("mft", "mfn", "maa", "bwt", "forgetting", "fwt")
METRIC_NAMES = CL_METRIC_NAMES + tuple(f"gk_{m}" for m in CL_METRIC_NAMES)


def higher_is_better(metric: str) -> bool:
    """Every CL metric is better when higher except forgetting (the mean drop from each task's best score)."""
    return metric.removeprefix("gk_") != "forgetting"


def cl_metrics(matrix: Sequence[Sequence[float | None]],
               zero_shot: Sequence[float | None] | None = None) -> dict[str, float]:
    """Summary metrics of one continual run. With 1-based i, j, T tasks and R[i][j] as above:

    - mft (mean fine-tuned)   = mean_j R[j][j]                       score just after learning
    - mfn (mean final)        = mean_j R[T][j]                       score at the end
    - maa (mean avg. accuracy) = mean_i mean_{j<=i} R[i][j]          average incremental accuracy
    - bwt (backward transfer) = mean_{j<T} (R[T][j] - R[j][j])       negative = forgetting
    - forgetting (Chaudhry)   = mean_{j<T} max_{j<=l<T} R[l][j] - R[T][j]   see per_task_forgetting
    - fwt (forward transfer)  = mean_{j>1} (R[j-1][j] - b_j),  b_j = zero_shot[j] (training order)

    fwt is returned only when `zero_shot` is given and every cell R[j-1][j] (just above the
    diagonal) holds a score; zero_shot[0] is not used and may be None. With T = 1, bwt,
    forgetting (and fwt) are means over no tasks and are NaN; filter them with math.isnan before
    logging if the sink rejects NaN.

    Raises ValueError naming the shape or the cell when the matrix is empty, ragged, not square,
    or misses a cell on or below the diagonal, or when zero_shot has the wrong length.
    """
    values = _checked_matrix(matrix)
    size = len(values)
    last = size - 1
    metrics = {
        "mft": _mean([values[j][j] for j in range(size)]),
        "mfn": _mean(values[last]),
        "maa": _mean([_mean(values[i][: i + 1]) for i in range(size)]),
        "bwt": _mean([values[last][j] - values[j][j] for j in range(last)]),
        "forgetting": _mean(_forgetting(values)),
    }
    if zero_shot is not None:
        if isinstance(zero_shot, (str, bytes)) or len(zero_shot) != size:
            raise ValueError(f"zero_shot must hold one score per task in training order ({size}), "
                             f"got {zero_shot!r}")
        baseline = [math.nan] + [_cell_value(zero_shot[j], f"zero_shot[{j}]") for j in range(1, size)]
        missing = [f"zero_shot[{j}]" for j in range(1, size) if math.isnan(baseline[j])]
        if missing:
            raise ValueError(f"forward transfer needs the zero-shot score of every task after the first, "
                             f"but {', '.join(missing)} is missing")
        if all(not math.isnan(values[j - 1][j]) for j in range(1, size)):
            metrics["fwt"] = _mean([values[j - 1][j] - baseline[j] for j in range(1, size)])
    return metrics


def matrix_from_rows(rows: Sequence[Mapping[str, float | None]],
                     order: Sequence[str]) -> list[list[float | None]]:
    """Build R from per-stage score dicts (task name -> score, e.g. StageReport.scores).

    Row i is rows[i] read in `order`; a task a row does not mention becomes None. The result has
    len(rows) rows and len(order) columns; for a run that stopped early, its leading square block
    `[row[: len(rows)] for row in matrix]` is what cl_metrics takes.
    Raises ValueError when a row names a task that is not in `order` (a misspelt name would
    otherwise vanish silently).
    """
    known = set(order)
    strays = [f"row {i}: {name!r}" for i, row in enumerate(rows) for name in row if name not in known]
    if strays:
        raise ValueError(f"score rows name tasks outside the order {list(order)}: {', '.join(strays)}; "
                         f"fix the task names or pass the full order")
    return [[row.get(name) for name in order] for row in rows]


def mean_seen(scores: Mapping[str, float | None], seen: Sequence[str]) -> float | None:
    """Mean score over the tasks trained so far (`seen`), skipping unevaluated ones; None when there are none.
    Reported after every stage as `avg_seen_acc` (after the last stage it equals MFN)."""
    values = [scores[t] for t in seen if scores.get(t) is not None]
    return sum(values) / len(values) if values else None
