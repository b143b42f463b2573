"""What the stage cache saves: the same order sweep with and without it, side by side in one run.

All orders of N tasks (default 4: 24 orders, 96 stages, 64 distinct prefixes) through the real sweep path
(Ray Tune trials, one Ray Train worker each), once with --no-cache semantics and once with the stage store;
prints stages trained and wall time of each, then a JSON line with the ratios.

    python benchmarks/sweep_cache.py [--tasks 4] [--steps 10]      # --smoke-test: 3 tasks, 3 steps

With --rerun: the smoke preset through sweeps/task_order.py (its own Ray, MLflow sqlite), then the same sweep on
the same storage in a new MLflow experiment (every stage and evaluation cell in the store: no trial starts a
Train worker), side by side, and a JSON line with the rerun's share of the first run's wall time.

    python benchmarks/sweep_cache.py --rerun [-- extra task_order.py flags]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-concurrent-trials", type=int, help="trials at once (default: as the sweep CLI: all CPUs)")
    p.add_argument("--smoke-test", action="store_true")
    p.add_argument("--rerun", action="store_true", help="the smoke preset's first run and its fully cached rerun")
    p.add_argument("extra", nargs="*", help="with --rerun: more task_order.py flags (after --)")
    args = p.parse_args()
    if args.rerun:
        return rerun(args.extra)
    if args.smoke_test:
        args.tasks, args.steps = 3, 3

    import ray
    import ray.tune as tune

    from coin_ray.config import ExperimentConfig
    from coin_ray.studies.cli import default_concurrency
    from coin_ray.studies.designs import all_orders, distinct_prefixes, schedule_for_sharing
    from coin_ray.studies.runner import SweepSpec, run_sweep
    from coin_ray.tasks import TASK_NAMES
    from coin_ray.training import prepare_data

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tasks = list(TASK_NAMES[: args.tasks])
    orders = all_orders(tasks)
    data_storage = Path(tempfile.mkdtemp(prefix="coin-ray-cache-bench-"))
    results = {}
    for label, cached in (("uncached", False), ("cached", True)):
        base = ExperimentConfig.from_dict({
            "order": tasks, "storage_path": str(data_storage), "use_stage_cache": cached,
            "train.max_steps": args.steps, "train.batch_size": 8, "data.train_rows": 48, "data.test_rows": 8,
            "eval.batch_size": 8, "scaling.num_workers": 1, "eval.judge": "none", "model.pretrain_steps": 0})
        prepared = prepare_data(base)
        concurrency = default_concurrency(base, args.max_concurrent_trials, prepared)
        spec = SweepSpec(name=f"cache-bench-{label}", base=base, tracking=False,
                         max_concurrent_trials=concurrency,
                         param_space={"order": tune.grid_search(
                             [">".join(o) for o in schedule_for_sharing(orders, concurrency)]), "seed": 0})
        started = time.perf_counter()
        outcome = run_sweep(spec, prepared)
        seconds = time.perf_counter() - started
        results[label] = {"stages_trained": outcome.stages_trained, "stages_reused": outcome.stages_reused,
                          "wall_s": round(seconds, 1), "concurrent_trials": concurrency}
        print(f"{label}: {results[label]}", flush=True)
    ray.shutdown()
    print(json.dumps({"orders": len(orders), "stages": len(orders) * len(tasks),
                      "distinct_prefixes": distinct_prefixes(orders), **results,
                      "stages_ratio": round(results["cached"]["stages_trained"] / results["uncached"]["stages_trained"], 3),
                      "time_ratio": round(results["cached"]["wall_s"] / results["uncached"]["wall_s"], 3)}))


def rerun(extra: list[str]) -> None:
    """The smoke preset's first run and its rerun in a new experiment on the same storage, side by side."""
    root = Path(tempfile.mkdtemp(prefix="coin-ray-rerun-bench-"))
    script = Path(__file__).resolve().parent.parent / "sweeps" / "task_order.py"
    results = {}
    for label in ("first", "rerun"):
        cmd = [sys.executable, str(script), "--smoke-test", "--storage-path", str(root / "runs"),
               "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--experiment", f"bench-{label}", *extra]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"{label} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        trained = re.search(r"stages trained: (\d+), stages reused from the stage store: (\d+)", proc.stdout)
        hours = re.search(r"^device-hours: .*$", proc.stdout, re.M)
        results[label] = {"wall_s": round(seconds, 1), "stages_trained": int(trained[1]),
                          "stages_reused": int(trained[2]), "cost": hours[0] if hours else None}
        print(f"{label:>6}: {results[label]}", flush=True)
    print(json.dumps({**results, "rerun_share": round(results["rerun"]["wall_s"] / results["first"]["wall_s"], 3)}))


if __name__ == "__main__":
    main()
