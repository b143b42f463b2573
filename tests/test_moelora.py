"""MoELoRA layer, router and config: the math (fused == loop, E=1 == LoRA), routing, aux loss, bad input."""
from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from coin_ray.tuners import MoELoRAConfig, MoELoRALinear, moelora_loop_forward
from coin_ray.tuners.moelora import MoELoRARouter


def make_layer(num_experts: int = 4, rank: int = 8, *, in_f: int = 12, out_f: int = 10, **kwargs) -> MoELoRALinear:
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(in_f, out_f), num_experts=num_experts, rank=rank, alpha=16.0, **kwargs)
    with torch.no_grad():  # B = 0 at init would hide every expert; give it values as after training
        layer.moelora_B.normal_(std=0.5)
    return layer


@pytest.mark.parametrize("num_experts,rank,top_k", [(1, 4, None), (2, 8, None), (4, 8, None), (4, 8, 2), (8, 8, 3)])
def test_fused_forward_equals_naive_expert_loop(num_experts, rank, top_k):
    layer = make_layer(num_experts, rank, top_k=top_k)
    x = torch.randn(3, 5, 12, requires_grad=True)
    fused = layer(x)
    loop = moelora_loop_forward(layer, x)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    # Gradients agree too (the fused path is what trains).
    grads_fused = torch.autograd.grad(fused.square().sum(), [x, layer.moelora_A, layer.moelora_router.weight])
    grads_loop = torch.autograd.grad(loop.square().sum(), [x, layer.moelora_A, layer.moelora_router.weight])
    for a, b in zip(grads_fused, grads_loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_fused_forward_equals_loop_with_dropout(training):
    layer = make_layer(4, 8, dropout=0.3).train(training)
    x = torch.randn(3, 5, 12)
    torch.manual_seed(7)
    fused = layer(x)
    torch.manual_seed(7)  # the same dropout mask for both (one mask shared by the experts)
    loop = moelora_loop_forward(layer, x)
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)
    torch.manual_seed(8)
    assert torch.equal(layer(x), fused) is not training  # dropout acts in training only


