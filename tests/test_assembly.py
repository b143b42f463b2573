"""A model assembled from its parts (language model + CLIP vision folder + stage-1 projector) or from LLaVA's
original layout: the folder it writes, the one-line errors before Ray, the projector's learning rate, length-
grouped batches, and two-stage runs from both."""
from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coin_ray.config import ExperimentConfig
from coin_ray.errors import UserError
from coin_ray.models._assemble import check_assembly, check_model, ensure_assembled
import _parts
from _checkpoints import continual_cfg, finite_adapters, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    lm = _parts.language_model(root / "vicuna")
    return {"lm": lm, "vision": _parts.vision_tower(root / "clip"),
            "projector": _parts.projector(root / "stage1" / "mm_projector.bin"),
            "original": _parts.original_layout(root / "llava-original", lm), "root": root}


def _model_cfg(**model):
    return ExperimentConfig.from_dict({f"model.{k}": str(v) for k, v in model.items()}).model


def test_assembled_folder_holds_the_parts_exactly_and_is_reused(parts, tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from coin_ray.models import build_processor, load_vlm

    plan = check_assembly(str(parts["lm"]), str(parts["vision"]), str(parts["projector"]))
    folder = ensure_assembled(plan, tmp_path)
    assert folder == tmp_path / "models" / plan.content_hash() and (folder / "model.safetensors").is_file()
    model, processor = load_vlm(folder)
    projector = torch.load(parts["projector"], weights_only=True)
    got = model.model.multi_modal_projector
    for i, linear in (("0", got.linear_1), ("2", got.linear_2)):
        assert torch.equal(linear.weight, projector[f"model.mm_projector.{i}.weight"])
        assert torch.equal(linear.bias, projector[f"model.mm_projector.{i}.bias"])
    vision = CLIPVisionModel.from_pretrained(parts["vision"]).state_dict()
    assert vision.keys() == model.model.vision_tower.state_dict().keys()
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in vision.items())
    lm = load_file(str(parts["lm"] / "model.safetensors"))
    n = lm["model.embed_tokens.weight"].shape[0]
    assert torch.equal(model.model.language_model.embed_tokens.weight[:n], lm["model.embed_tokens.weight"])
    # as transformers' conversion: <image> and <pad> appended, rows padded to a multiple of 64, layer -2
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids("<image>") == n == model.config.image_token_index
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n + 1 == model.config.pad_token_id
    assert model.config.text_config.vocab_size == 192 and model.config.vision_feature_layer == -2
    assert build_processor(str(folder)).image_processor.crop_size == {"height": 32, "width": 32}
    # a second run finds it: same folder, not written again; the same content under another name too
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert ensure_assembled(check_assembly(str(parts["lm"]), str(parts["vision"]), str(parts["projector"])),
                            tmp_path) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [folder.name]  # no claim or tmp left


