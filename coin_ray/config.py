"""Typed experiment configuration: the one place a CLI / YAML / Tune dict becomes frozen dataclasses.

`ExperimentConfig.from_dict` accepts nested sections (``{"tuner": {"rank": 16}}``) or dotted keys
(``{"tuner.rank": 16}``), validates every field, and raises one `ConfigError` listing every problem.
`flatten()` gives the dotted view that MLflow params and stage-store keys are built from.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TunerConfig",
    "TrainConfig",
    "EvalConfig",
    "ScalingConfig",
    "TrackingConfig",
    "ExperimentConfig",
]

BENCHMARKS = ("synthetic", "coin")
METHODS = ("moelora", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision: the autocast dtype (coin_ray.models._precision)
MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")  # model.dtype: the dtype the frozen base is held in
PROMPTS = ("vicuna_v1", "checkpoint")  # model.prompt: CoIN's vicuna_v1, or the checkpoint's own chat template
JUDGES = ("none", "embedding", "llm")  # = coin_ray.evaluation.judges.JUDGE_KINDS (a test keeps them equal;
# not imported so that reading a config never imports the HTTP stack)


class ConfigError(ValueError):
    """Invalid configuration; `problems` lists every problem found, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.problems))


def precision_problems(model_dtype: str, precision: str) -> list[str]:
    """The rule between model.dtype and train.precision (each value is checked by its own section): a half
    base under the other half type's autocast is refused."""
    half = ("bf16", "fp16")
    if model_dtype in half and precision in half and model_dtype != precision:
        return [f"model.dtype {model_dtype} with train.precision {precision} mixes float16 and bfloat16, which "
                f"autocast cannot combine (CLIP's embeddings fail): set both to {precision}, or train.precision "
                "auto, which follows model.dtype"]
    return []


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


@dataclass(frozen=True)
class DataConfig:
    """Where the tasks come from. `synthetic` generates the built-in benchmark (cached under the storage
    path); `coin` reads real CoIN data: `<instructions>/<Task>/{train,test}.json` + images under `images`."""

    benchmark: str = "synthetic"
    instructions: str | None = None  # coin: folder holding one sub-folder per task
    images: str | None = None  # coin: image root that the JSON's relative `image` paths resolve against
    processed: str | None = None  # where preprocessed Parquet goes (default: <storage_path>/data/<hash>)
    train_rows: int = 240  # synthetic: train examples per task
    test_rows: int = 40  # synthetic: test examples per task
    image_size: int = 32  # synthetic: image side in pixels
    max_train_rows: int | None = None  # cap per task (coin: the data-volume study; None = all)
    max_test_rows: int | None = None  # cap per task for evaluation (CoIN's "slim" sets use 4000)
    max_length: int = 160  # token budget per example (prompt + image tokens + answer)
    max_image_pixels: int = 64_000_000  # images with more pixels (width x height) are rejected: image_too_large
    materialize_below_mb: int = 512  # stages smaller than this are read once into Ray's object store
    seed: int = 0  # generator seed (synthetic)

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.benchmark in BENCHMARKS, f"data.benchmark must be one of {BENCHMARKS}, got {self.benchmark!r}")
        if self.benchmark == "coin":
            _check(p, bool(self.instructions), "data.instructions is required for benchmark 'coin' (folder with <Task>/train.json)")
            _check(p, bool(self.images), "data.images is required for benchmark 'coin' (the image root)")
        _check(p, self.train_rows >= 1, f"data.train_rows must be >= 1, got {self.train_rows}")
        _check(p, self.test_rows >= 1, f"data.test_rows must be >= 1, got {self.test_rows}")
        _check(p, self.max_length >= 16, f"data.max_length must be >= 16, got {self.max_length}")
        _check(p, self.max_image_pixels >= 1,
               f"data.max_image_pixels must be >= 1 (pixels, width x height), got {self.max_image_pixels}")
        for name in ("max_train_rows", "max_test_rows"):
            v = getattr(self, name)
            _check(p, v is None or v >= 1, f"data.{name} must be >= 1 or null, got {v}")
        return p


