"""MoELoRALinear: an nn.Linear plus E LoRA experts computed in one fused pass, and the naive loop it must equal."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from coin_ray.tuners.moelora.config import expert_problems
from coin_ray.tuners.moelora.router import MoELoRARouter


class MoELoRALinear(nn.Module):
    """Wraps a frozen nn.Linear `W`:  y = W x + sum_i g_i(x) * B_i A_i dropout(x) * (alpha / r).

    Experts are stored concatenated: `moelora_A` is (r, in) and `moelora_B` is (out, r); expert i owns rows
    [i*r/E, (i+1)*r/E) of A and the same columns of B. The forward is fused: one matmul into the full rank r,
    each expert's r/E slice scaled by its gate (a broadcast over a (..., E, r/E) view, no copy), one matmul
    back, accumulated straight into W x (addmm). That is a LoRA of rank r plus a (in x E) router matmul and an
    elementwise scale of the (..., r) hidden, with no Python loop over experts. The adapter is never merged into
    W (the gates depend on the input).

    Where dropout is off (eval, or dropout=0) A and the router weight are applied in one matmul. In training
    with dropout the router reads x and the experts read dropout(x). Difference from CoIN's code: its loop calls
    dropout once per expert (E independent masks); here one mask is shared by all experts (same expectation,
    no E copies of x). In eval mode or with dropout=0 the two are identical.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        top_k: int | None = None,
        aux_loss_weight: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(
                f"MoELoRALinear wraps nn.Linear, got {type(base_layer).__name__}: target only Linear layers"
            )
        problems = expert_problems(num_experts, rank, top_k)
        if problems:
            raise ValueError("; ".join(problems))
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.rank = rank
        self.expert_rank = rank // num_experts
        self.scaling = alpha / rank
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.moelora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.moelora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.moelora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.moelora_router = MoELoRARouter(
            self.in_features, num_experts, top_k=top_k, aux_loss_weight=aux_loss_weight, **factory
        )
        self.init_std = init_std
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """CoIN's init: A ~ N(0, init_std), B = 0 (so the adapter starts as the identity), router like nn.Linear."""
        nn.init.normal_(self.moelora_A, mean=0.0, std=self.init_std)
        nn.init.zeros_(self.moelora_B)
        self.moelora_router.reset_parameters()

    # transformers and peft code sometimes reads `.weight` / `.bias` of a projection; forward them to W.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        adapter_x = x.to(self.moelora_A.dtype)
        if self.training and isinstance(self.moelora_dropout, nn.Dropout):
            # The router sees x itself and the experts see dropout(x) (as in CoIN): two input matmuls.
            logits = F.linear(adapter_x, self.moelora_router.weight)
            hidden = F.linear(self.moelora_dropout(adapter_x), self.moelora_A)
        else:
            # Same input for both: one matmul into [r experts' ranks | E router logits] reads x once, and one
            # matmul in backward produces the input gradient of both.
            both = F.linear(adapter_x, torch.cat([self.moelora_A, self.moelora_router.weight]))
            hidden, logits = both.split([self.rank, self.num_experts], dim=-1)
        gates = self.moelora_router.route(logits)  # (..., E), float32
        # Fold alpha/r into the E gates rather than into the (..., out) output: E multiplies instead of `out`.
        scaled_gates = (gates * self.scaling).to(hidden.dtype).unsqueeze(-1)  # (..., E, 1)
        hidden = (hidden.unflatten(-1, (self.num_experts, self.expert_rank)) * scaled_gates).flatten(-2)
        # result + hidden @ B^T as one GEMM with beta=1: no separate pass over the (..., out) output.
        flat = torch.addmm(
            result.reshape(-1, self.out_features),
            hidden.reshape(-1, self.rank).to(result.dtype),
            self.moelora_B.to(result.dtype).t(),
        )
        return flat.view(result.shape)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, rank={self.rank}, expert_rank={self.expert_rank}, "
            f"scaling={self.scaling}"
        )


def moelora_loop_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The MoELoRA formula written as the per-expert Python loop CoIN's code uses; the reference that the fused
    `MoELoRALinear.forward` is tested and benchmarked against. Same parameters, same result (up to rounding).
    Dropout draws a fresh mask here, so compare in eval mode or with dropout 0."""
    result = layer.base_layer(x)
    gates = layer.moelora_router(x)
    dropped = layer.moelora_dropout(x.to(layer.moelora_A.dtype))
    for i in range(layer.num_experts):
        rows = slice(i * layer.expert_rank, (i + 1) * layer.expert_rank)
        expert_out = F.linear(F.linear(dropped, layer.moelora_A[rows]), layer.moelora_B[:, rows])
        result = result + (gates[..., i : i + 1] * expert_out * layer.scaling).to(result.dtype)
    return result
