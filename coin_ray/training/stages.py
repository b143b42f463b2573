"""Stage k of an order: what fixes its result (the stage-store key material), and obtaining it: reuse it
from the store, wait while another trial trains it, or train it here and put it.

Stage k's training depends only on the state after stage k-1 and on a seed derived from (seed, task
prefix), so a stage restarted after a crash, or served to another order that shares the prefix, gives
exactly the same result on CPU.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coin_ray.config import ExperimentConfig
from coin_ray.training.accounting import (ACCOUNTING_KEY, StageCost, device_kind, devices_of, peak_memory_gb,
                                          reduce_counts, reset_peak_memory, stored_device_hours)
from coin_ray.training.build import resolved_precision
from coin_ray.training.store import StageEntry, stage_key
from coin_ray.training.worker import WorkerRun

ADAPTER_DIR = "adapter"  # save_tuner output: tuner_config.json + tuner_weights.safetensors
LOSSES_FILE = "train_losses.json"


def stage_seed(seed: int, prefix: tuple[str, ...]) -> int:
    """Seed of the stage that ends `prefix`: the same prefix gets the same seed in every order."""
    digest = hashlib.sha256(f"{seed}:{'>'.join(prefix)}".encode()).hexdigest()
    return int(digest[:8], 16)


def stage_prefixes(cfg: ExperimentConfig) -> list[tuple[str, ...]]:
    """The task prefix each stage of the run ends: A, A>B, A>B>C for an order; one stage of every task (in
    name order, so any order of the same tasks is the same stage) for the joint bound (train.joint)."""
    if cfg.train.joint:
        return [tuple(sorted(cfg.order))]
    return [tuple(cfg.order[: k + 1]) for k in range(len(cfg.order))]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def stage_material(cfg: ExperimentConfig, data_hash: str, prefix: tuple[str, ...],
                   device: torch.device | None = None) -> dict[str, Any]:
    """Everything that fixes the result of the stage ending `prefix` (the stage-store key material).
    Evaluation settings are not part of it: evaluation cells are cached per task inside the entry, and
    eval settings that change scores (max_test_rows) go into the cell key."""
    from coin_ray.training.continual import stage_batch_size
    from coin_ray.training.data_order import DATA_ORDER_VERSION

    flat = cfg.flatten()
    material = {k: v for k, v in flat.items() if k.split(".")[0] in ("model", "train")}
    # the batch size this stage trains with (another task's entry in batch_size_per_task does not change it)
    del material["train.batch_size_per_task"]
    if prefix:
        material["train.batch_size"] = stage_batch_size(cfg, prefix)
    if cfg.train.joint:  # one stage of every task: nothing to replay
        material["train.replay_per_task"] = 0
    # only the fields the tuning method reads: LoRA trials that differ only in num_experts share stages
    material["tuner.method"] = cfg.tuner.method
    material.update({f"tuner.{k}": flat[f"tuner.{k}"] for k in cfg.tuner.METHOD_FIELDS[cfg.tuner.method]})
    from coin_ray.methods import build_method

    material.update(build_method(cfg).key_material())  # the continual method and its options ({} for plain)
    material.update({
        "data.benchmark": cfg.data.benchmark,
        "data.max_train_rows": cfg.data.max_train_rows,
        "data.train_fraction": cfg.data.train_fraction,
        "data.seed": cfg.data.seed,  # the seed of the train subsets
        "data_order": DATA_ORDER_VERSION,
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


def run_device(cfg: ExperimentConfig) -> torch.device:
    """The device type a run's workers train on, as the driver sees it (for stage keys computed before the run)."""
    return torch.device("cuda" if cfg.scaling.use_gpu else "cpu")


def stage_keys(cfg: ExperimentConfig, data_hash: str) -> list[tuple[tuple[str, ...], str]]:
    """(prefix, stage-store key) of every stage of the run, as its workers will compute them: what the plan and
    the fully-stored check look up in the store."""
    device = run_device(cfg)
    return [(prefix, stage_key(stage_material(cfg, data_hash, prefix, device))) for prefix in stage_prefixes(cfg)]


