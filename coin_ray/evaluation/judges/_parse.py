"""Read a 0-10 rating out of an LLM judge's free-text answer.

CoIN's parser took `float(text)` and, when that failed, the first digit 1-9 it found: a judge that
wrote "10\n..." or "Score: 10" scored 1, and an answer without a digit counted as 0. This one reads
the whole number, understands "8/10", "8 out of 10", "Score: 7", number words ("ten"), decimals,
and returns None (a failure, never 0) when no rating in [0, 10] can be found.
"""
from __future__ import annotations

import re

__all__ = ["parse_judge_score"]

_WORD_VALUES = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                "eight": 8, "nine": 9, "ten": 10}
_WORDS = "|".join(_WORD_VALUES)
_NUMBER = r"-?\d+(?:\.\d+)?"
# A value, optionally followed by its scale ("8/10", "4 out of 5"); not part of a longer token
# ("v1.5", "3rd", "someone").
_SCALE = rf"(?:\s*(?:/|out\s+of)\s*(?P<scale>\d+(?:\.\d+)?|{_WORDS}))?"
_DIGIT_RATING = re.compile(rf"(?<![\w.])(?P<value>{_NUMBER}){_SCALE}(?![\w])", re.IGNORECASE)
_WORD_RATING = re.compile(rf"\b(?P<value>{_WORDS}){_SCALE}\b", re.IGNORECASE)
_KEYWORD = re.compile(r"\b(?:score|scores|scored|rating|rate|rated|grade|mark)\b", re.IGNORECASE)
_MARKUP = re.compile(r"[*`#]")
_THINKING = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)  # a reasoning model's notes


def parse_judge_score(text: str | None) -> float | None:
    """The rating on CoIN's 0-10 scale, or None when none is found or it lies outside [0, 10].

    Search order: a number after a keyword ("score", "rating", "rate", ...), else the first number
    in the text; digits win over number words at each step (so "matches one of the answers: 9"
    reads 9). A rating given on another scale ("4/5") is rescaled to 0-10. A reasoning model's
    "<think>...</think>" block is skipped.
    """
    if not isinstance(text, str):
        return None
    cleaned = _MARKUP.sub("", _THINKING.sub("", text)).strip()
    if not cleaned:
        return None
    keyword = _KEYWORD.search(cleaned)
    regions = ([cleaned[keyword.end():]] if keyword else []) + [cleaned]
    for region in regions:
        for pattern in (_DIGIT_RATING, _WORD_RATING):
            match = pattern.search(region)
            if match:
                return _rating(match.group("value"), match.group("scale"))
    return None


def _rating(value_text: str, scale_text: str | None) -> float | None:
    value = _to_number(value_text)
    if scale_text is not None:
        scale = _to_number(scale_text)
        if scale <= 0 or not 0 <= value <= scale:
            return None
        value = 10.0 * value / scale
    return value if 0.0 <= value <= 10.0 else None


def _to_number(text: str) -> float:
    word = _WORD_VALUES.get(text.lower())
    return float(word) if word is not None else float(text)
