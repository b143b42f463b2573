"""The evaluation-matrix artifact: its JSON schema (eval_matrix.json, knowledge_matrix.json) and CSV form.

Schema: {"tasks": [task names in training order], "matrix": [[score or null, ...], ...],
"zero_shot": [score or null, ...] or null}; matrix[i][j] = score on tasks[j] after stage i, as a
fraction in [0, 1], null where not evaluated. A run still in progress has fewer rows than tasks.
"""
from __future__ import annotations

import csv
import io
import math
from typing import Any, Mapping, Sequence

__all__ = ["matrix_payload", "matrix_csv", "check_matrix_payload"]


def _cell(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number in [0, 1] or null, got {value!r}")
    number = float(value)
    if math.isnan(number):
        return None
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{where} = {number} is outside [0, 1]: scores are fractions (divide percents by 100)")
    return number


def matrix_payload(tasks: Sequence[str], matrix: Sequence[Sequence[float | None]],
                   zero_shot: Sequence[float | None] | None = None) -> dict[str, Any]:
    """The JSON-ready artifact; NaN becomes null. Raises ValueError naming the row or cell that breaks the
    schema (more rows than tasks, a row of the wrong length, a score outside [0, 1])."""
    tasks = [str(t) for t in tasks]
    if len(matrix) > len(tasks):
        raise ValueError(f"the matrix has {len(matrix)} rows but only {len(tasks)} tasks: one row per stage")
    rows = []
    for i, row in enumerate(matrix):
        if len(row) != len(tasks):
            raise ValueError(f"row {i} of the matrix has {len(row)} cells, expected one per task ({len(tasks)})")
        rows.append([_cell(v, f"matrix[{i}][{j}]") for j, v in enumerate(row)])
    zs = None
    if zero_shot is not None:
        if len(zero_shot) != len(tasks):
            raise ValueError(f"zero_shot has {len(zero_shot)} scores, expected one per task ({len(tasks)})")
        zs = [_cell(v, f"zero_shot[{j}]") for j, v in enumerate(zero_shot)]
    return {"tasks": tasks, "matrix": rows, "zero_shot": zs}


def check_matrix_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """A loaded eval_matrix.json / knowledge_matrix.json, validated against the schema."""
    missing = [k for k in ("tasks", "matrix") if k not in payload]
    if missing:
        raise ValueError(f"matrix artifact lacks {missing}: expected keys tasks, matrix, zero_shot")
    return matrix_payload(payload["tasks"], payload["matrix"], payload.get("zero_shot"))


def matrix_csv(payload: Mapping[str, Any]) -> str:
    """CSV of a matrix artifact: header `after_stage,<task>...`; a `zero_shot` row first when present, then
    one row per stage labelled `<stage>:<task trained>`; empty cells where not evaluated."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    tasks = payload["tasks"]
    writer.writerow(["after_stage", *tasks])

    def fmt(row: Sequence[float | None]) -> list[str]:
        return ["" if v is None else repr(float(v)) for v in row]

    if payload.get("zero_shot") is not None:
        writer.writerow(["zero_shot", *fmt(payload["zero_shot"])])
    for i, row in enumerate(payload["matrix"]):
        writer.writerow([f"{i}:{tasks[i]}", *fmt(row)])
    return out.getvalue()