def test_original_layout_assembles_to_the_same_weights(parts, tmp_path):
    from coin_ray.models import load_vlm

    from_parts = load_vlm(ensure_assembled(check_assembly(str(parts["lm"]), str(parts["vision"]),
                                                          str(parts["projector"])), tmp_path))[0]
    plan = check_model(_model_cfg(source=parts["original"], vision_tower=parts["vision"]))
    assert plan.original and plan.vision_feature_layer == -2
    original = load_vlm(ensure_assembled(plan, tmp_path))[0]
    a, b = from_parts.state_dict(), original.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case, message", [
    ("in_width", "model.mm_projector.0.weight is [48, 32] (input width 32) but model.vision_tower"),
    ("out_width", "(output width 40) but model.source"),
    ("no_vision", "needs model.vision_tower"),
    ("hf_llava", "is already an image-text checkpoint"),
    ("hub_tower", "mm_vision_tower 'openai/clip-vit-large-patch14-336', which is not a local folder: set "
                  "model.vision_tower"),
])
def test_each_wrong_input_is_one_line_naming_key_and_shapes(parts, tmp_path, case, message):
    given = {"source": parts["lm"], "vision_tower": parts["vision"], "projector": parts["projector"]}
    if case == "in_width":
        given["vision_tower"] = _parts.vision_tower(tmp_path / "clip64", hidden=64)
    elif case == "out_width":
        given["projector"] = _parts.projector(tmp_path / "p.bin", text_hidden=40)
    elif case == "no_vision":
        del given["vision_tower"]
    elif case == "hf_llava":
        given["source"] = save_tiny_checkpoint(tmp_path / "hf", torch.float32)
    else:
        given = {"source": parts["original"]}
    with pytest.raises(UserError) as error:
        check_model(_model_cfg(**given))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_wrong_projector_stops_the_sweep_script_before_ray(parts, tmp_path):
    bad = _parts.projector(tmp_path / "wrong.bin", vision_hidden=16)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sweeps" / "task_order.py"), "--no-tracking", "--smoke-test",
         "--storage-path", str(tmp_path / "runs"), "--set", f"model.source={parts['lm']}",
         "--set", f"model.vision_tower={parts['vision']}", "--set", f"model.projector={bad}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: model.projector"), proc.stderr
    assert "(input width 16) but model.vision_tower" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_projector_trains_at_its_own_learning_rate():
    from coin_ray.models import build_tiny_vlm
    from coin_ray.training.train import parameter_groups
    from coin_ray.tuners import apply_tuner

    model = apply_tuner(build_tiny_vlm()[0], "lora", rank=4)
    groups = parameter_groups(model, 2e-4, 2e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr"] for g in groups] == [2e-4, 2e-5]
    assert all("multi_modal_projector" in names[id(p)] for p in groups[1]["params"]) and len(groups[1]["params"]) == 4
    assert all("lora_" in names[id(p)] for p in groups[0]["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())
    [single] = parameter_groups(model, 2e-4, None)  # null: the projector at train.lr
    assert single["lr"] == 2e-4 and len(single["params"]) == len(groups[0]["params"]) + 4
    optimizer = torch.optim.AdamW(groups, lr=2e-4)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-4, 2e-5]


def _padding(order: np.ndarray, lengths: np.ndarray, batch: int) -> int:
    chunks = [lengths[order[i:i + batch]] for i in range(0, len(order), batch)]
    return int(sum(c.max() * len(c) - c.sum() for c in chunks))


def test_length_grouping_keeps_each_steps_rows_pads_less_and_is_seeded():
    from coin_ray.training.data_order import epoch_orders

    rng = np.random.default_rng(0)
    n, batch, accum = 96, 4, 3
    tasks, indices = np.array(["ScienceQA"] * 48 + ["ImageNet"] * 48, dtype=object), np.arange(n) % 48
    # ScienceQA rows with lectures beside ImageNet's one-word answers (a replay stage mixes them)
    lengths = np.concatenate([rng.integers(300, 600, 48), rng.integers(20, 40, 48)])
    plain = epoch_orders(7, tasks, indices, 2)
    grouped = epoch_orders(7, tasks, indices, 2, lengths, batch * accum)
    again = epoch_orders(7, tasks, indices, 2, lengths, batch * accum)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again))  # seeded
    assert not np.array_equal(grouped[0], epoch_orders(8, tasks, indices, 2, lengths, batch * accum)[0])
    step = batch * accum
    for p, g in zip(plain, grouped):
        assert sorted(g) == list(range(n))  # every row once per epoch
        for s in range(0, n, step):  # the same rows in every optimizer step, sorted longest first
            assert sorted(p[s:s + step]) == sorted(g[s:s + step])
            assert list(lengths[g[s:s + step]]) == sorted(lengths[g[s:s + step]], reverse=True)
        assert _padding(g, lengths, batch) < 0.6 * _padding(p, lengths, batch)


def test_new_keys_enter_the_stage_key():
    from coin_ray.training.stages import stage_material
    from coin_ray.training.store import stage_key

    base = ExperimentConfig.from_dict({})
    key = stage_key(stage_material(base, "h", ("GQA",)))
    for change in ({"train.projector_lr": 2e-5}, {"train.group_by_length": True}):
        assert stage_key(stage_material(base.replace(**change), "h", ("GQA",))) != key
    with pytest.raises(UserError, match="model.projector is for assembling"):
        ExperimentConfig.from_dict({"model.projector": "x.bin"})


# ---- two-stage runs from the parts and from the original layout --------------------------------------------------

