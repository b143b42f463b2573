"""Run a sweep of continual runs with Ray Tune: one trial per (order, seed, hyper-parameters).

Three layers, each a plain function (as in Ray's own examples): the per-worker stage loop
(`coin_ray.training.loop`), the Tune-free driver (`run_continual`), and the Tune trainable here
(`trial_trainable`) that builds a trial's config, opens its MLflow child run and calls the driver.
Names are deterministic everywhere, so `--resume` finds every trial's state instead of duplicating it.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from coin_ray.config import ExperimentConfig
from coin_ray.environment import environment, environment_tags
from coin_ray.evaluation.metrics import METRIC_NAMES
from coin_ray.studies.naming import value_label
from coin_ray.studies.space import HP_PREFIX, RANDOM_KEY_PREFIX, decode
from coin_ray.training.types import PreparedData



def trial_name(order: Sequence[str], seed: int, hparams: dict[str, Any] | None = None, config_hash: str = "",
               baseline: str | None = None, method: str | None = None) -> str:
    """Deterministic trial / MLflow run name: "<A>B>C>-s<seed>[-<method>][-<hp=v,...>][-<config hash, 6
    digits>]" (a value that is not short and plain, e.g. a path, as
    `coin_ray.studies.naming.value_label` writes it: readable part + hash); a baseline's is "<baseline>-s<seed>..." (e.g. the joint bound: "joint-s0-...")."""
    name = f"{baseline or '>'.join(order)}-s{seed}"
    if method:
        name += f"-{method}"
    if hparams:
        name += "-" + ",".join(f"{k.split('.')[-1]}={value_label(v)}" for k, v in sorted(hparams.items()))
    if config_hash:
        name += f"-{config_hash[:6]}"
    return name


