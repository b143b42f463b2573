"""LwF: learning without forgetting - distil the previous stage's model into the current one on the current
task's data.

From the second stage on, the previous stage's model (the weights the stage starts from, kept as a copy of
the trained parameters; the frozen base is shared) gives teacher logits for every batch, and the step adds

    w * T^2 * KL(softmax(z_teacher / T) || softmax(z / T))

averaged over the answer tokens (where the labels are not ignored), with w = cl.lwf_weight and
T = cl.lwf_temperature. The teacher runs in eval mode (no dropout) and without gradients.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from coin_ray.config import ExperimentConfig
from coin_ray.methods.base import Batches, Forward, options_material, trainable_snapshot

IGNORE_INDEX = -100


class LwF:
    name = "lwf"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.teacher: dict[str, torch.Tensor] | None = None

    def tuner(self) -> tuple[str, dict[str, Any]]:
        return self.cfg.tuner.method, self.cfg.tuner.options()

    def key_material(self) -> dict[str, Any]:
        return options_material(self.cfg)

    def start_stage(self, model: torch.nn.Module, stage: int, previous: Path | None) -> None:
        # the previous stage's model is the one the model holds now (the stored weights of that stage)
        self.teacher = trainable_snapshot(model) if stage > 0 else None

    def teacher_logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return torch.func.functional_call(model, self.teacher, args=(), kwargs=inputs).logits
        finally:
            model.train(was_training)

    def extra_loss(self, model, batch, outputs) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        o = self.cfg.cl
        return o.lwf_weight * distillation(outputs.logits, self.teacher_logits(model, batch), batch["labels"],
                                           o.lwf_temperature)

    def end_stage(self, model: torch.nn.Module, batches: Batches, forward: Forward) -> None:
        self.teacher = None

    def save_state(self, directory: Path) -> None:
        pass  # the teacher of the next stage is this stage's stored weights


def distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
                 ) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the positions that predict an
    answer token (logits at t predict the token at t + 1)."""
    if student.shape[:2] != labels.shape[:2]:
        raise ValueError(f"LwF needs one logit row per label, got logits {tuple(student.shape)} and labels "
                         f"{tuple(labels.shape)}")
    mask = labels[:, 1:] != IGNORE_INDEX
    s = student[:, :-1][mask].float() / temperature
    t = teacher[:, :-1][mask].float() / temperature
    if s.shape[0] == 0:
        return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2
