"""What a continual-learning method is to the training loop, and the plain one (sequential tuning).

A method is asked, per stage: which tuner the model is built with (`tuner`), what fixes its result besides
the tuner and the training fields (`key_material`, part of the stage-store key), to get ready for stage k
from the state the previous stage left (`start_stage`), for a loss term added to the LM loss at every step
(`extra_loss`), to finish the stage with the stage's data at hand (`end_stage`), and to write what a later
stage needs into the stage checkpoint folder (`save_state`). The loop never names a method.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from coin_ray.config import ExperimentConfig

# batches(batch_size) -> the stage's training batches on the device; forward(batch) -> model outputs under
# the run's autocast (what end_stage receives)
Batches = Callable[[int], Iterable[dict[str, torch.Tensor]]]
Forward = Callable[[dict[str, torch.Tensor]], Any]


class Method(Protocol):
    name: str

    def tuner(self) -> tuple[str, dict[str, Any]]:
        """(tuner method, options) for `apply_tuner`."""

    def key_material(self) -> dict[str, Any]:
        """What fixes this method's result besides the tuner and train fields (its options); {} for plain."""

    def start_stage(self, model: torch.nn.Module, stage: int, previous: Path | None) -> None:
        """Before stage `stage` trains; the model holds the previous stage's weights, `previous` is that
        stage's checkpoint folder (None at stage 0)."""

    def extra_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], outputs: Any
                   ) -> torch.Tensor | None:
        """The term added to this step's LM loss (already weighted), or None."""

    def end_stage(self, model: torch.nn.Module, batches: Batches, forward: Forward) -> None:
        """After the stage's last step, before it is saved."""

    def save_state(self, directory: Path) -> None:
        """Write what a later stage reads in `start_stage` into the stage checkpoint folder."""


class Sequential:
    """Plain sequential tuning (cl.method none): train each task on the tuner, nothing else."""

    name = "none"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg

    def tuner(self) -> tuple[str, dict[str, Any]]:
        return self.cfg.tuner.method, self.cfg.tuner.options()

    def key_material(self) -> dict[str, Any]:
        return {}

    def start_stage(self, model: torch.nn.Module, stage: int, previous: Path | None) -> None:
        pass

    def extra_loss(self, model, batch, outputs) -> torch.Tensor | None:
        return None

    def end_stage(self, model: torch.nn.Module, batches: Batches, forward: Forward) -> None:
        pass

    def save_state(self, directory: Path) -> None:
        pass


def options_material(cfg: ExperimentConfig) -> dict[str, Any]:
    """cl.method and the cl fields the method reads, as stage-key material."""
    return {"cl.method": cfg.cl.method, **{f"cl.{k}": v for k, v in cfg.cl.options().items()}}


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter, by name (the previous stage's optimum)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
