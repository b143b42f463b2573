"""Typed experiment configuration: the one place a CLI / YAML / Tune dict becomes frozen dataclasses.

`ExperimentConfig.from_dict` accepts nested sections (``{"tuner": {"rank": 16}}``) or dotted keys
(``{"tuner.rank": 16}``), validates every field, and raises one `ConfigError` listing every problem.
Every value is coerced to and checked against its field's declared type (`coerce_field`): a str that parses
as a number is a number (YAML reads ``1e-3`` as a string), an int is a float, booleans are true/false only,
None only where the field is Optional. `load_yaml_file` and `parse_override` read YAML files and
``--set KEY=VALUE`` text with the same rules. `flatten()` gives the dotted view that MLflow params and
stage-store keys are built from.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import json
import math
import numbers
import os
import re
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Mapping, Union, get_args, get_origin, get_type_hints

from coin_ray.errors import UserError

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "TunerConfig",
    "ContinualConfig",
    "TrainConfig",
    "EvalConfig",
    "ScalingConfig",
    "TrackingConfig",
    "ExperimentConfig",
    "TRACKING_SCHEMES",
    "coerce_field",
    "divisible_rank",
    "expert_problems",
    "dotted",
    "load_yaml_file",
    "preset",
    "parse_override",
]

BENCHMARKS = ("synthetic", "coin")
METHODS = ("moelora", "lora", "full")
# cl.method: the continual-learning method on top of the tuner (= the registry of coin_ray.methods; a test
# keeps them equal; not imported so that reading a config never imports torch)
CL_METHODS = ("none", "olora", "ewc", "lwf")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision: the autocast dtype (coin_ray.models._precision)
MODEL_DTYPES = ("auto", "bf16", "fp16", "fp32")  # model.dtype: the dtype the frozen base is held in
# model.prompt: auto (the family's own: CoIN's vicuna_v1 for LLaVA-1.5, the checkpoint's chat template for every
# other family), CoIN's vicuna_v1, or the checkpoint's own chat template
PROMPTS = ("auto", "vicuna_v1", "checkpoint")
# model_type -> the prompt `auto` means (= each family's first `Family.prompts`; a test keeps them equal);
# a family not listed is prompted with its checkpoint's chat template
AUTO_PROMPTS = {"llava": "vicuna_v1", "llava_llama": "vicuna_v1"}  # llava_llama: LLaVA's original layout


def auto_prompt(source: Any) -> str | None:
    """The prompt `model.prompt: auto` means for `source`: vicuna_v1 for the tiny model and LLaVA folders,
    checkpoint for a folder of any other family; None when the folder's config.json cannot be read (the
    model-source check then says why)."""
    if source == "tiny":
        return AUTO_PROMPTS["llava"]
    if not isinstance(source, str):
        return None
    try:
        model_type = json.loads((Path(source).expanduser() / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return AUTO_PROMPTS.get(model_type, "checkpoint") if isinstance(model_type, str) else None
INSTRUCTION_STYLES = ("original", "diverse", "10type")  # = coin_ray.tasks.INSTRUCTION_STYLES (a test keeps them equal)
JUDGES = ("none", "embedding", "llm")  # = coin_ray.evaluation.judges.JUDGE_KINDS (a test keeps them equal;
# not imported so that reading a config never imports the HTTP stack)


# MLflow stores a tracking URI may name (SQLAlchemy dialects may carry a driver: postgresql+psycopg2://)
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc")


def divisible_rank(rank: int, num_experts: int) -> int:
    """The smallest multiple of `num_experts` that is >= `rank`: the total rank a MoELoRA of `num_experts`
    experts can have (each expert gets rank / num_experts). The one rounding rule: config errors suggest it,
    and the hyper-parameter search applies it to a sampled (experts, rank) pair."""
    return -(-rank // num_experts) * num_experts


def expert_problems(num_experts: int, rank: int, top_k: int | None, prefix: str = "") -> list[str]:
    """Every broken rule among MoELoRA's expert-shape values, each with the value received and a fix. The one
    place of these rules: the experiment config (prefix "tuner."), MoELoRAConfig and the layer/router
    builders all call it."""
    problems = []
    if not isinstance(num_experts, int) or num_experts < 1:
        problems.append(f"{prefix}num_experts ({num_experts!r}) must be an integer >= 1: use num_experts=4")
    if not isinstance(rank, int) or rank < 1:
        problems.append(f"{prefix}rank ({rank!r}) must be an integer >= 1: use rank=16")
    if not problems and rank % num_experts:
        problems.append(
            f"{prefix}rank ({rank}) must be divisible by {prefix}num_experts ({num_experts}): use "
            f"rank={divisible_rank(rank, num_experts)} (each expert gets rank r/E)"
        )
    if top_k is not None and (
        not isinstance(top_k, int) or top_k < 1 or (isinstance(num_experts, int) and top_k > num_experts)
    ):
        problems.append(
            f"{prefix}top_k ({top_k!r}) must be None (dense routing) or an integer in [1, num_experts={num_experts}]: "
            f"use top_k=None or top_k={min(2, max(1, num_experts)) if isinstance(num_experts, int) else 2}"
        )
    return problems



class ConfigError(UserError):
    """Invalid configuration; `problems` lists every problem found, one line each (one problem: one line)."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            super().__init__(f"invalid configuration: {self.problems[0]}")
        else:
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
    max_train_rows: int | None = None  # cap per task: a seeded random subset of this many rows (None = all)
    max_test_rows: int | None = None  # per task for evaluation: a seeded random subset (CoIN's "slim" sets: 4000)
    train_fraction: float = 1.0  # a seeded random fraction of each train split (CoIN's data-volume study)
    instruction_style: str = "original"  # original | diverse | 10type (synthetic: generated; coin: the folder)
    textvqa_annotations: str | None = None  # coin: TextVQA annotation JSON with the 10 human answers per question
    max_length: int = 160  # token budget per example (prompt + image tokens + answer)
    max_image_pixels: int = 64_000_000  # images with more pixels (width x height) are rejected: image_too_large
    materialize_below_mb: int = 512  # stages smaller than this are read once into Ray's object store
    seed: int = 0  # generator seed (synthetic), and the seed of the train/test subsets (the same in every trial)

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
        _check(p, 0 < self.train_fraction <= 1,
               f"data.train_fraction must be in (0, 1] (1 = every train row), got {self.train_fraction}")
        _check(p, self.instruction_style in INSTRUCTION_STYLES,
               f"data.instruction_style must be one of {INSTRUCTION_STYLES}, got {self.instruction_style!r}")
        return p


