"""Driver of one continual run: prepare the data, then run every stage of the order on Ray Train workers
(one Train run carries all stages, so the worker group is built once) or in-process (num_workers=0).

`run_continual` is Tune-free: the sweep's trainable calls it, tests call it directly.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from coin_ray.config import ExperimentConfig
from coin_ray.errors import UserError
from coin_ray.training.hooks import RunHooks, RunResult
from coin_ray.training.types import PreparedData, WorkerConfig
from coin_ray.training.worker import quiet_data_context, quiet_ray_logs


class RunSetupError(UserError):
    """The run cannot start (bad data, unplaceable resources); raised before any training."""


class NoRunResult(FileNotFoundError):
    """`runs/<name>/result.json` is absent, torn, or was written by a run of another config."""


def prepare_data(cfg: ExperimentConfig, tasks: tuple[str, ...] | None = None) -> PreparedData:
    """Generate (synthetic) and preprocess the tasks once; cached by content hash under the storage path."""
    from pipelines.preprocess import preprocess

    from coin_ray.profiling import span
    from coin_ray.tasks import TASK_NAMES

    storage = Path(cfg.storage_path).resolve()
    d = cfg.data
    if d.benchmark == "synthetic":
        tasks = TASK_NAMES
        # the Original style keeps the options (and so the folder) the benchmark had before styles existed
        style = {} if d.instruction_style == "original" else {"instruction_style": d.instruction_style}
        with span("data generation"):
            root = ensure_synthetic_benchmark(storage, train_rows=d.train_rows, test_rows=d.test_rows,
                                              image_size=d.image_size, seed=d.seed, **style)
        from coin_ray.synthetic import IMAGE_ROOT, INSTRUCTIONS

        instructions, images = root / INSTRUCTIONS, root / IMAGE_ROOT
    else:
        tasks = tuple(tasks or cfg.order)
        instructions, images = coin_instructions(d.instructions, d.instruction_style), Path(d.images)
    annotations = d.textvqa_annotations if d.benchmark == "coin" else None
    from coin_ray.models._assemble import resolve_model_source

    with span("model assembly"):  # a driver step: preprocessing needs the assembled tokenizer (see README)
        source = resolve_model_source(cfg.model, storage)
    model_kwargs = cfg.model.tiny_kwargs() if source == "tiny" else {}
    if cfg.model.resolved_prompt() != "vicuna_v1":  # the prompt is baked into the preprocessed tokens
        model_kwargs["prompt"] = cfg.model.resolved_prompt()
    out = Path(d.processed) if d.processed else storage / "data" / _short_hash(
        [str(instructions), str(images), sorted(tasks), source, model_kwargs, d.max_length,
         d.max_image_pixels, *([str(annotations)] if annotations else [])])
    with span("preprocessing"):
        manifest = preprocess(str(instructions), str(images), list(tasks), str(out), model_source=source,
                              model_kwargs=model_kwargs, max_length=d.max_length,
                              max_image_pixels=d.max_image_pixels, textvqa_annotations=annotations)
    splits: dict[str, dict[str, str]] = {}
    rows: dict[str, dict[str, int]] = {}
    for task in tasks:
        entry = manifest["tasks"].get(task, {})
        test_split = "test" if "test" in entry else ("val" if "val" in entry else None)
        if "train" not in entry or test_split is None:
            raise RunSetupError(f"task {task} has no {'train' if 'train' not in entry else 'test'} split in {out}; "
                                f"CoIN needs <Task>/train.json and <Task>/test.json (or val.json)")
        splits[task] = {"train": str(out / task / "train"), "test": str(out / task / test_split)}
        rows[task] = {"train": int(entry["train"]["rows"]), "test": int(entry[test_split]["rows"])}
    if cfg.model.source == "tiny" and cfg.model.pretrain_steps > 0:
        # train (or find) the instruction-pretrained base once here, so trials only load it
        from coin_ray.training.build import build_base

        with span("base pretraining"):
            build_base(cfg, storage)
    return PreparedData(processed=str(out), splits=splits, rows=rows, data_hash=manifest["content_hash"],
                        benchmark=d.benchmark, instructions=str(instructions), images=str(images),
                        model_source=source)


# CoIN's instruction folders, one per style, side by side (e.g. CoIN/Instructions_Original, .../Instructions_Diverse)
STYLE_FOLDERS = {"original": "Instructions_Original", "diverse": "Instructions_Diverse", "10type": "Instructions_10Type"}


def coin_instructions(instructions: str, style: str) -> Path:
    """The instruction folder of `style`: `data.instructions` itself for "original"; for another style, the
    sibling folder of that style's name (STYLE_FOLDERS) when `data.instructions` is one of them, else the
    sub-folder of that name inside it. RunSetupError naming both places when neither exists."""
    folder = Path(instructions)
    if style == "original":
        return folder
    name = STYLE_FOLDERS[style]
    candidates = ([folder.parent / name] if folder.name in STYLE_FOLDERS.values() else []) + [folder / name]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RunSetupError(f"data.instruction_style {style}: no {name} folder at {' or '.join(map(str, candidates))}; "
                        f"put CoIN's {name} beside {folder}, or point data.instructions at the folder of that style "
                        f"and keep instruction_style original")


def ensure_synthetic_benchmark(storage: Path, **options: Any) -> Path:
    """The built-in benchmark under <storage>/synthetic/<hash of options>, generated once (atomically)."""
    from coin_ray.synthetic import GENERATOR_VERSION, write_synthetic_benchmark

    root = storage / "synthetic" / _short_hash([GENERATOR_VERSION, options])
    if not (root / "synthetic.json").is_file():
        from coin_ray.phases import phase
        from coin_ray.synthetic import TRAIN_SCALE
        from coin_ray.tasks import TASK_NAMES

        train, test = options.get("train_rows", 240), options.get("test_rows", 40)
        records = sum(train * TRAIN_SCALE.get(t, 1) + test for t in TASK_NAMES)
        with phase("benchmark generation", detail=f"{len(TASK_NAMES)} synthetic tasks, {records} records with "
                                                  f"their images, at {root}", total=records, unit="record") as p:
            write_synthetic_benchmark(root, **options, on_record=p.update)
            p.done(f"{p.count} records")
    return root


def _short_hash(material: Any) -> str:
    from coin_ray.identity import short_hash

    return short_hash(material, digits=16)


def with_train_datasets(cfg: ExperimentConfig, prepared: PreparedData) -> PreparedData:
    """`prepared` plus `train_datasets`: each small train split of the order's tasks read once into Ray's
    object store. A sweep does this once on its driver so no trial re-lists and re-reads files; big splits
    (real CoIN) stay lazy and stream from Parquet."""
    from pipelines import load_split

    cached = dict(prepared.train_datasets)
    for task in cfg.order:
        if task not in cached and _fits_object_store(cfg, prepared, task):
            cached[task] = load_split(prepared.processed, task, "train", in_memory=True)
    return prepared.with_datasets(cached)


def _fits_object_store(cfg: ExperimentConfig, prepared: PreparedData, task: str) -> bool:
    return prepared.rows[task]["train"] * _row_bytes(cfg) <= cfg.data.materialize_below_mb * 2**20


def ingest_needs_cpu(cfg: ExperimentConfig, prepared: PreparedData) -> bool:
    """Whether a run's Ray Data ingest needs CPU of its own while it trains: not when every train split is read
    into the object store up front and one worker iterates it in its own process (no read tasks, no split
    coordinator); yes for streamed splits (real CoIN) or several workers."""
    return cfg.scaling.num_workers > 1 or not all(_fits_object_store(cfg, prepared, t) for t in cfg.order)


def stage_parts(cfg: ExperimentConfig, rows: Mapping[str, Mapping[str, int]]) -> list[list[tuple[str, int, str]]]:
    """What each stage trains on, as (task, rows, role) parts: role "own" is the task's train split (a subset
    under data.train_fraction / data.max_train_rows), "replay" a sample of train.replay_per_task rows of a past
    task; a joint run (train.joint) has one stage of every task's own rows. `rows` is `PreparedData.rows`.
    `stage_datasets` builds the stages from it and the plan counts them with it."""
    from coin_ray.training import data_order as do
    from coin_ray.training.stages import stage_prefixes

    d, t = cfg.data, cfg.train

    def own(task: str) -> tuple[str, int, str]:
        m = do.fraction_rows(rows[task]["train"], d.train_fraction)
        if d.max_train_rows is not None:
            m = min(m, d.max_train_rows)
        return task, min(m, rows[task]["train"]), "own"

    stages = []
    for prefix in stage_prefixes(cfg):
        parts = [own(task) for task in prefix] if t.joint else [own(prefix[-1])]
        if t.replay_per_task > 0 and not t.joint:
            parts += [(past, min(t.replay_per_task, rows[past]["train"]), "replay") for past in prefix[:-1]]
        stages.append(parts)
    return stages


def stage_datasets(cfg: ExperimentConfig, prepared: PreparedData) -> tuple[dict[str, Any], list[int]]:
    """Ray Data datasets `stage_<k>` and their row counts: the parts of `stage_parts` (a seeded random subset of
    task k's train split, a seeded random sample of each past task's for replay), every epoch in its own seeded
    global order (`data_order`)."""
    from pipelines import load_split

    from coin_ray.training import data_order as do
    from coin_ray.training.stages import stage_prefixes, stage_seed

    d, t = cfg.data, cfg.train

    def split(task: str) -> Any:
        cached = prepared.train_datasets.get(task)
        return cached if cached is not None else load_split(prepared.processed, task, "train")

    def sample(task: str, m: int, seed: Any) -> Any:
        if m >= prepared.rows[task]["train"]:
            return split(task)
        keep = do.subset_indices(do.split_indices(prepared.splits[task]["train"]), task, seed, m)
        return do.keep_rows(split(task), keep)

    datasets: dict[str, Any] = {}
    rows: list[int] = []
    for k, (prefix, parts) in enumerate(zip(stage_prefixes(cfg), stage_parts(cfg, prepared.rows))):
        replay_seed = do.derived_seed(stage_seed(t.seed, prefix), "replay")
        sets = [sample(task, m, do.derived_seed(d.seed, "train") if role == "own" else replay_seed)
                for task, m, role in parts]
        ds = sets[0].union(*sets[1:]) if len(sets) > 1 else sets[0]
        n = sum(m for _, m, _ in parts)
        _, per_step, steps = stage_schedule(cfg, prefix, n)
        epochs = do.epochs_needed(steps, n, per_step)
        stage_bytes = epochs * n * _row_bytes(cfg)
        local = all(task in prepared.train_datasets for task in prefix) and stage_bytes <= d.materialize_below_mb * 2**20
        datasets[f"stage_{k}"] = do.epoch_stream(ds, stage_seed(t.seed, prefix), epochs, local=local,
                                                 partitions=math.ceil(n * _row_bytes(cfg) / 2**27),
                                                 per_step=per_step if t.group_by_length else 0)
        rows.append(n)
    return datasets, rows


def stage_schedule(cfg: ExperimentConfig, prefix: tuple[str, ...], rows: int) -> tuple[int, int, int]:
    """(batch size per worker, rows per optimizer step, optimizer steps) of the stage ending `prefix` with `rows`
    training rows: the driver sizes the stage's epoch stream with it and the worker trains that many steps, so
    the two cannot disagree."""
    from coin_ray.training import data_order

    batch = stage_batch_size(cfg, prefix)
    per_step = batch * max(cfg.scaling.num_workers, 1) * cfg.train.grad_accum
    return batch, per_step, data_order.stage_steps(cfg.train.max_steps, cfg.train.epochs, rows, per_step)


def stage_batch_size(cfg: ExperimentConfig, prefix: tuple[str, ...]) -> int:
    """The per-worker batch size of the stage ending `prefix` (train.batch_size_per_task of its task; a
    joint stage: train.batch_size)."""
    return cfg.train.batch_size if cfg.train.joint else cfg.train.batch_size_of(prefix[-1])


def _row_bytes(cfg: ExperimentConfig) -> int:
    side = cfg.model.image_size if cfg.model.source == "tiny" else 336
    return 3 * side * side * 4 + 8 * cfg.data.max_length


def check_resources(cfg: ExperimentConfig) -> None:
    """Say so, before any training, when the cluster can never place the requested workers."""
    import ray

    if cfg.scaling.num_workers == 0:
        return
    total = ray.cluster_resources()
    need_cpu = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise RunSetupError(
            f"scaling.num_workers={cfg.scaling.num_workers} x cpus_per_worker={cfg.scaling.cpus_per_worker} needs "
            f"{need_cpu:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}: lower --workers-per-trial or join a "
            f"bigger cluster with --address")
    if cfg.scaling.use_gpu:
        need_gpu = cfg.scaling.num_workers * cfg.scaling.gpus_per_worker
        if need_gpu > total.get("GPU", 0):
            raise RunSetupError(
                f"{cfg.scaling.num_workers} workers x {cfg.scaling.gpus_per_worker:g} GPUs need {need_gpu:g} GPUs but "
                f"the Ray cluster has {total.get('GPU', 0):g}: drop --gpus-per-worker/use_gpu or use a GPU cluster")


def run_continual(cfg: ExperimentConfig, *, hooks_factory: Callable[[], RunHooks] | None = None,
                  prepared: PreparedData | None = None, step_callbacks: Sequence[Callable[..., None]] = (),
                  train_callbacks: list[Any] | None = None, verbose: bool = False,
                  report: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """Train and evaluate every stage of `cfg.order`; resumes finished stages from the stage store. A run whose
    every stage and evaluation cell is stored starts no worker: it is assembled from the store
    (`from_store.run_from_store`), and `report(metrics)` (e.g. Tune's) gets its per-stage reports.

    Ray must be initialised (`ray.init`) by the caller: Ray Data serves the training shards in both modes.
    `step_callbacks` are called after every optimizer step as cb(stage=k, step=s) (e.g. `faults.KillOnce`).
    `verbose` keeps Ray's own info logs in the workers (default: warnings only, one line per stage).
    """
    import ray

    if not ray.is_initialized():
        raise RunSetupError("Ray is not initialised: call ray.init(...) first (or use sweeps/task_order.py)")
    quiet_data_context()
    quiet_ray_logs(verbose)  # this process (a sweep's Tune trial actor) builds the stage datasets
    prepared = prepared or prepare_data(cfg)
    missing = [t for t in cfg.order if t not in prepared.splits]
    if missing:
        raise RunSetupError(f"tasks {missing} are not in the prepared data ({prepared.tasks})")
    check_resources(cfg)
    from coin_ray.profiling import span
    from coin_ray.training.from_store import run_from_store

    with span("tracking", part="run from the store"):
        stored = run_from_store(cfg, prepared, hooks_factory=hooks_factory, report=report)
    if stored is not None:
        return stored
    with span("data loading"):
        prepared = with_train_datasets(cfg, prepared)
        datasets, stage_rows = stage_datasets(cfg, prepared)
    # workers get the datasets as shards, not inside their config
    config = {"worker": WorkerConfig(experiment=cfg.to_dict(), data=prepared.without_datasets(),
                                     stage_rows=tuple(stage_rows), hooks_factory=hooks_factory,
                                     step_callbacks=tuple(step_callbacks), verbose=verbose)}

    from coin_ray.training.loop import continual_worker
    from coin_ray.training.worker import WorkerEnv

    if cfg.scaling.num_workers == 0:
        import torch

        device = torch.device("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        env = WorkerEnv(rank=0, world=1, device=device, get_shard=datasets.__getitem__, in_ray_train=False)
        return continual_worker(config, env)

    _train_env_defaults()
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    trainer = TorchTrainer(
        continual_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=str(Path(cfg.storage_path).resolve() / "ray_train"),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             callbacks=train_callbacks or None,
                             # the controller's and workers' ray.train logs (resource requests, worker group
                             # starts) at warning level unless verbose
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
        datasets=datasets,
        # one worker needs no split: iterating in the worker itself saves a SplitCoordinator actor (a new
        # Python process, ~3 s on 2 cores) per stage dataset; several workers get equal streaming splits
        dataset_config=DataConfig(datasets_to_split="all" if s.num_workers > 1 else [],
                                  execution_options=ExecutionOptions(preserve_order=True)),
    )
    config["fit_started"] = time.time()  # for the profile: Ray Train's start-up, up to the worker's process
    trainer.fit()
    return load_run_result(cfg, prepared.data_hash)


def _train_env_defaults() -> None:
    """Ray Train settings for a run whose stages take seconds, unless the user set them: the controller polls
    its workers every 0.5 s (default 2 s: up to 2 s lost at the end of every run), and a single-node cluster
    has no spot nodes to watch, so it skips the preemption watcher (one actor process less to start).
    Ray Train propagates these variables from the driver to its controller and workers."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    if len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def load_run_result(cfg: ExperimentConfig, data_hash: str) -> RunResult:
    """The finished result of exactly this config and data (its run key is checked); NoRunResult otherwise."""
    import dataclasses

    from coin_ray._files import read_json
    from coin_ray.identity import run_key

    path = Path(cfg.storage_path).resolve() / "runs" / cfg.name / "result.json"
    d = read_json(path)
    if not isinstance(d, dict):
        raise NoRunResult(f"no finished result at {path}" + (" (torn or not JSON)" if path.exists() else ""))
    expected = run_key(cfg.name, cfg.flatten(), data_hash)
    if d.pop("run_key", None) != expected:
        raise NoRunResult(f"{path} was written by a run of another config (run key differs from {expected})")
    known = {f.name for f in dataclasses.fields(RunResult)}
    try:
        d["order"] = tuple(d["order"])
        d["stages_reused"] = tuple(d["stages_reused"])
        return RunResult(**{k: v for k, v in d.items() if k in known})
    except (KeyError, TypeError) as error:
        raise NoRunResult(f"{path} is not a run result ({error})") from None
