"""Tokenisation of training/prompt rows for every backbone family, and LLaVA's image pad-to-square.

The same functions serve the tiny model and real checkpoint folders: the prompt text comes from the
processor's family (coin_ray.models.families), and image tokens are expanded by the model's own processor,
so their count always matches the vision tower.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from coin_ray.models.families import Family, family_for_columns, family_of, pad_rows
from coin_ray.models.families.llava import LLAVA, SYSTEM_PROMPT

__all__ = [
    "SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "build_prompt",
    "expand_to_square",
    "image_background",
    "encode_train_batch",
    "encode_prompt_batch",
    "collate_train",
]

IGNORE_INDEX = -100  # label of every token the loss ignores (prompt, image tokens, padding)


def build_prompt(question: str, processor: Any = None) -> str:
    """The prompt for one image + question (CoIN's text: question + instruction line, no <image>): vicuna_v1,
    or the checkpoint's own chat template when the processor was built with prompt="checkpoint" (the only
    prompt of some families)."""
    return _family(processor).prompt(processor, question, _uses_template(processor))


def _family(processor: Any) -> Family:
    return LLAVA if processor is None else family_of(processor)


def _uses_template(processor: Any) -> bool:
    from coin_ray.models._build import PROMPT_ATTR

    if processor is None:
        return False
    return getattr(processor, PROMPT_ATTR, _family(processor).prompts[0]) == "checkpoint"


def answer_text(processor: Any, question: str, answer: str) -> tuple[str, bool]:
    """What follows the prompt in a training row, and whether </s> must be appended: vicuna_v1's answer
    (then </s>), or what the chat template writes after the generation prompt (its own end-of-turn marker)."""
    return _family(processor).answer(processor, question, answer, _uses_template(processor))


def image_background(processor: Any) -> tuple[int, int, int]:
    """LLaVA's padding colour: the image processor's mean, in 0-255 RGB."""
    mean = getattr(processor, "image_processor", processor).image_mean
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]


def expand_to_square(image: Image.Image, background: tuple[int, int, int] | int) -> Image.Image:
    """LLaVA's expand2square: pad to a square of side max(w, h), original centred (as CoIN's boxes assume)."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    fill = (background,) * 3 if isinstance(background, int) else tuple(background)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _encode_prompts(processor: Any, questions: Sequence[str], images: Sequence[Image.Image]
                    ) -> tuple[list[list[int]], dict[str, list[np.ndarray]]]:
    """Prompt token ids per row, and the family's per-row image and per-token columns."""
    if len(questions) != len(images):
        raise ValueError(f"got {len(questions)} questions but {len(images)} images: one image per question")
    family = _family(processor)
    prepared = [family.prepare_image(processor, im) for im in images]
    prompts = [build_prompt(q, processor) for q in questions]
    out = processor(text=prompts, images=prepared)
    ids = [list(map(int, row)) for row in out["input_ids"]]
    columns = family.image_rows(out, len(ids), processor)
    for name in family.token_columns:
        columns[name] = [np.asarray(row, dtype=np.int8) for row in out[name]]
    return ids, columns


def encode_prompt_batch(processor: Any, questions: Sequence[str], images: Sequence[Image.Image]) -> dict[str, list]:
    """Prompt-only rows for generation: ``input_ids`` (np.int32, the prompt with expanded image tokens) and
    the family's image columns (LLaVA: ``pixel_values`` np.float32 [3, H, W] after pad-to-square; Qwen2-VL:
    flattened patches, ``image_grid_thw`` and ``mm_token_type_ids``)."""
    ids, columns = _encode_prompts(processor, questions, images)
    return {"input_ids": [np.asarray(r, dtype=np.int32) for r in ids], **columns}


def encode_train_batch(
    processor: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    images: Sequence[Image.Image],
    max_length: int,
    *,
    on_overflow: str = "raise",
) -> dict[str, list]:
    """Training rows: prompt + " {answer}</s>", loss only on the answer tokens and </s>.

    Returns columns ``input_ids`` and ``labels`` (np.int32, same length; IGNORE_INDEX on every prompt and
    image token), the family's image columns (see encode_prompt_batch; a per-token column has the row's
    length), ``truncated`` (answer was cut to fit) and ``valid``.
    A row longer than max_length loses answer tokens from its end; image tokens are never cut. A row whose
    prompt alone leaves no room for one answer token raises ValueError (on_overflow="raise") or comes back
    with valid=False and all labels IGNORE_INDEX (on_overflow="flag", so a pipeline can filter it).
    """
    if on_overflow not in ("raise", "flag"):
        raise ValueError(f"on_overflow must be 'raise' or 'flag', got {on_overflow!r}")
    if len(answers) != len(questions):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers: one answer per question")
    tokenizer = processor.tokenizer
    prompt_ids, image_cols = _encode_prompts(processor, questions, images)
    token_names = _family(processor).token_columns
    texts = [answer_text(processor, q, a) for q, a in zip(questions, answers)]
    answer_ids = tokenizer([t for t, _ in texts], add_special_tokens=False)["input_ids"]
    cols: dict[str, list] = {"input_ids": [], "labels": [], **{k: v for k, v in image_cols.items()
                                                              if k not in token_names},
                             "truncated": [], "valid": []}
    for name in token_names:  # answer tokens are text (0)
        cols[name] = []
    for i, (prompt, answer) in enumerate(zip(prompt_ids, answer_ids)):
        target = list(answer) + ([tokenizer.eos_token_id] if texts[i][1] else [])
        room = max_length - len(prompt)
        valid = room >= 1
        if not valid and on_overflow == "raise":
            raise ValueError(
                f"row {i}: the prompt alone is {len(prompt)} tokens (image tokens included) but max_length is "
                f"{max_length}: raise max_length above {len(prompt)}, shorten the question, or pass "
                "on_overflow='flag' to mark such rows invalid instead")
        kept = target[:max(room, 0)]
        ids = (prompt + kept) if valid else prompt[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + kept) if valid else [IGNORE_INDEX] * len(ids)
        for name in token_names:
            prompt_part = list(image_cols[name][i])
            cols[name].append(np.asarray((prompt_part + [0] * len(kept))[:len(ids)], dtype=np.int8))
        cols["input_ids"].append(np.asarray(ids, dtype=np.int32))
        cols["labels"].append(np.asarray(labels, dtype=np.int32))
        cols["truncated"].append(len(kept) < len(target))
        cols["valid"].append(valid)
    return cols


def _rows(batch: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]) -> list[Mapping[str, Any]]:
    if isinstance(batch, Mapping):  # columns (e.g. a Ray Data numpy batch) -> rows
        n = len(batch["input_ids"])
        return [{k: batch[k][i] for k in batch} for i in range(n)]
    return list(batch)


def collate_train(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """Right-pad rows (or a dict of columns) into ``input_ids``, ``attention_mask``, ``labels`` (padding
    labelled IGNORE_INDEX) and the family's model inputs for the image (LLaVA: ``pixel_values`` [B, 3, H, W];
    Qwen2-VL: every row's patches concatenated, ``image_grid_thw`` [B, 3], ``mm_token_type_ids``)."""
    rows = _rows(rows)
    if not rows:
        raise ValueError("collate_train got an empty batch")
    family = family_for_columns(list(rows[0]))
    out = pad_rows(rows, [("input_ids", pad_id), ("labels", IGNORE_INDEX), *((n, 0) for n in family.token_columns)],
                   left=False)
    out.update(family.collate_images({name: [r[name] for r in rows] for name in family.image_columns}))
    return out
