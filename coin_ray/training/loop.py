"""The per-worker continual loop: for each stage, train on its task (or take it from the stage store),
evaluate every task of the order, checkpoint, report.

The same function runs inside a Ray Train worker (num_workers >= 1) and in-process (num_workers = 0);
`WorkerEnv` hides the difference. Stage k's training depends only on the state after stage k-1 and
on a seed derived from (seed, task prefix), so a stage restarted after a crash, or served to another
order that shares the prefix, gives exactly the same result on CPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from coin_ray.config import ExperimentConfig
from coin_ray.evaluation.metrics import cl_metrics, mean_seen
from coin_ray.training.hooks import HookList, RunInfo, RunResult, StageReport
from coin_ray.training.store import StageEntry, StageStore, stage_key

ADAPTER_DIR = "adapter"  # save_tuner output: tuner_config.json + tuner_weights.safetensors


class NonFiniteError(RuntimeError):
    """A NaN/inf loss, gradient norm or trained weight: the stage stops and nothing of it is saved."""


@dataclass
class WorkerEnv:
    """Where this copy of the loop runs: rank, world size, device, and how to read its data shard."""

    rank: int
    world: int
    device: torch.device
    get_shard: Callable[[str], Any]  # dataset name -> object with iter_torch_batches(...)
    in_ray_train: bool
    control_group: Any = None  # a gloo group with a long timeout for waits (see control_process_group)

    def barrier(self) -> None:
        """Wait for every rank. Runs on the control group: while rank 0 waits for a stage another trial is
        training, the other ranks wait here for as long as that takes, not for the default group's timeout."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.control_group)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if not self.in_ray_train:
            return
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if (
            checkpoint_dir is not None and self.rank == 0) else None
        ray.train.report(metrics, checkpoint=checkpoint)


CONTROL_TIMEOUT_S = 7 * 24 * 3600  # a stage trained elsewhere may take days at 7B scale


def control_process_group() -> Any:
    """A gloo process group for the loop's own waits, with a timeout long enough to wait for a stage that
    another trial is training (torch.distributed's default is 30 minutes; NCCL's watchdog would end the run).
    Gradients and evaluation rows still travel on the default group. Every rank must call this once, at the
    same point."""
    from datetime import timedelta

    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=timedelta(seconds=CONTROL_TIMEOUT_S))


def stage_seed(seed: int, prefix: tuple[str, ...]) -> int:
    """Seed of the stage that ends `prefix`: the same prefix gets the same seed in every order."""
    digest = hashlib.sha256(f"{seed}:{'>'.join(prefix)}".encode()).hexdigest()
    return int(digest[:8], 16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage_material(cfg: ExperimentConfig, data_hash: str, prefix: tuple[str, ...],
                   device: torch.device | None = None) -> dict[str, Any]:
    """Everything that fixes the result of the stage ending `prefix` (the stage-store key material).
    Evaluation settings are not part of it: evaluation cells are cached per task inside the entry, and
    eval settings that change scores (max_test_rows) go into the cell key."""
    flat = cfg.flatten()
    material = {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "tuner", "train")}
    material.update({
        "data.benchmark": cfg.data.benchmark,
        "data.max_train_rows": cfg.data.max_train_rows,
        "data.max_length": cfg.data.max_length,
        "data_hash": data_hash,
        "prefix": list(prefix),
        "world": cfg.scaling.num_workers or 1,  # data-parallel world changes batches and so results
    })
    # "auto" dtypes resolve per device (bf16 on a GPU, fp32 on CPU): the resolved pair is what fixes the result
    base, autocast = resolved_precision(cfg, device or torch.device("cpu"))
    material["precision"] = [str(base).removeprefix("torch."), str(autocast).removeprefix("torch.")]
    if not cfg.use_stage_cache:
        material["run_name"] = cfg.name  # no sharing: the store only serves this run's own resume
    return material


def eval_cell_name(task: str, cfg: ExperimentConfig) -> str:
    judge = cfg.eval.judge
    opts = json.dumps(dict(cfg.eval.judge_options), sort_keys=True, default=str)
    tag = hashlib.sha256(f"{cfg.data.max_test_rows}:{judge}:{opts}".encode()).hexdigest()[:8]
    return f"{task}-{tag}"


