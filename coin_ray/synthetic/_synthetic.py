"""Write the built-in synthetic benchmark in CoIN's own on-disk layout.

    <root>/Instructions/<Task>/train.json   LLaVA conversation records
    <root>/Instructions/<Task>/test.json    {question_id, image, text, answer | answer_bbox + size}
    <root>/images/<Task>/<split>/<id>.png   image files; JSON paths are relative to <root>/images
    <root>/synthetic.json                   generator version + options (what produced this folder)

Everything downstream reads it with the same code as real CoIN data. Question text is the task
registry's own: ``get_task(name).format_question(body)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from coin_ray._files import write_dir_atomic
from coin_ray.synthetic._instructions import synthetic_task, variant_of
from coin_ray.synthetic._tasks import FAMILIES, GENERATORS, MIN_IMAGE_SIZE, Example
from coin_ray.tasks import TASK_NAMES

__all__ = ["GENERATOR_VERSION", "TRAIN_SCALE", "MAX_IMAGE_SIZE", "MIN_IMAGE_SIZE", "IMAGE_ROOT", "INSTRUCTIONS",
           "write_synthetic_benchmark", "generate_examples", "synthetic_records"]

GENERATOR_VERSION = 5  # bump whenever a generator changes what it draws or asks
# Train rows of each task relative to `train_rows`. CoIN's stages differ in size (1 epoch of 12k ScienceQA to 129k
# ImageNet examples); here the tasks the tiny model learns slowest get more, so a preset that trains a number of
# epochs per stage gives them more steps (measured: Grounding alone 0.61 at 1x, 1.00 at 2x).
TRAIN_SCALE: dict[str, int] = {"GQA": 2, "Grounding": 2, "VQAv2": 2}
MAX_IMAGE_SIZE = 1024
IMAGE_ROOT = "images"
INSTRUCTIONS = "Instructions"
_SPLITS = ("train", "test", "base")  # "base": held-out questions for the stage-0 base, never written here


def _check_options(tasks: Sequence[str], rows: dict[str, int], image_size: int) -> tuple[str, ...]:
    problems = []
    if isinstance(tasks, str):
        problems.append(f"tasks must be a list of task names, got the string {tasks!r}: use [{tasks!r}]")
        tasks = ()
    unknown = [t for t in tasks if t not in GENERATORS]
    if unknown:
        problems.append(f"tasks: unknown task(s) {unknown}; valid: {', '.join(TASK_NAMES)}")
    if not tasks and not isinstance(tasks, str):
        problems.append(f"tasks must name at least one task: choose from {', '.join(TASK_NAMES)}")
    if len(set(tasks)) != len(tasks):
        problems.append(f"tasks names a task twice: {list(tasks)}")
    for name, n in rows.items():
        if not isinstance(n, int) or n < 1:
            problems.append(f"{name} must be an integer >= 1, got {n!r}")
    if not isinstance(image_size, int) or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        problems.append(f"image_size must be an integer in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (smaller images "
                        f"cannot hold the 3x5-pixel glyphs and shapes), got {image_size!r}")
    if problems:
        raise ValueError("invalid synthetic benchmark options: " + "; ".join(problems))
    return tuple(tasks)


def generate_examples(task: str, n: int, *, split: str, image_size: int = 32, seed: int = 0) -> Iterator[Example]:
    """n examples of `task` for `split` ("train", "test", or "base" = the stage-0 question family).

    Each (seed, task, split) has its own random stream, so a task's data does not depend on which other
    tasks are generated or in what order.
    """
    _check_options([task], {"n": n}, image_size)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, TASK_NAMES.index(task), _SPLITS.index(split), GENERATOR_VERSION])
    family = "base" if split == "base" else FAMILIES[0]
    for _ in range(n):
        yield GENERATORS[task](rng, image_size, family)


def synthetic_records(task: str, example: Example, split: str, index: int, image: str,
                      style: str = "original", seed: int = 0) -> dict[str, Any]:
    """The CoIN JSON record of one example (train: conversation; test: question_id/text/answer). Its
    instruction is one of the style's templates (`_instructions`), drawn per example."""
    t = synthetic_task(task, style)
    question = t.format_question(example.body, style, variant_of(t, style, seed, split, index), ref=example.ref)
    rec_id = f"{task}-{split}-{index:06d}"
    if split != "test":
        return {"id": rec_id, "image": image, "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": example.answer}]}
    record: dict[str, Any] = {"question_id": rec_id, "image": image, "text": question}
    if t.reference_key == "answer_bbox":
        record["answer_bbox"] = example.answer
        record["size"] = list(example.extra["size"])
    elif t.accepts_answer_list and example.answers is not None:
        record["answer"] = list(example.answers)
    else:
        record["answer"] = example.answer
    return record


def write_synthetic_benchmark(
    root: str | os.PathLike,
    *,
    tasks: Sequence[str] = TASK_NAMES,
    train_rows: int = 240,
    test_rows: int = 40,
    image_size: int = 32,
    seed: int = 0,
    instruction_style: str = "original",
    on_record: Callable[[], None] | None = None,
) -> Path:
    """Generate the benchmark into `root` (created; an existing benchmark there is replaced) and return it.
    `on_record` is called after each record is written (a progress bar's update).

    Each task gets `train_rows` x TRAIN_SCALE[task] (default 1) train records and `test_rows` test records.

    Deterministic: the same options give byte-identical files. Written into a temporary sibling folder and
    renamed into place, so a crash never leaves a half-written benchmark behind.
    """
    tasks = _check_options(tasks, {"train_rows": train_rows, "test_rows": test_rows}, image_size)
    for task in tasks:
        synthetic_task(task, instruction_style).templates(instruction_style)  # unknown style: fail before writing
    root = Path(root)
    train_per_task = {t: train_rows * TRAIN_SCALE.get(t, 1) for t in tasks}

    def fill(tmp: Path) -> None:
        for task in tasks:
            folder = tmp / INSTRUCTIONS / task
            folder.mkdir(parents=True)
            for split, n in (("train", train_per_task[task]), ("test", test_rows)):
                image_dir = tmp / IMAGE_ROOT / task / split
                image_dir.mkdir(parents=True)
                records = []
                for i, ex in enumerate(generate_examples(task, n, split=split, image_size=image_size, seed=seed)):
                    rel = f"{task}/{split}/{i:06d}.png"
                    ex.image.save(tmp / IMAGE_ROOT / rel, format="PNG", optimize=False)
                    records.append(synthetic_records(task, ex, split, i, rel, instruction_style, seed))
                    if on_record is not None:
                        on_record()
                (folder / f"{split}.json").write_text(json.dumps(records, indent=1))
        info = {"generator_version": GENERATOR_VERSION, "tasks": list(tasks), "train_rows": train_rows,
                "train_rows_per_task": train_per_task,
                "test_rows": test_rows, "image_size": image_size, "seed": seed,
                "instruction_style": instruction_style, "image_root": IMAGE_ROOT}
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=1))

    write_dir_atomic(root, fill, replace=True)
    return root
