"""Overhead of running a continual run's stages on Ray Train vs in-process.

The same run (tiny model, synthetic benchmark, stage cache off) with one Ray Train worker and with
num_workers=0, side by side in one process, at 1 stage and at K stages. A Ray Train run pays a start-up once
(controller and worker processes, their imports, the process group) and an overhead per stage (the stage's
dataset stream, the report and its checkpoint); the two lengths separate them:
    overhead(n) = ray_s(n) - local_s(n);  per stage = (overhead(K) - overhead(1)) / (K - 1);
    start-up = overhead(1) - per stage.
Prints a JSON line {"ray_s", "local_s", "stages", "overhead_s_per_stage", "startup_s",
"overhead_s_per_stage_with_startup" (= overhead(K) / K)}. Target: <= 1 s per stage.

    python benchmarks/stage_overhead.py [--stages 8] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--smoke-test", action="store_true", help="K=3, 5 steps")
    args = p.parse_args()
    if args.smoke_test:
        args.stages, args.steps = 3, 5
    if args.stages < 2:
        p.error("--stages must be >= 2 (the per-stage overhead is the difference between 1 and K stages)")

    import ray

    from coin_ray.config import ExperimentConfig
    from coin_ray.tasks import TASK_NAMES
    from coin_ray.training import prepare_data, run_continual
    from coin_ray.training.continual import with_train_datasets

    ray.init(address="local", num_cpus=2)  # as a sweep starts its local Ray (coin_ray.studies.cli.init_ray)
    storage = Path(tempfile.mkdtemp(prefix="coin-ray-overhead-"))
    base = ExperimentConfig.from_dict({
        "order": list(TASK_NAMES[: args.stages]), "storage_path": str(storage), "use_stage_cache": False,
        "train.max_steps": args.steps, "train.batch_size": 8, "data.train_rows": 64, "data.test_rows": 16,
        "eval.batch_size": 16, "eval.judge": "none", "model.pretrain_steps": 0})
    # train splits read into the object store once, as a sweep's driver does: both modes then time stages only
    prepared = with_train_datasets(base, prepare_data(base))
    timings: dict[tuple[str, int], float] = {}
    for n in (1, args.stages):
        for label, workers in (("local", 0), ("ray", 1)):
            cfg = base.replace(name=f"overhead-{label}-{n}", order=list(TASK_NAMES[:n]),
                               **{"scaling.num_workers": workers})
            started = time.perf_counter()
            result = run_continual(cfg, prepared=prepared)
            timings[label, n] = time.perf_counter() - started
            print(f"{label}, {n} stages: {timings[label, n]:.1f} s, final row "
                  f"{[round(x, 3) for x in result.matrix[-1]]}", flush=True)
    ray.shutdown()
    k = args.stages
    overhead = {n: timings["ray", n] - timings["local", n] for n in (1, k)}
    per_stage = (overhead[k] - overhead[1]) / (k - 1)
    print(json.dumps({"ray_s": round(timings["ray", k], 2), "local_s": round(timings["local", k], 2), "stages": k,
                      "overhead_s_per_stage": round(per_stage, 3), "startup_s": round(overhead[1] - per_stage, 2),
                      "overhead_s_per_stage_with_startup": round(overhead[k] / k, 3)}))


if __name__ == "__main__":
    main()
