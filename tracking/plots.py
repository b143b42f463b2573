"""Pure plotting and table helpers for evaluation matrices and sweep summaries (matplotlib, Agg backend).

Figures are built with `matplotlib.figure.Figure` (no pyplot global state), so trials in threads can plot at
once; the sweep analysis and tracking/report.py reuse them.
"""
from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any, Sequence

from coin_ray.evaluation.metrics import METRIC_NAMES, higher_is_better

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "TABLE_COLUMNS",
    "figure_png",
    "format_table",
    "matrices_figure",
    "matrix_figure",
    "matrix_heatmap",
    "spread_figure",
    "summary_figure",
    "table_heatmap",
]

# The comparison table's columns, in this order, when present (gk_* only when a judge ran).
TABLE_COLUMNS = ("trial", "order", "seed", "method", "num_experts", "rank", *METRIC_NAMES, "stages_reused", "status")


def _nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def matrix_heatmap(ax: "Axes", tasks: Sequence[str], matrix: Sequence[Sequence[float | None]], title: str = "",
                   zero_shot: Sequence[float | None] | None = None, diverging: bool = False) -> Any:
    """Draw one matrix on `ax`: rows = after stage i (plus a zero-shot row on top), columns = tasks; cells
    annotated in percent, blank where not evaluated. `diverging` uses a red-blue scale centred on 0 (for
    gaps, in [-1, 1]). Returns the image for a colorbar."""
    import numpy as np

    rows = ([list(zero_shot)] if zero_shot is not None else []) + [list(r) for r in matrix]
    labels = (["zero-shot"] if zero_shot is not None else []) + [f"{i}: {tasks[i]}" for i in range(len(matrix))]
    data = np.array([[_nan(v) for v in r] for r in rows], dtype=float).reshape(len(rows), len(tasks))
    masked = np.ma.masked_invalid(data)
    if diverging:
        image = ax.imshow(masked, cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    else:
        image = ax.imshow(masked, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tasks)), labels=list(tasks), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels=labels, fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after training stage")
    ax.set_title(title, fontsize=10)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if not math.isnan(data[i, j]):
                light = (abs(data[i, j]) > 0.5) if diverging else (data[i, j] < 0.5)
                ax.text(j, i, f"{100 * data[i, j]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    return image


def _figure(width: float, height: float) -> "Figure":
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def matrix_figure(tasks: Sequence[str], matrix: Sequence[Sequence[float | None]],
                  zero_shot: Sequence[float | None] | None = None, title: str = "instruction following") -> "Figure":
    """A single heatmap with a colorbar (eval_matrix.png)."""
    side = 1.6 + 0.55 * len(tasks)
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot(1, 1, 1)
    image = matrix_heatmap(ax, tasks, matrix, title, zero_shot)
    fig.colorbar(image, ax=ax, shrink=0.8, label="score")
    return fig


def matrices_figure(tasks: Sequence[str], instruction: Sequence[Sequence[float | None]],
                    knowledge: Sequence[Sequence[float | None]] | None = None, title: str = "") -> "Figure":
    """Instruction-following and knowledge matrices side by side, and their gap (knowledge - instruction):
    a large positive gap on old tasks is forgetting of the answer format, not of the knowledge."""
    side = 1.6 + 0.55 * len(tasks)
    panels = 1 if knowledge is None else 3
    fig = _figure(panels * (side + 0.6) + 0.8, side + 0.4)
    axes = [fig.add_subplot(1, panels, k + 1) for k in range(panels)]
    image = matrix_heatmap(axes[0], tasks, instruction, "instruction following")
    if knowledge is not None:
        matrix_heatmap(axes[1], tasks, knowledge, "knowledge (judge)")
        gap = [[None if (a is None or b is None) else float(b) - float(a) for a, b in zip(ri, rk)]
               for ri, rk in zip(instruction, knowledge)]
        gap_image = matrix_heatmap(axes[2], tasks, gap, "gap: knowledge - instruction", diverging=True)
        fig.colorbar(gap_image, ax=axes[2], shrink=0.8)
    fig.colorbar(image, ax=axes[:2] if knowledge is not None else axes[0], shrink=0.8, label="score")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def summary_figure(table: "pd.DataFrame", metrics: Sequence[str] = ("mft", "mfn", "bwt", "forgetting"),
                   label: str = "trial") -> "Figure":
    """One horizontal bar chart per metric, a bar per trial (row of `table`), labelled by `label`;
    metrics missing from the table are skipped. Raises ValueError when none is present."""
    present = [m for m in metrics if m in table.columns and table[m].notna().any()]
    if not present:
        raise ValueError(f"summary_figure needs at least one of the columns {list(metrics)}, "
                         f"got {list(table.columns)}")
    labels = [str(v) for v in (table[label] if label in table.columns else table.index)]
    fig = _figure(3.2 * len(present) + 2.5, 0.9 + 0.28 * len(table))
    for k, metric in enumerate(present):
        ax = fig.add_subplot(1, len(present), k + 1)
        values = table[metric].astype(float).to_numpy()
        ax.barh(range(len(values)), values, color=["tab:red" if v < 0 else "tab:blue" for v in values])
        ax.set_yticks(range(len(labels)), labels=labels if k == 0 else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_title(metric, fontsize=10)
    return fig


def table_heatmap(table: "pd.DataFrame", title: str, cmap: str = "viridis") -> "Figure":
    """A labelled heatmap of a small DataFrame (rows = index, columns = columns; NaN cells blank), each cell
    annotated with its value: the sweep analyses' tables (training position, carry-over, experts x rank)."""
    import numpy as np

    values = table.to_numpy(dtype=float)
    fig = _figure(1.6 + 0.9 * values.shape[1], 1.2 + 0.6 * values.shape[0])
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap)
    ax.set_xticks(range(values.shape[1]), labels=[str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), labels=[str(i) for i in table.index])
    if table.columns.name:
        ax.set_xlabel(str(table.columns.name))
    if table.index.name:
        ax.set_ylabel(str(table.index.name))
    mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < mean else "black", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return fig


def spread_figure(per_order: "pd.DataFrame", metric: str, title: str = "") -> "Figure":
    """Each method's spread across orders: one column per method, a dot per order (its mean over seeds) and a
    line from the lowest to the highest. `per_order` has columns method, order, value."""
    methods = list(dict.fromkeys(per_order["method"]))
    fig = _figure(1.8 + 0.9 * len(methods), 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for i, method in enumerate(methods):
        values = per_order.loc[per_order["method"] == method, "value"].astype(float)
        ax.vlines(i, values.min(), values.max(), color="0.6", linewidth=2)
        ax.scatter([i] * len(values), values, s=18, zorder=3)
    ax.set_xticks(range(len(methods)), labels=[str(m) for m in methods], rotation=30, ha="right")
    ax.set_ylabel(f"{metric} (mean over seeds, one dot per order)")
    ax.set_title(title or f"{metric} across task orders, per method", fontsize=9)
    return fig


def figure_png(fig: "Figure", dpi: int = 110) -> bytes:
    """PNG bytes of a figure (Agg canvas; nothing global is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def format_table(table: "pd.DataFrame", sort_by: str | None = None, ascending: bool | None = None,
                 columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """The comparison table as text: known columns in TABLE_COLUMNS order (then any others), sorted by
    `sort_by` (best first: descending unless lower is better, e.g. forgetting), scores in percent."""
    if sort_by is not None:
        if sort_by not in table.columns:
            raise ValueError(f"cannot sort by {sort_by!r}: the table has {', '.join(map(str, table.columns))}")
        if ascending is None:
            ascending = not higher_is_better(sort_by)
        table = table.sort_values(sort_by, ascending=ascending, na_position="last")
    ordered = [c for c in columns if c in table.columns] + [c for c in table.columns if c not in columns]
    shown = table[ordered].copy()
    for column in ordered:
        if column in METRIC_NAMES:
            shown[column] = shown[column].map(lambda v: "" if v is None or v != v else f"{100 * float(v):.1f}")
    return shown.to_string(index=False)