@dataclass(frozen=True)
class ModelConfig:
    """The VLM: `source="tiny"` builds a LLaVA-style model from the sizes below (offline, CPU-sized);
    any other value is a local checkpoint folder (e.g. llava-1.5-7b-hf) loaded with local_files_only."""

    source: str = "tiny"
    # with source a language-model folder (e.g. vicuna-7b-v1.5): the parts LLaVA is assembled from, once per
    # content, into <storage_path>/models/<hash>/ (coin_ray.models._assemble); vision_tower also names the CLIP
    # folder of a source in LLaVA's original layout (model_type llava_llama) whose mm_vision_tower is a hub id
    vision_tower: str | None = None  # a local CLIP vision folder with its preprocessor_config.json
    projector: str | None = None  # LLaVA's stage-1 mm_projector.bin (or .safetensors)
    dtype: str = "auto"  # frozen base weights: auto (bf16 on CUDA with bf16, fp32 on CPU) | bf16 | fp16 | fp32
    prompt: str = "auto"  # auto (the family's: vicuna_v1 for LLaVA, else checkpoint) | vicuna_v1 | checkpoint
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    initializer_range: float = 0.1
    pretrain_steps: int = 300  # tiny model: instruction-pretraining "stage 0" of the base (0 = off), cached
    pretrain_lr: float = 2e-3
    seed: int = 0

    def resolved_prompt(self) -> str:
        """The prompt trained with: `prompt`, or for `auto` the family's own (`auto_prompt`; "auto" while the
        folder cannot be read). The config keeps `auto`, so a changed source (a --grid over folders) resolves
        again; `flatten()` (MLflow params, hashes) holds the resolved value."""
        if self.prompt != "auto":
            return self.prompt
        if self.vision_tower or self.projector:  # a LLaVA assembled from parts (coin_ray.models._assemble)
            return AUTO_PROMPTS["llava"]
        return auto_prompt(self.source) or "auto"

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
        if self.source == "tiny":
            for name in ("vision_tower", "projector"):
                _check(p, getattr(self, name) is None, f"model.{name} is for assembling a model from parts; "
                       f"model.source 'tiny' has its own: set model.source to a language-model folder or drop "
                       f"model.{name}")
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
    init_std: float = 0.01  # MoELoRA: std of the normal init of each expert's A (B starts at zero)

    # the fields each method reads; the others do not change its result (stage keys leave them out)
    METHOD_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "moelora": ("num_experts", "rank", "alpha", "dropout", "target_modules", "top_k", "aux_loss_weight",
                    "init_std"),
        "lora": ("rank", "alpha", "dropout", "target_modules"),
        "full": (),
    }

    def options(self) -> dict[str, Any]:
        """The chosen method's hyper-parameters, as `apply_tuner(model, method, **options)` takes them."""
        return {name: getattr(self, name) for name in self.METHOD_FIELDS.get(self.method, ())}

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.method in METHODS, f"tuner.method must be one of {METHODS}, got {self.method!r}")
        _check(p, self.rank >= 1, f"tuner.rank must be >= 1, got {self.rank}")
        _check(p, self.num_experts >= 1, f"tuner.num_experts must be >= 1, got {self.num_experts}")
        if self.method == "moelora" and self.num_experts >= 1 and self.rank >= 1:
            p += expert_problems(self.num_experts, self.rank, self.top_k, prefix="tuner.")
        _check(p, 0.0 <= self.dropout < 1.0, f"tuner.dropout must be in [0, 1), got {self.dropout}")
        _check(p, self.alpha > 0, f"tuner.alpha must be > 0, got {self.alpha} (CoIN: alpha = 2 x rank)")
        _check(p, self.aux_loss_weight >= 0, f"tuner.aux_loss_weight must be >= 0, got {self.aux_loss_weight}")
        _check(p, self.init_std > 0, f"tuner.init_std must be > 0, got {self.init_std}")
        return p


