"""The continual-learning methods' defining properties, on a tiny Llama built from config (no Ray): O-LoRA
keeps the earlier tasks' blocks fixed while its orthogonality term falls, EWC's penalty is zero at the
previous optimum and grows with the square of the distance, LwF at weight 0 trains exactly as plain LoRA.
The real loop runs each method in tests/test_training.py."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coin_ray.config import CL_METHODS, ConfigError, ExperimentConfig
from coin_ray.methods import (REGISTRY, build_method, method_changes, method_label, parse_methods)
from coin_ray.methods.ewc import FISHER_FILE, estimate_fisher
from coin_ray.methods.lwf import distillation
from coin_ray.methods.olora import ADAPTER, lora_layers
from coin_ray.tuners import apply_tuner, trainable_state_dict

ORDER = ["ScienceQA", "TextVQA", "ImageNet"]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread (two threads spin against each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(method: str, **changes) -> ExperimentConfig:
    return ExperimentConfig.from_dict({"order": ORDER, **method_changes(method), "tuner.rank": 2,
                                       "tuner.alpha": 4.0, "tuner.dropout": 0.0, **changes})


def tiny_model(cfg: ExperimentConfig, seed: int = 0) -> tuple[LlamaForCausalLM, object]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    method = build_method(cfg)
    tuner, options = method.tuner()
    apply_tuner(model, tuner, **options)
    return model, method


def task_batches(task: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """A task: 8-token sequences from its own token range, the last 4 tokens the answer."""
    generator = torch.Generator().manual_seed(100 + task)
    out = []
    for _ in range(n):
        ids = torch.randint(12 * task, 12 * task + 12, (4, 8), generator=generator)
        labels = ids.clone()
        labels[:, :4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(model, method, stage: int, steps: int, previous=None) -> None:
    """One stage as coin_ray.training.train does it: start_stage, AdamW steps on LM loss + extra loss,
    end_stage."""
    method.start_stage(model, stage, previous)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-2, weight_decay=0.0)
    data = task_batches(stage)
    model.train()
    for step in range(steps):
        batch = data[step % len(data)]
        outputs = model(**batch)
        loss = outputs.loss
        extra = method.extra_loss(model, batch, outputs)
        if extra is not None:
            loss = loss + extra
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    method.end_stage(model, lambda batch_size: iter(data), lambda batch: model(**batch))
    model.eval()


def test_registry_and_the_sweep_names():
    assert tuple(REGISTRY) == CL_METHODS
    assert parse_methods("lora, olora,ewc+replay") == ["lora", "olora", "ewc+replay"]
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['sgd'\]"):
        parse_methods("lora,sgd")
    for name in ("lora", "moelora", "full", "olora", "ewc", "lwf", "lwf+replay"):
        cfg = ExperimentConfig.from_dict({"order": ORDER, **method_changes(name)})
        assert method_label(cfg) == name
    assert method_changes("ewc+replay", 7)["train.replay_per_task"] == 7
    with pytest.raises(ConfigError, match="cl.method olora trains LoRA blocks: set tuner.method lora"):
        ExperimentConfig.from_dict({"cl.method": "olora", "tuner.method": "moelora"})
    # the stage key carries the method and only the options it reads
    assert build_method(config("ewc")).key_material() == {"cl.method": "ewc", "cl.ewc_lambda": 1000.0,
                                                          "cl.ewc_samples": 64}
    assert build_method(config("lora")).key_material() == {}


def test_olora_freezes_earlier_blocks_and_its_orthogonality_term_falls():
    cfg = config("olora", **{"cl.olora_lambda_orth": 20.0})
    model, method = tiny_model(cfg)
    layers = lora_layers(model)
    assert layers and all(layer.lora_A[ADAPTER].weight.shape[0] == 2 * len(ORDER) for layer in layers)
    train(model, method, 0, steps=4)
    after_first = {n: p.detach().clone() for n, p in trainable_state_dict(model).items()}
    for layer in layers:  # the later tasks' blocks add nothing yet: their B is still zero
        assert not layer.lora_B[ADAPTER].weight[:, 2:].any() and layer.lora_B[ADAPTER].weight[:, :2].any()
    method.start_stage(model, 1, None)
    start = float(method.orthogonality(model).detach())
    train(model, method, 1, steps=12)
    assert float(method.orthogonality(model).detach()) < 0.5 * start
    for layer in layers:
        a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
        name = next(n for n, p in model.named_parameters() if p is a)
        assert torch.equal(a[:2], after_first[name][:2]) and not torch.equal(a[2:4], after_first[name][2:4])
        name_b = next(n for n, p in model.named_parameters() if p is b)
        assert torch.equal(b[:, :2], after_first[name_b][:, :2]) and b[:, 2:4].any() and not b[:, 4:].any()


def test_ewc_penalty_is_zero_at_the_previous_optimum_and_grows_with_the_distance(tmp_path):
    cfg = config("ewc", **{"cl.ewc_samples": 3})
    model, method = tiny_model(cfg)
    assert method.extra_loss(model, {}, None) is None  # the first stage has no earlier one
    train(model, method, 0, steps=4)
    method.save_state(tmp_path)
    later = build_method(cfg)  # a later stage, from the stored checkpoint (resume, stage cache)
    later.start_stage(model, 1, tmp_path)
    assert (tmp_path / FISHER_FILE).is_file() and any(f.sum() > 0 for f in later.fisher.values())
    assert float(later.extra_loss(model, {}, None).detach()) == 0.0
    direction = {n: torch.randn_like(p) for n, p in trainable_state_dict(model).items()}

    def penalty_at(t: float) -> float:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in direction:
                    p.copy_(later.anchor[n] + t * direction[n])
        return float(later.extra_loss(model, {}, None).detach())

    p1, p2, p3 = penalty_at(1.0), penalty_at(2.0), penalty_at(3.0)
    assert 0 < p1 < p2 < p3
    assert p2 == pytest.approx(4 * p1, rel=1e-4) and p3 == pytest.approx(9 * p1, rel=1e-4)
    penalty_at(0.0)
    # the Fisher accumulates across stages: the carried one plus this stage's
    data = task_batches(1)
    fresh = estimate_fisher(model, lambda b: iter(data), lambda batch: model(**batch), 3)
    carried = {n: f.clone() for n, f in later.fisher.items()}
    later.end_stage(model, lambda b: iter(data), lambda batch: model(**batch))
    assert all(torch.allclose(later.fisher[n], carried[n] + fresh[n]) for n in carried)


def test_lwf_at_weight_zero_is_plain_training_and_distils_above_it():
    def run(method_name: str, **changes):
        cfg = config(method_name, **changes)
        model, method = tiny_model(cfg)
        train(model, method, 0, steps=4)
        teacher = {n: p.detach().clone() for n, p in trainable_state_dict(model).items()}
        torch.manual_seed(5)
        train(model, method, 1, steps=6)
        old = task_batches(0)[0]
        with torch.no_grad():  # how far the model moved from its stage-0 self on the old task
            student = model(**old).logits
            teacher_logits = torch.func.functional_call(model, teacher, args=(), kwargs={
                k: v for k, v in old.items() if k != "labels"}).logits
        return trainable_state_dict(model), float(distillation(student, teacher_logits, old["labels"], 2.0))

    plain, plain_kl = run("lora")
    zero, _ = run("lwf", **{"cl.lwf_weight": 0.0})
    assert plain.keys() == zero.keys() and all(torch.equal(plain[n], zero[n]) for n in plain)
    _, lwf_kl = run("lwf", **{"cl.lwf_weight": 5.0})
    assert lwf_kl < plain_kl