def safe_dirname(name: str) -> str:
    readable = name.replace(">", "_").replace("=", "").replace(",", "_")[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def trial_config(base: dict[str, Any], config: dict[str, Any], data_hash: str = "") -> ExperimentConfig:
    """The trial's ExperimentConfig from the sweep's base config and Tune's sampled values; its name carries
    the hash of every result-changing field and of the data (`coin_ray.identity.config_hash`)."""
    from coin_ray.identity import config_hash

    cfg = ExperimentConfig.from_dict(base)
    choice = decode(config, cfg)
    cfg = cfg.replace(order=list(choice.order), **{"train.seed": choice.seed}, **choice.changes)
    return cfg.replace(name=trial_name(choice.order, choice.seed, choice.hparams, config_hash(cfg.flatten(), data_hash),
                                       baseline=choice.baseline, method=choice.method))


@dataclass(frozen=True)
class TrialTracking:
    """Where a sweep's trials log: the MLflow store and experiment, the sweep's parent run, and the folder
    where writes the server did not take wait (tracking.replay sends them)."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    sweep: str
    spool_dir: str
    system_metrics: bool = True  # MLflow's system/* metrics on each trial run (tracking.system_metrics)

    def tracker(self, name: str, run_key: str) -> Any:
        """A factory of the trial's MlflowTracker (built on the worker that runs the trial's rank 0)."""
        from tracking import MlflowTracker

        return functools.partial(MlflowTracker, self.tracking_uri, self.experiment, name,
                                 parent_run_id=self.parent_run_id, tags={"coin_ray.sweep": self.sweep},
                                 run_key=run_key, spool_dir=self.spool_dir, system_metrics=self.system_metrics)

    def mark_failed(self, run_key: str, status: str = "FAILED") -> None:
        from tracking import mark_run_failed

        mark_run_failed(self.tracking_uri, self.experiment, run_key, parent_run_id=self.parent_run_id, status=status)


def trial_trainable(config: dict[str, Any], *, base: dict[str, Any], prepared: PreparedData,
                    tracking: TrialTracking | None, verbose: bool = False) -> None:
    """The Tune function trainable: one continual run; per-stage metrics reach Tune from the Train workers
    (TuneReportCallback), so schedulers such as ASHA can stop a trial between stages."""
    from coin_ray.identity import run_key
    from coin_ray.training import run_continual

    from coin_ray.profiling import TRIAL, span

    cfg = trial_config(base, config, prepared.data_hash)
    key = run_key(cfg.name, cfg.flatten(), prepared.data_hash)
    hooks_factory = tracking.tracker(cfg.name, key) if tracking is not None else None
    import ray.tune as tune
    from ray.tune.integration.ray_train import TuneReportCallback

    try:
        with span(TRIAL, trial=cfg.name):
            run_continual(cfg, hooks_factory=hooks_factory, prepared=prepared,
                          train_callbacks=[TuneReportCallback()], verbose=verbose, report=tune.report)
    except BaseException:
        if tracking is not None:
            tracking.mark_failed(key)
        raise


@dataclass
class SweepSpec:
    """Everything one sweep needs; built by sweeps/task_order.py and sweeps/hparams.py."""

    name: str
    base: ExperimentConfig
    param_space: dict[str, Any]
    num_samples: int = 1
    search_alg: Any = None
    scheduler: Any = None
    max_concurrent_trials: int = 1
    resume: bool = False
    tracking: bool = True
    sweep_params: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False  # Tune's trial table and Ray's own info logs (--verbose)


@dataclass
class SweepOutcome:
    trials: list[dict[str, Any]]  # name, order, seed, E, r, sampled, matrix, metrics, status, partial, ...
    sweep_run_id: str | None
    experiment_id: str | None
    stages_trained: int
    stages_reused: int
    storage: Path
    device_hours: float = 0.0  # what the finished trials trained and evaluated cost
    device_hours_saved: float = 0.0  # what their reused stages cost when they were trained

    def cost_line(self) -> str:
        return (f"device-hours: {self.device_hours:.2f} trained, {self.device_hours_saved:.2f} saved by the "
                "stage store")


def sweep_key(spec: SweepSpec, data_hash: str) -> str:
    """What identifies a sweep: its given name, the hash of its base config and data, and its params (design,
    search space, ...), so a sweep run never holds two values of one param."""
    from coin_ray.identity import config_hash, short_hash

    return short_hash({"name": spec.name, "config_hash": config_hash(spec.base.flatten(), data_hash),
                       "params": spec.sweep_params})


def run_sweep(spec: SweepSpec, prepared: PreparedData) -> SweepOutcome:
    """Run the sweep's trials. `spec.name` becomes "<name>-<6 digits of sweep_key>": the Tune experiment
    folder and the MLflow sweep run of a sweep with another config are other ones."""
    import ray.tune as tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    from coin_ray.identity import run_key
    from coin_ray.methods import method_label
    from coin_ray.training.continual import NoRunResult, load_run_result

    cfg = spec.base
    if cfg.scaling.num_workers < 1:
        from coin_ray.training import RunSetupError

        raise RunSetupError("a sweep needs --workers-per-trial >= 1: in-process runs (0) cannot run inside Ray Tune; "
                         "use coin_ray.training.run_continual directly to debug in-process")
    data_hash = prepared.data_hash
    key = sweep_key(spec, data_hash)
    spec.name = f"{spec.name}-{key[:6]}"
    storage = Path(cfg.storage_path).resolve()
    tracking = None
    sweep_run_id = None
    from coin_ray.profiling import span

    if spec.tracking:
        from tracking import open_sweep_run, resolve_tracking_uri

        # absolute (sqlite paths): Tune runs each trial in its own working directory
        cfg = cfg.replace(**{"tracking.tracking_uri": resolve_tracking_uri(cfg.tracking.tracking_uri)})
        spec.base = cfg
        with span("tracking"):
            sweep_run_id = open_sweep_run(cfg.tracking.tracking_uri, cfg.tracking.experiment, spec.name,
                                          params=spec.sweep_params, run_key=key,
                                          # the driver's; finish_sweep puts the trials' there when they share one
                                          tags={"coin_ray.sweep": spec.name, **environment_tags(environment())})
        tracking = TrialTracking(cfg.tracking.tracking_uri, cfg.tracking.experiment, sweep_run_id, spec.name,
                                 # undelivered MLflow writes stay beside the results (shared storage on a cluster)
                                 spool_dir=str(storage / "mlflow_spool"),
                                 system_metrics=cfg.tracking.system_metrics)
    from coin_ray.training.continual import with_train_datasets

    with span("data loading"):
        prepared = with_train_datasets(cfg, prepared)  # read small train splits once for every trial
    trainable = tune.with_parameters(trial_trainable, base=cfg.to_dict(), prepared=prepared, tracking=tracking,
                                     verbose=spec.verbose)
    # The trial function only waits on fit(): it holds no CPU (Tune needs some resource, so a token 1 MiB of
    # memory), and the cores go to the Train workers - N trials of one 1-CPU worker fit N CPUs exactly.
    trainable = tune.with_resources(trainable, {"memory": 2**20})
    tune_path = storage / "tune"
    if spec.resume and Tuner.can_restore(str(tune_path / spec.name)):
        tuner = Tuner.restore(str(tune_path / spec.name), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = Tuner(
            trainable,
            param_space=spec.param_space,
            # metric/mode live on the search algorithm and the scheduler (Tune refuses them in both places)
            tune_config=TuneConfig(num_samples=spec.num_samples, search_alg=spec.search_alg,
                                   scheduler=spec.scheduler, max_concurrent_trials=spec.max_concurrent_trials,
                                   reuse_actors=True,
                                   trial_name_creator=lambda t: _trial_name_of(cfg, t.config, data_hash),
                                   trial_dirname_creator=lambda t: safe_dirname(
                                       _trial_name_of(cfg, t.config, data_hash))),
            run_config=RunConfig(name=spec.name, storage_path=str(tune_path), verbose=1 if spec.verbose else 0),
        )
    grid = tuner.fit()

    trials: list[dict[str, Any]] = []
    for res in grid:
        tcfg = trial_config(cfg.to_dict(), res.config, data_hash)
        row: dict[str, Any] = {"name": tcfg.name, "order": tcfg.order, "seed": tcfg.train.seed,
                               "baseline": "joint" if tcfg.train.joint else None,
                               "method": method_label(tcfg), "num_experts": tcfg.tuner.num_experts,
                               "rank": tcfg.tuner.rank, "alpha": tcfg.tuner.alpha, "lr": tcfg.train.lr,
                               "run_key": run_key(tcfg.name, tcfg.flatten(), data_hash),
                               "sampled": sampled_params(res.config),
                               "n_stages": 1 if tcfg.train.joint else len(tcfg.order),
                               "status": "ERROR" if res.error else "TERMINATED",
                               "error": error_summary(res.error) if res.error else None}
        try:
            if res.error:  # whatever result.json holds, this trial did not produce it
                raise NoRunResult(f"trial {tcfg.name} failed: {res.error}")
            rr = load_run_result(tcfg, data_hash)
            row.update(matrix=rr.matrix, knowledge_matrix=rr.knowledge_matrix, metrics=rr.metrics,
                       stages_reused=len(rr.stages_reused), zero_shot=rr.zero_shot, partial=False,
                       environment=rr.environment,
                       device_hours=rr.device_hours, device_hours_saved=rr.device_hours_saved,
                       stage_reached=row["n_stages"], last_reported={})
        except NoRunResult:  # stopped early (ASHA) or failed: no final metrics, only what Tune saw last
            last = {k: v for k, v in (res.metrics or {}).items() if isinstance(v, (int, float))}
            row.update(matrix=None, metrics={}, last_reported=last, stages_reused=0,
                       status="STOPPED" if not res.error else "ERROR", partial=not res.error,
                       # stages the trial completed: the loop reports its 0-based "stage" after each one
                       stage_reached=int(last["stage"]) + 1 if "stage" in last else 0)
        trials.append(row)
    if tracking is not None:  # trials Tune stopped (ASHA) or that died never closed their MLflow run
        for t in trials:
            if t["matrix"] is None:
                tracking.mark_failed(t["run_key"], status="KILLED" if t["status"] == "STOPPED" else "FAILED")
    finished = [t for t in trials if t["matrix"] is not None]
    stages_total = sum(1 if t["baseline"] == "joint" else len(t["order"]) for t in finished)
    reused = sum(t["stages_reused"] for t in finished)
    outcome = SweepOutcome(trials=trials, sweep_run_id=sweep_run_id, experiment_id=None,
                           stages_trained=stages_total - reused, stages_reused=reused, storage=storage,
                           device_hours=sum(t["device_hours"] for t in finished),
                           device_hours_saved=sum(t["device_hours_saved"] for t in finished))
    return outcome


def error_summary(error: BaseException) -> str:
    """The first line of the innermost error a trial died of (Tune and Train wrap a worker's exception in
    their own; the worker's own `Type: message` line is what names the cause)."""
    import re

    seen = set()
    inner = error
    while True:  # follow explicit causes and Ray's wrappers down to the original exception
        nxt = getattr(inner, "__cause__", None) or getattr(inner, "cause", None)
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        seen.add(id(nxt))
        inner = nxt
    text = str(inner)
    # a wrapper that carries its workers' tracebacks as text: the last "SomeError: message" line is the cause
    causes = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+)$", text, flags=re.M)
    if causes:
        kind, message = causes[-1]
        return f"{kind}: {message.strip()}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {first}" if first else type(inner).__name__