@dataclass(frozen=True)
class ContinualConfig:
    """The continual-learning method trained on top of the tuner (coin_ray/methods): `none` (plain sequential
    tuning), `olora` (a new LoRA block per task, earlier ones frozen, orthogonality loss; needs tuner.method
    lora), `ewc` (diagonal-Fisher quadratic penalty) or `lwf` (distillation from the previous stage's model).
    Replay composes with any of them through train.replay_per_task."""

    method: str = "none"
    olora_lambda_orth: float = 0.5  # O-LoRA lambda_1: weight of sum |A_new A_old^T| over the adapted layers
    olora_lambda_l2: float = 0.0  # O-LoRA lambda_2: weight of the L2 norm of the new adapter
    ewc_lambda: float = 1000.0  # EWC penalty lambda/2 * sum F_i (theta_i - theta*_i)^2
    ewc_samples: int = 64  # training examples of a stage its diagonal Fisher is estimated on
    lwf_weight: float = 1.0  # LwF: weight of the distillation term
    lwf_temperature: float = 2.0  # LwF: softmax temperature T (the term is scaled by T^2)

    # the fields each method reads; the others do not change its result (stage keys leave them out)
    METHOD_FIELDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "none": (),
        "olora": ("olora_lambda_orth", "olora_lambda_l2"),
        "ewc": ("ewc_lambda", "ewc_samples"),
        "lwf": ("lwf_weight", "lwf_temperature"),
    }

    def options(self) -> dict[str, Any]:
        """The chosen method's options (the fields it reads)."""
        return {name: getattr(self, name) for name in self.METHOD_FIELDS.get(self.method, ())}

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.method in CL_METHODS, f"cl.method must be one of {CL_METHODS}, got {self.method!r}")
        for name in ("olora_lambda_orth", "olora_lambda_l2", "ewc_lambda", "lwf_weight"):
            _check(p, getattr(self, name) >= 0, f"cl.{name} must be >= 0, got {getattr(self, name)}")
        _check(p, self.ewc_samples >= 1, f"cl.ewc_samples must be >= 1, got {self.ewc_samples}")
        _check(p, self.lwf_temperature > 0, f"cl.lwf_temperature must be > 0, got {self.lwf_temperature}")
        return p


