"""Continual-learning metrics on hand-computed evaluation matrices."""
from __future__ import annotations

import math

import numpy as np
import pytest

from coin_ray.evaluation.metrics import cl_metrics, matrix_from_rows, per_task_forgetting

# R[i][j]: score on task j after stage i. Upper triangle not evaluated.
R3 = [
    [80.0, None, None],
    [60.0, 70.0, None],
    [40.0, 65.0, 90.0],
]


def test_three_task_matrix_by_hand() -> None:
    metrics = cl_metrics(R3)
    assert metrics["mft"] == pytest.approx((80 + 70 + 90) / 3)
    assert metrics["mfn"] == pytest.approx((40 + 65 + 90) / 3)
    assert metrics["maa"] == pytest.approx((80 + (60 + 70) / 2 + (40 + 65 + 90) / 3) / 3)
    assert metrics["bwt"] == pytest.approx(((40 - 80) + (65 - 70)) / 2)
    assert metrics["forgetting"] == pytest.approx(((80 - 40) + (70 - 65)) / 2)
    assert "fwt" not in metrics


def test_forgetting_uses_the_best_earlier_row_not_the_diagonal() -> None:
    # task 0 improves after stage 1 (50 -> 70), then drops to 30: forgetting 40, BWT -20
    matrix = [[50, None, None], [70, 60, None], [30, 60, 40]]
    assert per_task_forgetting(matrix) == pytest.approx([40.0, 0.0])
    metrics = cl_metrics(matrix)
    assert metrics["forgetting"] == pytest.approx(20.0)
    assert metrics["bwt"] == pytest.approx((-20 + 0) / 2)


def test_negative_forgetting_is_kept() -> None:
    # the last row beats every earlier row for task 0: Chaudhry's max excludes the last row
    assert per_task_forgetting([[0.2, None], [0.5, 0.9]]) == pytest.approx([-0.3])


def test_fwt_with_zero_shot_and_full_matrix() -> None:
    matrix = [[0.8, 0.3, 0.1], [0.6, 0.7, 0.4], [0.4, 0.65, 0.9]]
    metrics = cl_metrics(matrix, zero_shot=[None, 0.2, 0.5])
    assert metrics["fwt"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.5)) / 2)
    # cells above the diagonal do not change the other metrics
    assert metrics["mft"] == pytest.approx(0.8) and metrics["maa"] == pytest.approx(
        (0.8 + 0.65 + (0.4 + 0.65 + 0.9) / 3) / 3)


def test_fwt_is_omitted_when_a_superdiagonal_cell_is_missing() -> None:
    matrix = [[0.8, 0.3, None], [0.6, 0.7, None], [0.4, 0.65, 0.9]]
    assert "fwt" not in cl_metrics(matrix, zero_shot=[0.1, 0.2, 0.5])


def test_zero_shot_length_and_missing_values_are_errors() -> None:
    with pytest.raises(ValueError, match=r"one score per task in training order \(3\)"):
        cl_metrics(R3, zero_shot=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"zero_shot\[2\] is missing"):
        cl_metrics(R3, zero_shot=[0.1, 0.2, None])


def test_single_task_run() -> None:
    metrics = cl_metrics([[0.75]], zero_shot=[0.5])
    assert metrics["mft"] == metrics["mfn"] == metrics["maa"] == 0.75
    assert math.isnan(metrics["bwt"]) and math.isnan(metrics["forgetting"]) and math.isnan(metrics["fwt"])
    assert per_task_forgetting([[0.75]]) == []


def test_numpy_input_with_nan_upper_triangle() -> None:
    array = np.array([[80.0, np.nan, np.nan], [60.0, 70.0, np.nan], [40.0, 65.0, 90.0]])
    assert cl_metrics(array) == pytest.approx(cl_metrics(R3))


@pytest.mark.parametrize("matrix, fragment", [
    ([], r"empty \(shape \(0, 0\)\)"),
    ([[1.0, None, None], [1.0, 1.0, None]], r"square .* got \(2, 3\)"),
    ([[1.0, None], [1.0]], r"2 rows of lengths \[2, 1\]"),
    ([[1.0, None], [None, 1.0]], r"R\[1\]\[0\]"),
    ([[float("nan"), None], [1.0, None]], r"R\[0\]\[0\], R\[1\]\[1\]"),
    ([[1.0, None], [1.0, "high"]], r"R\[1\]\[1\] must be a number"),
    ([[1.0, None], [1.0, float("inf")]], r"R\[1\]\[1\] is inf"),
])
def test_bad_matrices_name_the_shape_or_cell(matrix, fragment) -> None:
    with pytest.raises(ValueError, match=fragment):
        cl_metrics(matrix)


def test_matrix_from_rows() -> None:
    rows = [{"GQA": 0.5, "ImageNet": None}, {"GQA": 0.4, "ImageNet": 0.9}]
    matrix = matrix_from_rows(rows, ["GQA", "ImageNet"])
    assert matrix == [[0.5, None], [0.4, 0.9]]
    assert cl_metrics(matrix)["bwt"] == pytest.approx(-0.1)
    assert matrix_from_rows([{"GQA": 0.5}], ["GQA", "ImageNet"]) == [[0.5, None]]
    with pytest.raises(ValueError, match="row 1: 'gqa'"):
        matrix_from_rows([{"GQA": 0.5}, {"gqa": 0.4}], ["GQA", "ImageNet"])
