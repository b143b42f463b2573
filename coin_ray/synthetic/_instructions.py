"""The synthetic benchmark's Diverse and 10Type instruction styles, so CoIN's instruction-style study runs on
a laptop. These wordings are this project's own (the task registry ships only CoIN's Original lines): Diverse
is one other instruction per task, 10Type ten rephrasings per task, one drawn per example. Every word is a
word of the tiny tokenizer's vocabulary (tests/test_synthetic.py checks it), so prompts stay short.
"""
from __future__ import annotations

import hashlib

from coin_ray.tasks import TASK_NAMES, Task, get_task

_SHORT10 = (
    "Answer the question using a single word or phrase.",
    "Answer with a single word or phrase.",
    "Answer using one word or phrase.",
    "Please answer with a single word.",
    "Please respond with a single word or phrase.",
    "Answer the question with one word.",
    "Answer directly with a single word or phrase.",
    "Answer this question using one word or phrase.",
    "Please provide a single word or phrase to answer the question.",
    "Answer in a single word or phrase.",
)
_IMAGENET_QUESTIONS = (
    "What is the object in the image?", "Which object is shown in the image?", "What object is in this picture?",
    "What is shown in the photo?", "Which object is in this image?", "What is the object shown in this picture?",
    "What object is shown in the image?", "What is in the image?", "Which object is in the photo?",
    "What is the object in this photo?",
)
_UNANSWERABLE = (
    "When the provided information is insufficient, respond with 'Unanswerable'.",
    "When the image is insufficient, respond with 'Unanswerable'.",
    "When the information in the image is insufficient, respond with 'Unanswerable'.",
)
_LETTER10 = (
    "Answer with the option's letter from the given choices directly.",
    "Select the correct option letter from the given choices.",
    "Choose the best option and answer with the letter.",
    "Answer with one letter from the given choices.",
    "Which option is correct? Answer with the letter.",
    "Please answer with the letter of the correct option.",
    "Select one of the given choices and answer with the letter.",
    "Answer with the letter of the best option directly.",
    "Choose one option from the given choices. Answer with the letter.",
    "What is the correct option? Answer with a single letter.",
)
_BOX10 = (
    "Please provide the bounding box coordinate of the region this sentence describes: {ref}",
    "Please provide the bounding box of the region this sentence describes: {ref}",
    "Please provide the box coordinate of the region this sentence describes: {ref}",
    "What is the bounding box of the region this sentence describes? {ref}",
    "Please provide the bounding box coordinate of the object this sentence describes: {ref}",
    "Please provide the bounding box of the object in this sentence: {ref}",
    "Please provide the bounding box coordinate of this region: {ref}",
    "Please provide the bounding box coordinate of the region: {ref}",
    "What is the bounding box coordinate of the object this sentence describes? {ref}",
    "Please provide the box of the region this sentence describes: {ref}",
)

TEN_TYPE: dict[str, tuple[str, ...]] = {
    "ScienceQA": _LETTER10,
    "TextVQA": _SHORT10,
    "ImageNet": tuple(f"{q}\n{a}" for q, a in zip(_IMAGENET_QUESTIONS, _SHORT10)),
    "GQA": _SHORT10[::-1],
    "VizWiz": tuple(f"{_UNANSWERABLE[i % 3]}\n{a}" for i, a in enumerate(_SHORT10)),
    "Grounding": _BOX10,
    "VQAv2": _SHORT10[5:] + _SHORT10[:5],
    "OCRVQA": _SHORT10[3:] + _SHORT10[:3],
}
DIVERSE: dict[str, tuple[str, ...]] = {
    "ScienceQA": ("Select the correct option letter from the given choices.",),
    "TextVQA": ("Answer with the text written in the image.",),
    "ImageNet": ("Which object is shown in this picture?\nAnswer with a single word or phrase.",),
    "GQA": ("Answer the question with a single word.",),
    "VizWiz": ("When the information in the image is insufficient, respond with 'Unanswerable'.\n"
               "Answer with one word or phrase.",),
    "Grounding": ("Please provide the bounding box of the region this sentence describes: {ref}",),
    "VQAv2": ("Please answer the question using one word or phrase.",),
    "OCRVQA": ("Answer with the words on the book cover.",),
}
STYLES: dict[str, dict[str, tuple[str, ...]]] = {"diverse": DIVERSE, "10type": TEN_TYPE}
assert all(sorted(s) == sorted(TASK_NAMES) for s in STYLES.values())


def synthetic_task(name: str, style: str) -> Task:
    """The task with the synthetic benchmark's templates of `style` registered (the registry's own for
    "original")."""
    task = get_task(name)
    return task.with_instructions(style, STYLES[style][name]) if style in STYLES else task


def variant_of(task: Task, style: str, seed: int, split: str, index: int) -> int:
    """Which of the style's templates example `index` gets: drawn per example (seeded), template 0 when the
    style has one."""
    n = len(task.templates(style))
    digest = hashlib.sha256(f"{seed}:{task.name}:{split}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n
