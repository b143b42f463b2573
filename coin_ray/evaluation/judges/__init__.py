"""Knowledge judges: CoIN's "general knowledge" score of a reply against its ground truth, in [0, 1].

`build_judge("llm", base_url=..., model=...)` rates with a chat model behind an OpenAI-compatible
endpoint (CoIN's prompt and 0-10 rubric, deterministic); `build_judge("embedding")` uses an
offline sentence-embedding similarity; `build_judge("none")` returns None (no judge, no cost).
"""
from __future__ import annotations

import inspect
from typing import Any

from coin_ray.evaluation.judges._base import MAX_ERRORS, Judge, JudgeResult, check_judge_inputs, strip_instruction_line
from coin_ray.evaluation.judges._embedding import EmbeddingJudge, default_embedding_model_path
from coin_ray.evaluation.judges._llm import (API_KEY_ENV_VARS, JUDGE_PROMPT, JUDGE_RUBRIC, JUDGE_SYSTEM_PROMPT,
                                             LLMJudge, build_judge_messages)
from coin_ray.evaluation.judges._parse import parse_judge_score

__all__ = [
    "API_KEY_ENV_VARS",
    "EmbeddingJudge",
    "JUDGE_KINDS",
    "JUDGE_PROMPT",
    "JUDGE_RUBRIC",
    "JUDGE_SYSTEM_PROMPT",
    "Judge",
    "JudgeResult",
    "LLMJudge",
    "MAX_ERRORS",
    "build_judge",
    "build_judge_messages",
    "check_judge_inputs",
    "default_embedding_model_path",
    "parse_judge_score",
    "strip_instruction_line",
]

_JUDGES: dict[str, type] = {"embedding": EmbeddingJudge, "llm": LLMJudge}
JUDGE_KINDS: tuple[str, ...] = ("none", *_JUDGES)


def build_judge(kind: str, **options: Any) -> Judge | None:
    """The judge named `kind` ("none", "embedding" or "llm") built from its constructor options;
    None for "none" (its options are ignored, so a config can keep them while the judge is off)."""
    if kind == "none":
        return None
    cls = _JUDGES.get(kind)
    if cls is None:
        raise ValueError(f"judge kind must be one of {JUDGE_KINDS}, got {kind!r}")
    parameters = {name: p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the {kind!r} judge: valid options are {list(parameters)}")
    required = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in options]
    if required:
        raise ValueError(f"the {kind!r} judge needs option(s) {required}: set them in eval.judge_options, "
                         "e.g. {'base_url': 'http://localhost:8000/v1', 'model': 'Qwen/Qwen1.5-32B-Chat'}")
    return cls(**options)
