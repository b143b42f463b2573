"""Where the wall time of a sweep goes, first run included.

Runs `python sweeps/task_order.py --smoke-test` (or the study given after `--`) once, in a fresh storage
folder with its own sqlite MLflow store, with COIN_RAY_PROFILE set, so the driver, every trial and every
Ray Train worker record spans of their work (coin_ray/profiling.py). Prints the wall time split into phases
(driver start, data generation, preprocessing, base pretraining, data loading, trial start-up, training,
evaluation, reporting, tracking, idle) as seconds and shares, with the process-seconds each phase was busy,
then one JSON line.

    python benchmarks/sweep_profile.py                        # the smoke preset
    python benchmarks/sweep_profile.py -- --seeds 2           # extra task_order.py flags
    python benchmarks/sweep_profile.py --no-smoke             # the no-argument study
    python benchmarks/sweep_profile.py --keep DIR             # keep the storage folder and the spans

Shares: at each instant the phases running share it equally (two trials training at once count half each);
an instant inside a trial with none of its finer spans running is that trial's start-up and Ray overhead
(worker group start, model build, process imports); an instant with nothing running is idle.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-smoke", action="store_true", help="profile the no-argument study instead of --smoke-test")
    p.add_argument("--keep", metavar="DIR", help="storage folder to use and keep (default: a temporary one)")
    p.add_argument("extra", nargs="*", help="after --: more sweeps/task_order.py flags")
    args = p.parse_args()

    from coin_ray.profiling import ENV, PHASES, busy_seconds, read_spans, wall_shares

    folder = Path(args.keep or tempfile.mkdtemp(prefix="coin-ray-profile-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    spans_file = folder / "profile.jsonl"
    spans_file.unlink(missing_ok=True)
    command = [sys.executable, str(ROOT / "sweeps" / "task_order.py"), *([] if args.no_smoke else ["--smoke-test"]),
               "--storage-path", str(folder / "runs"), "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
               *args.extra]
    log = folder / "sweep.log"
    print(f"running: {' '.join(command)}\n(log: {log})", flush=True)
    started = time.time()
    with open(log, "w") as out:
        rc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
                            env={**os.environ, ENV: str(spans_file)}).returncode
    ended = time.time()
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"error: the sweep exited with {rc}; see {log}")
    spans = read_spans(str(spans_file))
    wall = ended - started
    shares = wall_shares(spans, started, ended)
    busy = busy_seconds(spans)
    print(f"\nwall time {wall:.1f} s ({len(spans)} spans)\n")
    print(f"{'phase':<18}{'wall s':>8}{'share':>8}{'busy s':>9}")
    for phase in PHASES:
        print(f"{phase:<18}{shares.get(phase, 0.0):>8.1f}{shares.get(phase, 0.0) / wall:>8.1%}"
              f"{busy.get(phase, 0.0):>9.1f}")
    parts: dict[str, list[float]] = {}
    for s in spans:
        if s["phase"] == "trial start-up":
            parts.setdefault(s.get("part", "other"), []).append(s["end"] - s["start"])
    if parts:
        print("\ntrial start-up, mean seconds per trial: " + ", ".join(
            f"{part} {sum(v) / len(v):.1f}" for part, v in parts.items()))
    stages = [s for s in spans if s["phase"] == "training"]
    trials = [s for s in spans if s["phase"] == "trial"]
    data = [s for s in spans if s["phase"] in ("data generation", "preprocessing", "base pretraining")]
    # as the sweep prints it: from the start of data generation to the end of the base pretraining
    data_ready = max(s["end"] for s in data) - min(s["start"] for s in data) if data else 0.0
    print(f"\ndata ready in {data_ready:.1f} s; {len(trials)} trials, {len(stages)} stages")
    if not args.keep:
        print(f"(spans kept in {spans_file})")
    print(json.dumps({"wall_s": round(wall, 1), "data_ready_s": round(data_ready, 1),
                      "phases_s": {k: round(shares.get(k, 0.0), 1) for k in PHASES},
                      "busy_s": {k: round(v, 1) for k, v in busy.items()},
                      "startup_parts_s": {k: round(sum(v) / len(v), 2) for k, v in parts.items()},
                      "trials": len(trials), "stages": len(stages)}))


if __name__ == "__main__":
    main()
