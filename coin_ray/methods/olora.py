"""O-LoRA: a new LoRA per task, the earlier tasks' LoRAs frozen, and a loss that keeps the new one's
subspace orthogonal to theirs.

The model carries one peft LoRA of rank r x T (T tasks in the order) whose rank blocks are the per-task
LoRAs: task k trains rows k*r:(k+1)*r of every A and the same columns of every B, the other blocks get no
gradient (earlier ones keep their values; later ones keep B = 0, so they add nothing). alpha is scaled by T
too, so each block has the scale alpha / r of a rank-r LoRA, and the model's update is the sum of the
per-task updates. All blocks live in the adapter weights of the stage checkpoint, so resume and the stage
cache need no other state. The loss added at stage k is

    lambda_1 * sum over adapted layers of sum |A_k A_j^T| (j < k)  +  lambda_2 * sum (||A_k|| + ||B_k||)

(cl.olora_lambda_orth, default 0.5; cl.olora_lambda_l2, default 0). Parameters outside the LoRA (the
projector) keep training in every stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from coin_ray.config import ExperimentConfig
from coin_ray.methods.base import Batches, Forward, options_material

ADAPTER = "default"  # peft's adapter name (inject_adapter_in_model)


def lora_layers(model: torch.nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


class OLoRA:
    name = "olora"

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.tasks = len(cfg.order)
        self.rank = cfg.tuner.rank  # per task
        self.slot = 0
        self._hooks: list[Any] = []

    def tuner(self) -> tuple[str, dict[str, Any]]:
        options = dict(self.cfg.tuner.options())
        options.update(rank=self.rank * self.tasks, alpha=self.cfg.tuner.alpha * self.tasks)
        return "lora", options

    def key_material(self) -> dict[str, Any]:
        return {**options_material(self.cfg), "olora.tasks": self.tasks}

    def block(self, stage: int) -> slice:
        return slice(stage * self.rank, (stage + 1) * self.rank)

    def start_stage(self, model: torch.nn.Module, stage: int, previous: Path | None) -> None:
        if stage >= self.tasks:
            raise ValueError(f"O-LoRA was built for {self.tasks} tasks, asked to train stage {stage}")
        for handle in self._hooks:
            handle.remove()
        self.slot = stage
        self._hooks = []
        for layer in lora_layers(model):
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            mask_a, mask_b = torch.zeros_like(a), torch.zeros_like(b)
            mask_a[self.block(stage)] = 1
            mask_b[:, self.block(stage)] = 1
            self._hooks += [a.register_hook(lambda g, m=mask_a: g * m), b.register_hook(lambda g, m=mask_b: g * m)]

    def orthogonality(self, model: torch.nn.Module) -> torch.Tensor:
        """sum over layers of sum |A_k A_j^T| over the earlier blocks j < k (0 at the first stage)."""
        total = None
        k = self.block(self.slot)
        for layer in lora_layers(model):
            a = layer.lora_A[ADAPTER].weight
            if k.start == 0:
                continue
            term = (a[k] @ a[: k.start].detach().T).abs().sum()
            total = term if total is None else total + term
        return total if total is not None else torch.zeros(())

    def l2(self, model: torch.nn.Module) -> torch.Tensor:
        k = self.block(self.slot)
        return sum(layer.lora_A[ADAPTER].weight[k].norm() + layer.lora_B[ADAPTER].weight[:, k].norm()
                   for layer in lora_layers(model))

    def extra_loss(self, model, batch, outputs) -> torch.Tensor | None:
        o = self.cfg.cl
        terms = []
        if o.olora_lambda_orth > 0 and self.slot > 0:
            terms.append(o.olora_lambda_orth * self.orthogonality(model))
        if o.olora_lambda_l2 > 0:
            terms.append(o.olora_lambda_l2 * self.l2(model))
        return sum(terms) if terms else None

    def end_stage(self, model: torch.nn.Module, batches: Batches, forward: Forward) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def save_state(self, directory: Path) -> None:
        pass  # every block is in the adapter weights