def zero_shot_key(cfg: ExperimentConfig, data_hash: str) -> str:
    """The store key under which the base model's evaluation cells (the zero-shot row) are kept."""
    return stage_key(stage_material(cfg, data_hash, (), run_device(cfg)))


def store_root(cfg: ExperimentConfig) -> Path:
    """The stage store of a run: shared under the storage path, or the run's own with use_stage_cache off."""
    storage = Path(cfg.storage_path).resolve()
    return storage / "stage_store" if cfg.use_stage_cache else storage / "runs" / cfg.name / "stages"


def adapter_weights_file(entry: StageEntry) -> Path:
    from coin_ray.tuners import TUNER_WEIGHTS_NAME

    return entry.checkpoint / ADAPTER_DIR / TUNER_WEIGHTS_NAME


@dataclass(frozen=True)
class Stage:
    """A stage as the loop sees it: its store entry, its training losses, whether it was reused, and what its
    training cost here (or, reused, what it cost when it was trained)."""

    key: str
    entry: StageEntry
    losses: list[tuple[int, float]]
    reused: bool
    cost: StageCost


def obtain_stage(run: WorkerRun, prefix: tuple[str, ...]) -> Stage:
    """The stage ending `prefix`, from the store or trained here (then put in the store).

    Rank 0 claims the key: a trial running beside this one may be training the same prefix, and this one
    waits for it instead of training it twice; the other ranks follow what the store then holds."""
    from coin_ray.training.train import train_stage

    env, store = run.env, run.store
    material = stage_material(run.cfg, run.data.data_hash, prefix, env.device)
    key = stage_key(material)
    entry = store.get(key)
    claim = None
    if entry is None:
        if env.rank == 0:
            got = store.claim(key)
            entry, claim = (got, None) if isinstance(got, StageEntry) else (None, got)
        env.barrier()
        if env.rank != 0:
            entry = store.get(key)
    cost = StageCost(devices=devices_of(run.cfg), device_kind=device_kind(env.device), reused=entry is not None)
    if entry is not None:
        run.weights.select(entry)
        cost.saved_device_hours = stored_device_hours(entry.meta()) if env.rank == 0 else 0.0
        return Stage(key, entry, stored_losses(entry), reused=True, cost=cost)
    try:
        run.weights.ensure()
        reset_peak_memory(env.device)
        started = time.perf_counter()
        losses, optim_state, (examples, tokens) = train_stage(run, prefix)
        cost.train_seconds = time.perf_counter() - started
        cost.train_examples, cost.train_tokens, cost.peak_memory_gb = reduce_counts(
            env, examples, tokens, peak_memory_gb(env.device))
        if env.rank == 0:
            entry = store.put(key, material, lambda directory: _write_stage(run, losses, optim_state, directory),
                              extra_meta={ACCOUNTING_KEY: cost.stored()})
    finally:
        if claim is not None:
            claim.release()
    env.barrier()
    entry = entry or store.get(key)
    run.weights.holds(entry)
    return Stage(key, entry, losses, reused=False, cost=cost)


def _write_stage(run: WorkerRun, losses: list[tuple[int, float]], optim_state: dict[str, Any],
                 directory: Path) -> None:
    from coin_ray.tuners import save_tuner

    save_tuner(run.model, directory / ADAPTER_DIR)
    run.method.save_state(directory)  # what the continual method carries to the next stage
    torch.save(optim_state, directory / "optimizer.pt")
    (directory / LOSSES_FILE).write_text(json.dumps(losses))
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
               directory / "rng_state.pt")


def stored_losses(entry: StageEntry) -> list[tuple[int, float]]:
    path = entry.checkpoint / LOSSES_FILE
    return [tuple(x) for x in json.loads(path.read_text())] if path.is_file() else []