@dataclass(frozen=True)
class ModelConfig:
    """The VLM: `source="tiny"` builds a LLaVA-style model from the sizes below (offline, CPU-sized);
    any other value is a local checkpoint folder (e.g. llava-1.5-7b-hf) loaded with local_files_only."""

    source: str = "tiny"
    dtype: str = "auto"  # frozen base weights: auto (bf16 on CUDA with bf16, fp32 on CPU) | bf16 | fp16 | fp32
    prompt: str = "vicuna_v1"  # vicuna_v1 (CoIN's prompt) | checkpoint (the folder's own chat template)
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    initializer_range: float = 0.1
    pretrain_steps: int = 0  # tiny model: instruction-pretraining "stage 0" of the base (0 = off), cached
    pretrain_lr: float = 2e-3
    seed: int = 0

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.source == "tiny":
            _check(p, self.image_size % self.patch_size == 0,
                   f"model.image_size ({self.image_size}) must be a multiple of model.patch_size ({self.patch_size})")
            _check(p, self.hidden % self.heads == 0,
                   f"model.hidden ({self.hidden}) must be divisible by model.heads ({self.heads})")
            for name in ("image_size", "patch_size", "vision_hidden", "vision_layers", "hidden", "layers", "heads", "intermediate"):
                _check(p, getattr(self, name) >= 1, f"model.{name} must be >= 1, got {getattr(self, name)}")
        _check(p, self.pretrain_steps >= 0, f"model.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        _check(p, self.dtype in MODEL_DTYPES, f"model.dtype must be one of {MODEL_DTYPES}, got {self.dtype!r}")
        _check(p, self.prompt in PROMPTS, f"model.prompt must be one of {PROMPTS}, got {self.prompt!r}")
        if self.prompt == "checkpoint":
            _check(p, self.source != "tiny", "model.prompt 'checkpoint' needs a checkpoint folder with a chat "
                   "template as model.source; the tiny model has none (use vicuna_v1)")
        return p

    def tiny_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "image_size", "patch_size", "vision_hidden", "vision_layers", "hidden", "layers", "heads",
            "intermediate", "initializer_range", "seed")}


