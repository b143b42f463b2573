"""Inject MoELoRA layers into a model in place, find them again, and collect their load-balancing loss."""
from __future__ import annotations

import torch
from torch import nn

from coin_ray.tuners._targets import resolve_target_modules
from coin_ray.tuners.moelora.config import MoELoRAConfig
from coin_ray.tuners.moelora.layer import MoELoRALinear

ADAPTER_PREFIX = "moelora_"


def inject_moelora(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Replace every target nn.Linear of `model` by a MoELoRALinear wrapping it; returns the adapted names.

    The model keeps its class (a LlavaForConditionalGeneration stays one, so `generate` works unchanged); the
    wrapped Linear moves to `<name>.base_layer`, as in peft. Freezing is the caller's job (see apply_tuner).
    """
    names = resolve_target_modules(model, config.target_modules)
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = MoELoRALinear(
            getattr(parent, child_name),
            num_experts=config.num_experts,
            rank=config.rank,
            alpha=config.alpha,
            dropout=config.dropout,
            top_k=config.top_k,
            aux_loss_weight=config.aux_loss_weight,
            init_std=config.init_std,
        )
        setattr(parent, child_name, layer)
    return names


def moelora_layers(model: nn.Module) -> list[tuple[str, MoELoRALinear]]:
    """(name, layer) of every MoELoRA layer in `model`, in model order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoELoRALinear)]


def moelora_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """aux_loss_weight * mean over layers of each router's load-balancing loss from the last forward (formula in
    MoELoRARouter); None when the loss is off or no forward ran yet. Ready to add to the LM loss.

    The mean (not Switch's sum over layers) keeps one weight meaningful across model depths.
    """
    terms = [
        layer.moelora_router.aux_loss_weight * layer.moelora_router.last_aux_loss
        for _, layer in moelora_layers(model)
        if layer.moelora_router.last_aux_loss is not None
    ]
    return torch.stack(terms).mean() if terms else None
