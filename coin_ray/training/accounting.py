"""What a stage cost, measured where it runs: examples and tokens trained, answers generated, wall time, peak
memory and device-hours. The training part is kept in the stage-store entry's meta.json (`accounting`), the
evaluation part in each evaluation cell (`seconds`), so a later run that reuses the stage knows what it saved and
a plan can estimate from measured throughput. Metric names are a contract (README, "What a study costs")."""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

STAGE_METRICS = ("stage/train_examples", "stage/train_tokens", "stage/train_tokens_per_s", "stage/eval_answers",
                 "stage/eval_answers_per_s", "stage/peak_memory_gb", "stage/device_hours")
ACCOUNTING_KEY = "accounting"  # the meta.json entry
GIB = 2**30


def devices_of(cfg: Any) -> float:
    """Devices a run holds: workers x GPUs per worker, or one per worker on CPU (in-process: one)."""
    s = cfg.scaling
    return max(s.num_workers, 1) * (s.gpus_per_worker if s.use_gpu else 1)


def device_kind(device: torch.device) -> str:
    """"cpu", or the GPU's name (e.g. "NVIDIA H100 80GB HBM3"): what throughput is comparable across."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return device.type


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """The largest CUDA memory allocated on `device` since the last reset; on CPU this process's peak resident
    memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / GIB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / GIB if sys.platform == "darwin" else rss * 1024 / GIB


@dataclass
class StageCost:
    """One stage's cost on this run. A reused stage trained nothing here: `saved_device_hours` is what its
    training and the evaluation cells read from the store cost when they were computed."""

    devices: float
    device_kind: str
    reused: bool = False
    train_examples: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    eval_answers: int = 0  # answers generated here (cells read from the store count as saved)
    eval_seconds: float = 0.0
    peak_memory_gb: float = 0.0
    saved_device_hours: float = 0.0

    @property
    def device_hours(self) -> float:
        """Wall time x devices of what ran here: training (0 when reused) and fresh evaluation cells."""
        return (self.train_seconds + self.eval_seconds) * self.devices / 3600

    def metrics(self) -> dict[str, float]:
        """The `stage/*` metrics (step = stage index)."""
        return {"stage/train_examples": float(self.train_examples), "stage/train_tokens": float(self.train_tokens),
                "stage/train_tokens_per_s": _rate(self.train_tokens, self.train_seconds),
                "stage/eval_answers": float(self.eval_answers),
                "stage/eval_answers_per_s": _rate(self.eval_answers, self.eval_seconds),
                "stage/peak_memory_gb": self.peak_memory_gb, "stage/device_hours": self.device_hours}

    def stored(self) -> dict[str, Any]:
        """What the stage-store entry keeps of a trained stage (its training; evaluation cells keep their own)."""
        return {"train_examples": self.train_examples, "train_tokens": self.train_tokens,
                "train_seconds": self.train_seconds,
                "train_tokens_per_s": _rate(self.train_tokens, self.train_seconds),
                "peak_memory_gb": self.peak_memory_gb, "device_kind": self.device_kind, "devices": self.devices,
                "device_hours": self.train_seconds * self.devices / 3600}


def stored_device_hours(meta: dict[str, Any]) -> float:
    """The training device-hours an entry's meta.json records (0 for an entry written before accounting)."""
    value = (meta.get(ACCOUNTING_KEY) or {}).get("device_hours", 0.0)
    return float(value) if isinstance(value, (int, float)) else 0.0


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def reduce_counts(env: Any, examples: int, tokens: int, peak_gb: float) -> tuple[int, int, float]:
    """Sum examples and tokens over the ranks, and the largest peak memory of any rank (every rank calls this)."""
    if env.world <= 1:
        return examples, tokens, peak_gb
    import torch.distributed as dist

    counts = torch.tensor([examples, tokens], dtype=torch.float64)
    peak = torch.tensor([peak_gb], dtype=torch.float64)
    dist.all_reduce(counts, group=env.control_group)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=env.control_group)
    return int(counts[0]), int(counts[1]), float(peak[0])
