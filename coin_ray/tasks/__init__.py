"""The eight CoIN tasks: instruction templates, answer formats, scoring rules and task orders.

    >>> from coin_ray.tasks import get_task
    >>> task = get_task("ScienceQA")
    >>> task.score("The answer is B", "B")
    1.0

Scoring follows CoIN's eval scripts with its two bugs fixed (an empty ImageNet reply is wrong;
the Grounding parser no longer cuts a character off each end); every other deviation is named in
the docstring of the rule it touches (coin_ray/tasks/_scoring.py).
"""
from ._registry import (ALPHABETICAL_ORDER, TASK_NAMES, InvalidOrderError, UnknownTaskError,
                        get_task, validate_order)
from ._scoring import (IOU_THRESHOLD, Box, box_iou, box_problem, extract_option_letter, format_box, parse_box,
                       vqa_normalize, vqa_soft_accuracy)
from ._task import INSTRUCTION_STYLES, InstructionStyleUnavailableError, Reference, Task

__all__ = [
    "ALPHABETICAL_ORDER",
    "INSTRUCTION_STYLES",
    "IOU_THRESHOLD",
    "TASK_NAMES",
    "Box",
    "InstructionStyleUnavailableError",
    "InvalidOrderError",
    "Reference",
    "Task",
    "UnknownTaskError",
    "box_iou",
    "extract_option_letter",
    "box_problem",
    "format_box",
    "get_task",
    "parse_box",
    "validate_order",
    "vqa_normalize",
    "vqa_soft_accuracy",
]