def test_one_expert_equals_peft_lora_with_the_same_weights():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    moe = MoELoRALinear(base, num_experts=1, rank=4, alpha=8.0, dropout=0.1)
    holder = nn.Sequential()
    holder.add_module("proj", nn.Linear(12, 10))
    config = LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.1, target_modules=["proj"])
    lora = inject_adapter_in_model(config, holder).proj
    with torch.no_grad():
        lora.base_layer.load_state_dict(base.state_dict())
        moe.moelora_B.normal_()
        lora.lora_A["default"].weight.copy_(moe.moelora_A)
        lora.lora_B["default"].weight.copy_(moe.moelora_B)
    moe.eval(), lora.eval()
    x = torch.randn(2, 7, 12)
    torch.testing.assert_close(moe(x), lora(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(moe(x), base(x))  # the adapter contributes, so the check is not vacuous


def test_new_layer_is_the_identity_and_A_has_the_configured_std():
    torch.manual_seed(0)
    base = nn.Linear(256, 64)
    layer = MoELoRALinear(base, num_experts=4, rank=32, alpha=64.0, init_std=0.01)
    x = torch.randn(4, 256)
    assert torch.equal(layer(x), base(x))  # B = 0
    assert layer.moelora_A.std().item() == pytest.approx(0.01, rel=0.05)
    assert layer.moelora_A.shape == (32, 256) and layer.moelora_B.shape == (64, 32)
    assert layer.moelora_router.weight.shape == (4, 256)
    assert layer.scaling == 2.0 and layer.expert_rank == 8


def test_router_gates_sum_to_one_per_token_and_top_k_keeps_k():
    torch.manual_seed(0)
    x = torch.randn(3, 6, 16)
    dense = MoELoRARouter(16, 4)(x)
    torch.testing.assert_close(dense.sum(-1), torch.ones(3, 6))
    assert (dense > 0).all()
    router = MoELoRARouter(16, 4, top_k=2)
    sparse = router(x)
    torch.testing.assert_close(sparse.sum(-1), torch.ones(3, 6))
    assert ((sparse > 0).sum(-1) == 2).all()
    # the kept gates are the softmax over the two largest logits
    logits = x @ router.weight.T
    top_logits, top_idx = logits.topk(2, dim=-1)
    torch.testing.assert_close(sparse.gather(-1, top_idx), torch.softmax(top_logits, -1))


def test_load_balancing_loss_matches_the_switch_formula():
    router = MoELoRARouter(2, 2, aux_loss_weight=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])  # tokens 0,1 -> expert 0; token 2 -> expert 1
    probs = torch.softmax(x @ router.weight.T, -1)
    router(x)
    fraction = torch.tensor([2 / 3, 1 / 3])
    expected = 2 * (fraction * probs.mean(0)).sum()
    torch.testing.assert_close(router.last_aux_loss, expected)
    router.last_aux_loss.backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    # uniform routing gives the minimum, 1
    with torch.no_grad():
        router.weight.zero_()
    router(x)
    assert router.last_aux_loss.item() == pytest.approx(1.0)


def test_aux_loss_is_not_computed_when_off():
    router = MoELoRARouter(4, 2)
    router(torch.randn(3, 4))
    assert router.last_aux_loss is None


def test_only_adapter_and_router_receive_gradients():
    layer = make_layer()
    layer.base_layer.requires_grad_(False)
    layer(torch.randn(2, 3, 12)).sum().backward()
    grads = {name for name, p in layer.named_parameters() if p.grad is not None}
    assert grads == {"moelora_A", "moelora_B", "moelora_router.weight"}


def test_bf16_base_layer_keeps_its_dtype():
    layer = MoELoRALinear(nn.Linear(8, 8).to(torch.bfloat16), num_experts=2, rank=4, alpha=8.0)
    out = layer(torch.randn(2, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.moelora_A.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"num_experts": 4, "rank": 30}, "rank (30) must be divisible by num_experts (4): use rank=32"),
        ({"num_experts": 0}, "num_experts (0) must be an integer >= 1"),
        (
            {"num_experts": 4, "rank": 8, "top_k": 5},
            "top_k (5) must be None (dense routing) or an integer in [1, num_experts=4]",
        ),
        ({"dropout": 1.5}, "dropout (1.5) must be in [0, 1)"),
        ({"target_modules": []}, "target_modules (()) is empty"),
    ],
)
def test_config_rejects_bad_values_with_the_fix(kwargs, needle):
    with pytest.raises(ValueError) as error:
        MoELoRAConfig(**kwargs)
    assert needle in str(error.value)


def test_config_lists_every_problem_at_once():
    with pytest.raises(ValueError) as error:
        MoELoRAConfig(num_experts=3, rank=8, top_k=4, aux_loss_weight=-1.0)
    message = str(error.value)
    assert "rank (8)" in message and "top_k (4)" in message and "aux_loss_weight (-1.0)" in message


def test_layer_rejects_bad_shapes_and_non_linear():
    with pytest.raises(ValueError, match=r"rank \(6\) must be divisible by num_experts \(4\): use rank=8"):
        MoELoRALinear(nn.Linear(4, 4), num_experts=4, rank=6, alpha=1.0)
    with pytest.raises(TypeError, match="wraps nn.Linear, got Conv1d"):
        MoELoRALinear(nn.Conv1d(4, 4, 1), num_experts=1, rank=1, alpha=1.0)


def test_config_properties():
    config = MoELoRAConfig(num_experts=8, rank=128, alpha=256.0, target_modules=["q_proj", "v_proj"])
    assert config.expert_rank == 16 and config.scaling == 2.0
    assert config.target_modules == ("q_proj", "v_proj")  # frozen and hashable


def test_overhead_benchmark_smoke_test_prints_the_json_line(monkeypatch, capsys):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "moelora_overhead.py"
    spec = importlib.util.spec_from_file_location("moelora_overhead", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(path), "--smoke-test", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        module.main()
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"lora_ms", "moelora_ms", "loop_ms", "ratio"} <= result.keys()
    assert result["lora_ms"] > 0 and result["ratio"] == pytest.approx(result["moelora_ms"] / result["lora_ms"], rel=1e-2)
