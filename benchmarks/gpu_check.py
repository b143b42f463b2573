"""GPU check: two short stages of the tiny model on CUDA with bf16 through Ray Train; prints throughput.

    python benchmarks/gpu_check.py            # needs a CUDA GPU; exits 2 with a message without one
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible to torch; run this on a GPU machine", file=sys.stderr)
        return 2
    import ray

    from coin_ray.config import ExperimentConfig
    from coin_ray.training import prepare_data, run_continual

    ray.init(include_dashboard=False, log_to_driver=False)
    storage = Path(tempfile.mkdtemp(prefix="coin-ray-gpu-"))
    steps, batch = 100, 32
    cfg = ExperimentConfig.from_dict({
        "order": ["ScienceQA", "ImageNet"], "storage_path": str(storage), "use_stage_cache": False,
        "train.max_steps": steps, "train.batch_size": batch, "train.precision": "bf16",
        "scaling.num_workers": 1, "scaling.use_gpu": True, "scaling.gpus_per_worker": 1, "name": "gpu-check"})
    prepared = prepare_data(cfg)
    started = time.perf_counter()
    result = run_continual(cfg, prepared=prepared)
    seconds = time.perf_counter() - started
    print(json.dumps({"device": torch.cuda.get_device_name(0), "stages": 2, "seconds": round(seconds, 2),
                      "train_examples_per_s": round(2 * steps * batch / seconds, 1), "matrix": result.matrix,
                      "metrics": result.metrics}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