@dataclass(frozen=True)
class TunerConfig:
    """What is trained: `moelora` (CoIN's mixture of LoRA experts), `lora` (peft LoRA, same targets),
    or `full` (all LM weights; small models only)."""

    method: str = "moelora"
    num_experts: int = 4
    rank: int = 16  # total rank r; each expert has r / num_experts
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None  # None = every Linear of the language model
    top_k: int | None = None  # beyond CoIN: sparse routing
    aux_loss_weight: float = 0.0  # beyond CoIN: load-balancing loss weight

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.method in METHODS, f"tuner.method must be one of {METHODS}, got {self.method!r}")
        _check(p, self.num_experts >= 1, f"tuner.num_experts must be >= 1, got {self.num_experts}")
        _check(p, self.rank >= 1, f"tuner.rank must be >= 1, got {self.rank}")
        if self.method == "moelora" and self.num_experts >= 1 and self.rank >= 1:
            _check(p, self.rank % self.num_experts == 0,
                   f"tuner.rank ({self.rank}) must be divisible by tuner.num_experts ({self.num_experts}): "
                   f"use rank={max(self.num_experts, self.rank - self.rank % self.num_experts)}")
        _check(p, 0.0 <= self.dropout < 1.0, f"tuner.dropout must be in [0, 1), got {self.dropout}")
        if self.top_k is not None:
            _check(p, 1 <= self.top_k <= self.num_experts,
                   f"tuner.top_k ({self.top_k}) must be in [1, num_experts={self.num_experts}]")
        _check(p, self.aux_loss_weight >= 0, f"tuner.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        return p


@dataclass(frozen=True)
class TrainConfig:
    """Per-stage optimisation. Each stage gets a fresh AdamW + warmup/cosine schedule (as CoIN's per-stage
    scripts do); `max_steps` > 0 overrides `epochs`."""

    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 16  # per worker
    grad_accum: int = 1
    precision: str = "auto"  # autocast dtype: auto = model.dtype when half, else bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    replay_per_task: int = 0  # examples of each past task mixed into the current stage
    max_grad_norm: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(p, 0 <= self.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(p, self.epochs > 0 or self.max_steps > 0, "train.epochs or train.max_steps must be > 0")
        _check(p, self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(p, self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(p, self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(p, self.replay_per_task >= 0, f"train.replay_per_task must be >= 0, got {self.replay_per_task}")
        return p


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after every stage on every task of the order (greedy decoding)."""

    batch_size: int = 32
    zero_shot: bool = False  # also evaluate before stage 1 (needed for fwt)
    judge: str = "none"  # knowledge matrix: none | embedding | llm
    judge_options: Mapping[str, Any] = field(default_factory=dict)  # e.g. base_url, model for llm
    max_predictions_logged: int = 20  # per task and stage

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.judge in JUDGES, f"eval.judge must be one of {JUDGES}, got {self.judge!r}")
        return p


@dataclass(frozen=True)
class ScalingConfig:
    """Ray Train workers per continual run. num_workers=0 runs in-process (tests, debugging)."""

    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # Ray Train restarts after a worker dies; the run resumes at the last stage
    gpu_memory_gb: float = 80.0  # per-GPU memory the preflight checks its estimate against (use_gpu only)

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.num_workers >= 0, f"scaling.num_workers must be >= 0, got {self.num_workers}")
        _check(p, self.cpus_per_worker > 0, f"scaling.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu:
            _check(p, self.gpus_per_worker > 0, f"scaling.gpus_per_worker must be > 0, got {self.gpus_per_worker}")
            _check(p, self.num_workers >= 1, "scaling.use_gpu needs scaling.num_workers >= 1")
        _check(p, self.max_failures >= 0, f"scaling.max_failures must be >= 0, got {self.max_failures}")
        _check(p, self.gpu_memory_gb > 0, f"scaling.gpu_memory_gb must be > 0, got {self.gpu_memory_gb}")
        return p


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "coin-ray"

    def problems(self) -> list[str]:
        return [] if self.experiment else ["tracking.experiment must not be empty"]


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "tuner": TunerConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "scaling": ScalingConfig,
    "tracking": TrackingConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """One continual run: a task order plus everything that determines its result."""

    order: tuple[str, ...] = ("ScienceQA", "TextVQA", "ImageNet")
    name: str = "coin-run"  # deterministic run name (no timestamps): restarts find their state by it
    storage_path: str = "runs"
    use_stage_cache: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for section in _SECTIONS:
            problems += getattr(self, section).problems()
        problems += precision_problems(self.model.dtype, self.train.precision)
        problems += _order_problems(self.order)
        _check(problems, bool(self.name) and "/" not in self.name,
               f"name must be a non-empty string without '/', got {self.name!r}")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        """Build from nested sections and/or dotted keys; every unknown key or bad value is reported."""
        nested: dict[str, Any] = {}
        for key, value in raw.items():
            if "." in key:
                section, _, sub = key.partition(".")
                nested.setdefault(section, {})
                if not isinstance(nested[section], dict):
                    nested[section] = dict(nested[section])
                nested[section][sub] = value
            elif key in _SECTIONS and isinstance(value, Mapping):
                nested.setdefault(key, {}).update(value)
            else:
                nested[key] = value
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        top_fields = {f.name for f in fields(cls)}
        for key, value in nested.items():
            if key in _SECTIONS:
                section_cls = _SECTIONS[key]
                valid = {f.name for f in fields(section_cls)}
                unknown = sorted(set(value) - valid)
                for u in unknown:
                    problems.append(f"unknown key {key}.{u}; valid keys: {', '.join(sorted(valid))}")
                args = {k: _coerce(section_cls, k, v) for k, v in value.items() if k in valid}
                try:
                    kwargs[key] = section_cls(**args)
                except TypeError as e:  # pragma: no cover - defensive
                    problems.append(f"{key}: {e}")
            elif key in top_fields:
                kwargs[key] = tuple(value.split(">") if isinstance(value, str) else value) if key == "order" else value
            else:
                problems.append(f"unknown key {key!r}; valid: {', '.join(sorted(top_fields))}")
        if problems:
            # also report value problems of what could be built
            try:
                cls(**kwargs)
            except ConfigError as e:
                problems += e.problems
            raise ConfigError(problems)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["order"] = list(self.order)
        return d

    def flatten(self) -> dict[str, Any]:
        """Dotted keys -> plain values (lists/dicts as JSON strings): MLflow params, stage-store keys."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, Mapping) and not (prefix.endswith("judge_options")):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(value, (list, tuple, dict)) or (isinstance(value, Mapping)):
                out[prefix] = json.dumps(value, sort_keys=True, default=str)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """A copy with changes applied, dotted or top-level (``{"tuner.rank": 32, "order": [...]}``),
        validated again."""
        merged = self.to_dict()
        for key, value in changes.items():
            section, dot, sub = key.partition(".")
            if dot:
                merged[section] = {**merged[section], sub: value}
            else:
                merged[key] = value
        return ExperimentConfig.from_dict(merged)


def _coerce(section_cls: type, key: str, value: Any) -> Any:
    """YAML/CLI values into the field's type where it is unambiguous (lists -> tuples)."""
    if key == "target_modules" and isinstance(value, list):
        return tuple(value)
    if key == "judge_options" and value is None:
        return {}
    return value


def _order_problems(order: tuple[str, ...]) -> list[str]:
    from coin_ray.tasks import TASK_NAMES  # local: tasks imports nothing heavy

    p: list[str] = []
    if len(order) < 1:
        p.append("order must name at least one task")
    unknown = [t for t in order if t not in TASK_NAMES]
    if unknown:
        p.append(f"order names unknown task(s) {unknown}; valid: {', '.join(TASK_NAMES)}")
    dupes = sorted({t for t in order if order.count(t) > 1})
    if dupes:
        p.append(f"order names task(s) {dupes} more than once; each task is one stage")
    return p
