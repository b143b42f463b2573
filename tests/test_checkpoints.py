"""Real checkpoint folders: tiny llava-1.5-hf-layout checkpoints saved in float16 / bfloat16 (as llava-1.5-7b-hf
ships), the precision policy, the non-finite guard, the checkpoint's own processor, and the preflights."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from coin_ray.config import ConfigError, ExperimentConfig
from coin_ray.models import (
    ModelSourceError,
    build_processor,
    build_tiny_vlm,
    check_model_source,
    encode_prompt_batch,
    encode_train_batch,
    load_vlm,
)
from coin_ray.models._precision import resolve_autocast, resolve_dtype
from _checkpoints import TINY, continual_cfg, finite_adapters, save_tiny_checkpoint

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: save_tiny_checkpoint(root / name, dtype)
            for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))}


# ---- precision policy ------------------------------------------------------------------------------------------

def test_saved_dtype_is_what_the_folder_holds(checkpoints):
    st = json.loads((checkpoints["float16"] / "config.json").read_text())
    assert st.get("dtype", st.get("torch_dtype")) == "float16"


@pytest.mark.parametrize("want", [torch.bfloat16, torch.float32, torch.float16])
def test_base_is_loaded_in_model_dtype_whatever_the_folder_holds(checkpoints, want):
    model, _ = load_vlm(checkpoints["float16"], dtype=want)
    assert {p.dtype for p in model.parameters()} == {want}


def test_resolution_on_cpu():
    assert resolve_dtype("auto", CPU) == torch.float32
    assert resolve_dtype("fp16", CPU) == torch.float16
    assert resolve_autocast("auto", torch.float32, CPU) is None
    assert resolve_autocast("auto", torch.bfloat16, CPU) == torch.bfloat16  # follows a half base
    assert resolve_autocast("bf16", torch.float32, CPU) == torch.bfloat16
    assert resolve_autocast("fp32", torch.bfloat16, CPU) is None
    with pytest.raises(ValueError, match="mixes float16 and bfloat16"):
        resolve_autocast("bf16", torch.float16, CPU)


def test_config_refuses_two_half_types_and_unknown_names():
    with pytest.raises(ConfigError, match="mixes float16 and bfloat16"):
        ExperimentConfig.from_dict({"model.dtype": "fp16", "train.precision": "bf16"})
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        ExperimentConfig.from_dict({"model.dtype": "int8"})
    with pytest.raises(ConfigError, match="model.prompt 'checkpoint' needs a checkpoint folder"):
        ExperimentConfig.from_dict({"model.prompt": "checkpoint"})
    ExperimentConfig.from_dict({"model.dtype": "fp16", "train.precision": "fp16"})


def _one_batch(processor):
    from PIL import Image

    from coin_ray.models import collate_train

    images = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 30), (30, 30, 200))]
    enc = encode_train_batch(processor, ["What colour?", "What colour is it?"], ["red", "blue"], images, 160)
    rows = [{k: enc[k][i] for k in ("input_ids", "labels", "pixel_values")} for i in range(2)]
    return collate_train(rows, processor.tokenizer.pad_token_id)


@pytest.mark.parametrize("method", ["moelora", "lora", "full"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_trainable_parameters_are_fp32_masters_in_a_bf16_base(checkpoints, tmp_path, method, autocast):
    from coin_ray.training.build import build_model

    cfg = continual_cfg(tmp_path, "masters", checkpoints["float16"], **{"model.dtype": "bf16", "tuner.method": method})
    model, processor = build_model(cfg, tmp_path, CPU)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    if method != "full":
        assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    batch = _one_batch(processor)
    model.train()
    for _ in range(2):
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        assert math.isfinite(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(bool(torch.isfinite(p).all()) for p in trainable.values())
    assert any(not torch.equal(before[n], p) for n, p in trainable.items())  # it did train


# ---- the checkpoint's own processor and prompt -----------------------------------------------------------------

def test_image_size_and_token_count_come_from_the_folder(tmp_path):
    """A processor saved the way llava-1.5-7b-hf ships it (336 px, patch 14, CLS dropped) expands <image> to
    576 tokens, read back from the folder alone."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from coin_ray.models import build_tokenizer

    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        tokenizer=build_tokenizer(), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    processor.save_pretrained(tmp_path)
    from transformers import AutoProcessor
    from PIL import Image

    loaded = AutoProcessor.from_pretrained(tmp_path, local_files_only=True)
    out = encode_prompt_batch(loaded, ["What is it?"], [Image.new("RGB", (500, 300))])
    image_id = loaded.tokenizer.convert_tokens_to_ids("<image>")
    assert list(out["input_ids"][0]).count(image_id) == 576
    assert out["pixel_values"][0].shape == (3, 336, 336)


def test_tiny_checkpoint_processor_matches_its_vision_tower(checkpoints):
    from PIL import Image

    model, _ = load_vlm(checkpoints["bfloat16"])
    processor = build_processor(str(checkpoints["bfloat16"]))
    out = encode_prompt_batch(processor, ["Q?"], [Image.new("RGB", (32, 32))])
    assert list(out["input_ids"][0]).count(model.config.image_token_index) == model.config.image_seq_length == 16


TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def test_prompt_checkpoint_uses_the_folders_chat_template(tmp_path):
    from PIL import Image

    from coin_ray.models import IGNORE_INDEX

    folder = save_tiny_checkpoint(tmp_path / "templated", torch.float16, chat_template=TEMPLATE)
    processor = build_processor(str(folder), prompt="checkpoint")
    enc = encode_train_batch(processor, ["What colour?"], ["red"], [Image.new("RGB", (32, 32))], 160)
    ids, labels = list(enc["input_ids"][0]), list(enc["labels"][0])
    text = processor.tokenizer.decode(ids)
    assert "USER: " in text and "A chat between" not in text  # the template's prompt, not vicuna_v1's system line
    answer = processor.tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])
    assert answer.strip() == "red</s>"  # the template's end-of-turn marker, no second </s>
    vicuna = build_processor(str(folder))  # default: CoIN's vicuna_v1
    assert "A chat between" in vicuna.tokenizer.decode(
        encode_train_batch(vicuna, ["Q?"], ["red"], [Image.new("RGB", (32, 32))], 160)["input_ids"][0])
    with pytest.raises(ModelSourceError, match="no chat_template"):
        build_processor(str(save_tiny_checkpoint(tmp_path / "plain", torch.float16)), prompt="checkpoint")


def test_a_folder_of_an_unsupported_family_is_refused_with_the_fix(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                vocab_size=100).save_pretrained(tmp_path / "llama")
    with pytest.raises(ModelSourceError, match="'llama' checkpoint .*not an image-text model of a supported family"):
        check_model_source(tmp_path / "llama")
    model, _ = build_tiny_vlm(**TINY)
    model.save_pretrained(tmp_path / "no-processor")
    with pytest.raises(ModelSourceError, match="no image processor files"):
        check_model_source(tmp_path / "no-processor")
    with pytest.raises(ModelSourceError, match="not a local folder"):
        check_model_source(tmp_path / "missing")


# ---- memory preflight ------------------------------------------------------------------------------------------

def test_memory_estimate_of_llava_7b_at_coins_settings():
    from coin_ray.models.memory import MemoryPreflightError, check_memory, estimate_memory, llava_1_5_7b_config

    shape = llava_1_5_7b_config()
    common = dict(dtype="bf16", batch_size=8, seq_len=2048, world=8)
    moe = estimate_memory(shape, method="moelora", num_experts=8, rank=128, gradient_checkpointing=True, **common)
    base = moe.total_params - moe.trainable_params
    assert 7.0e9 < moe.total_params < 7.5e9 and 6.9e9 < base < 7.1e9  # llava-1.5-7b: 7.06 B parameters
    assert 0.2e9 < moe.trainable_params < 0.5e9
    assert 20 < moe.total_gib < 60
    check_memory(moe, 80)
    full = estimate_memory(shape, method="full", num_experts=1, rank=8, gradient_checkpointing=True, **common)
    assert full.parts_gib["trained (fp32 weight, grad, AdamW)"] > 90
    with pytest.raises(MemoryPreflightError, match=r"will not fit: estimated .* GiB .*Way out: tuner.method moelora"):
        check_memory(full, 80)
    no_ckpt = estimate_memory(shape, method="moelora", num_experts=8, rank=128, gradient_checkpointing=False, **common)
    assert no_ckpt.parts_gib["activations"] > 5 * moe.parts_gib["activations"]


