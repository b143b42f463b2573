"""LLaVA's vicuna_v1 chat format, image pad-to-square, and tokenisation of training/prompt rows.

The same functions serve the tiny model and a real llava-1.5 folder: image tokens are expanded by the
model's own LlavaProcessor, so their count always matches the vision tower.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

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

# vicuna_v1 as LLaVA-1.5 / CoIN use it: system + " " + "USER: <msg> ASSISTANT:" + " <answer></s>"
SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IGNORE_INDEX = -100  # label of every token the loss ignores (prompt, image tokens, padding)


def build_prompt(question: str, processor: Any = None) -> str:
    """The prompt for one image + question (CoIN's text: question + instruction line, no <image>): vicuna_v1,
    or the checkpoint's own chat template when the processor was built with prompt="checkpoint"."""
    if _uses_template(processor):
        return _chat_template(processor, question, None)
    return f"{SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"


def _uses_template(processor: Any) -> bool:
    from coin_ray.models._build import PROMPT_ATTR

    return processor is not None and getattr(processor, PROMPT_ATTR, "vicuna_v1") == "checkpoint"


def _chat_template(processor: Any, question: str, answer: str | None) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def answer_text(processor: Any, question: str, answer: str) -> tuple[str, bool]:
    """What follows the prompt in a training row, and whether </s> must be appended: vicuna_v1's answer
    (then </s>), or what the chat template writes after the generation prompt (its own end-of-turn marker)."""
    if not _uses_template(processor):
        return answer, True
    prompt = _chat_template(processor, question, None)
    full = _chat_template(processor, question, answer)
    if not full.startswith(prompt):
        raise ValueError("the checkpoint's chat template does not write the assistant turn after its generation "
                         "prompt, so the answer cannot be labelled alone: use model.prompt vicuna_v1")
    return full[len(prompt):], False


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
                    ) -> tuple[list[list[int]], list[np.ndarray]]:
    if len(questions) != len(images):
        raise ValueError(f"got {len(questions)} questions but {len(images)} images: one image per question")
    background = image_background(processor)
    squares = [expand_to_square(im, background) for im in images]
    prompts = [build_prompt(q, processor) for q in questions]
    out = processor(text=prompts, images=squares)
    ids = [list(map(int, row)) for row in out["input_ids"]]
    pixels = [np.asarray(p, dtype=np.float32) for p in out["pixel_values"]]
    return ids, pixels


def encode_prompt_batch(processor: Any, questions: Sequence[str], images: Sequence[Image.Image]) -> dict[str, list]:
    """Prompt-only rows for generation: ``input_ids`` (np.int32, <s> + prompt with expanded image tokens)
    and ``pixel_values`` (np.float32 [3, H, W], after pad-to-square)."""
    ids, pixels = _encode_prompts(processor, questions, images)
    return {"input_ids": [np.asarray(r, dtype=np.int32) for r in ids], "pixel_values": pixels}


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
    image token), ``pixel_values`` (np.float32 [3, H, W]), ``truncated`` (answer was cut to fit) and ``valid``.
    A row longer than max_length loses answer tokens from its end; image tokens are never cut. A row whose
    prompt alone leaves no room for one answer token raises ValueError (on_overflow="raise") or comes back
    with valid=False and all labels IGNORE_INDEX (on_overflow="flag", so a pipeline can filter it).
    """
    if on_overflow not in ("raise", "flag"):
        raise ValueError(f"on_overflow must be 'raise' or 'flag', got {on_overflow!r}")
    if len(answers) != len(questions):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers: one answer per question")
    tokenizer = processor.tokenizer
    prompt_ids, pixels = _encode_prompts(processor, questions, images)
    texts = [answer_text(processor, q, a) for q, a in zip(questions, answers)]
    answer_ids = tokenizer([t for t, _ in texts], add_special_tokens=False)["input_ids"]
    cols: dict[str, list] = {"input_ids": [], "labels": [], "pixel_values": pixels, "truncated": [], "valid": []}
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
    labelled IGNORE_INDEX) and ``pixel_values`` [B, 3, H, W]."""
    rows = _rows(rows)
    if not rows:
        raise ValueError("collate_train got an empty batch")
    width = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(r["input_ids"], dtype=np.int64))
        labels[i, :n] = torch.as_tensor(np.asarray(r["labels"], dtype=np.int64))
        mask[i, :n] = 1
    pixel_values = torch.as_tensor(np.stack([np.asarray(r["pixel_values"], dtype=np.float32) for r in rows]))
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "pixel_values": pixel_values}
