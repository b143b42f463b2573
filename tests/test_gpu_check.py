"""benchmarks/gpu_check.py off a GPU: the no-device message (exit 0), and --dry-run-cpu (the tiny bf16 stage on CPU
through the real loop, and the 7B-shape FLOP counts on the meta device)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the CPU behaviour, on a GPU machine too
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=SCRIPT.parent.parent)


def test_without_cuda_it_says_so_and_exits_0():
    proc = _run(timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)"


@pytest.mark.integration
def test_dry_run_cpu_exercises_the_stage_and_the_flop_count():
    proc = _run("--dry-run-cpu", timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = {d["check"]: d for d in (json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{"))}
    assert set(lines) == {"tiny_stage", "llava7b_moelora", "llava7b_lora"}
    tiny = lines["tiny_stage"]
    assert tiny["finite"] is True and tiny["stage_s"] > 0 and len(tiny["matrix"]) == 1
    moe, lora = lines["llava7b_moelora"], lines["llava7b_lora"]
    for d in (moe, lora):
        assert d["tokens_per_step"] == 8 * 2048
        assert 7.0e9 < d["total_params"] < 7.5e9 and 0 < d["trainable_params"] < d["total_params"]
        # (4 N + 2 N_trainable) T dominates: between 4 N T and 7 N T (attention, recompute) for the 7B shape
        n, t = d["total_params"], d["tokens_per_step"]
        assert 3.5 * n * t < d["model_flops"] < d["hardware_flops"] < 7 * n * t
        assert d["estimated_gib"] > 14  # at least the bf16 weights
    assert moe["trainable_params"] > lora["trainable_params"]  # the routers on top of the same rank-128 LoRA
