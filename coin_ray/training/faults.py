"""Fault injection for resume tests, as a step callback of the training loop."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KillOnce:
    """Kill the worker process at `step` of `stage`, once: the marker file records that it happened, so the
    restarted worker (Ray Train's FailureConfig) runs on and must resume from the stage store."""

    marker: str
    stage: int
    step: int = 1

    def __call__(self, *, stage: int, step: int) -> None:
        if stage == self.stage and step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text("worker killed on purpose by the KillOnce step callback\n")
            os._exit(1)