@pytest.mark.integration
@pytest.mark.parametrize("layout", ["parts", "original"])
def test_two_stage_run_from_parts(ray_cluster, parts, tmp_path, layout):
    from mlflow import MlflowClient

    from coin_ray.training import prepare_data, run_continual
    from tracking import MlflowTracker

    model = ({"model.vision_tower": str(parts["vision"]), "model.projector": str(parts["projector"])}
             if layout == "parts" else {"model.vision_tower": str(parts["vision"])})
    source = parts["lm"] if layout == "parts" else parts["original"]
    cfg = continual_cfg(tmp_path, f"{layout}-a", source, **model, **{
        "train.projector_lr": 1e-3, "train.group_by_length": True, "data.max_length": 200})
    data = prepare_data(cfg)
    [assembled] = (tmp_path / "models").iterdir()
    assert data.model_source == str(assembled)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = functools.partial(MlflowTracker, uri, "parts", cfg.name) if layout == "parts" else None
    result = run_continual(cfg, prepared=data, hooks_factory=tracker)
    assert len(result.matrix) == 2 and all(v is not None and 0 <= v <= 1 for row in result.matrix for v in row)
    stages = json.loads((tmp_path / "runs" / cfg.name / "stages.json").read_text())
    for s in stages:
        losses = json.loads((Path(s["path"]) / "checkpoint" / "train_losses.json").read_text())
        assert len(losses) == 6 and all(math.isfinite(loss) for _, loss in losses)
    assert finite_adapters(stages)
    assert result.environment["device"] == "cpu" and result.environment["torch"] == torch.__version__
    if tracker is not None:  # the trial run carries the environment as tags
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("parts").experiment_id])
        assert result.environment == {k.removeprefix("coin_ray.env."): v for k, v in run.data.tags.items()
                                      if k.startswith("coin_ray.env.")}
        assert {f"coin_ray.env.{k}" for k in ("python", "transformers", "peft", "ray", "coin_ray")} <= set(run.data.tags)
    again = prepare_data(cfg.replace(name=f"{layout}-b"))  # the assembled folder and the data are reused
    assert again.model_source == str(assembled) and again.data_hash == data.data_hash
    assert [p.name for p in (tmp_path / "models").iterdir()] == [assembled.name]


def test_memory_preflight_reads_the_assembled_shape_and_olora_ranks(parts):
    from coin_ray.models.memory import estimate_for_config

    cfg = ExperimentConfig.from_dict({"model.source": str(parts["lm"]), "model.vision_tower": str(parts["vision"]),
                                      "model.projector": str(parts["projector"]), "tuner.method": "lora",
                                      "tuner.rank": 4, "train.weight_decay": 0})
    lora = estimate_for_config(cfg)
    olora = estimate_for_config(cfg.replace(**{"cl.method": "olora"}))
    assert lora.total_params > 0 and olora.trainable_params > lora.trainable_params
    projector = sum(v.numel() for v in _parts.projector_weights().values())
    adapters = lora.trainable_params - projector
    assert olora.trainable_params - projector == adapters * len(cfg.order)  # r x T


def test_environment_of_a_result_and_the_line_when_trials_differ():
    from coin_ray.environment import environment, environment_tags, environments_line

    env = environment()
    assert env["device"] == "cpu" and "cuda" not in env and env["torch"] == torch.__version__
    assert env["coin_ray"].startswith("0.1.0")
    assert environment_tags(env)["coin_ray.env.python"] == env["python"]
    assert environments_line([env, env, None]) is None
    gpu = {**env, "device": "NVIDIA H100 80GB HBM3 x 8", "cuda": "12.8"}
    line = environments_line([env, gpu, env])
    assert line.startswith("environment: the trials ran in 2 environments") and "\n" not in line
    assert "device NVIDIA H100 80GB HBM3 x 8 (1) / cpu (2)" in line and "cuda 12.8 (1) / none (2)" in line


def test_a_second_caller_waits_for_the_claimed_assembly_and_reuses_it(parts, tmp_path, capsys):
    """Two sweeps on one storage path: the first claims the content hash and assembles, the second waits for
    the folder instead of assembling it again."""
    import threading

    from coin_ray._files import write_dir_atomic
    from coin_ray.models._assemble import assemble
    from coin_ray.training.store import StageClaim, take_claim

    plan = check_assembly(str(parts["lm"]), str(parts["vision"]), str(parts["projector"]))
    target = tmp_path / "models" / plan.content_hash()
    target.parent.mkdir(parents=True)
    claim = take_claim(target.parent / f".claim-{target.name}", lambda: None, what="-")
    assert isinstance(claim, StageClaim)
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("folder", ensure_assembled(plan, tmp_path)))
    waiter.start()
    waiter.join(timeout=1.5)
    assert waiter.is_alive() and not target.exists(), "the second caller must wait while the model is claimed"
    write_dir_atomic(target, lambda tmp: assemble(plan, tmp))
    claim.release()
    waiter.join(timeout=30)
    assert got["folder"] == target
    captured = capsys.readouterr()
    assert f"[coin-ray] waiting for model {target.name}: started (another process is assembling it" in captured.err
    assert "model assembled in" not in captured.out
