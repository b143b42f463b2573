"""What every knowledge judge shares: the `Judge` protocol, `JudgeResult`, and input checks.

A judge rates how much of the ground truth's knowledge a model's reply carries, in [0, 1]. It is
CoIN's "general knowledge" axis, kept apart from the task scorers ("instruction following").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from coin_ray.tasks._task import strip_instruction_line  # re-exported: judges strip it

__all__ = ["Judge", "JudgeResult", "MAX_ERRORS", "check_judge_inputs", "strip_instruction_line"]

MAX_ERRORS = 20  # errors kept per JudgeResult; a batch of 4,000 failures would otherwise flood logs


@dataclass(frozen=True)
class JudgeResult:
    """Scores of one `Judge.score` call, aligned with its inputs.

    `scores[i]` is in [0, 1], or None when item i could not be judged (a failure: never scored 0).
    `failures` counts the None entries; `errors` describes them, at most `MAX_ERRORS` lines, the
    last one saying how many were left out.
    """

    scores: list[float | None]
    failures: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = sum(s is None for s in self.scores)
        if self.failures != missing:
            raise ValueError(f"JudgeResult.failures ({self.failures}) must equal the number of None scores "
                             f"({missing}): build results with JudgeResult.from_outcomes")
        bad = [s for s in self.scores if s is not None and not 0.0 <= s <= 1.0]
        if bad:
            raise ValueError(f"judge scores must lie in [0, 1], got {bad[:5]}: map ratings onto [0, 1] first")

    @classmethod
    def from_outcomes(cls, scores: Sequence[float | None], errors: Sequence[str]) -> JudgeResult:
        """Count the failures and cap the error list at `MAX_ERRORS` lines."""
        errors = list(errors)
        if len(errors) > MAX_ERRORS:
            errors = errors[:MAX_ERRORS - 1] + [f"... and {len(errors) - MAX_ERRORS + 1} more errors"]
        scores = list(scores)
        return cls(scores=scores, failures=sum(s is None for s in scores), errors=errors)

    @property
    def mean(self) -> float | None:
        """Mean over the judged items (failures left out), or None when nothing was judged."""
        judged = [s for s in self.scores if s is not None]
        return sum(judged) / len(judged) if judged else None


@runtime_checkable
class Judge(Protocol):
    """Rates replies against ground truths. `questions` come without their instruction line
    (see `strip_instruction_line`); all three lists are aligned and of equal length."""

    name: str

    def score(self, questions: list[str], references: list[str], replies: list[str]) -> JudgeResult:
        ...


def check_judge_inputs(questions: Sequence[str], references: Sequence[str], replies: Sequence[str]) -> None:
    """Raise when the three lists are not aligned or hold something other than strings."""
    sizes = (len(questions), len(references), len(replies))
    if len(set(sizes)) != 1:
        raise ValueError(f"questions, references and replies must have equal lengths, got {sizes}: "
                         "pass one entry per evaluated example in each list")
    for name, items in (("questions", questions), ("references", references), ("replies", replies)):
        wrong = next(((i, x) for i, x in enumerate(items) if not isinstance(x, str)), None)
        if wrong is not None:
            raise TypeError(f"{name}[{wrong[0]}] must be a str, got {type(wrong[1]).__name__} {wrong[1]!r}: "
                            "turn references into text (e.g. a box as '[x1, y1, x2, y2]') before judging")
