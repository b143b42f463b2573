"""Events the continual run emits, and the hook interface that consumers (tracking) implement.

Training code never imports MLflow: it calls these hooks on rank 0 only, and a tracker turns them into
runs, metrics and artifacts. Tests can run training with no hooks at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class RunInfo:
    """What a continual run is, known before its first stage."""

    name: str  # deterministic trial/run name, e.g. "order-ScienceQA>TextVQA>ImageNet-seed0"
    order: tuple[str, ...]  # task names in training order
    params: dict[str, Any]  # flattened experiment config (dotted keys), real values: consumers that send
    # them out of the process mask them (coin_ray.redact.redact_params, as tracking._tracker.trial_params does)
    benchmark: str  # "synthetic" or "coin"
    data_hash: str  # content hash from the pipeline manifest
    method: str = ""  # the --methods name (coin_ray.methods.method_label): lora, moelora, olora, ewc+replay, ...
    environment: dict[str, str] = field(default_factory=dict)  # coin_ray.environment.environment() of the workers


@dataclass(frozen=True)
class StageReport:
    """One finished stage: trained (or reused from the stage store) and evaluated on every task."""

    stage: int  # 0-based index into RunInfo.order
    task: str  # order[stage]
    scores: dict[str, float | None]  # instruction-following score in [0, 1] per task of the order
    knowledge: dict[str, float | None] | None  # judge score per task, or None when the judge is off
    train_losses: list[tuple[int, float]]  # (global optimizer step, loss) over this stage
    predictions: list[dict[str, Any]]  # capped samples: task, question_id, prompt, prediction, reference, score
    reused: bool  # True when the stage came from the stage store instead of training
    seconds: float  # wall time of the stage (train + eval)
    cost: dict[str, float] = field(default_factory=dict)  # the stage/* metrics (coin_ray.training.accounting)


@dataclass(frozen=True)
class RunResult:
    """The finished run: matrices are in training order, rows = stages, columns = tasks."""

    order: tuple[str, ...]
    matrix: list[list[float | None]]  # matrix[i][j] = score on order[j] after stage i
    zero_shot: list[float | None] | None  # scores before stage 1, or None
    knowledge_matrix: list[list[float | None]] | None
    knowledge_zero_shot: list[float | None] | None
    metrics: dict[str, float]  # cl_metrics(matrix, zero_shot) (+ "gk_*" from the knowledge matrix)
    stages_reused: tuple[int, ...] = field(default=())  # indices of stages served by the stage store
    adapter_dir: str | None = None  # final stage checkpoint folder (adapter + trainable parts)
    environment: dict[str, str] = field(default_factory=dict)  # where it ran (coin_ray.environment.environment)
    device_hours: float = 0.0  # what this run trained and evaluated cost (coin_ray.training.accounting)
    device_hours_saved: float = 0.0  # what the stages and cells it reused from the store cost when computed


class RunHooks(Protocol):
    """Consumers of continual-run events. All methods are called on rank 0 only, in this order:
    on_run_start, [on_zero_shot], on_stage_end * T, then on_run_end or on_run_failed."""

    def on_run_start(self, info: RunInfo) -> None: ...

    def on_zero_shot(self, scores: dict[str, float | None], knowledge: dict[str, float | None] | None) -> None: ...

    def on_stage_end(self, report: StageReport) -> None: ...

    def on_run_end(self, result: RunResult) -> None: ...

    def on_run_failed(self, error: BaseException) -> None: ...


class HookList:
    """Fans each event out to several hooks (e.g. the MLflow tracker and a console printer)."""

    def __init__(self, hooks: Sequence[RunHooks] = ()) -> None:
        self.hooks = list(hooks)

    def __getattr__(self, event: str):
        if not event.startswith("on_"):
            raise AttributeError(event)

        def call(*args: Any, **kwargs: Any) -> None:
            from coin_ray.profiling import span

            with span("tracking", event=event):
                for hook in self.hooks:
                    getattr(hook, event)(*args, **kwargs)

        return call
