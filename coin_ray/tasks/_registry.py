"""The eight CoIN tasks, the two task orders CoIN studied, and name lookup / order validation."""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from coin_ray.errors import UserError

from ._scoring import (score_box, score_class_name, score_gqa, score_ocrvqa, score_option_letter,
                       score_vqa)
from ._task import REF_PLACEHOLDER, Task

TASK_NAMES: tuple[str, ...] = (
    "ScienceQA", "TextVQA", "ImageNet", "GQA", "VizWiz", "Grounding", "VQAv2", "OCRVQA",
)
"""CoIN's default training order."""

ALPHABETICAL_ORDER: tuple[str, ...] = (
    "GQA", "ImageNet", "OCRVQA", "Grounding", "ScienceQA", "TextVQA", "VizWiz", "VQAv2",
)
"""The second order CoIN studied (its paper's "alphabetical" order, listed as CoIN lists it)."""

_SHORT_ANSWER = "Answer the question using a single word or phrase."

# Budgets: a letter plus EOS fits in 4 tokens; short answers and ImageNet class names
# ("Chesapeake Bay retriever") in 16; a box "[0.123, 0.456, 0.789, 0.912]" is ~30 Llama tokens
# (digits are single tokens), so 40 leaves room for EOS and stray spaces.
_TASKS: tuple[Task, ...] = (
    Task("ScienceQA", "letter", 4, score_option_letter,
         {"original": ("Answer with the option's letter from the given choices directly.",)}),
    Task("TextVQA", "text", 16, score_vqa, {"original": (_SHORT_ANSWER,)},
         accepts_answer_list=True),
    Task("ImageNet", "class", 16, score_class_name,
         {"original": (f"What is the object in the image?\n{_SHORT_ANSWER}",)}),
    Task("GQA", "text", 16, score_gqa, {"original": (_SHORT_ANSWER,)}),
    Task("VizWiz", "text", 16, score_vqa,
         {"original": ("When the provided information is insufficient, respond with 'Unanswerable'.\n"
                       + _SHORT_ANSWER,)},
         accepts_answer_list=True),
    Task("Grounding", "box", 40, score_box,
         {"original": ("Please provide the bounding box coordinate of the region this sentence "
                       f"describes: {REF_PLACEHOLDER}",)},
         reference_key="answer_bbox", judge_sees_instruction=True),
    Task("VQAv2", "text", 16, score_vqa, {"original": (_SHORT_ANSWER,)}, accepts_answer_list=True),
    Task("OCRVQA", "text", 16, score_ocrvqa, {"original": (_SHORT_ANSWER,)}),
)
_BY_NAME: dict[str, Task] = {task.name: task for task in _TASKS}
_BY_LOWER_NAME: dict[str, Task] = {task.name.lower(): task for task in _TASKS}
assert tuple(_BY_NAME) == TASK_NAMES and sorted(ALPHABETICAL_ORDER) == sorted(TASK_NAMES)


class UnknownTaskError(UserError):
    """A task name that is not one of the eight CoIN tasks."""


class InvalidOrderError(UserError):
    """A task order with unknown or repeated tasks: the message lists every problem, `problems` holds them
    one by one (`ExperimentConfig` reports them beside its other problems)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


def _lookup(name: str) -> Task | None:
    return _BY_NAME.get(name) or _BY_LOWER_NAME.get(name.lower())


def get_task(name: str) -> Task:
    """The CoIN task called `name`. Matching ignores case ("scienceqa" -> ScienceQA), so names
    typed on a command line work; the returned task always carries the canonical spelling."""
    task = _lookup(name) if isinstance(name, str) else None
    if task is None:
        raise UnknownTaskError(f"unknown task {name!r}: use one of {', '.join(TASK_NAMES)}")
    return task


def validate_order(names: Sequence[str]) -> tuple[str, ...]:
    """Check a task order and return it in canonical spelling.

    Every problem is reported in one `InvalidOrderError`: an empty order, unknown names, and tasks
    named twice (compared after case folding, so "GQA" and "gqa" are a repeat). This is the one check of a
    task order: the config, the designs and the sweep scripts all call it.
    """
    if isinstance(names, str):
        raise InvalidOrderError(f"a task order must be a list of task names, got the string {names!r}: "
                                f"use [{names!r}] or split it, e.g. {names!r}.split(',')")
    names = list(names)
    if not names:
        raise InvalidOrderError(f"a task order must name at least one task: choose from {', '.join(TASK_NAMES)}")
    problems = []
    unknown = [name for name in names if not isinstance(name, str) or _lookup(name) is None]
    if unknown:
        problems.append(f"unknown task(s) {unknown!r} (valid: {', '.join(TASK_NAMES)}; case is ignored)")
    canonical = [task.name for name in names if isinstance(name, str) and (task := _lookup(name))]
    repeats = [name for name, count in Counter(canonical).items() if count > 1]
    if repeats:
        problems.append(f"task(s) named more than once: {', '.join(repeats)} (each task is trained once per order)")
    if problems:
        raise InvalidOrderError(f"invalid task order {names!r}: " + "; ".join(problems), problems)
    return tuple(canonical)
