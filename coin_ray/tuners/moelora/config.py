"""MoELoRAConfig: the hyperparameters of one MoELoRA adapter, validated once at construction."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coin_ray.config import expert_problems  # the expert-shape rules, shared with the experiment config

__all__ = ["MoELoRAConfig", "expert_problems"]


@dataclass(frozen=True)
class MoELoRAConfig:
    """Mixture-of-LoRA-experts adapter as CoIN defines it.

    Each adapted Linear gets `num_experts` LoRA pairs of rank `rank // num_experts` (total rank `rank`, so the
    parameter count equals a LoRA of rank `rank` plus one `in_features x num_experts` router per layer).
    Every problem found in the values is reported at once.
    """

    num_experts: int = field(default=4, metadata={"help": "E, experts per adapted layer (CoIN tried 2, 4, 8)."})
    rank: int = field(default=16, metadata={"help": "Total rank r over all experts; each expert has rank r / E."})
    alpha: float = field(default=32.0, metadata={"help": "Scale numerator: the adapter output is scaled by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter input (not on the router input)."})
    target_modules: str | tuple[str, ...] | None = field(
        default=None,
        metadata={
            "help": "Which nn.Linear layers to adapt. None: every Linear of the language model (q,k,v,o,gate,up,down; "
            "never the vision tower, projector or lm_head). A sequence: module-name suffixes, looked up inside the "
            "language model only. A string: a regex that must match the full module name (anywhere in the model)."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={"help": "Keep only the k largest gates per token and renormalise them; None = dense (CoIN)."},
    )
    aux_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the Switch-style load-balancing loss (0 = off, as in CoIN)."},
    )
    init_std: float = field(default=0.01, metadata={"help": "Std of the normal init of A (B starts at zero)."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, Sequence) and not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = expert_problems(self.num_experts, self.rank, self.top_k)
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout ({self.dropout}) must be in [0, 1): use dropout=0.05")
        if self.aux_loss_weight < 0:
            problems.append(f"aux_loss_weight ({self.aux_loss_weight}) must be >= 0: use 0.0 (off) or e.g. 0.01")
        if self.init_std <= 0:
            problems.append(f"init_std ({self.init_std}) must be > 0: use init_std=0.01")
        if self.alpha <= 0:
            problems.append(f"alpha ({self.alpha}) must be > 0: use alpha=2*rank (CoIN: r=128, alpha=256)")
        if isinstance(self.target_modules, tuple) and not self.target_modules:
            problems.append("target_modules (()) is empty: use None for every Linear of the language model")
        if problems:
            raise ValueError("invalid MoELoRAConfig:\n  - " + "\n  - ".join(problems))

    @property
    def expert_rank(self) -> int:
        """Rank of one expert, r / E."""
        return self.rank // self.num_experts

    @property
    def scaling(self) -> float:
        """alpha / r with the total rank r, as in CoIN."""
        return self.alpha / self.rank