def test_memory_cli_prints_the_estimate_for_the_shipped_config(capsys):
    from coin_ray.models.memory import main

    root = Path(__file__).resolve().parent.parent
    assert main(["--config", str(root / "configs" / "coin_llava7b.yaml"), "--shape", "llava-1.5-7b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("estimated ") and json.loads(out[1])["fits"] is True


# ---- failures name their cause ---------------------------------------------------------------------------------

def test_error_summary_finds_the_workers_error_line():
    from coin_ray.studies.runner import error_summary

    wrapped = RuntimeError("Training failed due to worker errors:\n[Rank 0]\nTraceback (most recent call last):\n"
                           '  File "loop.py", line 1\ncoin_ray.training.train.NonFiniteError: non-finite loss in '
                           "trial x, stage 0 (ScienceQA), step 2: loss = nan at lr 1e+09\n")
    assert error_summary(wrapped).startswith("NonFiniteError: non-finite loss in trial x")
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise RuntimeError("outer") from e
    except RuntimeError as outer:
        assert error_summary(outer) == "KeyError: 'inner'"


# ---- the continual loop on real checkpoint folders (Ray Data serves the shards) --------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("saved", ["float16", "bfloat16"])
def test_continual_run_on_half_precision_checkpoints(ray_cluster, checkpoints, tmp_path, saved):
    from coin_ray.training import prepare_data, run_continual

    data = prepare_data(continual_cfg(tmp_path, "prep", checkpoints[saved]))
    for precision, dtype in (("bf16", "bf16"), ("auto", "auto"), ("bf16", "auto")):
        cfg = continual_cfg(tmp_path, f"{saved}-{precision}-{dtype}", checkpoints[saved],
                   **{"train.precision": precision, "model.dtype": dtype})
        result = run_continual(cfg, prepared=data)
        assert len(result.matrix) == 2 and all(v is not None and 0 <= v <= 1 for row in result.matrix for v in row)
        assert all(math.isfinite(v) for v in result.metrics.values())
        stages = json.loads((tmp_path / "runs" / cfg.name / "stages.json").read_text())
        for s in stages:
            losses = json.loads((Path(s["path"]) / "checkpoint" / "train_losses.json").read_text())
            assert len(losses) == 6 and all(math.isfinite(loss) for _, loss in losses)
        assert finite_adapters(stages)


@pytest.mark.integration
def test_non_finite_loss_stops_the_stage_and_saves_nothing(ray_cluster, checkpoints, tmp_path):
    from coin_ray.training import prepare_data, run_continual
    from coin_ray.training.train import NonFiniteError

    folder = save_tiny_checkpoint(tmp_path / "poisoned", torch.float16, poisoned=True)
    cfg = continual_cfg(tmp_path, "explodes", folder, **{"train.warmup_ratio": 0.0})
    data = prepare_data(cfg)
    with pytest.raises(NonFiniteError, match=r"non-finite loss in trial explodes, stage 0 \(ScienceQA\), step 1: "
                                             r"loss = nan at lr 0.004"):
        run_continual(cfg, prepared=data)
    store = tmp_path / "stage_store"
    entries = [p for p in store.iterdir() if (p / "meta.json").is_file()] if store.is_dir() else []
    assert entries == []
    assert not (tmp_path / "runs" / "explodes" / "result.json").exists()


# ---- the sweep script on a checkpoint folder -------------------------------------------------------------------

@pytest.mark.slow
def test_sweep_on_a_float16_folder_and_a_failing_trial_exits_non_zero(tmp_path):
    """`python sweeps/task_order.py --config FILE.yaml` with model.source = a float16 folder and precision bf16
    trains with finite losses and a complete matrix; a trial that hits a non-finite loss fails the sweep
    (exit 1, its name and the guard's message printed), its MLflow run is FAILED with the reason, and the
    stage store gains nothing."""
    import subprocess
    import sys

    import yaml
    from mlflow import MlflowClient

    root = Path(__file__).resolve().parent.parent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def sweep(folder: Path, experiment: str) -> subprocess.CompletedProcess:
        config = {"model": {"source": str(folder)}, "train": {"precision": "bf16", "max_steps": 4, "batch_size": 8},
                  "data": {"train_rows": 32, "test_rows": 8}, "eval": {"batch_size": 8},
                  "tuner": {"rank": 8, "num_experts": 2}}
        path = tmp_path / f"{experiment}.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run(
            [sys.executable, str(root / "sweeps" / "task_order.py"), "--config", str(path), "--design", "given",
             "--orders", "ScienceQA>TextVQA", "--seeds", "1", "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri,
             "--experiment", experiment], cwd=tmp_path, capture_output=True, text=True, timeout=900)

    good = sweep(save_tiny_checkpoint(tmp_path / "fp16", torch.float16), "fp16")
    assert good.returncode == 0, good.stdout[-3000:] + good.stderr[-3000:]
    results = list((tmp_path / "runs" / "runs").glob("*/result.json"))
    assert len(results) == 1
    result = json.loads(results[0].read_text())
    assert len(result["matrix"]) == 2 and all(v is not None for row in result["matrix"] for v in row)
    stages = json.loads((results[0].parent / "stages.json").read_text())
    for s in stages:
        losses = json.loads((Path(s["path"]) / "checkpoint" / "train_losses.json").read_text())
        assert losses and all(math.isfinite(loss) for _, loss in losses)
    assert finite_adapters(stages)

    store = tmp_path / "runs" / "stage_store"
    entries_before = sorted(p.name for p in store.iterdir() if (p / "meta.json").is_file())
    bad = sweep(save_tiny_checkpoint(tmp_path / "poisoned", torch.float16, poisoned=True), "poisoned")
    assert bad.returncode == 1, bad.stdout[-3000:] + bad.stderr[-3000:]
    assert "1 of 1 trials failed" in bad.stderr
    assert "ScienceQA>TextVQA-s0" in bad.stderr and "NonFiniteError: non-finite loss in trial" in bad.stderr
    assert sorted(p.name for p in store.iterdir() if (p / "meta.json").is_file()) == entries_before
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("poisoned").experiment_id])
    trial_runs = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trial_runs) == 1 and trial_runs[0].info.status == "FAILED"
    assert "non-finite loss" in trial_runs[0].data.tags.get("coin_ray.error", "")
    assert not any(k in trial_runs[0].data.metrics for k in ("mft", "mfn", "bwt"))
