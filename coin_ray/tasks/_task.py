"""The `Task` record: one CoIN task's instructions, answer format, scorer and reference field."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ._scoring import reference_box


def _question_lines(text: str) -> list[str]:
    return [line for line in text.strip("\n").split("\n") if line.strip() != "<image>"]


def strip_instruction_line(text: str) -> str:
    """The question as CoIN's judge sees it: `text` minus its last line (the instruction).

    A "<image>" line is dropped first. A one-line text is returned whole rather than emptied
    (CoIN would send an empty question to the judge; an empty question helps no judge).
    """
    lines = _question_lines(text)
    return "\n".join(lines if len(lines) <= 1 else lines[:-1])


INSTRUCTION_STYLES: tuple[str, ...] = ("original", "diverse", "10type")
"""CoIN's three instruction styles: Original (LLaVA-1.5 wording), Diverse (one task-specific
wording per task) and 10Type (ten rephrasings per task)."""

REF_PLACEHOLDER = "{ref}"
"""Where a template takes the referring expression (Grounding)."""

Reference = str | tuple[str, ...] | tuple[float, float, float, float]
Scorer = Callable[[str, Any], float]


class InstructionStyleUnavailableError(NotImplementedError):
    """A known instruction style with no templates registered for a task."""


@dataclass(frozen=True)
class Task:
    """One CoIN task.

    Build variants with `with_instructions`; the registry's tasks are shared, so never mutate one.
    """

    name: str
    answer_format: str  # "letter", "text", "class" or "box": what a reply must look like
    max_new_tokens: int  # greedy-decoding budget for one reply
    scorer: Scorer = field(repr=False, compare=False, hash=False)
    instructions: Mapping[str, tuple[str, ...]] = field(
        default_factory=dict, repr=False, compare=False, hash=False)
    reference_key: str = "answer"  # the test-record field holding the ground truth
    accepts_answer_list: bool = False  # True when a reference may be a list of human answers
    judge_sees_instruction: bool = False  # True when the judge sees the whole question (Grounding)

    def __post_init__(self) -> None:
        problems = [f"unknown style {style!r} (known: {', '.join(INSTRUCTION_STYLES)})"
                    for style in self.instructions if style not in INSTRUCTION_STYLES]
        problems += [f"style {style!r} has an empty template list"
                     for style, templates in self.instructions.items() if not templates]
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens ({self.max_new_tokens}) must be >= 1")
        if problems:
            raise ValueError(f"task {self.name!r} is misconfigured: " + "; ".join(problems))
        frozen = {style: tuple(templates) for style, templates in self.instructions.items()}
        object.__setattr__(self, "instructions", MappingProxyType(frozen))

    # -- instructions and prompts ------------------------------------------------------------
    def templates(self, style: str = "original") -> tuple[str, ...]:
        """The instruction templates registered for `style` (case-insensitive: "10Type" works)."""
        key = style.lower()
        if key not in INSTRUCTION_STYLES:
            raise ValueError(f"instruction style {style!r} is unknown: use one of "
                             f"{', '.join(INSTRUCTION_STYLES)}")
        if key not in self.instructions:
            raise InstructionStyleUnavailableError(
                f"{self.name} has no {key!r} instruction templates: coin-ray ships only CoIN's "
                f"verbatim 'original' lines (the {key!r} wordings were not verified from CoIN's "
                f"source); register yours with get_task({self.name!r}).with_instructions({key!r}, [...])")
        return self.instructions[key]

    def instruction(self, style: str = "original", variant: int = 0, *, ref: str | None = None) -> str:
        """The instruction line(s) for `style`, template number `variant`.

        Grounding's template takes the referring expression: pass it as `ref`.
        """
        templates = self.templates(style)
        if not 0 <= variant < len(templates):
            raise ValueError(f"variant ({variant}) must be in [0, {len(templates)}) for {self.name} "
                             f"style {style!r}: it has {len(templates)} template(s)")
        template = templates[variant]
        takes_ref = REF_PLACEHOLDER in template
        if takes_ref and not ref:
            raise ValueError(f"{self.name}'s instruction needs the referring expression: "
                             f"pass ref='the man in the red shirt'")
        if ref is not None and not takes_ref:
            raise ValueError(f"{self.name}'s {style!r} instruction has no place for a referring "
                             f"expression, got ref={ref!r}: drop ref")
        return template.replace(REF_PLACEHOLDER, ref) if takes_ref else template

    def format_question(self, body: str, style: str = "original", variant: int = 0,
                        *, ref: str | None = None) -> str:
        """The question text of a record: `body` + "\\n" + instruction line(s).

        An empty body gives the instruction alone (ImageNet's question and Grounding's request are
        part of their instruction). No "<image>" token: the prompt builder adds it.
        """
        instruction = self.instruction(style, variant, ref=ref)
        body = body.rstrip("\n")
        return f"{body}\n{instruction}" if body.strip() else instruction

    def question_for_judge(self, text: str) -> str:
        """The question as CoIN's knowledge judge sees it: the text minus its last line
        (the instruction). Grounding keeps the whole text, as CoIN does: its last line is the
        request with the referring expression. A one-line text is returned whole rather than
        emptied (deviation: CoIN would send an empty question). A leading "<image>" line is dropped.
        """
        if self.judge_sees_instruction:
            return "\n".join(_question_lines(text))
        return strip_instruction_line(text)

    # -- references and scoring --------------------------------------------------------------
    def reference_from_record(self, record: Mapping[str, Any]) -> Reference:
        """The ground truth of a CoIN test record, checked: `answer` (a letter, class name or
        short answer; a tuple of human answers where the task accepts a list), or for Grounding
        `answer_bbox` parsed into four floats."""
        where = f"{self.name} test record (question_id={record.get('question_id')!r})"
        if self.reference_key not in record:
            raise ValueError(f"{where} has no {self.reference_key!r} field (fields: "
                             f"{', '.join(sorted(record))}): CoIN {self.name} test files carry it")
        value = record[self.reference_key]
        if self.reference_key == "answer_bbox":
            return reference_box(value)
        if isinstance(value, str):
            return value
        if self.accepts_answer_list and isinstance(value, Sequence) and value \
                and all(isinstance(item, str) for item in value):
            return tuple(value)
        accepted = "a string or a non-empty list of strings" if self.accepts_answer_list else "a string"
        raise ValueError(f"{where}: {self.reference_key!r} must be {accepted}, got {value!r}")

    def score(self, prediction: str, reference: Reference) -> float:
        """Instruction-following score of one reply, in [0, 1] (see the task's scorer)."""
        return self.scorer(prediction, reference)

    # -- variants ----------------------------------------------------------------------------
    def with_instructions(self, style: str, templates: Sequence[str]) -> Task:
        """A copy of this task with `templates` registered for `style` (e.g. CoIN's 10Type wordings)."""
        if isinstance(templates, str):
            raise TypeError(f"templates must be a list of strings, got the string {templates!r}: "
                            f"wrap it as [{templates!r}]")
        return dataclasses.replace(self, instructions={**self.instructions, style.lower(): tuple(templates)})
