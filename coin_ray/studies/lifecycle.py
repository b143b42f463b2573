"""The start and the end of a sweep script: pre-flight checks, data preparation, and the closing report
(table, order analysis, MLflow sweep-run artifacts, how to open the MLflow UI)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from coin_ray.config import ExperimentConfig
from coin_ray.training.types import PreparedData
from coin_ray.redact import redact_text
from coin_ray.studies import cli
from coin_ray.studies.analysis import analyse_orders, format_analysis
from coin_ray.studies.runner import SweepOutcome, SweepSpec, trials_table


def preflight(cfg: ExperimentConfig, args: argparse.Namespace) -> None:
    """Everything that can be wrong before a trial starts: the model folder, per-GPU memory, storage, tracking
    server, Ray address."""
    if cfg.model.source != "tiny":
        from coin_ray.models import check_model_source

        check_model_source(cfg.model.source)
    if cfg.scaling.use_gpu:
        from coin_ray.models.memory import check_memory, estimate_for_config

        estimate = estimate_for_config(cfg)
        print(f"[coin-ray] memory preflight: {estimate.line()}", flush=True)
        check_memory(estimate, cfg.scaling.gpu_memory_gb)
    cli.check_storage(cfg.storage_path)
    if not args.no_tracking:
        from tracking import check_tracking_uri

        check_tracking_uri(cfg.tracking.tracking_uri)
    cli.init_ray(args)


def prepare(cfg: ExperimentConfig, args: argparse.Namespace) -> PreparedData:
    from coin_ray.training import prepare_data

    started = time.time()
    prepared = prepare_data(cfg)
    print(f"[coin-ray] data ready in {time.time() - started:.1f} s: {prepared.benchmark} benchmark, "
          f"{len(prepared.splits)} tasks, hash {prepared.data_hash[:12]}, at {prepared.processed}")
    return prepared


def finish_sweep(spec: SweepSpec, outcome: SweepOutcome, *, metric: str, design: str) -> dict[str, Any]:
    table = trials_table(outcome.trials)
    sort_col = metric if metric in table.columns else "mfn"
    if sort_col in table.columns:
        table = table.sort_values(sort_col, ascending=False)
    print("\n=== Trials ===")
    with_cols = [c for c in ("order", "seed", "method", "num_experts", "rank", "mft", "mfn", "bwt", "forgetting",
                             "gk_mfn", "gk_bwt", "stages_reused", "status") if c in table.columns]
    print(table[with_cols].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    finished = [t for t in outcome.trials if t["matrix"] is not None]
    analysis = None
    if finished:
        analysis = analyse_orders(finished, metric=metric)
        print("\n" + format_analysis(analysis, metric))
    print(f"\nstages trained: {outcome.stages_trained}, stages reused from the stage store: {outcome.stages_reused}")
    if spec.tracking and outcome.sweep_run_id:
        from tracking import close_sweep_run, experiment_runs_url, log_sweep_artifacts

        cfg = spec.base
        tables, figures, texts = {}, {}, {}
        metrics = {"stages_trained": outcome.stages_trained, "stages_reused": outcome.stages_reused,
                   "trials_finished": len(finished), "trials": len(outcome.trials)}
        if analysis is not None:
            tables = {"per_order": analysis.per_order.set_index("order"), "task_spread": analysis.task_spread.set_index("task"),
                      "position": analysis.position}
            figures = {"position": table_heatmap(analysis.position, "final accuracy by training position")}
            if analysis.carry_over is not None:
                tables["carry_over"] = analysis.carry_over
                figures["carry_over"] = table_heatmap(
                    analysis.carry_over, "drop of A (row) when B (col) is trained right after", cmap="Reds")
            texts = {"summary.txt": format_analysis(analysis, metric)}
            for key in ("eta_squared", "p_value", "F", "seed_std"):
                if key in analysis.variance:
                    metrics[f"order_{key}"] = analysis.variance[key]
        log_sweep_artifacts(cfg.tracking.tracking_uri, outcome.sweep_run_id, trials=table, metrics=metrics,
                            figures=figures, tables=tables, texts=texts)
        close_sweep_run(cfg.tracking.tracking_uri, outcome.sweep_run_id,
                        status="FINISHED" if len(finished) == len(outcome.trials) else "FAILED")
        ui_cmd, url = experiment_runs_url(cfg.tracking.tracking_uri, cfg.tracking.experiment)
        print(f"\nResults are in MLflow ({redact_text(cfg.tracking.tracking_uri)}), experiment {cfg.tracking.experiment!r}, "
              f"sweep run {spec.name!r}.")
        if ui_cmd:
            print(f"Look at them with:\n  {ui_cmd}")
        print(f"then open {url}")
    failed = [t for t in outcome.trials if t["status"] == "ERROR"]
    if failed:  # a scheduler's stop (STOPPED) is a decision, not a failure
        print(f"\nerror: {len(failed)} of {len(outcome.trials)} trials failed:", file=sys.stderr)
        for t in failed:
            print(f"  {t['name']}: {t.get('error') or 'no error message'}", file=sys.stderr)
        raise SystemExit(1)
    return {"table": table, "analysis": analysis}


def table_heatmap(table, title: str, cmap: str = "viridis"):
    """A labelled heatmap of a small DataFrame (NaN cells blank) as a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = table.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * values.shape[1], 1.0 + 0.6 * values.shape[0]))
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap)
    ax.set_xticks(range(values.shape[1]), [str(c) for c in table.columns], rotation=45, ha="right")
    ax.set_yticks(range(values.shape[0]), [str(i) for i in table.index])
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < np.nanmean(values) else "black",
                    fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig
