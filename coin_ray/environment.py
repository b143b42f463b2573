"""The environment a result came from: library versions, the code's version (and git commit), the device.

Reruns of one method on other hardware or library versions differ by points in multimodal continual
learning; these values go on every trial run and the sweep run as MLflow tags ``coin_ray.env.<name>`` so a
reader can tell environment from effect (`coin_ray.studies.lifecycle` says when a sweep's trials differ).
"""
from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ENV_TAG_PREFIX", "environment", "environment_tags", "environments_line"]

ENV_TAG_PREFIX = "coin_ray.env."
_PACKAGES = ("torch", "transformers", "peft", "ray")


@functools.cache
def _code_version() -> str:
    """coin_ray's version, plus the git commit when the code is a checkout ("+dirty" with local changes)."""
    import coin_ray

    version = coin_ray.__version__
    root = Path(coin_ray.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return version
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version} ({commit}{'+dirty' if dirty else ''})" if commit else version


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def environment(device: Any = "cpu", workers: int = 1) -> dict[str, str]:
    """{python, torch, transformers, peft, ray, coin_ray, device[, cuda]} of this process; `device` is the
    torch device the run trains on and `workers` how many workers hold one like it (device "cpu", or e.g.
    "NVIDIA H100 80GB HBM3 x 8")."""
    import torch

    env = {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}, "coin_ray": _code_version()}
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        env["device"] = f"{torch.cuda.get_device_name(device)} x {max(1, workers)}"
        env["cuda"] = str(torch.version.cuda)
    else:
        env["device"] = "cpu"
    return env


def environment_tags(env: Mapping[str, str]) -> dict[str, str]:
    """The MLflow tags of an environment: coin_ray.env.<name>."""
    return {ENV_TAG_PREFIX + k: str(v) for k, v in env.items()}


def environments_line(envs: Sequence[Mapping[str, str] | None]) -> str | None:
    """One line when the given trials' environments differ (what differs, and how many trials had each value),
    else None."""
    known = [dict(e) for e in envs if e]
    if len({tuple(sorted(e.items())) for e in known}) <= 1:
        return None
    keys = sorted({k for e in known for k in e if len({e.get(k) for e in known}) > 1})
    parts = []
    for k in keys:
        counts: dict[str, int] = {}
        for e in known:
            value = str(e.get(k, "none"))
            counts[value] = counts.get(value, 0) + 1
        parts.append(f"{k} " + " / ".join(f"{v} ({n})" for v, n in sorted(counts.items())))
    return (f"environment: the trials ran in {len({tuple(sorted(e.items())) for e in known})} environments "
            f"({'; '.join(parts)}): compare results across them with care")
