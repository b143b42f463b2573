"""Precision policy: which dtype the frozen base is held in, which dtype autocast computes in, and fp32 master
weights for everything that trains.

- ``model.dtype`` (auto | bf16 | fp16 | fp32) is the dtype the *frozen* base weights are loaded in, whatever the
  checkpoint folder holds on disk (llava-1.5-7b-hf ships float16). auto: bf16 on a CUDA device that supports it,
  fp16 on an older CUDA device, fp32 on CPU.
- ``train.precision`` (auto | bf16 | fp16 | fp32) is the autocast dtype of forward passes. auto: the base's own
  dtype when that is a half type, else bf16 on CUDA and fp32 (no autocast) on CPU. A half base under the
  *other* half type's autocast is refused: CLIP's embeddings concatenate a parameter in the base dtype with a
  convolution output in the autocast dtype, and autocast cannot promote float16 and bfloat16 together.
- Trainable parameters (adapters, routers, the projector, full fine-tuning's weights) are always float32:
  AdamW on float16 parameters turns them NaN within a step (its eps underflows). A trainable module that sits
  in a half-precision model computes in float32 and hands its output back in the activation dtype, so the
  frozen layers around it see the dtype they were loaded in, with or without autocast.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from coin_ray.config import precision_problems

__all__ = [
    "TORCH_DTYPES",
    "resolve_dtype",
    "resolve_autocast",
    "fp32_master_weights",
    "dtype_name",
]

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16" (the names config and stage keys use)."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"no precision name for {dtype}: use one of {sorted(TORCH_DTYPES)}")


def _cuda_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16. A process that sees no GPU (a sweep's driver or trial planning the
    stage keys of GPU workers) assumes the workers' GPUs do (Ampere or newer)."""
    if device.type != "cuda":
        return False
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def resolve_dtype(model_dtype: str, device: torch.device) -> torch.dtype:
    """The dtype the frozen base weights are held in on `device`."""
    if model_dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_bf16(device) else torch.float16
        return torch.float32
    return TORCH_DTYPES[model_dtype]


def resolve_autocast(precision: str, base_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of forward passes (None = no autocast, plain fp32 compute where weights are fp32)."""
    if precision == "auto":
        if base_dtype in (torch.bfloat16, torch.float16):
            return base_dtype
        if device.type == "cuda":
            return torch.bfloat16 if _cuda_bf16(device) else torch.float16
        return None
    if precision == "fp32":
        return None
    dtype = TORCH_DTYPES[precision]
    if base_dtype in (torch.bfloat16, torch.float16) and base_dtype != dtype:
        raise ValueError(precision_problems(dtype_name(base_dtype), precision)[0])
    return dtype


def _cast_inputs(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
    dtype = module.coin_master_dtype
    first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
    module.coin_activation_dtype = first.dtype if first is not None else None
    cast = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return cast, kwargs


def _cast_output(module: nn.Module, args: Any, kwargs: Any, output: Any):
    dtype = module.coin_activation_dtype
    if dtype is None or dtype == module.coin_master_dtype:
        return output
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(dtype)
    return output


def fp32_master_weights(model: nn.Module) -> int:
    """Make every trainable parameter float32, in place; returns how many modules got a dtype boundary.

    Adapter layers (MoELoRA, peft LoRA) already cast their input to their own parameters' dtype and their output
    back, so they are left as they are. Any other module that owns a trainable parameter and would now receive
    activations of another dtype (the projector over a bf16 vision tower, say) gets a forward pre-hook that casts
    its floating inputs to float32 and a forward hook that casts its output back to the input's dtype.
    """
    from coin_ray.tuners._apply import _is_adapter_layer

    adapter_parts: set[int] = set()
    for module in model.modules():
        if _is_adapter_layer(module):
            adapter_parts.update(id(m) for m in module.modules())
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    half_model = any(p.dtype in (torch.bfloat16, torch.float16) for p in model.parameters())
    hooked = 0
    if not half_model:
        return hooked
    for module in model.modules():
        if id(module) in adapter_parts or getattr(module, "coin_master_dtype", None) is not None:
            continue
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own or isinstance(module, nn.Embedding):
            continue  # an embedding reads integer ids: nothing to cast
        module.coin_master_dtype = torch.float32
        module.register_forward_pre_hook(_cast_inputs, with_kwargs=True)
        module.register_forward_hook(_cast_output, with_kwargs=True)
        hooked += 1
    return hooked
