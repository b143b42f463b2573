"""The start and the end of a sweep script: pre-flight checks, data preparation, and the closing report
(trials table, the hyper-parameter report and the order analysis, MLflow sweep-run artifacts, how to open the
MLflow UI)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from coin_ray.config import ExperimentConfig
from coin_ray.environment import environment_tags, environments_line
from coin_ray.profiling import span
from coin_ray.training.types import PreparedData
from coin_ray.redact import redact_text
from coin_ray.studies import cli
from coin_ray.studies.analysis import (analyse_methods, analyse_orders, format_analysis, format_joint_gaps,
                                      format_methods, joint_gaps, order_skip_reason)
from coin_ray.studies.hparam_analysis import (NoFinishedTrials, analyse_hparams, describe_space, format_hparams,
                                              hparam_figures, hparam_tables, lower_is_better)
from coin_ray.studies.runner import SweepOutcome, SweepSpec, trials_table
from tracking.plots import spread_figure, table_heatmap


def preflight(cfg: ExperimentConfig, args: argparse.Namespace, grid: dict[str, list[Any]] | None = None) -> None:
    """Everything that can be wrong before a trial starts, checked before Ray starts: workers per trial, the
    model folder (or the parts it is assembled from), the data folders, the judge (`coin_ray.studies.checks`, for each `--grid` value too),
    per-GPU memory, storage, tracking server; then Ray starts (or is joined at its address)."""
    from coin_ray.studies.checks import check_before_ray

    check_before_ray(cfg, args, grid)
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


def display_varied(table: Any, shown: list[str]) -> Any:
    """`table` plus one display column per varied config field (`hp.<section.field>` columns: a `--grid` or
    a searched field) that `shown` lacks, named by the field (e.g. `source`, `replay_per_task`), its values
    as names write them (a path as its readable part + hash: `coin_ray.studies.naming.value_label`)."""
    from coin_ray.studies.naming import value_label
    from coin_ray.studies.space import HP_PREFIX

    out = table.copy()
    for column in [c for c in table.columns if c.startswith(HP_PREFIX)]:
        label = column[len(HP_PREFIX):].rsplit(".", 1)[-1]
        if label in shown or label in out.columns:
            continue
        out[label] = [value_label(v) if isinstance(v, (str, list, tuple)) else v for v in table[column]]
    return out


def plan_or_budget(spec: SweepSpec, prepared: PreparedData, args: argparse.Namespace) -> None:
    """`--plan`: print the sweep's plan (its last line one JSON object) and exit 0 (2 when over
    `--budget-hours`); `--budget-hours`: refuse a sweep whose plan is over it or has no estimate. Before any
    trial or MLflow run starts."""
    if not args.plan and args.budget_hours is None:
        return
    from coin_ray.studies.plan import budget_problem, build_plan

    with span("plan"):
        plan = build_plan(spec.base, spec.param_space, spec.num_samples, prepared, throughput=args.throughput)
    problem = budget_problem(plan, args.budget_hours) if args.budget_hours is not None else None
    if args.plan:
        print("\n".join(plan.lines(spec.name)))
        if args.pilot:
            print(pilot_report(spec, args, plan))
        print(json.dumps(plan.summary()), flush=True)
    if problem:
        cli.fail(problem)
    if args.plan:
        raise SystemExit(0)
    print(f"[coin-ray] budget: the plan estimates {plan.device_hours:.2f} of --budget-hours {args.budget_hours:g} "
          f"device-hours ({len(plan.to_train)} stages to train)", flush=True)


def pilot_report(spec: SweepSpec, args: argparse.Namespace, plan: Any) -> str:
    """The seeds the order question needs at this plan's orders, from the finished sweep `--pilot` names (its
    MLflow sweep run in this experiment; the name with or without its 6-digit key): the variance of its trials'
    --metric between orders and between seeds (`studies.power`)."""
    from mlflow import MlflowClient

    from coin_ray.studies.designs import distinct_prefixes
    from coin_ray.studies.power import power_statement, variance_components
    from tracking import resolve_tracking_uri

    cfg, name, metric = spec.base, args.pilot, getattr(args, "metric", "mfn")
    client = MlflowClient(resolve_tracking_uri(cfg.tracking.tracking_uri))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000) if exp is not None else []
    sweeps = [r for r in runs if "mlflow.parentRunId" not in r.data.tags
              and (r.info.run_name == name or r.info.run_name.rsplit("-", 1)[0] == name)]
    if not sweeps:
        raise cli.UsageError(f"--pilot {name}: no sweep run of that name in MLflow experiment "
                             f"{cfg.tracking.experiment!r}: pass the name a finished sweep printed (or --experiment)")
    parent = sweeps[0].info.run_id
    groups: dict[str, list[float]] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId") == parent and metric in r.data.metrics:
            groups.setdefault(r.data.params.get("task_order", ""), []).append(r.data.metrics[metric])
    components = variance_components(list(groups.values()))
    if components is None:
        return (f"pilot {name}: {sum(map(len, groups.values()))} finished trials over {len(groups)} orders; sizing "
                "the seeds needs 2 orders and a second seed of one")
    hours = plan.device_hours
    return f"pilot {name}: " + power_statement(
        components, metric, orders=len(plan.orders) or None,
        stages_per_seed=distinct_prefixes(plan.orders) if plan.orders else None,
        hours_per_stage=hours / len(plan.to_train) if hours is not None and plan.to_train else None)


@span("tracking")
def finish_sweep(spec: SweepSpec, outcome: SweepOutcome, *, metric: str, design: str,
                 pareto: bool = False) -> dict[str, Any]:
    """Print the trials and the study's analysis, log them on the sweep run (trials.csv, analysis/*.csv and
    *.png, analysis/summary.txt), close it, and exit non-zero when a trial failed. `design` "hparams" adds
    the hyper-parameter report (`hparam_analysis`; `pareto`: its Pareto front); the order analysis runs where
    the finished trials trained more than one order."""
    table = trials_table(outcome.trials)
    sort_col = metric if metric in table.columns else "mfn"
    if sort_col in table.columns:
        table = table.sort_values(sort_col, ascending=lower_is_better(sort_col), kind="stable")
    partial = table["partial"].astype(bool) if "partial" in table.columns else table.index.isna()
    fmt = lambda x: f"{x:.3f}"  # noqa: E731
    print("\n=== Trials ===")
    with_cols = [c for c in ("order", "seed", "method", "num_experts", "rank", "mft", "mfn", "bwt", "forgetting",
                             "gk_mfn", "gk_bwt", "stages_reused", "status") if c in table.columns]
    shown = display_varied(table, with_cols)  # every varied value (--grid, searched fields) as its own column
    with_cols = with_cols[:3] + [c for c in shown.columns if c not in table.columns] + with_cols[3:]
    print(shown.loc[~partial, with_cols].to_string(index=False, float_format=fmt))
    if partial.any():
        stopped_cols = [c for c in with_cols if c not in cli.METRICS] + ["stage_reached", "n_stages",
                                                                         "last_avg_seen_acc"]
        print("\n=== Stopped early by the scheduler (partial: no final metrics; stage_reached of n_stages, and "
              "the avg_seen_acc it was compared by) ===")
        print(shown.loc[partial, [c for c in stopped_cols if c in shown.columns]].to_string(index=False,
                                                                                          float_format=fmt))
    done = [t for t in outcome.trials if t["matrix"] is not None]
    # the joint bound has no order: it is kept out of the order analysis, which reports each order's gap to it
    joint = [t for t in done if t.get("baseline") == "joint"]
    finished = [t for t in done if t.get("baseline") is None]
    tables, figures, summaries = {}, {}, []
    metrics = {"stages_trained": outcome.stages_trained, "stages_reused": outcome.stages_reused,
               "device_hours": outcome.device_hours, "device_hours_saved": outcome.device_hours_saved,
               "trials_finished": len(done), "trials": len(outcome.trials), "trials_partial": int(partial.sum())}
    if joint and finished:
        gaps = joint_gaps(finished, joint, metric)
        summaries.append(format_joint_gaps(gaps, metric))
        tables["joint_gap"] = gaps.set_index("order")
        metrics[f"joint_{metric}"] = float(gaps[f"joint_{metric}"].iloc[0])
    hparams = None
    if design == "hparams" and finished:
        try:
            hparams = analyse_hparams(table, describe_space(spec.param_space), metric=metric, pareto=pareto)
        except NoFinishedTrials as e:  # e.g. --metric gk_mfn where the judge scored no trial
            summaries.append(f"hyper-parameter report skipped: {e}")
        else:
            summaries.append(format_hparams(hparams))
            tables.update(hparam_tables(hparams))
            figures.update(hparam_figures(hparams))
            metrics[f"best_{metric}"] = float(hparams.best[metric].iloc[0])
    analysis = None
    skip = order_skip_reason(finished) if finished else None
    if skip:
        summaries.append(skip)
    elif finished:
        slots = outcome.stages_trained + outcome.stages_reused  # what a stage costs, stored or not
        analysis = analyse_orders(finished, metric=metric, hours_per_stage=(
            (outcome.device_hours + outcome.device_hours_saved) / slots if slots else None))
        summaries.append(format_analysis(analysis, metric))
        tables.update({"per_order": analysis.per_order.set_index("order"),
                       "task_spread": analysis.task_spread.set_index("task"), "position": analysis.position})
        figures["position"] = table_heatmap(analysis.position, "final accuracy by training position")
        if analysis.carry_over is not None:
            tables["carry_over"] = analysis.carry_over
            figures["carry_over"] = table_heatmap(
                analysis.carry_over, "drop of A (row) when B (col) is trained right after", cmap="Reds")
        for key in ("eta_squared", "p_value", "F", "seed_std", "seeds_needed"):
            if analysis.variance.get(key) is not None:
                metrics[f"order_{key}"] = analysis.variance[key]
        methods = analyse_methods(finished, metric=metric)
        summaries.append(format_methods(methods, metric))
        tables["methods"] = methods.table.set_index("method")
        figures["methods"] = spread_figure(methods.per_order, metric)
    environments = [t.get("environment") for t in done]
    differ = environments_line(environments)
    if differ:
        summaries.append(differ)
    for text in summaries:
        print("\n" + text)
    print(f"\nstages trained: {outcome.stages_trained}, stages reused from the stage store: {outcome.stages_reused}")
    print(outcome.cost_line())
    if spec.tracking and outcome.sweep_run_id:
        from tracking import close_sweep_run, experiment_runs_url, log_sweep_artifacts, sweep_compare_url

        cfg = spec.base
        texts = {"summary.txt": "\n\n".join(summaries)} if summaries else {}
        # the trials' environment on the sweep run when they shared one (else it keeps the driver's)
        shared = environment_tags(environments[0]) if environments and environments[0] and not differ else None
        log_sweep_artifacts(cfg.tracking.tracking_uri, outcome.sweep_run_id, trials=table, metrics=metrics,
                            figures=figures, tables=tables, texts=texts, tags=shared)
        close_sweep_run(cfg.tracking.tracking_uri, outcome.sweep_run_id,
                        status="FINISHED" if len(done) == len(outcome.trials) else "FAILED")
        ui_cmd, url = experiment_runs_url(cfg.tracking.tracking_uri, cfg.tracking.experiment)
        print(f"\nResults are in MLflow ({redact_text(cfg.tracking.tracking_uri)}), experiment {cfg.tracking.experiment!r}, "
              f"sweep run {spec.name!r}.")
        if ui_cmd:
            print(f"Look at them with:\n  {ui_cmd}")
        print(f"then open {url}")
        compare = sweep_compare_url(cfg.tracking.tracking_uri, cfg.tracking.experiment, outcome.sweep_run_id)
        if compare:
            print(f"or compare this sweep's trials side by side: {compare}")
    failed = [t for t in outcome.trials if t["status"] == "ERROR"]
    if failed:  # a scheduler's stop (STOPPED) is a decision, not a failure
        print(f"\nerror: {len(failed)} of {len(outcome.trials)} trials failed:", file=sys.stderr)
        for t in failed:
            print(f"  {t['name']}: {t.get('error') or 'no error message'}", file=sys.stderr)
        raise SystemExit(1)
    return {"table": table, "analysis": analysis, "hparams": hparams}