def build_base(cfg: ExperimentConfig, storage_path: Path, device: torch.device | None = None
               ) -> tuple[torch.nn.Module, Any]:
    """The base VLM: tiny from config (optionally instruction-pretrained, cached under <storage>/base), or a
    local checkpoint folder; held in `model.dtype` as resolved for `device` (CPU when None)."""
    from coin_ray.models import build_vlm
    from coin_ray.models._precision import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype, device or torch.device("cpu"))
    tiny = cfg.model.source == "tiny"
    kwargs = cfg.model.tiny_kwargs() if tiny else {"dtype": dtype}
    model, processor = build_vlm(cfg.model.source, **kwargs)
    if tiny and cfg.model.pretrain_steps > 0:
        from coin_ray.synthetic.base import pretrain_base

        pretrain_base(model, processor, storage_path / "base", cfg.model.pretrain_steps, cfg.model.pretrain_lr,
                      cfg.model.seed, image_size=cfg.data.image_size, max_length=cfg.data.max_length)
    if tiny and dtype != torch.float32:
        model.to(dtype)
    return model, processor


def build_model(cfg: ExperimentConfig, storage_path: Path, device: torch.device | None = None
                ) -> tuple[torch.nn.Module, Any]:
    """The base VLM with the tuner applied (adapter init seeded by train.seed: part of the replicate); every
    trainable parameter is a float32 master weight whatever the base dtype."""
    from coin_ray.models._precision import fp32_master_weights
    from coin_ray.tuners import apply_tuner

    model, processor = build_base(cfg, storage_path, device)
    t = cfg.tuner
    torch.manual_seed(cfg.train.seed)
    apply_tuner(model, t.method, num_experts=t.num_experts, rank=t.rank, alpha=t.alpha, dropout=t.dropout,
                target_modules=list(t.target_modules) if t.target_modules else None, top_k=t.top_k,
                aux_loss_weight=t.aux_loss_weight)
    fp32_master_weights(model)
    return model, processor


