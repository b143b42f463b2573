"""apply_tuner / save_tuner / load_tuner on a tiny LLaVA and a plain Llama built from config."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from coin_ray.tuners import (
    TUNER_CONFIG_NAME,
    MoELoRALinear,
    apply_tuner,
    load_trainable_state_dict,
    load_tuner,
    save_tuner,
    trainable_state_dict,
    tuner_aux_loss,
    tuner_parameter_counts,
)

IMAGE_TOKEN = 63
LM_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NUM_LAYERS = 2


def text_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8
    )
    config = LlavaConfig(vision_config=vision, text_config=text_config(), image_token_index=IMAGE_TOKEN)
    return LlavaForConditionalGeneration(config)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config())


def llava_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(0, IMAGE_TOKEN, (2, 6), generator=generator)
    image_tokens = torch.full((2, 4), IMAGE_TOKEN)  # (16 / 8)^2 patches, CLS dropped
    input_ids = torch.cat([text[:, :1], image_tokens, text[:, 1:]], dim=1)
    return {
        "input_ids": input_ids,
        "pixel_values": torch.randn(2, 3, 16, 16, generator=generator),
        "labels": input_ids,
    }


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], lr: float = 0.5) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_moelora_adapts_every_lm_linear_and_nothing_else():
    model = apply_tuner(tiny_llava(), "moelora", num_experts=2, rank=4, alpha=8.0)
    adapted = [name for name, module in model.named_modules() if isinstance(module, MoELoRALinear)]
    assert len(adapted) == NUM_LAYERS * len(LM_SUFFIXES)
    assert all(".language_model." in name and name.endswith(LM_SUFFIXES) for name in adapted)
    for name in trainable_names(model):
        assert ".moelora_" in name or ".multi_modal_projector." in name, name
    assert any(".moelora_router.weight" in name for name in trainable_names(model))
    assert isinstance(model, LlavaForConditionalGeneration)


def test_moelora_param_count_is_lora_count_plus_routers():
    kwargs = {"rank": 8, "alpha": 16.0}
    moe = apply_tuner(tiny_llava(), "moelora", num_experts=4, **kwargs)
    lora = apply_tuner(tiny_llava(), "lora", **kwargs)
    routers = sum(layer.in_features * 4 for layer in moe.modules() if isinstance(layer, MoELoRALinear))
    assert tuner_parameter_counts(moe)["trainable"] == tuner_parameter_counts(lora)["trainable"] + routers
    adapters = {n for n in trainable_names(lora) if "multi_modal_projector" not in n}
    assert adapters and all(".lora_A." in n or ".lora_B." in n for n in adapters)
    assert len(adapters) == 2 * NUM_LAYERS * len(LM_SUFFIXES)  # same targets as MoELoRA


def test_one_expert_moelora_model_equals_peft_lora_model():
    moe = apply_tuner(tiny_llava(), "moelora", num_experts=1, rank=4, alpha=8.0)
    lora = apply_tuner(tiny_llava(), "lora", rank=4, alpha=8.0)
    lora_modules = dict(lora.named_modules())
    torch.manual_seed(3)
    with torch.no_grad():
        for name, layer in moe.named_modules():
            if isinstance(layer, MoELoRALinear):
                layer.moelora_B.normal_(std=0.2)
                lora_modules[name].lora_A["default"].weight.copy_(layer.moelora_A)
                lora_modules[name].lora_B["default"].weight.copy_(layer.moelora_B)
    batch = llava_batch()
    moe_logits, lora_logits = logits(moe, batch), logits(lora, batch)
    torch.testing.assert_close(moe_logits, lora_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(moe_logits, logits(tiny_llava(), batch), atol=1e-3)


def test_full_trains_the_language_model_but_not_the_vision_tower():
    model = apply_tuner(tiny_llava(), "full")
    names = trainable_names(model)
    assert not any("vision_tower" in n for n in names)
    assert "lm_head.weight" in names and any("language_model.embed_tokens" in n for n in names)
    assert any("multi_modal_projector" in n for n in names)
    frozen_projector = apply_tuner(tiny_llava(), "full", trainable_modules=())
    assert not any("multi_modal_projector" in n for n in trainable_names(frozen_projector))


def test_plain_causal_lm_and_suffix_targets():
    model = apply_tuner(tiny_llama(), "moelora", rank=4, num_experts=2, target_modules=["q_proj", "v_proj"])
    adapted = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    expected = [f"model.layers.{i}.self_attn.{p}" for i in range(NUM_LAYERS) for p in ("q_proj", "v_proj")]
    assert sorted(adapted) == sorted(expected)
    assert all(".moelora_" in n for n in trainable_names(model))  # no projector in a plain LM


def test_regex_targets_can_reach_the_vision_tower_explicitly():
    model = apply_tuner(tiny_llava(), "moelora", rank=2, num_experts=2, target_modules=r".*vision_tower.*\.q_proj")
    adapted = [n for n, m in model.named_modules() if isinstance(m, MoELoRALinear)]
    assert adapted == ["model.vision_tower.encoder.layers.0.self_attn.q_proj"]


@pytest.mark.parametrize(
    "method,kwargs,error,needle",
    [
        ("dora", {}, ValueError, "unknown tuner method 'dora': use one of moelora, lora, full"),
        ("moelora", {"target_modules": ["qkv"]}, ValueError, "suffixes ['qkv'] match no nn.Linear of the language"),
        ("lora", {"target_modules": ["q_proj", "fc9"]}, ValueError, "suffixes ['fc9'] match no nn.Linear"),
        ("moelora", {"target_modules": r"nothing\.here"}, ValueError, "matched no nn.Linear"),
        ("moelora", {"rank": 6, "num_experts": 4}, ValueError, "rank (6) must be divisible by num_experts (4): use"),
        ("moelora", {"trainable_modules": ["projektor"]}, ValueError, "trainable_modules ['projektor'] match no"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(method, kwargs, error, needle):
    with pytest.raises(error) as raised:
        apply_tuner(tiny_llava(), method, **kwargs)
    assert needle in str(raised.value)


def test_applying_twice_is_rejected():
    model = apply_tuner(tiny_llama(), "lora", rank=2)
    with pytest.raises(ValueError, match="already has adapter layers"):
        apply_tuner(model, "moelora")


@pytest.mark.parametrize(
    "method,kwargs",
    [
        ("moelora", {"num_experts": 2, "rank": 4, "alpha": 8.0, "top_k": 1, "aux_loss_weight": 0.01}),
        ("lora", {"rank": 4, "alpha": 8.0}),
        ("full", {}),
    ],
)
def test_save_load_round_trip_reproduces_outputs_and_training(tmp_path, method, kwargs):
    batch = llava_batch()
    model = apply_tuner(tiny_llava(seed=0), method, dropout=0.0, **kwargs)
    train_step(model, batch)
    save_tuner(model, tmp_path)
    assert json.loads((tmp_path / TUNER_CONFIG_NAME).read_text())["method"] == method

    fresh = load_tuner(tiny_llava(seed=0), tmp_path)
    assert torch.equal(logits(fresh, batch), logits(model, batch))
    assert trainable_names(fresh) == trainable_names(model)
    # trained away from the init, so the equality is not the trivial one
    assert not torch.allclose(logits(model, batch), logits(apply_tuner(tiny_llava(0), method, **kwargs), batch))

    train_step(model, batch)
    train_step(fresh, batch)
    for (name, a), b in zip(trainable_state_dict(model).items(), trainable_state_dict(fresh).values()):
        assert torch.equal(a, b), name


def test_load_trainable_state_dict_is_strict():
    model = apply_tuner(tiny_llama(), "moelora", rank=2, num_experts=2)
    state = {k: v.clone() for k, v in trainable_state_dict(model).items()}
    first = next(iter(state))
    with pytest.raises(ValueError, match=r"1 missing .*apply the same tuner"):
        load_trainable_state_dict(model, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="1 unexpected"):
        load_trainable_state_dict(model, {**state, "model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="another shape"):
        load_trainable_state_dict(model, {**state, first: torch.zeros(1)})
    load_trainable_state_dict(model, state)  # exact keys load


def test_load_into_another_tuner_fails(tmp_path):
    save_tuner(apply_tuner(tiny_llama(), "moelora", rank=4, num_experts=2), tmp_path)
    config = json.loads((tmp_path / TUNER_CONFIG_NAME).read_text())
    (tmp_path / TUNER_CONFIG_NAME).write_text(json.dumps({**config, "num_experts": 4}))
    with pytest.raises(ValueError, match="another shape"):
        load_tuner(tiny_llama(), tmp_path)
    (tmp_path / TUNER_CONFIG_NAME).write_text(json.dumps({**config, "experts": 4}))
    with pytest.raises(ValueError, match=r"unknown: \['experts'\]"):
        load_tuner(tiny_llama(), tmp_path)


def test_save_requires_a_tuner_config(tmp_path):
    with pytest.raises(ValueError, match="call apply_tuner on it first"):
        save_tuner(tiny_llama(), tmp_path)


def test_tuner_aux_loss_only_when_enabled():
    batch = {"input_ids": torch.randint(0, 64, (2, 5))}
    off = apply_tuner(tiny_llama(), "moelora", rank=4, num_experts=2)
    off(**batch)
    assert tuner_aux_loss(off) is None
    on = apply_tuner(tiny_llama(), "moelora", rank=4, num_experts=2, aux_loss_weight=0.1)
    assert tuner_aux_loss(on) is None  # no forward yet
    on(**batch)
    aux = tuner_aux_loss(on)
    assert aux.ndim == 0 and 0.1 <= aux.item() <= 0.1 * 2  # weight * L, L in [1, E]
    aux.backward()
    router = next(m for m in on.modules() if isinstance(m, MoELoRALinear)).moelora_router
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
