"""Calibration of the built-in synthetic benchmark: is every task learnable, is forgetting partial, and does
the task order matter more than the seed? The embedded default and the smoke preset (configs/default.yaml,
configs/smoke.yaml) are tuned with it.

For each method (LoRA, MoELoRA, or a continual-learning method: olora, ewc, lwf) on the tiny model with a preset's budgets it
  1. trains each task alone and prints its accuracy next to chance level (the expected score of a uniform
     guess among the task's train answers) and the best constant answer ("majority"),
  2. runs every order of the tasks (all permutations, or the first N) with each seed and prints the
     evaluation matrices (rows = after stage i, columns = tasks in training order) and MFT / MFN / BWT,
  3. compares the spread of MFN across orders with its spread across seeds, checks the preset's targets
     and prints a final JSON line.
Single-task runs share the stage store with the orders (stage 1 of an order that starts with task t is the
run of t alone), so step 1 costs only the evaluations.

    python benchmarks/synthetic_calibration.py                # default preset, 3 tasks, lora+moelora, 2 seeds
    python benchmarks/synthetic_calibration.py --smoke-test   # smoke preset, moelora (the sweep's), 1 seed
    python benchmarks/synthetic_calibration.py --tasks GQA,VQAv2,OCRVQA --methods lora --seeds 3

Metrics (coin_ray.evaluation.metrics, R[i][j] = score on task j after stage i): MFT = mean_j R[j][j],
MFN = mean_j R[T][j], BWT = mean_{j<T} (R[T][j] - R[j][j]).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Targets of the embedded default and of the smoke preset (README "Numbers").
TARGETS: dict[str, dict[str, Any]] = {
    "default": {"alone_min": 0.8, "mft_min": 0.7, "bwt_range": (-0.9, -0.1), "order_over_seed": True},
    "smoke": {"mft_min": 0.5, "bwt_max": -0.05},
}


def chance_levels(instructions: Path, task: str) -> dict[str, float]:
    """Scores of answering without looking: `chance` = expected score of a uniform guess among the distinct
    train answers, `majority` = score of the best single constant answer, both on the test split."""
    from coin_ray.tasks import get_task

    t = get_task(task)
    train = json.loads((instructions / task / "train.json").read_text())
    test = json.loads((instructions / task / "test.json").read_text())
    candidates = sorted({rec["conversations"][-1]["value"] for rec in train})
    refs = [t.reference_from_record(rec) for rec in test]
    per_candidate = [sum(t.score(c, r) for r in refs) / len(refs) for c in candidates]
    return {"chance": sum(per_candidate) / len(per_candidate), "majority": max(per_candidate),
            "answers": len(candidates)}


def _fmt_matrix(order: Sequence[str], matrix: list[list[float | None]]) -> str:
    head = " " * 17 + " ".join(f"{t[:9]:>9}" for t in order)
    rows = [f"  after {t[:9]:<9}" + " ".join(f"{'-' if v is None else f'{v:.2f}':>9}" for v in row)
            for t, row in zip(order, matrix)]
    return "\n".join([head, *rows])


def _sd(values: Sequence[float]) -> float:
    return statistics.pstdev(values) if len(values) > 1 else 0.0


def order_vs_seed(mfn: dict[tuple[str, ...], list[float]]) -> dict[str, float]:
    """Spread of MFN due to the order (std over orders of the per-order mean over seeds) and due to the seed
    (mean over orders of the std over seeds); the order effect is visible when the first is larger."""
    means = [statistics.fmean(v) for v in mfn.values()]
    return {"mfn_sd_orders": _sd(means), "mfn_sd_seeds": statistics.fmean(_sd(v) for v in mfn.values()),
            "mfn_range_orders": max(means) - min(means)}


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def calibrate(method: str, preset: str, tasks: Sequence[str], seeds: int, n_orders: int | None, storage: Path,
              overrides: dict[str, Any], use_stage_cache: bool = True) -> dict[str, Any]:
    """Single-task runs + every order x seed for one method; prints as it goes, returns the summary."""
    from coin_ray.config import ExperimentConfig
    from coin_ray.config import preset as preset_layer
    from coin_ray.methods import method_changes
    from coin_ray.training import prepare_data, run_continual

    # the embedded default (the dataclass defaults) or the smoke preset over it; no judge: the calibration
    # targets are about the instruction matrix
    layer = preset_layer("smoke") if preset == "smoke" else {}
    raw = {**layer, "eval.judge": "none", "order": list(tasks), "storage_path": str(storage), "scaling.num_workers": 0,
           **method_changes(method), "use_stage_cache": use_stage_cache, "name": f"calib-{method}", **overrides}
    cfg = ExperimentConfig.from_dict(raw)
    started = time.perf_counter()
    prepared = prepare_data(cfg)
    prep_s = time.perf_counter() - started
    print(f"\n=== {method} ({preset} preset; data + base ready in {prep_s:.1f} s) ===", flush=True)

    instructions = Path(prepared.instructions)
    alone: dict[str, dict[str, Any]] = {}
    print(f"{'task alone':<11} {'score':>6} {'chance':>7} {'majority':>9} {'answers':>8}   (per seed)")
    for task in tasks:
        scores = []
        for seed in range(seeds):
            run = cfg.replace(order=[task], name=f"calib-{method}-alone-{task}-s{seed}", **{"train.seed": seed})
            scores.append(run_continual(run, prepared=prepared).matrix[0][0])
        levels = chance_levels(instructions, task)
        alone[task] = {"score": statistics.fmean(scores), "seeds": scores, **levels}
        print(f"{task:<11} {alone[task]['score']:>6.2f} {levels['chance']:>7.2f} {levels['majority']:>9.2f} "
              f"{levels['answers']:>8}   {[round(s, 2) for s in scores]}", flush=True)

    orders = list(itertools.permutations(tasks))[: n_orders or None]
    runs: list[dict[str, Any]] = []
    mfn: dict[tuple[str, ...], list[float]] = {}
    for order in orders:
        for seed in range(seeds):
            run = cfg.replace(order=list(order), name=f"calib-{method}-{'-'.join(order)}-s{seed}",
                              **{"train.seed": seed})
            t0 = time.perf_counter()
            result = run_continual(run, prepared=prepared)
            m = result.metrics
            runs.append({"order": list(order), "seed": seed, "matrix": result.matrix,
                         **{k: m[k] for k in ("mft", "mfn", "bwt")}})
            mfn.setdefault(order, []).append(m["mfn"])
            print(f"\n{' > '.join(order)}  seed {seed}: MFT {m['mft']:.2f}  MFN {m['mfn']:.2f}  BWT {m['bwt']:+.2f}"
                  f"  ({time.perf_counter() - t0:.1f} s)\n{_fmt_matrix(order, result.matrix)}", flush=True)

    summary = {k: statistics.fmean(r[k] for r in runs) for k in ("mft", "mfn", "bwt")}
    spread = order_vs_seed(mfn)
    print(f"\n{method}: mean MFT {summary['mft']:.3f}  MFN {summary['mfn']:.3f}  BWT {summary['bwt']:+.3f}   "
          f"MFN sd across orders {spread['mfn_sd_orders']:.3f} vs across seeds {spread['mfn_sd_seeds']:.3f}")
    checks = check_targets(preset, alone, summary, spread, seeds)
    for name, ok in checks.items():
        print(f"  target {name}: {'ok' if ok else 'MISSED'}")
    return {"method": method, "alone": alone, "runs": runs, **summary, **spread, "targets": checks,
            "seconds": time.perf_counter() - started}


def check_targets(preset: str, alone: dict[str, dict[str, Any]], summary: dict[str, float],
                  spread: dict[str, float], seeds: int) -> dict[str, bool]:
    t = TARGETS[preset]
    checks = {"above_chance": all(a["score"] > a["majority"] + 0.1 for a in alone.values())}
    if "alone_min" in t:
        checks[f"alone>={t['alone_min']}"] = all(a["score"] >= t["alone_min"] for a in alone.values())
    checks[f"mft>={t['mft_min']}"] = summary["mft"] >= t["mft_min"]
    if "bwt_max" in t:
        checks[f"bwt<={t['bwt_max']}"] = summary["bwt"] <= t["bwt_max"]
    if "bwt_range" in t:
        lo, hi = t["bwt_range"]
        checks[f"{lo}<=bwt<={hi}"] = lo <= summary["bwt"] <= hi
    if t.get("order_over_seed") and seeds > 1:
        checks["mfn_orders>seeds"] = spread["mfn_sd_orders"] > spread["mfn_sd_seeds"]
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke-test", action="store_true",
                   help="smoke preset, MoELoRA only, 1 seed, all 6 orders (the sweep's --smoke-test study)")
    p.add_argument("--preset", choices=("default", "smoke"), help="budgets (default: default; smoke with --smoke-test)")
    p.add_argument("--tasks", default="ScienceQA,TextVQA,ImageNet", help="comma-separated tasks (2-4)")
    p.add_argument("--methods", help="comma-separated methods, as sweeps/task_order.py --methods names them: lora, "
                                     "moelora, full, olora, ewc, lwf, each optionally +replay (default "
                                     "lora,moelora; smoke: moelora)")
    p.add_argument("--seeds", type=int, help="replicates per order (default 2; smoke: 1)")
    p.add_argument("--orders", type=int, help="first N permutations only (default: all)")
    p.add_argument("--storage-path", default="runs/calibration",
                   help="data, base, stage store (reused across calls; a changed generator gets new hashes)")
    p.add_argument("--threads", type=int,
                   help="torch threads (default: torch's choice). On a machine shared with other jobs use 1: two "
                        "threads on two busy cores made a training step ~40x slower (measured, 5.9 s vs 0.15 s)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)

    from coin_ray.studies.cli import parse_overrides

    preset = args.preset or ("smoke" if args.smoke_test else "default")
    methods = (args.methods or ("moelora" if args.smoke_test else "lora,moelora")).split(",")
    seeds = args.seeds or (1 if args.smoke_test else 2)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not 2 <= len(tasks) <= 4:
        p.error(f"--tasks needs 2 to 4 tasks (all permutations are run), got {len(tasks)}: {tasks}")
    if seeds < 1:
        p.error(f"--seeds must be >= 1, got {seeds}")
    overrides = parse_overrides(args.set)

    import ray
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    wall0, cpu0 = time.perf_counter(), _cpu_seconds()
    load0 = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        results = [calibrate(m, preset, tasks, seeds, args.orders, Path(args.storage_path).resolve(), overrides)
                   for m in methods]
    finally:
        ray.shutdown()
    wall, cpu = time.perf_counter() - wall0, _cpu_seconds() - cpu0
    print(f"\nwall {wall:.0f} s, CPU {cpu:.0f} s, load average {load0:.1f} at start / {os.getloadavg()[0]:.1f} at end "
          f"(on a loaded machine wall time overstates an idle 2-core run)")
    print(json.dumps({
        "preset": preset, "tasks": tasks, "seeds": seeds, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "methods": {r["method"]: {
            "alone": {t: round(a["score"], 3) for t, a in r["alone"].items()},
            "chance": {t: round(a["chance"], 3) for t, a in r["alone"].items()},
            "mft": round(r["mft"], 3), "mfn": round(r["mfn"], 3), "bwt": round(r["bwt"], 3),
            "mfn_sd_orders": round(r["mfn_sd_orders"], 3), "mfn_sd_seeds": round(r["mfn_sd_seeds"], 3),
            "mfn_by_order": {">".join(o): round(statistics.fmean(x["mfn"] for x in r["runs"] if tuple(x["order"]) == o), 3)
                             for o in dict.fromkeys(tuple(x["order"]) for x in r["runs"])},
            "targets": r["targets"]} for r in results},
        "all_targets_met": all(all(r["targets"].values()) for r in results)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
