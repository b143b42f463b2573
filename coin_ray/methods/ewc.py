"""EWC: a quadratic penalty that holds the trained parameters near the previous stages' optimum, weighted
by how much each parameter mattered to them (the diagonal of the Fisher information).

At the end of every stage the diagonal empirical Fisher of the trained parameters is estimated on
cl.ewc_samples of the stage's training examples, one example at a time,

    F_i = 1/N sum_n (d loss_n / d theta_i)^2        (loss_n: example n's LM loss)

and added to the Fisher carried from the earlier stages (saved as ewc_fisher.safetensors in the stage
checkpoint). The next stage adds, at every step,

    lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

with theta* the weights the stage starts from (those of the previous stage) and lambda = cl.ewc_lambda: the
accumulated penalty with the latest optimum as anchor ("online" EWC with no decay).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coin_ray.config import ExperimentConfig
from coin_ray.methods.base import Batches, Forward, options_material, trainable_snapshot

FISHER_FILE = "ewc_fisher.safetensors"


class EWC:
    name = "ewc"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.fisher: dict[str, torch.Tensor] = {}  # accumulated over the stages so far
        self.anchor: dict[str, torch.Tensor] = {}

    def tuner(self) -> tuple[str, dict[str, Any]]:
        return self.cfg.tuner.method, self.cfg.tuner.options()

    def key_material(self) -> dict[str, Any]:
        return options_material(self.cfg)

    def start_stage(self, model: torch.nn.Module, stage: int, previous: Path | None) -> None:
        self.fisher, self.anchor = {}, {}
        if previous is None:
            return
        path = previous / FISHER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: the stage checkpoint of an EWC run holds its Fisher; "
                                    "delete that stage from the store so that it is trained again")
        from safetensors.torch import load_file

        device = next(model.parameters()).device
        self.fisher = load_file(str(path), device=str(device))
        self.anchor = trainable_snapshot(model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """sum_i F_i (theta_i - theta*_i)^2 over the trained parameters (None before any stage ended)."""
        if not self.fisher:
            return None
        total = None
        for name, p in model.named_parameters():
            if name in self.fisher:
                term = (self.fisher[name] * (p - self.anchor[name]) ** 2).sum()
                total = term if total is None else total + term
        return total

    def extra_loss(self, model, batch, outputs) -> torch.Tensor | None:
        penalty = self.penalty(model)
        return None if penalty is None else self.cfg.cl.ewc_lambda / 2 * penalty

    def end_stage(self, model: torch.nn.Module, batches: Batches, forward: Forward) -> None:
        stage_fisher = estimate_fisher(model, batches, forward, self.cfg.cl.ewc_samples)
        self.fisher = {name: self.fisher.get(name, 0) + f for name, f in stage_fisher.items()}

    def save_state(self, directory: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.to("cpu").contiguous() for k, v in self.fisher.items()}, str(directory / FISHER_FILE))


def estimate_fisher(model: torch.nn.Module, batches: Batches, forward: Forward, samples: int
                    ) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the trainable parameters on up to `samples` examples (one per backward),
    averaged over the data-parallel ranks when there are several."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()
    n = 0
    for batch in batches(1):
        model.zero_grad(set_to_none=True)
        forward(batch).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
        n += 1
        if n >= samples:
            break
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if n == 0:
        raise RuntimeError("EWC: the stage has no training examples to estimate the Fisher on")
    fisher = {name: f / n for name, f in fisher.items()}
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for f in fisher.values():
            dist.all_reduce(f)
            f /= dist.get_world_size()
    return fisher
