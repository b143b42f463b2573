"""Stage 0: an instruction-pretrained base for the synthetic benchmark, cached on disk by content hash.

CoIN starts from LLaVA-1.5, a model already aligned to each task's answer format. A randomly initialised
tiny model is not, and continual tuning from it forgets totally (measured: BWT about -1, every answer in the
last task's format, no order effect). This fine-tunes the tiny model on the benchmark's *base* question
family (other questions in each task's answer format; coin_ray.synthetic._tasks) with the stage loop's
optimizer step (`coin_ray.training.train.optimizer_step`), and saves the result as a normal checkpoint folder, so ``build_vlm(str(path))`` loads it like any model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from coin_ray._files import write_dir_atomic
from coin_ray.models import collate_train, encode_train_batch
from coin_ray.synthetic._synthetic import GENERATOR_VERSION, generate_examples
from coin_ray.tasks import TASK_NAMES, get_task

__all__ = ["BASE_VERSION", "base_key", "pretrain_base"]

BASE_VERSION = 1  # bump when the loop below changes what it produces


def _state_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def base_key(model: torch.nn.Module, material: dict[str, Any]) -> str:
    """Content hash of everything that fixes the base: the starting weights, the model config, the loop's
    options and the generator/loop versions (first 20 hex digits)."""
    payload = {"base_version": BASE_VERSION, "generator_version": GENERATOR_VERSION,
               "config": model.config.to_dict(), "weights": _state_digest(model), **material}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pretrain_base(
    model: torch.nn.Module,
    processor: Any,
    root: str | os.PathLike,
    steps: int,
    lr: float,
    seed: int,
    *,
    tasks: Sequence[str] = TASK_NAMES,
    rows_per_task: int = 256,
    batch_size: int = 16,
    image_size: int = 32,
    max_length: int = 160,
    warmup_ratio: float = 0.1,
) -> Path:
    """Fine-tune every weight of `model` in place on the base question family; return the checkpoint folder.

    The folder is ``<root>/base-<key>`` (model + processor, save_pretrained layout). When it already exists
    the weights are loaded from it instead of training (same key = same inputs = same result).
    """
    problems = []
    if steps < 1:
        problems.append(f"steps must be >= 1, got {steps}")
    if lr <= 0:
        problems.append(f"lr must be > 0, got {lr}")
    if batch_size < 1:
        problems.append(f"batch_size must be >= 1, got {batch_size}")
    if rows_per_task < 1:
        problems.append(f"rows_per_task must be >= 1, got {rows_per_task}")
    if problems:
        raise ValueError("invalid base pretraining options: " + "; ".join(problems))
    tasks = tuple(get_task(t).name for t in tasks)
    material = {"steps": steps, "lr": lr, "seed": seed, "tasks": tasks, "rows_per_task": rows_per_task,
                "batch_size": batch_size, "image_size": image_size, "max_length": max_length,
                "warmup_ratio": warmup_ratio}
    folder = Path(root) / f"base-{base_key(model, material)}"
    if (folder / "base.json").is_file():
        # from_pretrained knows how saved keys map onto the module tree; then copy strictly
        saved = type(model).from_pretrained(folder, local_files_only=True, dtype=next(model.parameters()).dtype)
        model.load_state_dict(saved.state_dict(), strict=True)
        model.eval()
        return folder

    from coin_ray.training.train import optimizer_step

    questions, answers, images = [], [], []
    for task in tasks:
        for ex in generate_examples(task, rows_per_task, split="base", image_size=image_size, seed=seed):
            questions.append(get_task(task).format_question(ex.body, ref=ex.ref))
            answers.append(ex.answer)
            images.append(ex.image)
    rows = encode_train_batch(processor, questions, answers, images, max_length)
    n = len(questions)
    pad_id = processor.tokenizer.pad_token_id

    gen = torch.Generator().manual_seed(seed)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, int(steps * warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    order = torch.randperm(n, generator=gen)
    cursor, losses = 0, []
    from coin_ray.phases import phase

    with torch.random.fork_rng(devices=[]), phase(
            "base pretraining", detail=f"{steps} steps of {batch_size} over {n} examples of {len(tasks)} tasks, "
                                       f"cached in {folder}", total=steps, unit="step") as progress:
        torch.manual_seed(seed)
        for _ in range(steps):
            if cursor + batch_size > n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + batch_size].tolist()
            cursor += batch_size
            batch = collate_train([{k: rows[k][i] for k in ("input_ids", "labels", "pixel_values")} for i in idx],
                                  pad_id)
            loss = model(**batch).loss
            loss.backward()
            norm = optimizer_step(params, opt, sched, max_grad_norm=1.0)
            losses.append(float(loss.detach()))
            if not (math.isfinite(losses[-1]) and math.isfinite(norm)):  # a broken base is never cached
                raise ValueError(f"base pretraining diverged at step {len(losses)} (loss {losses[-1]}, gradient "
                                 f"norm {norm}); nothing was saved: lower model.pretrain_lr")
            progress.update()
        tail = losses[-max(1, steps // 10):]
        progress.done(f"loss {losses[0]:.3f} -> {sum(tail) / len(tail):.3f}")
    model.eval()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        tail = losses[-max(1, steps // 10):]
        (tmp / "base.json").write_text(json.dumps(
            {**material, "tasks": list(tasks), "final_loss": sum(tail) / len(tail), "first_loss": losses[0]},
            indent=1))

    write_dir_atomic(folder, fill)  # another process finished the same base first: identical content, theirs stays
    return folder
