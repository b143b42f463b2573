"""Every check of a sweep's inputs that can run before Ray starts: workers per trial, the model folder (family,
prompt, readable weights), the CoIN data folders (instruction style, task files, image root, TextVQA
annotation file) and the judge options. Each failure is one line naming the flag or config key the user has;
a `--grid` over one of these fields has each of its values checked."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping

from coin_ray.config import ExperimentConfig
from coin_ray.errors import UserError

__all__ = ["PreflightError", "check_before_ray", "check_judge", "check_sweep_workers", "grid_variants"]


class PreflightError(UserError):
    """A sweep input that cannot work, found before Ray starts."""


# the fields a sweep's data preparation reads (coin_ray.training.continual.prepare_data): the tokens, images and
# splits are prepared once per sweep, on the driver, so a trial cannot take another value of one of them
PREPARED_FIELDS = ("model.source", "model.prompt", "model.image_size", "model.patch_size", "data.benchmark",
                   "data.instructions", "data.images", "data.processed", "data.train_rows", "data.test_rows",
                   "data.image_size", "data.instruction_style", "data.textvqa_annotations", "data.max_length",
                   "data.max_image_pixels", "data.seed")


def check_grid_keys(grid: Mapping[str, list[Any]] | None) -> None:
    """A `--grid` over a field the data preparation reads is refused: every trial trains on the one prepared
    data set, so its values would not reach the data."""
    for key in grid or {}:
        if key in PREPARED_FIELDS:
            raise PreflightError(f"--grid {key}: a sweep prepares its data once (tokens, images, splits), and {key} "
                                 f"changes them, so its values cannot differ between trials: run one sweep per value "
                                 f"(--set {key}=...)")


def check_before_ray(cfg: ExperimentConfig, args: argparse.Namespace | None = None,
                     grid: Mapping[str, list[Any]] | None = None) -> None:
    """Run every check over the sweep's base config and each `--grid` value; each distinct input once."""
    check_grid_keys(grid)
    check_sweep_workers(cfg, args)
    seen: set[Any] = set()

    def once(key: Any, check: Callable[[], None]) -> None:
        if key not in seen:
            seen.add(key)
            check()

    for variant in grid_variants(cfg, grid):
        m, d = variant.model, variant.data
        if m.source != "tiny":
            once(("model", m.source, m.prompt, m.vision_tower, m.projector), lambda: _check_model(m))
        if d.benchmark == "coin":
            once(("data", d.instructions, d.instruction_style, d.images, tuple(variant.order)),
                 lambda: _check_coin_data(variant))
            if d.textvqa_annotations and "TextVQA" in variant.order:
                once(("annotations", d.textvqa_annotations), lambda: _check_annotations(d.textvqa_annotations))
        e = variant.eval
        once(("judge", e.judge, repr(sorted(e.judge_options.items()))), lambda: check_judge(e.judge, e.judge_options))


def grid_variants(cfg: ExperimentConfig, grid: Mapping[str, list[Any]] | None) -> list[ExperimentConfig]:
    """The base config and, per `--grid` field, the base with each of its values (the fields a check reads
    are checked for every value; their combinations add nothing)."""
    return [cfg, *(cfg.replace(**{key: value}) for key, values in (grid or {}).items() for value in values)]


def check_sweep_workers(cfg: ExperimentConfig, args: argparse.Namespace | None = None) -> None:
    """A sweep runs each trial on Ray Train workers: at least one."""
    if cfg.scaling.num_workers < 1:
        given = ("--workers-per-trial 0" if args is not None and getattr(args, "workers_per_trial", None) is not None
                 else f"scaling.num_workers {cfg.scaling.num_workers}")
        raise PreflightError(f"{given}: a sweep needs at least 1 Ray Train worker per trial (in-process runs cannot "
                             "run inside Ray Tune): use --workers-per-trial 1, or coin_ray.training.run_continual "
                             "to debug a run in-process")


def _check_model(model: Any) -> None:
    """A checkpoint folder (family, prompt, readable weights), or the parts a LLaVA is assembled from
    (coin_ray.models._assemble: their configs and tensor headers)."""
    from coin_ray.models._assemble import check_model, needs_assembly

    if needs_assembly(model.source, model.vision_tower, model.projector):
        check_model(model)
        return
    from coin_ray.models.preflight import check_model_folder

    check_model_folder(model.source, model.prompt)


def _check_coin_data(cfg: ExperimentConfig) -> None:
    from coin_ray.training.continual import coin_instructions
    from pipelines._records import split_files

    d = cfg.data
    if not Path(d.instructions).expanduser().is_dir():
        raise PreflightError(f"data.instructions {d.instructions}: no such folder (CoIN's instruction folder, "
                             "holding one folder per task with train.json and test.json)")
    folder = coin_instructions(str(Path(d.instructions).expanduser()), d.instruction_style)
    setting = "data.instructions" + (f" (data.instruction_style {d.instruction_style}: {folder})"
                                     if d.instruction_style != "original" else "")
    for task in cfg.order:
        split_files(folder, task, setting)
    if not Path(d.images).expanduser().is_dir():
        raise PreflightError(f"data.images {d.images}: no such folder (the image root the records' image paths "
                             "are relative to)")


def _check_annotations(path: str) -> None:
    from pipelines._annotations import load_textvqa_answers

    load_textvqa_answers(path, setting="data.textvqa_annotations")


def check_judge(kind: str, options: Mapping[str, Any]) -> None:
    """The judge can be built from eval.judge_options (the checks of its constructor: no model is loaded and
    no request is sent)."""
    from coin_ray.evaluation.judges import build_judge

    try:
        build_judge(kind, **dict(options))
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        head, *rest = [line.strip(" -") for line in str(e).splitlines() if line.strip(" -")] or [type(e).__name__]
        text = f"{head.rstrip(':')}: {'; '.join(rest)}" if rest else head
        raise PreflightError(f"eval.judge {kind} with eval.judge_options: {text}") from None
