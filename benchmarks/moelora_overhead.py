"""How much a MoELoRA training step costs over LoRA of the same total rank, and what fusing the experts saves.

    python benchmarks/moelora_overhead.py               # hidden 1024, seq 256, batch 8, E=4, r=32, 4 layers
    python benchmarks/moelora_overhead.py --smoke-test  # tiny sizes, for CI

Times forward+backward of a stack of frozen Linear layers with (a) peft's LoRA (r), (b) our fused MoELoRA
(E experts of rank r/E, routers), (c) the same MoELoRA parameters run through the naive per-expert loop.
Variants run round-robin within each repeat so machine noise hits them alike; reports medians, and the last
line is JSON: {"lora_ms", "moelora_ms", "loop_ms", "ratio" (= moelora / lora, wall-clock medians), plus
"loop_ratio", "cpu_ratio" (process CPU time, steadier on a shared machine) and the load average at the end}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from coin_ray.tuners.moelora import MoELoRALinear, moelora_loop_forward


class LoopMoELoRA(nn.Module):
    """Runs a MoELoRALinear's parameters through the per-expert loop instead of the fused forward."""

    def __init__(self, layer: MoELoRALinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return moelora_loop_forward(self.layer, x)


def build_stacks(hidden: int, layers: int, experts: int, rank: int, dropout: float) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(hidden, hidden, bias=False) for _ in range(layers))).requires_grad_(False)

    lora = copy.deepcopy(base)
    targets = [str(i) for i in range(layers)]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=targets)
    inject_adapter_in_model(config, lora)

    moelora = nn.Sequential(
        *(
            MoELoRALinear(copy.deepcopy(linear), num_experts=experts, rank=rank, alpha=2 * rank, dropout=dropout)
            for linear in base
        )
    )
    loop = nn.Sequential(*(LoopMoELoRA(layer) for layer in copy.deepcopy(moelora)))
    for stack in (lora, moelora, loop):
        with torch.no_grad():  # B != 0, as after some training (B = 0 changes no timing, but keep it honest)
            for name, param in stack.named_parameters():
                if param.requires_grad and ("lora_B" in name or "moelora_B" in name):
                    param.normal_(std=0.01)
        stack.train()
    return {"lora": lora, "moelora": moelora, "loop": loop}


def time_step(stack: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> tuple[float, float]:
    """(wall ms, process CPU ms) of one forward+backward. CPU time is less inflated than wall time when other
    processes compete for the cores (it still counts cache and memory-bandwidth contention, and OpenMP
    spin-waits when threads > 1)."""
    wall, cpu = time.perf_counter(), time.process_time()
    # A dense upstream gradient, as a real loss gives: `.sum().backward()` would hand the last layer a stride-0
    # expanded gradient, which matmuls must copy first and which would distort the comparison.
    stack(x).backward(grad_out)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    for param in stack.parameters():
        param.grad = None
    return wall * 1000.0, cpu * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes and few repeats, for CI")
    args = parser.parse_args()
    if args.smoke_test:
        args.hidden, args.seq, args.batch, args.layers, args.warmup, args.repeats = 64, 16, 2, 2, 1, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    stacks = build_stacks(args.hidden, args.layers, args.experts, args.rank, args.dropout)
    x = torch.randn(args.batch, args.seq, args.hidden)
    grad_out = torch.randn(args.batch, args.seq, args.hidden)
    times: dict[str, list[float]] = {name: [] for name in stacks}
    cpu_times: dict[str, list[float]] = {name: [] for name in stacks}
    for repeat in range(args.warmup + args.repeats):
        for name, stack in stacks.items():
            wall, cpu = time_step(stack, x, grad_out)
            if repeat >= args.warmup:
                times[name].append(wall)
                cpu_times[name].append(cpu)

    medians = {name: statistics.median(values) for name, values in times.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    print(
        f"hidden={args.hidden} seq={args.seq} batch={args.batch} layers={args.layers} E={args.experts} "
        f"r={args.rank} dropout={args.dropout} threads={torch.get_num_threads()} repeats={args.repeats}"
    )
    for name, values in times.items():
        print(
            f"  {name:8s} wall median {medians[name]:9.2f} ms  min {min(values):9.2f}  max {max(values):9.2f}"
            f"   cpu median {cpu_medians[name]:9.2f} ms"
        )
    result = {
        "lora_ms": round(medians["lora"], 3),
        "moelora_ms": round(medians["moelora"], 3),
        "loop_ms": round(medians["loop"], 3),
        "ratio": round(medians["moelora"] / medians["lora"], 4),
        "loop_ratio": round(medians["loop"] / medians["lora"], 4),
        "cpu_ratio": round(cpu_medians["moelora"] / cpu_medians["lora"], 4),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
