"""The per-layer MoELoRA router: token -> expert gates (softmax, optional top-k) and the load-balancing loss."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from coin_ray.tuners.moelora.config import expert_problems


class MoELoRARouter(nn.Module):
    """Bias-free linear gate `in_features -> num_experts` with a per-token softmax.

    Dense by default (CoIN): every expert contributes with its softmax weight. With `top_k`, only the k largest
    gates of a token are kept and renormalised to sum to 1 (equivalently: a softmax over the k largest logits).

    When `aux_loss_weight > 0` each forward stores the Switch Transformer load-balancing loss in `last_aux_loss`
    (unweighted):

        L = E * sum_i f_i * P_i

    with P_i the mean over tokens of the full softmax probability of expert i (this carries the gradient) and f_i
    the fraction of routing slots that went to expert i (top-k slots, or the argmax expert under dense routing;
    not differentiable). L = 1 for perfectly uniform routing and grows to E when one expert takes everything.
    Every token of the batch counts, padding included (the layer never sees the attention mask).
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        *,
        top_k: int | None = None,
        aux_loss_weight: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        problems = expert_problems(num_experts, num_experts, top_k)
        if problems:
            raise ValueError("; ".join(problems))
        self.in_features = in_features
        self.num_experts = num_experts
        # top_k == E is dense routing; dropping it skips a topk + scatter per forward.
        self.top_k = None if top_k == num_experts else top_k
        self.aux_loss_weight = float(aux_loss_weight)
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, device=device, dtype=dtype))
        self.last_aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same init as nn.Linear(in_features, num_experts, bias=False), which is what CoIN's router is.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates of shape (..., num_experts), non-negative and summing to 1 over the last dim."""
        return self.route(F.linear(x.to(self.weight.dtype), self.weight)).to(x.dtype)

    def route(self, logits: torch.Tensor) -> torch.Tensor:
        """Gates (float32) from router logits (..., num_experts); records the aux loss when enabled. Split out of
        forward so MoELoRALinear can compute the logits in the same matmul as its experts' A."""
        # Softmax in float32: bf16 gates of 8 experts lose the small ones entirely.
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        chosen = None
        if self.top_k is None:
            gates = probs
        else:
            top_vals, chosen = probs.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(probs).scatter(-1, chosen, top_vals / top_vals.sum(-1, keepdim=True))
        if self.aux_loss_weight > 0:
            self.last_aux_loss = self._load_balancing_loss(probs, chosen)
        return gates

    def _load_balancing_loss(self, probs: torch.Tensor, chosen: torch.Tensor | None) -> torch.Tensor:
        probs = probs.reshape(-1, self.num_experts)
        if chosen is None:
            chosen = probs.argmax(dim=-1, keepdim=True)
        slots = chosen.reshape(-1)
        fraction = torch.bincount(slots, minlength=self.num_experts).to(probs.dtype) / slots.numel()
        return self.num_experts * (fraction * probs.mean(dim=0)).sum()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"aux_loss_weight={self.aux_loss_weight}"
        )