def sampled_params(config: dict[str, Any]) -> dict[str, Any]:
    """The values a search sampled for a trial (`hp.*` and the order's `key.*`), as Tune gave them (before
    `trial_config` makes the rank divisible by the expert count)."""
    return {k: v for k, v in config.items() if k.startswith((HP_PREFIX, RANDOM_KEY_PREFIX))}


def _trial_name_of(cfg: ExperimentConfig, config: dict[str, Any], data_hash: str) -> str:
    return trial_config(cfg.to_dict(), config, data_hash).name


def trials_table(trials: list[dict[str, Any]]):
    """One row per trial with the contract columns (order, method, E, r, MFT, MFN, BWT, forgetting...).

    Final metrics are those of finished trials only; a trial a scheduler stopped is `partial` (status STOPPED)
    with the stages it completed (`stage_reached` of `n_stages`) and the `avg_seen_acc` Tune last saw from it
    (`last_avg_seen_acc`, what ASHA compared). The values a search sampled follow as `hp.*` / `key.*` columns."""
    import pandas as pd

    rows = []
    for t in trials:
        m = t.get("metrics") or {}
        n_stages = t.get("n_stages", len(t["order"]))
        rows.append({"trial": t["name"], "order": t.get("baseline") or ">".join(t["order"]), "seed": t["seed"],
                     "method": t["method"],
                     "num_experts": t["num_experts"], "rank": t["rank"], "alpha": t["alpha"], "lr": t["lr"],
                     "status": t["status"], "partial": bool(t.get("partial", False)),
                     "stage_reached": t.get("stage_reached", n_stages), "n_stages": n_stages,
                     "last_avg_seen_acc": (t.get("last_reported") or {}).get("avg_seen_acc", math.nan),
                     "stages_reused": t.get("stages_reused", 0),
                     **{k: m.get(k, math.nan) for k in METRIC_NAMES},
                     **(t.get("sampled") or {})})
    df = pd.DataFrame(rows)
    return df.dropna(axis=1, how="all")


