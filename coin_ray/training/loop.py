"""The per-worker continual loop, top to bottom: for each stage of the order, obtain it (reuse, wait or
train; `stages.obtain_stage`), evaluate every task with it (`evaluate.evaluate_row`), report.

The same function runs inside a Ray Train worker (num_workers >= 1) and in-process (num_workers = 0);
`WorkerEnv` hides the difference.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from coin_ray import profiling
from coin_ray.config import ExperimentConfig
from coin_ray.environment import environment
from coin_ray.evaluation.metrics import cl_metrics, mean_seen
from coin_ray.methods import build_method
from coin_ray.training.accounting import StageCost, device_kind, devices_of, peak_memory_gb, reset_peak_memory
from coin_ray.profiling import span
from coin_ray.training.build import build_model, resolved_precision
from coin_ray.training.evaluate import EvalRow, evaluate_row
from coin_ray.training.hooks import HookList, RunInfo, RunResult, StageReport
from coin_ray.training.stages import ADAPTER_DIR, Stage, obtain_stage, stage_material, stage_prefixes, store_root
from coin_ray.training.store import StageStore, stage_key
from coin_ray.training.types import WorkerConfig
from coin_ray.training.worker import LoadedWeights, WorkerEnv, WorkerRun, progress, ray_train_env


def continual_worker(config: dict[str, Any], env: WorkerEnv | None = None) -> RunResult | None:
    """Run (or resume) every stage of the order on this worker. `config["worker"]` is a `WorkerConfig`."""
    wc: WorkerConfig = config["worker"]
    profiling.label(trial=wc.experiment["name"])  # the config itself is parsed once, by start_run
    if "fit_started" in config:  # a Ray Train worker: the controller's and this process's start
        born = max(profiling.process_started(), config["fit_started"])  # a pooled process may be older
        profiling.record_span("trial start-up", config["fit_started"], born, part="Ray Train start")
        profiling.record_span("trial start-up", born, time.time(), part="worker process start")
    with span("trial start-up", part="model build"):
        run = start_run(wc, env or ray_train_env(wc.verbose))
    cfg, out = run.cfg, run_output(run)
    out.start()
    try:
        with span("evaluation", stage=-1):
            zero_shot = evaluate_zero_shot(run) if cfg.eval.zero_shot else None
        tally = Progress(run.order, zero_shot, judged=run.judge is not None, joint=cfg.train.joint)
        tally.add_zero_shot_cost(zero_shot, devices_of(cfg), device_kind(run.env.device))
        for k, prefix in enumerate(stage_prefixes(cfg)):
            started = time.time()
            reset_peak_memory(run.env.device)
            with span("training", stage=k):
                stage = obtain_stage(run, prefix)
            obtained_s = time.time() - started
            with span("evaluation", stage=k):
                row = evaluate_row(run, stage.entry.path)
            stage.cost.peak_memory_gb = max(stage.cost.peak_memory_gb, peak_memory_gb(run.env.device))
            out.stage(tally, stage, row, started, obtained_s)
        return out.result
    except BaseException as error:
        if out.result is None:
            run.hooks.on_run_failed(error)
        raise


@dataclass
class RunOutput:
    """Where a run's events go: its hooks (rank 0 holds them), its run folder (stages.json, result.json) and
    the report to Ray Train / Tune after each stage. Shared by the worker loop and a run assembled from the
    store without a worker (`coin_ray.training.from_store`)."""

    cfg: ExperimentConfig
    data_hash: str
    hooks: HookList
    run_dir: Path
    rank0: bool
    report: Callable[[dict[str, Any], Path | None], None]
    environment: dict[str, str] = field(default_factory=dict)  # where it ran (coin_ray.environment)
    result: RunResult | None = None  # set once the run is closed

    def start(self) -> None:
        from coin_ray.methods import method_label

        cfg = self.cfg
        self.hooks.on_run_start(RunInfo(name=cfg.name, order=tuple(cfg.order), params=cfg.flatten(),
                                        benchmark=cfg.data.benchmark, data_hash=self.data_hash,
                                        method=method_label(cfg), environment=self.environment))

    def stage(self, tally: "Progress", stage: Stage, row: EvalRow, started: float, obtained_s: float) -> None:
        """Stage k (the next row of `tally`) is obtained and evaluated: record it, tell the hooks, close the run
        after its last stage, report."""
        cfg = self.cfg
        tally.add(stage, row)
        k = len(tally.matrix) - 1
        task = "joint" if cfg.train.joint else cfg.order[k]
        if self.rank0:
            progress(f"{cfg.name} stage {k} {task}: {'reused' if stage.reused else 'trained'} in "
                     f"{obtained_s:.1f} s, evaluated in {time.time() - started - obtained_s:.1f} s; seen-task "
                     "scores " + " ".join(f"{t}={row.scores[t]:.2f}" for t in tally.seen(k)
                                          if row.scores[t] is not None))
            from coin_ray._files import write_json_atomic

            write_json_atomic(self.run_dir / "stages.json", tally.index)
        self.hooks.on_stage_end(StageReport(stage=k, task=task, scores=row.scores, knowledge=row.knowledge,
                                            train_losses=stage.losses, predictions=row.predictions,
                                            reused=stage.reused, seconds=time.time() - started,
                                            cost=stage.cost.metrics()))
        if k == len(stage_prefixes(cfg)) - 1:
            # the run is closed (hooks, result.json) before its last stage is reported: a Tune scheduler
            # may stop the trial the moment it sees that report (ASHA stops every trial reaching max_t)
            self.finish(tally.result(adapter_dir=str(stage.entry.checkpoint / ADAPTER_DIR)))
        with span("reporting", stage=k):
            self.report(tally.metrics(), stage.entry.checkpoint)

    def finish(self, result: RunResult) -> None:
        """Close the run: hooks, then result.json with the run key that tells this config's result from
        another's."""
        result = dataclasses.replace(result, environment=self.environment)
        self.hooks.on_run_end(result)
        if self.rank0:
            from coin_ray._files import write_json_atomic
            from coin_ray.identity import run_key

            write_json_atomic(self.run_dir / "result.json", {
                **result_dict(result), "run_key": run_key(self.cfg.name, self.cfg.flatten(), self.data_hash)})
        self.result = result


