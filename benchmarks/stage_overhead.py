"""Overhead of running a continual run's stages on Ray Train vs in-process.

The same K-stage run (tiny model, synthetic benchmark, stage cache off) with one Ray Train worker and with
num_workers=0, side by side in one process; prints a JSON line:
{"ray_s": ..., "local_s": ..., "stages": K, "overhead_s_per_stage": (ray_s - local_s) / K}. Goal <= 2 s.

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

    import ray

    from coin_ray.config import ExperimentConfig
    from coin_ray.tasks import TASK_NAMES
    from coin_ray.training import prepare_data, run_continual
    from coin_ray.training.continual import with_train_datasets

    ray.init(num_cpus=2, include_dashboard=False)
    storage = Path(tempfile.mkdtemp(prefix="coin-ray-overhead-"))
    base = ExperimentConfig.from_dict({
        "order": list(TASK_NAMES[: args.stages]), "storage_path": str(storage), "use_stage_cache": False,
        "train.max_steps": args.steps, "train.batch_size": 8, "data.train_rows": 64, "data.test_rows": 16,
        "eval.batch_size": 16, "eval.judge": "none", "model.pretrain_steps": 0})
    # train splits read into the object store once, as a sweep's driver does: both modes then time stages only
    prepared = with_train_datasets(base, prepare_data(base))
    timings = {}
    for label, workers in (("local", 0), ("ray", 1)):
        cfg = base.replace(name=f"overhead-{label}", **{"scaling.num_workers": workers})
        started = time.perf_counter()
        result = run_continual(cfg, prepared=prepared)
        timings[label] = time.perf_counter() - started
        print(f"{label}: {timings[label]:.1f} s, final row {[round(x, 3) for x in result.matrix[-1]]}", flush=True)
    ray.shutdown()
    print(json.dumps({"ray_s": round(timings["ray"], 2), "local_s": round(timings["local"], 2),
                      "stages": args.stages,
                      "overhead_s_per_stage": round((timings["ray"] - timings["local"]) / args.stages, 3)}))


if __name__ == "__main__":
    main()
