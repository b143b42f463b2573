"""Batched greedy decoding: left padding + attention mask + KV cache, as evaluation after every stage needs."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

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
    **image_columns: Sequence[Any],
) -> list[str]:
    """Greedy replies for prompt rows (from encode_prompt_batch), decoded without special tokens, stripped.

    `image_columns`: the family's other stored columns of the rows (Qwen2-VL: ``image_grid_thw`` and
    ``mm_token_type_ids``), so rows with different image-token counts batch together. Rows are left-padded
    so every prompt ends where generation starts; results equal per-row decoding.
    """
    from coin_ray.models.families import family_of, pad_rows

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(input_ids_list) == 0:
        return []
    if len(input_ids_list) != len(pixel_values):
        raise ValueError(f"got {len(input_ids_list)} prompts but {len(pixel_values)} images")
    family = family_of(processor)
    columns: dict[str, Sequence[Any]] = {"pixel_values": pixel_values, **image_columns}
    missing = [n for n in family.extra_columns if n not in columns]
    if missing:
        raise ValueError(f"{family.name} rows need the columns {missing} too (from encode_prompt_batch)")
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [{"input_ids": ids, **{n: columns[n][i] for n in family.token_columns}}
            for i, ids in enumerate(input_ids_list)]
    batch: Mapping[str, torch.Tensor] = {
        **pad_rows(rows, [("input_ids", pad_id), *((n, 0) for n in family.token_columns)], left=True),
        **family.collate_images({n: columns[n] for n in family.image_columns})}
    width = batch["input_ids"].shape[1]
    device = next(model.parameters()).device
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = {n: t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for n, t in batch.items()}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            **inputs,
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
