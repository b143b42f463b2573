"""apply_tuner: turn a base model into a trainable one with MoELoRA, peft LoRA or full fine-tuning of the LM."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from coin_ray.config import METHODS, TunerConfig
from coin_ray.tuners._targets import (
    PROJECTOR_COMPONENTS,
    is_vision_module,
    resolve_module_names,
    resolve_target_modules,
)
from coin_ray.tuners.moelora import MoELoRAConfig, MoELoRALinear, inject_moelora, moelora_aux_loss

TUNER_METHODS = METHODS
TUNER_CONFIG_ATTR = "coin_tuner_config"  # apply_tuner records its arguments here; save_tuner reads them
LORA_OPTIONS = TunerConfig.METHOD_FIELDS["lora"]


def apply_tuner(model: nn.Module, method: str, *, trainable_modules: Sequence[str] | None = None,
                **options: Any) -> nn.Module:
    """Make `model` trainable with one tuning method, in place, and return it (same object, same class).

    `options` are the method's hyper-parameters, named as the fields of `coin_ray.config.TunerConfig`
    (`TunerConfig.options()` gives exactly the ones a method reads; defaults are MoELoRAConfig's):
    - "moelora": MoELoRAConfig(**options) - num_experts, rank (total rank), alpha, dropout, target_modules,
      top_k, aux_loss_weight, init_std - on the target Linears; only `moelora_*` parameters train.
    - "lora": peft LoRA with r=rank, lora_alpha=alpha, lora_dropout=dropout on the *same* resolved targets;
      only `lora_*` parameters train.
    - "full": every parameter outside the vision tower and the projector trains; it reads no options.
    A method ignores the options only another method reads (LoRA ignores num_experts).
    For all methods everything else is frozen, and the modules named by `trainable_modules` (name suffixes)
    train fully. Default None: the multimodal projector when the model has one (so a plain causal LM works).
    Targets (`target_modules`): see resolve_target_modules. The arguments are recorded on the model for
    save_tuner.
    """
    if method not in TUNER_METHODS:
        raise ValueError(f"unknown tuner method {method!r}: use one of {', '.join(TUNER_METHODS)}")
    known = TunerConfig.METHOD_FIELDS["moelora"]  # every option of every method
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown tuner option(s) {unknown}: the options are {', '.join(known)}")
    allowed = TunerConfig.METHOD_FIELDS[method]  # a method ignores the others' options (LoRA: num_experts)
    options = {k: v for k, v in options.items() if k in allowed}
    already = [name for name, module in model.named_modules() if _is_adapter_layer(module)]
    if already:
        raise ValueError(
            f"{type(model).__name__} already has adapter layers (e.g. {already[0]}): apply_tuner to a fresh base "
            "model, or load_tuner into one"
        )
    if trainable_modules is None:
        projectors = [n for n, _ in model.named_modules() if n.split(".")[-1] in PROJECTOR_COMPONENTS]
        trainable_names = projectors
    else:
        trainable_names = resolve_module_names(model, list(trainable_modules), role="trainable_modules")

    model.requires_grad_(False)
    if method == "moelora":
        config = MoELoRAConfig(**options)
        inject_moelora(model, config)
        for name, param in model.named_parameters():
            if ".moelora_" in name:
                param.requires_grad_(True)
        recorded_options = {f: getattr(config, f) for f in allowed}
    elif method == "lora":
        defaults = MoELoRAConfig()
        recorded_options = {f: options.get(f, getattr(defaults, f)) for f in LORA_OPTIONS}
        _inject_peft_lora(model, **recorded_options)
    else:
        recorded_options = {}
        for name, param in model.named_parameters():
            if not is_vision_module(name) and not any(part in PROJECTOR_COMPONENTS for part in name.split(".")):
                param.requires_grad_(True)
    for name in trainable_names:
        model.get_submodule(name).requires_grad_(True)
    if trainable_modules is None:  # a projector part that is a bare parameter (LLaVA-OneVision's image_newline)
        for name, param in model.named_parameters():
            if name.split(".")[-1] in PROJECTOR_COMPONENTS:
                param.requires_grad_(True)

    target = recorded_options.get("target_modules")
    if target is not None and not isinstance(target, str):
        recorded_options["target_modules"] = list(target)
    setattr(model, TUNER_CONFIG_ATTR, {"method": method, **recorded_options,
                                       "trainable_modules": None if trainable_modules is None else list(trainable_modules)})
    return model


def _inject_peft_lora(
    model: nn.Module, *, rank: int, alpha: float, dropout: float, target_modules: str | Sequence[str] | None
) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve_target_modules(model, target_modules)
    # Exact full names: peft matches a list entry by equality or "." + suffix, so each hits only its own layer.
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    inject_adapter_in_model(config, model)


def _is_adapter_layer(module: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, (MoELoRALinear, BaseTunerLayer))


def tuner_parameter_counts(model: nn.Module) -> dict[str, int]:
    """{"trainable": ..., "total": ...} parameter counts (shared parameters counted once)."""
    params = list(model.parameters())
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": sum(p.numel() for p in params)}


def tuner_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """The tuner's auxiliary loss from the last forward, already weighted, to add to the LM loss; None when
    there is none (LoRA, full, or MoELoRA with aux_loss_weight=0). See moelora_aux_loss for the formula."""
    return moelora_aux_loss(model)
