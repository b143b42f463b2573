"""Tuning methods for the continual runs: MoELoRA (ours, CoIN's method), the peft LoRA baseline on the same
targets, and full fine-tuning of the language model; plus save/load of what they train.

    model = apply_tuner(build_model(...), "moelora", num_experts=8, rank=128, alpha=256.0)
    loss = lm_loss + (tuner_aux_loss(model) or 0)
    save_tuner(model, "stage-3/")                 # tuner_config.json + tuner_weights.safetensors
    model = load_tuner(build_model(...), "stage-3/")   # same outputs, bit for bit
"""
from coin_ray.tuners._apply import TUNER_METHODS, apply_tuner, tuner_aux_loss, tuner_parameter_counts
from coin_ray.tuners._state import (
    TUNER_CONFIG_NAME,
    TUNER_WEIGHTS_NAME,
    load_trainable_state_dict,
    load_tuner,
    save_tuner,
    trainable_state_dict,
)
from coin_ray.tuners._targets import resolve_target_modules
from coin_ray.tuners.moelora import MoELoRAConfig, MoELoRALinear, moelora_loop_forward

__all__ = [
    "TUNER_CONFIG_NAME",
    "TUNER_METHODS",
    "TUNER_WEIGHTS_NAME",
    "MoELoRAConfig",
    "MoELoRALinear",
    "apply_tuner",
    "load_trainable_state_dict",
    "load_tuner",
    "moelora_loop_forward",
    "resolve_target_modules",
    "save_tuner",
    "trainable_state_dict",
    "tuner_aux_loss",
    "tuner_parameter_counts",
]
