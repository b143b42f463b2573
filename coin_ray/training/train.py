"""Training one stage from the model's current state: AdamW with a cosine schedule, gradient accumulation
(all-reduced only on the last micro-batch under DDP), autocast per the precision policy, and a guard that
stops the stage at the first non-finite loss, gradient norm or weight."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from coin_ray.training.stages import seed_everything, stage_prefixes, stage_seed
from coin_ray.training.worker import WorkerRun


class NonFiniteError(RuntimeError):
    """A NaN/inf loss, gradient norm or trained weight: the stage stops and nothing of it is saved."""


def optimizer_step(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, scheduler: Any,
                   max_grad_norm: float, scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer step after the gradients are accumulated: clip to `max_grad_norm` (0 = measure only),
    step the optimizer and the schedule, zero the gradients; returns the gradient norm. Without a scaler a
    non-finite norm steps nothing (the caller stops); with one, the scaler skips that step itself. Shared by
    the stage loop and the synthetic base's pretraining."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf))
    if scaler is not None:
        scaler.step(optimizer)  # skipped when the scaled gradients overflowed
        scaler.update()
    elif not math.isfinite(norm):
        return norm
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def parameter_groups(model: torch.nn.Module, lr: float, projector_lr: float | None) -> list[dict[str, Any]]:
    """AdamW's parameter groups: the projector's trainable parameters at `projector_lr` (None: `lr`, one group),
    every other trainable parameter at `lr` - LLaVA's mm_projector_lr. The cosine schedule scales both."""
    from coin_ray.models.families import PROJECTOR_COMPONENTS

    projector, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            in_projector = any(part in PROJECTOR_COMPONENTS for part in name.split("."))
            (projector if in_projector and projector_lr is not None else rest).append(param)
    return [g for g in ({"params": rest, "lr": lr}, {"params": projector, "lr": projector_lr}) if g["params"]]


def train_stage(run: WorkerRun, prefix: tuple[str, ...]
                ) -> tuple[list[tuple[int, float]], dict[str, Any], tuple[int, int]]:
    """Train the stage ending `prefix`; returns (step, loss) pairs, the final optimizer/scheduler state (kept in
    the stage checkpoint) and this rank's (examples, tokens) trained: tokens are the non-padding ones of the
    attention mask, image tokens included (the prompt holds them expanded)."""
    from transformers import get_cosine_schedule_with_warmup

    from coin_ray.tuners import tuner_aux_loss
    from pipelines import train_collate_fn

    from coin_ray.training.continual import stage_schedule

    cfg, env, model, autocast_dtype = run.cfg, run.env, run.model, run.autocast_dtype
    t = cfg.train
    k = stage_prefixes(cfg).index(prefix)
    seed_everything(stage_seed(t.seed, prefix))
    # the worker world is scaling.num_workers (1 in-process), as the driver sized the epoch stream with
    batch_size, _, steps = stage_schedule(cfg, prefix, run.stage_rows[k])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameter_groups(model, t.lr, t.projector_lr), lr=t.lr, weight_decay=t.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(t.warmup_ratio * steps), steps)
    train_model = model
    if env.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    train_model.train()
    collate = train_collate_fn(run.processor.tokenizer.pad_token_id)
    shard = env.get_shard(f"stage_{k}")
    # float16 autocast needs loss scaling (its gradients underflow); a step whose scaled gradients overflowed
    # is skipped by the scaler, as GradScaler is meant to work
    scaler = torch.amp.GradScaler(env.device.type) if autocast_dtype == torch.float16 else None
    previous = run.weights.loaded  # the stage this one starts from (None: the fresh tuner)
    run.method.start_stage(model, k, previous.checkpoint if previous is not None else None)

    def autocast():
        return torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    def non_finite(what: str, value: float) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite {what} in trial {cfg.name}, stage {k} ({prefix[-1]}), step {step + 1}: {what} = {value} "
            f"at lr {scheduler.get_last_lr()[0]:.3g}; nothing of this stage was saved. Lower train.lr, or train "
            "in bf16 or fp32 (train.precision)")

    losses: list[tuple[int, float]] = []
    step = micro = examples = tokens = 0
    running = 0.0
    while step < steps:  # the shard holds every epoch, each in its own seeded global order (data_order)
        n_batches = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            n_batches += 1
            examples += len(batch["input_ids"])
            tokens += int(batch["attention_mask"].sum())
            batch = {name: x.to(env.device) for name, x in batch.items()}
            last_micro = (micro + 1) % t.grad_accum == 0
            sync = contextlib.nullcontext() if (env.world <= 1 or last_micro) else train_model.no_sync()
            with sync:
                with autocast():
                    outputs = train_model(**batch)
                    loss = outputs.loss
                    for extra in (tuner_aux_loss(model), run.method.extra_loss(model, batch, outputs)):
                        if extra is not None:
                            loss = loss + extra
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise non_finite("loss", value)
                scaled = loss / t.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            running += value / t.grad_accum
            micro += 1
            if micro % t.grad_accum:
                continue
            norm = optimizer_step(params, optimizer, scheduler, t.max_grad_norm, scaler)
            if scaler is None and not math.isfinite(norm):
                raise non_finite("gradient norm", norm)
            step += 1
            losses.append((step, running))
            running = 0.0
            for callback in run.step_callbacks:
                callback(stage=k, step=step)
            if step >= steps:
                break
        if n_batches == 0:
            raise RuntimeError(f"stage {k} ({prefix[-1]}): the training shard is empty; check the preprocessed data")

    def stage_batches(batch_size: int):  # the stage's stream from its start (its first epoch), for end_stage
        for batch in shard.iter_torch_batches(batch_size=batch_size, collate_fn=collate):
            yield {name: x.to(env.device) for name, x in batch.items()}

    def forward(batch: dict[str, torch.Tensor]):
        with autocast():
            return model(**batch)

    run.method.end_stage(model, stage_batches, forward)
    model.eval()
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise non_finite(f"weights ({len(bad)} tensors, e.g. {bad[0]})", math.nan)
    return (losses, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "steps": step},
            (examples, tokens))