def resolved_precision(cfg: ExperimentConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """(base dtype, autocast dtype or None) of this run on `device`."""
    from coin_ray.models._precision import resolve_autocast, resolve_dtype

    base = resolve_dtype(cfg.model.dtype, device)
    return base, resolve_autocast(cfg.train.precision, base, device)


def continual_worker(config: dict[str, Any], env: WorkerEnv | None = None) -> RunResult | None:
    """Run (or resume) every stage of `config["experiment"]["order"]` on this worker.

    `config` holds: experiment (ExperimentConfig dict), data (prepared-data dict: processed dir per task and
    split, rows per task, data_hash), hooks_factory (callable -> RunHooks, used on rank 0, optional),
    fail_once (test hook: {"marker": path, "stage": k, "step": s} makes the worker exit once mid-stage).
    """
    cfg = ExperimentConfig.from_dict(config["experiment"])
    data = config["data"]
    env = env or _ray_train_env()
    storage = Path(cfg.storage_path).resolve()
    run_dir = storage / "runs" / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    store = StageStore(storage / "stage_store" if cfg.use_stage_cache else run_dir / "stages")
    order = tuple(cfg.order)

    torch.manual_seed(cfg.model.seed)
    model, processor = build_model(cfg, storage, env.device)
    model.to(env.device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    judge = None
    if cfg.eval.judge != "none":
        from coin_ray.evaluation.judges import build_judge

        judge = build_judge(cfg.eval.judge, **dict(cfg.eval.judge_options))

    hooks = HookList([config["hooks_factory"]()] if (env.rank == 0 and config.get("hooks_factory")) else [])
    info = RunInfo(name=cfg.name, order=order, params=cfg.flatten(), benchmark=cfg.data.benchmark,
                   data_hash=data["data_hash"])
    hooks.on_run_start(info)
    completed = []

    def complete(result: RunResult) -> None:
        """Close the run (hooks, result.json) before the last stage is reported: a Tune scheduler may stop
        the trial the moment it sees that report (ASHA stops every trial that reaches max_t)."""
        hooks.on_run_end(result)
        if env.rank == 0:
            from coin_ray._files import write_json_atomic
            from coin_ray.identity import run_key

            # the run key lets a reader tell this config's result from another's (load_run_result)
            write_json_atomic(run_dir / "result.json",
                              {**_result_dict(result), "run_key": run_key(cfg.name, cfg.flatten(), data["data_hash"])})
        completed.append(result)

    try:
        return _run_stages(cfg, config, env, store, model, processor, judge, hooks, data, run_dir, complete)
    except BaseException as error:
        if not completed:
            hooks.on_run_failed(error)
        raise


def _run_stages(cfg: ExperimentConfig, config: dict[str, Any], env: WorkerEnv, store: StageStore,
                model: torch.nn.Module, processor: Any, judge: Any, hooks: HookList, data: dict[str, Any],
                run_dir: Path, complete: Callable[[RunResult], None]) -> RunResult:
    from coin_ray.tuners import load_trainable_state_dict, save_tuner
    from coin_ray.tuners import TUNER_WEIGHTS_NAME

    order = tuple(cfg.order)
    _, autocast_dtype = resolved_precision(cfg, env.device)
    loaded_entry: StageEntry | None = None  # which stage's weights the model holds (None = base)
    pending: StageEntry | None = None  # weights to load before the model is next used

    def ensure_loaded() -> None:
        nonlocal pending, loaded_entry
        if pending is not None and pending is not loaded_entry:
            from safetensors.torch import load_file

            load_trainable_state_dict(model, load_file(str(pending.checkpoint / ADAPTER_DIR / TUNER_WEIGHTS_NAME),
                                                       device=str(env.device)))
            loaded_entry = pending

    def eval_row(entry_path: Path) -> tuple[dict[str, float | None], dict[str, float | None] | None, list]:
        scores: dict[str, float | None] = {}
        knowledge: dict[str, float | None] = {}
        predictions: list[dict[str, Any]] = []
        for task in order:
            cell_name = eval_cell_name(task, cfg)
            cell = StageStore.read_eval(entry_path, cell_name)
            if cell is not None and judge is not None and _judge_failed(cell):
                cell = None  # stored by an older version with judge failures: judge again
            if cell is None:
                ensure_loaded()
                from coin_ray.evaluation.generation import evaluate_task

                cell = evaluate_task(model, processor, task, data["splits"][task]["test"],
                                     batch_size=cfg.eval.batch_size, device=env.device, rank=env.rank,
                                     world=env.world, max_rows=cfg.data.max_test_rows, judge=judge,
                                     max_predictions=cfg.eval.max_predictions_logged,
                                     autocast_dtype=autocast_dtype)
                if env.rank == 0 and not _judge_failed(cell):  # a failure is never cached: next run judges again
                    StageStore.write_eval(entry_path, cell_name, cell)
                if env.rank == 0 and cell.get("knowledge_error"):
                    print(f"[coin-ray] {cfg.name}: no knowledge score for {task}: {cell['knowledge_error']}",
                          flush=True)
            scores[task] = cell["score"]
            knowledge[task] = cell.get("knowledge")
            predictions += cell.get("predictions", [])
        env.barrier()
        return scores, (knowledge if judge is not None else None), predictions

    zero_shot = knowledge_zero = None
    if cfg.eval.zero_shot:
        material = stage_material(cfg, data["data_hash"], (), env.device)
        base_dir = store.ensure_eval_dir(stage_key(material), material).parent if env.rank == 0 else None
        env.barrier()
        base_dir = base_dir or store.root / stage_key(material)
        zs, kz, _ = eval_row(base_dir)
        zero_shot = [zs[t] for t in order]
        knowledge_zero = [kz[t] for t in order] if kz is not None else None
        hooks.on_zero_shot(zs, kz)

    matrix: list[list[float | None]] = []
    kmatrix: list[list[float | None]] = []
    reused: list[int] = []
    stages_index = []
    for k, task in enumerate(order):
        started = time.time()
        prefix = order[: k + 1]
        material = stage_material(cfg, data["data_hash"], prefix, env.device)
        key = stage_key(material)
        entry = store.get(key)
        claim = None
        if entry is None:
            # a trial running beside this one may be training the same prefix: wait for it instead of
            # training it twice (rank 0 claims; the other ranks follow what the store then holds)
            if env.rank == 0:
                got = store.claim(key)
                entry, claim = (got, None) if isinstance(got, StageEntry) else (None, got)
            env.barrier()
            if env.rank != 0:
                entry = store.get(key)
        losses: list[tuple[int, float]] = []
        if entry is not None:
            reused.append(k)
        else:
            try:
                ensure_loaded()
                losses, optim_state = _train_stage(cfg, config, env, model, processor, data, prefix, autocast_dtype)

                def write(directory: Path) -> None:
                    save_tuner(model, directory / ADAPTER_DIR)
                    torch.save(optim_state, directory / "optimizer.pt")
                    (directory / "train_losses.json").write_text(json.dumps(losses))
                    torch.save({"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state()}, directory / "rng_state.pt")

                if env.rank == 0:
                    entry = store.put(key, material, write)
            finally:
                if claim is not None:
                    claim.release()
            env.barrier()
            entry = entry or store.get(key)
            loaded_entry = entry  # the model already holds exactly this state
        pending = entry
        if not losses and (entry.checkpoint / "train_losses.json").is_file():
            losses = [tuple(x) for x in json.loads((entry.checkpoint / "train_losses.json").read_text())]
        train_s = time.time() - started
        scores, knowledge, predictions = eval_row(entry.path)
        if env.rank == 0:
            print(f"[coin-ray] {cfg.name} stage {k} {task}: {'reused' if k in reused else 'trained'} in {train_s:.1f} s, "
                  f"evaluated in {time.time() - started - train_s:.1f} s; seen-task scores "
                  + " ".join(f"{t}={scores[t]:.2f}" for t in prefix if scores[t] is not None), flush=True)
        matrix.append([scores[t] for t in order])
        if knowledge is not None:
            kmatrix.append([knowledge[t] for t in order])
        stages_index.append({"stage": k, "task": task, "key": key, "path": str(entry.path), "reused": k in reused})
        if env.rank == 0:
            from coin_ray._files import write_json_atomic

            write_json_atomic(run_dir / "stages.json", stages_index)
        report = StageReport(stage=k, task=task, scores=scores, knowledge=knowledge, train_losses=losses,
                             predictions=predictions, reused=k in reused, seconds=time.time() - started)
        hooks.on_stage_end(report)
        metrics = {"stage": k, "task": task, "reused": int(k in reused),
                   "avg_seen_acc": mean_seen(scores, order[: k + 1]) or 0.0,
                   **{f"acc/{t}": scores[t] for t in order if scores[t] is not None}}
        # running CL metrics over the tasks seen so far (final metrics at the last stage); a schedulers'
        # metric must exist at every stage, so the undefined ones of a 1x1 matrix (bwt, forgetting) report 0
        running = _final_metrics(matrix, zero_shot, kmatrix if judge is not None else None, knowledge_zero)
        metrics.update({m: (0.0 if math.isnan(v) else v) for m, v in running.items()})
        metrics["stages_reused"] = len(reused)
        if k == len(order) - 1:
            result = RunResult(order=order, matrix=matrix, zero_shot=zero_shot,
                               knowledge_matrix=kmatrix if judge is not None else None,
                               knowledge_zero_shot=knowledge_zero, metrics=running, stages_reused=tuple(reused),
                               adapter_dir=str(pending.checkpoint / ADAPTER_DIR))
            complete(result)
        env.report(metrics, entry.checkpoint)
    return result


def _judge_failed(cell: dict[str, Any]) -> bool:
    """A cell whose knowledge score is missing because the judge failed (not because it has no rows)."""
    return bool(cell.get("knowledge_error") or cell.get("knowledge_failures"))


def _final_metrics(matrix, zero_shot, kmatrix, kzero) -> dict[str, float]:
    """CL metrics of the instruction matrix; gk_* of the knowledge matrix only when every cell they need was
    judged (a failed judge leaves null cells: those metrics are then undefined, not 0)."""
    n = len(matrix)
    metrics = dict(cl_metrics(_square(matrix), zero_shot=zero_shot[:n] if zero_shot else None))
    if kmatrix and all(kmatrix[i][j] is not None for i in range(n) for j in range(i + 1)):
        kz = kzero[:n] if kzero and all(v is not None for v in kzero[1:n]) else None
        gk = cl_metrics(_square(kmatrix), zero_shot=kz)
        metrics.update({f"gk_{k}": v for k, v in gk.items()})
    return {k: float(v) for k, v in metrics.items()}


def _square(matrix: list[list[float | None]]) -> list[list[float | None]]:
    """Rows so far, cut to a square (mid-run reports use the seen tasks only)."""
    n = len(matrix)
    return [row[:n] for row in matrix]


def _result_dict(result: RunResult) -> dict[str, Any]:
    import dataclasses

    d = dataclasses.asdict(result)
    d["order"] = list(result.order)
    d["stages_reused"] = list(result.stages_reused)
    return d


def _train_stage(cfg: ExperimentConfig, config: dict[str, Any], env: WorkerEnv, model: torch.nn.Module,
                 processor: Any, data: dict[str, Any], prefix: tuple[str, ...],
                 autocast_dtype: torch.dtype | None) -> tuple[list[tuple[int, float]], dict[str, Any]]:
    """Train one stage from the model's current state; returns (step, loss) pairs and the final
    optimizer/scheduler state (kept in the stage checkpoint)."""
    from transformers import get_cosine_schedule_with_warmup

    from coin_ray.tuners import tuner_aux_loss

    pad_id = processor.tokenizer.pad_token_id

    k = len(prefix) - 1
    seed_everything(stage_seed(cfg.train.seed, prefix))
    rows = data["stage_rows"][k]
    per_step = cfg.train.batch_size * max(env.world, 1) * cfg.train.grad_accum
    steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * rows / per_step))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * steps), steps)
    train_model = model
    if env.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    train_model.train()
    from pipelines import train_collate_fn

    collate = train_collate_fn(pad_id)
    shard = env.get_shard(f"stage_{k}")
    fail = config.get("fail_once")
    # float16 autocast needs loss scaling (its gradients underflow); a step whose scaled gradients overflowed
    # is skipped by the scaler, as GradScaler is meant to work
    scaler = torch.amp.GradScaler(env.device.type) if autocast_dtype == torch.float16 else None

    def non_finite(what: str, value: float) -> NonFiniteError:
        return NonFiniteError(
            f"non-finite {what} in trial {cfg.name}, stage {k} ({prefix[-1]}), step {step + 1}: {what} = {value} "
            f"at lr {scheduler.get_last_lr()[0]:.3g}; nothing of this stage was saved. Lower train.lr, or train "
            "in bf16 or fp32 (train.precision)")

    losses: list[tuple[int, float]] = []
    step = 0
    micro = 0
    running = 0.0
    epoch = 0
    while step < steps:
        n_batches = 0
        for batch in shard.iter_torch_batches(batch_size=cfg.train.batch_size, collate_fn=collate,
                                              local_shuffle_buffer_size=max(4 * cfg.train.batch_size, 64),
                                              local_shuffle_seed=stage_seed(cfg.train.seed + epoch, prefix) % (2**31)):
            n_batches += 1
            batch = {name: t.to(env.device) for name, t in batch.items()}
            # under DDP, gradients are all-reduced only on the last micro-batch of an accumulation
            last_micro = (micro + 1) % cfg.train.grad_accum == 0
            sync = contextlib.nullcontext() if (env.world <= 1 or last_micro) else train_model.no_sync()
            with sync:
                with torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    out = train_model(**batch)
                    loss = out.loss
                    aux = tuner_aux_loss(model)
                    if aux is not None:
                        loss = loss + aux
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise non_finite("loss", value)
                scaled = loss / cfg.train.grad_accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            running += value / cfg.train.grad_accum
            micro += 1
            if micro % cfg.train.grad_accum:
                continue
            if scaler is not None:
                scaler.unscale_(optimizer)
            # max_norm inf measures without clipping: the norm is checked in every case
            norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or math.inf))
            if scaler is not None:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
            elif not math.isfinite(norm):
                raise non_finite("gradient norm", norm)
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            losses.append((step, running))
            running = 0.0
            if fail and fail.get("stage") == k and step == fail.get("step", 1) and not os.path.exists(fail["marker"]):
                Path(fail["marker"]).write_text("worker killed on purpose by the fail_once test hook\n")
                os._exit(1)
            if step >= steps:
                break
        epoch += 1
        if n_batches == 0:
            raise RuntimeError(f"stage {k} ({prefix[-1]}): the training shard is empty; check the preprocessed data")
    model.eval()
    bad = [name for name, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise non_finite(f"weights ({len(bad)} tensors, e.g. {bad[0]})", math.nan)
    return losses, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "steps": step}


def _ray_train_env() -> WorkerEnv:
    import ray.train
    import ray.train.torch

    from coin_ray.training.continual import quiet_data_context

    quiet_data_context()

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    return WorkerEnv(rank=ctx.get_world_rank(), world=world, device=ray.train.torch.get_device(),
                     get_shard=ray.train.get_dataset_shard, in_ray_train=True,
                     control_group=control_process_group() if world > 1 else None)
