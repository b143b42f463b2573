"""TextVQA's human answers: CoIN's TextVQA test.json holds one answer per question, while TextVQA is scored
with soft VQA accuracy against the 10 answers of the TextVQA annotation file
(`{"data": [{"question_id": ..., "answers": [10 strings]}, ...]}`, e.g. TextVQA_0.5.1_val.json).
`with_textvqa_answers` puts each question's list into its record's `answer` field, so the task's reference
(and the `reference` column) is that list and `coin_ray.tasks.score_vqa` applies soft accuracy."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pipelines._records import PipelineInputError

TEXTVQA = "TextVQA"


def load_textvqa_answers(path: str | Path, setting: str = "--textvqa-annotations"
                         ) -> tuple[dict[str, list[str]], bytes]:
    """question_id (as text) -> its human answers, and the file's bytes (for the content hash). `setting`: how
    the user gave the file, for the messages (the CLI flag, or the config key data.textvqa_annotations)."""
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as e:
        raise PipelineInputError(f"{setting} {path}: cannot be read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PipelineInputError(f"{setting} {path}: not valid JSON ({e})") from None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise PipelineInputError(f"{setting} {path}: expected the TextVQA annotation file, "
                                 '{"data": [{"question_id": ..., "answers": [...]}, ...]}')
    answers: dict[str, list[str]] = {}
    for entry in entries:
        if not (isinstance(entry, dict) and "question_id" in entry and isinstance(entry.get("answers"), list)
                and all(isinstance(a, str) for a in entry["answers"])):
            raise PipelineInputError(f"{setting} {path}: entry {str(entry)[:80]} lacks question_id or "
                                     "a list of answer strings")
        answers[str(entry["question_id"])] = list(entry["answers"])
    return answers, raw


def with_textvqa_answers(records: list[Any], answers: dict[str, list[str]] | None, source: str) -> list[Any]:
    """TextVQA test records with `answer` set to their list of human answers. Without `answers`, or for a
    question the file lacks, a record keeps its single answer; a warning says so (exact match then applies)."""
    single = [r for r in records if isinstance(r, dict) and isinstance(r.get("answer"), str)]
    if answers is None:
        if single:
            print(f"[preprocess] warning: {len(single)} TextVQA test records in {source} carry one answer and no "
                  "annotation file was given: TextVQA falls back to exact match; pass --textvqa-annotations FILE "
                  "(data.textvqa_annotations) for soft VQA accuracy over the 10 human answers", file=sys.stderr)
        return records
    out, missing = [], 0
    for record in records:
        qid = str(record.get("question_id")) if isinstance(record, dict) else None
        if qid is not None and qid in answers and len(answers[qid]) > 1:
            record = {**record, "answer": answers[qid]}
        elif isinstance(record, dict) and isinstance(record.get("answer"), str):
            missing += 1
        out.append(record)
    if missing:
        print(f"[preprocess] warning: {missing} TextVQA test records of {source} have no answers in the annotation "
              "file: they are scored by exact match", file=sys.stderr)
    return out
