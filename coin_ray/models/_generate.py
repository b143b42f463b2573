"""Batched greedy decoding: left padding + attention mask + KV cache, as evaluation after every stage needs."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["generate_batch"]


@torch.no_grad()
def generate_batch(
    model: torch.nn.Module,
    processor: Any,
    input_ids_list: Sequence[Sequence[int]],
    pixel_values: Sequence[np.ndarray] | np.ndarray | torch.Tensor,
    max_new_tokens: int,
) -> list[str]:
    """Greedy replies for prompt rows (from encode_prompt_batch), decoded without special tokens, stripped.

    Rows are left-padded so every prompt ends where generation starts; results equal per-row decoding.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(input_ids_list) == 0:
        return []
    if len(input_ids_list) != len(pixel_values):
        raise ValueError(f"got {len(input_ids_list)} prompts but {len(pixel_values)} images")
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(r) for r in input_ids_list)
    ids = torch.full((len(input_ids_list), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(input_ids_list):
        n = len(row)
        ids[i, width - n:] = torch.as_tensor(np.asarray(row, dtype=np.int64))
        mask[i, width - n:] = 1
    if isinstance(pixel_values, torch.Tensor):
        pixels = pixel_values
    else:
        pixels = torch.as_tensor(np.stack([np.asarray(p, dtype=np.float32) for p in pixel_values]))
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels.to(device=device, dtype=dtype),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    finally:
        model.train(was_training)
    new_tokens = out[:, width:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