def run_output(run: WorkerRun) -> RunOutput:
    return RunOutput(run.cfg, run.data.data_hash, run.hooks, run.run_dir, run.env.rank == 0, run.env.report,
                     environment=environment(run.env.device, run.env.world))


def start_run(wc: WorkerConfig, env: WorkerEnv) -> WorkerRun:
    """Build this worker's model (base + tuner), judge, store and hooks for the run."""
    import torch

    cfg = ExperimentConfig.from_dict(wc.experiment)
    storage = Path(cfg.storage_path).resolve()
    run_dir = storage / "runs" / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.model.seed)
    model, processor = build_model(cfg, storage, env.device, wc.data.model_source)
    model.to(env.device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    judge = None
    if cfg.eval.judge != "none":
        from coin_ray.evaluation.judges import build_judge

        judge = build_judge(cfg.eval.judge, **dict(cfg.eval.judge_options))
    hooks = HookList([wc.hooks_factory()] if (env.rank == 0 and wc.hooks_factory) else [])
    return WorkerRun(cfg=cfg, data=wc.data, stage_rows=wc.stage_rows, env=env,
                     store=StageStore(store_root(cfg)),
                     model=model, processor=processor, judge=judge, hooks=hooks, run_dir=run_dir,
                     autocast_dtype=resolved_precision(cfg, env.device)[1],
                     weights=LoadedWeights(model, env.device), method=build_method(cfg),
                     step_callbacks=list(wc.step_callbacks))


def evaluate_zero_shot(run: WorkerRun) -> EvalRow:
    """The base model (tuner freshly initialised) on every task; cached in the store under the empty prefix."""
    material = stage_material(run.cfg, run.data.data_hash, (), run.env.device)
    key = stage_key(material)
    base_dir = run.store.ensure_eval_dir(key, material).parent if run.env.rank == 0 else None
    run.env.barrier()
    row = evaluate_row(run, base_dir or run.store.root / key)
    run.hooks.on_zero_shot(row.scores, row.knowledge)
    return row


class Progress:
    """The evaluation matrix so far, and the metrics reported after each stage."""

    def __init__(self, order: tuple[str, ...], zero_shot: EvalRow | None, judged: bool, joint: bool = False) -> None:
        self.order = order
        self.judged = judged
        self.joint = joint  # one stage on every task: its row stands for every stage (see running_metrics)
        self.zero_shot = [zero_shot.scores[t] for t in order] if zero_shot else None
        self.knowledge_zero = ([zero_shot.knowledge[t] for t in order]
                               if zero_shot and zero_shot.knowledge is not None else None)
        self.matrix: list[list[float | None]] = []
        self.kmatrix: list[list[float | None]] = []
        self.reused: list[int] = []
        self.index: list[dict[str, Any]] = []  # stages.json
        self.last: EvalRow | None = None
        self.device_hours = self.device_hours_saved = 0.0

    def add_zero_shot_cost(self, row: EvalRow | None, devices: float, kind: str) -> None:
        """The base model's row costs evaluation only."""
        if row is not None:
            self.add_cost(StageCost(devices, kind, eval_answers=row.answers, eval_seconds=row.seconds,
                                    saved_device_hours=row.saved_seconds * devices / 3600))

    def add_cost(self, cost: StageCost) -> None:
        self.device_hours += cost.device_hours
        self.device_hours_saved += cost.saved_device_hours

    def add(self, stage: Stage, row: EvalRow) -> None:
        """Stage k's matrix row and its cost (the evaluation part completed here from `row`)."""
        k = len(self.matrix)
        cost = stage.cost
        cost.eval_answers, cost.eval_seconds = row.answers, row.seconds
        cost.saved_device_hours += row.saved_seconds * cost.devices / 3600
        self.add_cost(cost)
        self.matrix.append([row.scores[t] for t in self.order])
        if row.knowledge is not None:
            self.kmatrix.append([row.knowledge[t] for t in self.order])
        if stage.reused:
            self.reused.append(k)
        self.index.append({"stage": k, "task": "joint" if self.joint else self.order[k], "key": stage.key, "path": str(stage.entry.path),
                           "reused": stage.reused})
        self.last = row

    def seen(self, k: int) -> tuple[str, ...]:
        """The tasks trained by the end of stage k (a joint stage trains every task)."""
        return self.order if self.joint else self.order[: k + 1]

    def running_metrics(self) -> dict[str, float]:
        matrix, kmatrix = self.matrix, self.kmatrix
        if self.joint:  # the bound as if every stage had trained every task: MFT = MFN = its mean, BWT = 0
            n = len(self.order)
            matrix, kmatrix = matrix * n, kmatrix * n
        return final_metrics(matrix, self.zero_shot, kmatrix if self.judged else None, self.knowledge_zero)

    def metrics(self) -> dict[str, Any]:
        """What a stage reports to Ray Train/Tune: the seen-task average, each task's score, and the CL metrics
        over the tasks seen so far. A scheduler's metric must exist at every stage, so the undefined ones of
        a 1x1 matrix (bwt, forgetting) report 0."""
        k = len(self.matrix) - 1
        scores = self.last.scores
        metrics = {"stage": k, "task": "joint" if self.joint else self.order[k], "reused": int(k in self.reused),
                   "avg_seen_acc": mean_seen(scores, self.seen(k)) or 0.0,
                   **{f"acc/{t}": scores[t] for t in self.order if scores[t] is not None}}
        metrics.update({m: (0.0 if math.isnan(v) else v) for m, v in self.running_metrics().items()})
        metrics["stages_reused"] = len(self.reused)
        return metrics

    def result(self, adapter_dir: str) -> RunResult:
        return RunResult(order=self.order, matrix=self.matrix, zero_shot=self.zero_shot,
                         knowledge_matrix=self.kmatrix if self.judged else None,
                         knowledge_zero_shot=self.knowledge_zero, metrics=self.running_metrics(),
                         stages_reused=tuple(self.reused), adapter_dir=adapter_dir,
                         device_hours=self.device_hours, device_hours_saved=self.device_hours_saved)


def final_metrics(matrix, zero_shot, kmatrix, kzero) -> dict[str, float]:
    """CL metrics of the instruction matrix; gk_* of the knowledge matrix only when every cell they need was
    judged (a failed judge leaves null cells: those metrics are then undefined, not 0)."""
    n = len(matrix)
    metrics = dict(cl_metrics(_square(matrix), zero_shot=zero_shot[:n] if zero_shot else None))
    if kmatrix and all(kmatrix[i][j] is not None for i in range(n) for j in range(i + 1)):
        kz = kzero[:n] if kzero and all(v is not None for v in kzero[1:n]) else None
        gk = cl_metrics(_square(kmatrix), zero_shot=kz)
        metrics.update({f"gk_{k}": v for k, v in gk.items()})
    return {k: float(v) for k, v in metrics.items()}


def _square(matrix: list[list[float | None]]) -> list[list[float | None]]:
    """Rows so far, cut to a square (mid-run reports use the seen tasks only)."""
    n = len(matrix)
    return [row[:n] for row in matrix]


def result_dict(result: RunResult) -> dict[str, Any]:
    d = dataclasses.asdict(result)
    d["order"] = list(result.order)
    d["stages_reused"] = list(result.stages_reused)
    return d