def continual_problems(cl: ContinualConfig, tuner: TunerConfig, train: "TrainConfig") -> list[str]:
    """The rules between cl.method and the tuner/optimiser it trains with (each value is checked by its own
    section)."""
    p: list[str] = []
    if cl.method == "olora":
        _check(p, tuner.method == "lora", f"cl.method olora trains LoRA blocks: set tuner.method lora, got "
                                          f"{tuner.method!r}")
        _check(p, train.weight_decay == 0, f"cl.method olora freezes the earlier tasks' blocks by masking their "
                                           f"gradients, which AdamW's weight decay would still shrink: set "
                                           f"train.weight_decay 0, got {train.weight_decay}")
    return p


@dataclass(frozen=True)
class TrainConfig:
    """Per-stage optimisation. Each stage gets a fresh AdamW + warmup/cosine schedule (as CoIN's per-stage
    scripts do); `max_steps` > 0 overrides `epochs`."""

    lr: float = 1e-3
    projector_lr: float | None = None  # the projector's AdamW lr (None = lr; CoIN: 2e-5 beside LoRA's 2e-4)
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    epochs: float = 10.0  # the embedded default; CoIN trains 1 epoch per stage (configs/coin_llava7b.yaml)
    max_steps: int = 0
    batch_size: int = 16  # per worker
    grad_accum: int = 1
    precision: str = "auto"  # autocast dtype: auto = model.dtype when half, else bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    replay_per_task: int = 0  # a seeded random sample of this many examples of each past task, shuffled in
    batch_size_per_task: Mapping[str, Any] = field(default_factory=dict)  # e.g. {Grounding: 8}; else batch_size
    joint: bool = False  # the multitask upper bound: one stage on the union of the order's tasks
    max_grad_norm: float = 1.0
    # each optimizer step's rows (batch x workers x grad_accum) sorted by length inside the seeded epoch order,
    # as LLaVA's group_by_modality_length groups them (CoIN: on): less padding, the same rows each epoch
    group_by_length: bool = False
    seed: int = 0

    def problems(self) -> list[str]:
        p: list[str] = []
        _check(p, self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(p, self.projector_lr is None or self.projector_lr > 0,
               f"train.projector_lr must be > 0 or null (= train.lr), got {self.projector_lr}")
        _check(p, 0 <= self.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        _check(p, self.epochs > 0 or self.max_steps > 0, "train.epochs or train.max_steps must be > 0")
        _check(p, self.max_steps >= 0, f"train.max_steps must be >= 0, got {self.max_steps}")
        _check(p, self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _check(p, self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(p, self.precision in PRECISIONS, f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(p, self.replay_per_task >= 0, f"train.replay_per_task must be >= 0, got {self.replay_per_task}")
        for task, size in self.batch_size_per_task.items():
            _check(p, isinstance(size, int) and not isinstance(size, bool) and size >= 1,
                   f"train.batch_size_per_task.{task} must be an integer >= 1, got {size!r}")
        return p

    def batch_size_of(self, task: str) -> int:
        """The per-worker batch size of `task`'s stage: batch_size_per_task[task] where given, else batch_size."""
        return int(self.batch_size_per_task.get(task, self.batch_size))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation after every stage on every task of the order (greedy decoding)."""

    batch_size: int = 40
    zero_shot: bool = False  # also evaluate before stage 1 (needed for fwt)
    judge: str = "embedding"  # knowledge matrix: none | embedding (offline) | llm
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
    system_metrics: bool = True  # MLflow's system/* metrics (CPU, GPU, memory over time) on trial runs (needs psutil)

    def problems(self) -> list[str]:
        p = [] if self.experiment else ["tracking.experiment must not be empty"]
        uri_problem = _tracking_uri_problem(self.tracking_uri)
        return p + ([uri_problem] if uri_problem else [])


def _tracking_uri_problem(uri: str) -> str | None:
    """Refuse, before anything starts, a tracking URI that no MLflow 3.17 store accepts."""
    scheme = uri.partition(":")[0].partition("+")[0].lower() if ":" in uri else ""
    if uri.lower() in ("databricks", "databricks-uc") or scheme in TRACKING_SCHEMES:
        return None
    fix = "pass --tracking-uri sqlite:///mlflow.db (a local database) or http://HOST:5000 (an MLflow server)"
    if scheme in ("", "file") or len(scheme) == 1:  # a bare path (C:\ too) or file: URI
        return (f"tracking.tracking_uri {uri!r} is a file store, which MLflow 3.17 refuses (filesystem backend "
                f"in maintenance mode): {fix}")
    return f"tracking.tracking_uri {uri!r}: unknown scheme {scheme!r} (valid: {', '.join(TRACKING_SCHEMES)}): {fix}"


_SECTIONS = {
    "data": DataConfig,
    "model": ModelConfig,
    "tuner": TunerConfig,
    "cl": ContinualConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "scaling": ScalingConfig,
    "tracking": TrackingConfig,
}


@dataclass(frozen=True)
class ExperimentConfig:
    """One continual run: a task order plus everything that determines its result."""

    # the embedded default study: four of CoIN's tasks (in CoIN's order), whose order effect the synthetic
    # calibration measured above seed noise at these budgets (README "Numbers"); `--tasks` or a --config
    # (configs/coin_llava7b.yaml) names all eight
    order: tuple[str, ...] = ("GQA", "Grounding", "VQAv2", "OCRVQA")
    name: str = "coin-run"  # deterministic run name (no timestamps): restarts find their state by it
    storage_path: str = "runs"
    use_stage_cache: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tuner: TunerConfig = field(default_factory=TunerConfig)
    cl: ContinualConfig = field(default_factory=ContinualConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        problems: list[str] = []
        for section, section_cls in _SECTIONS.items():
            value = getattr(self, section)
            if not isinstance(value, section_cls):
                problems.append(f"{section} must be a {section_cls.__name__}, got {value!r}")
                continue
            # a section with a value of the wrong type is not checked further (its comparisons would fail)
            problems += _type_problems(value, f"{section}.") or value.problems()
        if not problems:
            problems += precision_problems(self.model.dtype, self.train.precision)
            problems += continual_problems(self.cl, self.tuner, self.train)
        top_problems = _type_problems(self, "")
        problems += top_problems
        if not any(p.startswith("order:") for p in top_problems):
            from coin_ray.tasks import InvalidOrderError, validate_order

            try:  # canonical spelling ("gqa" -> "GQA"): the one order check, shared with the sweep scripts
                object.__setattr__(self, "order", validate_order(self.order))
            except InvalidOrderError as e:
                problems += [f"order: {p}" for p in e.problems]
        if isinstance(self.train, TrainConfig):
            from coin_ray.tasks import TASK_NAMES

            for task in self.train.batch_size_per_task:
                _check(problems, task in TASK_NAMES, f"train.batch_size_per_task names {task!r}, not a task: use "
                       f"one of {', '.join(TASK_NAMES)} (spelled as there)")
        if isinstance(self.name, str):
            _check(problems, bool(self.name) and "/" not in self.name,
                   f"name must be a non-empty string without '/', got {self.name!r}")
        if isinstance(self.storage_path, str):
            _check(problems, "://" not in self.storage_path,
                   f"storage_path must be a local or mounted shared folder, got {self.storage_path!r}: the stage "
                   f"store and runs/ are written as local files (mount the bucket, e.g. with s3fs or gcsfuse, "
                   f"and pass the mount point)")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        """Build from nested sections and/or dotted keys; every unknown key or bad value is reported.
        Values are coerced to their field's type (`coerce_field`); later keys win."""
        problems: list[str] = []
        if not isinstance(raw, Mapping):
            raise ConfigError([f"a config is a mapping of keys to values, got {type(raw).__name__} {raw!r}"])
        sections: dict[str, dict[Any, Any]] = {name: {} for name in _SECTIONS}
        top: dict[str, Any] = {}
        top_fields = {f.name for f in fields(cls)} - set(_SECTIONS)
        for key, value in raw.items():
            if not isinstance(key, str):
                problems.append(f"config keys must be strings, got {key!r}")
                continue
            name, dot, sub = key.partition(".")
            if name in _SECTIONS:
                if dot:
                    sections[name][sub] = value
                elif isinstance(value, Mapping):
                    sections[name].update(value)
                elif value is not None:  # None: a YAML section with nothing under it
                    example = fields(_SECTIONS[name])[0].name
                    problems.append(f"{name} must be a mapping of its fields (e.g. {name}: {{{example}: ...}}), "
                                    f"got {value!r}")
            elif key in top_fields:
                top[key] = value
            else:
                problems.append(f"unknown key {key!r}; valid: {', '.join(sorted(top_fields))} and the sections "
                                f"{', '.join(_SECTIONS)} (as section.field)")
        kwargs: dict[str, Any] = {}
        for name, values in sections.items():
            section_cls = _SECTIONS[name]
            valid = {f.name for f in fields(section_cls)}
            for u in sorted((str(k) for k in values if k not in valid)):
                problems.append(f"unknown key {name}.{u}; valid keys: {', '.join(sorted(valid))}")
            args, type_problems = _coerce_all(section_cls, {k: v for k, v in values.items() if k in valid}, f"{name}.")
            problems += type_problems
            if not type_problems:  # a section with a mistyped value keeps its defaults for the value checks
                kwargs[name] = section_cls(**args)
        args, type_problems = _coerce_all(cls, top, "")
        problems += type_problems
        kwargs.update(args)
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
            if isinstance(value, Mapping) and not prefix.endswith(("judge_options", "batch_size_per_task")):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            elif isinstance(value, (list, tuple, dict)) or (isinstance(value, Mapping)):
                out[prefix] = json.dumps(value, sort_keys=True, default=str)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        out["model.prompt"] = self.model.resolved_prompt()  # what trains (a tiny run's is vicuna_v1, as before auto)
        return out

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """A copy with changes applied, dotted or top-level (``{"tuner.rank": 32, "order": [...]}``),
        validated again."""
        merged = self.to_dict()
        for key, value in changes.items():
            section, dot, sub = key.partition(".")
            if dot and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], sub: value}
            else:  # a top-level field, or a key no section has: from_dict names it as unknown
                merged[key] = value
        return ExperimentConfig.from_dict(merged)


class _Mismatch(Exception):
    """A value that does not fit a field's type (`coerce_field` turns it into a message)."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _optional(hint: Any) -> tuple[bool, Any]:
    """(True, X) for `X | None`, else (False, hint)."""
    if get_origin(hint) in (Union, types.UnionType):
        args = get_args(hint)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return True, rest[0]
    return False, hint


def _is_mapping(hint: Any) -> bool:
    return get_origin(hint) in (collections.abc.Mapping, dict) or hint in (dict, Mapping)


def _describe(hint: Any) -> str:
    optional, inner = _optional(hint)
    if get_origin(inner) is tuple:
        text = "a list of strings"
    elif _is_mapping(inner):
        text = "a mapping of keys to values"
    else:
        text = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
            inner, getattr(inner, "__name__", str(inner)))
    return f"{text} or null" if optional else text


def _to_number(value: Any) -> Any:
    """A str that parses as a number becomes one (YAML 1.1 reads `1e-3` as a string); others pass through."""
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                pass
    return value


def _coerce(hint: Any, value: Any) -> Any:
    optional, inner = _optional(hint)
    if value is None:
        if optional:
            return None
        if _is_mapping(inner):
            return {}  # a YAML key with nothing under it
        raise _Mismatch
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise _Mismatch
    if inner in (int, float):
        number = _to_number(value)
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
            raise _Mismatch
        if inner is float:
            return float(number)
        if isinstance(number, numbers.Integral):
            return int(number)
        if float(number).is_integer():  # 1e3 or 32.0 for an int field; 2.5 is refused
            return int(number)
        raise _Mismatch
    if inner is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        raise _Mismatch
    if get_origin(inner) is tuple:  # tuple[str, ...]: a list, or one string of comma-separated names
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) for x in items):
            raise _Mismatch
        return tuple(x.strip() for x in items if x.strip())
    if _is_mapping(inner):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if isinstance(inner, type) and isinstance(value, inner):
        return value
    raise _Mismatch


def coerce_field(cls: type, name: str, value: Any, prefix: str = "") -> Any:
    """`value` as field `name` of dataclass `cls` declares it; ConfigError naming field, value and type."""
    try:
        return _coerce(_hints(cls)[name], value)
    except _Mismatch:
        raise ConfigError([f"{prefix}{name}: expected {_describe(_hints(cls)[name])}, got {value!r}"]) from None


def _coerce_all(cls: type, values: Mapping[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        if name == "order" and cls is ExperimentConfig and isinstance(value, str):
            value = value.split(">")  # the written form of an order: "ScienceQA>TextVQA>ImageNet"
        try:
            out[name] = coerce_field(cls, name, value, prefix)
        except ConfigError as e:
            problems += e.problems
    return out, problems


def _type_problems(obj: Any, prefix: str) -> list[str]:
    """The fields of a built dataclass whose values do not fit their declared types (sections skipped)."""
    values = {f.name: getattr(obj, f.name) for f in fields(obj) if f.name not in _SECTIONS}
    return _coerce_all(type(obj), values, prefix)[1]


def _field_owner(key: str) -> tuple[type, str] | None:
    """(dataclass, field name) of a dotted or top-level key; None for a key no field has."""
    section, dot, sub = key.partition(".")
    if dot and section in _SECTIONS and sub in {f.name for f in fields(_SECTIONS[section])}:
        return _SECTIONS[section], sub
    if not dot and key in {f.name for f in fields(ExperimentConfig)} - set(_SECTIONS):
        return ExperimentConfig, key
    return None


@functools.cache
def _yaml_loader() -> type:
    """PyYAML's SafeLoader with YAML 1.2 scalars: only true/false are booleans (`yes`, `on`, `no` stay
    strings, so `experiment: on` is the name it looks like) and `1e-3` is a float."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 - a SafeLoader subclass


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def dotted(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config (a YAML file's sections) as dotted keys, so that layers merge field by field."""
    out: dict[str, Any] = {}
    for section, value in loaded.items():
        if section in _SECTIONS and isinstance(value, Mapping):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def preset(name: str) -> dict[str, Any]:
    """configs/<name>.yaml as dotted keys (a layer over the defaults, e.g. the smoke preset)."""
    return dotted(load_yaml_file(CONFIG_DIR / f"{name}.yaml"))


def load_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML experiment config as a dict; ConfigError naming the file and line of a syntax error, or saying
    that the top level is not a mapping."""
    import yaml

    path = Path(path)
    try:
        loaded = _load_yaml(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        context = ""
        if e.context and e.context_mark and e.problem_mark:  # e.g. where an unclosed [ began
            context = f" ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})"
        raise ConfigError([f"{where}: YAML syntax error: {e.problem or e.context}{context}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path}: cannot be read ({e})"]) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections and keys (e.g. `tuner: {{rank: 16}}`), "
                           f"got {type(loaded).__name__} {loaded!r:.60}"])
    return loaded


def parse_override(key: str, text: str) -> Any:
    """The value of `--set KEY=TEXT`: the raw text for a string field (so `--set tracking.experiment=on` or
    `=007` is that name; `null` for an Optional one is None), YAML 1.2 scalars otherwise (`1e-3`, `true`,
    `[q_proj, v_proj]`, `{model: x}`); `coerce_field` then checks it against the field's type."""
    import yaml

    target = _field_owner(key)
    if target is not None:
        optional, inner = _optional(_hints(target[0])[target[1]])
        if inner is str:
            return None if optional and text.strip() in ("null", "~", "") else text
    try:
        return _load_yaml(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError([f"--set {key}={text}: the value is not valid YAML ({problem}); quote it or fix it"]) from None
