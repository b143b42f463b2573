"""python benchmarks/gpu_check.py [--steps 5] [--batch 8]: bf16 training on one GPU - step time, tokens/s, MFU, peak memory.

Two kinds of check, one JSON line each, about 10 minutes in all on one H200 (never in CI):

- ``tiny_stage``: one MoELoRA stage of a tiny llava-1.5-hf-layout checkpoint (saved in float16, as
  llava-1.5-7b-hf ships) in bf16 through the real loop (``run_continual`` on one Ray Train GPU worker): stage wall
  time, final loss, the accuracy matrix and the worker's peak CUDA memory.
- ``llava7b_moelora`` / ``llava7b_lora``: training steps of a randomly initialised model of llava-1.5-7b's shape
  (``coin_ray.models.memory.llava_1_5_7b_config``, nothing downloaded) at CoIN's settings - MoELoRA E=8 r=128 vs
  LoRA r=128, bf16 weights with fp32 master weights of the trained parameters, bf16 autocast, gradient
  checkpointing, sequences of 2048 tokens of which 576 are image tokens - with the step time, tokens/s, model
  FLOPs utilisation and the measured peak memory beside the memory preflight's estimate (``estimate_memory``).

Without a CUDA device it says so and exits 0. ``--dry-run-cpu`` exercises the code path here: the tiny stage on
CPU with a few steps, and the FLOP/parameter counting of the 7B shape on the meta device (nothing allocated).
Exits non-zero when a loss is non-finite or a check failed (a CUDA OOM is reported as that check's "error").
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3
NO_GPU = "gpu_check: no CUDA device here; nothing to check (run it on a GPU machine)"
# dense bf16 peak FLOP/s (no sparsity) by device name; the first matching key wins, so the PCIe H100 comes first
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12))
SEQ_LEN, IMAGE_SIZE = 2048, 336
METHODS = {"llava7b_moelora": dict(method="moelora", num_experts=8, rank=128, alpha=256.0),
           "llava7b_lora": dict(method="lora", num_experts=8, rank=128, alpha=256.0)}


def emit(line: dict[str, Any]) -> dict[str, Any]:
    print(json.dumps(line), flush=True)
    return line


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAK_BF16 if key in device_name), None)


# ---- (a) one MoELoRA stage of a tiny checkpoint through the real loop ------------------------------------------

class StageProbe:
    """RunHooks that write what rank 0 of the training worker sees at each stage end - its wall time (train +
    eval), losses and peak CUDA memory - to a JSON file: under Ray Train the worker is another process."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_run_start(self, info: Any) -> None: ...

    def on_zero_shot(self, scores: Any, knowledge: Any) -> None: ...

    def on_stage_end(self, report: Any) -> None:
        import torch

        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        Path(self.path).write_text(json.dumps({
            "seconds": report.seconds, "losses": report.train_losses,
            "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}))

    def on_run_end(self, result: Any) -> None: ...

    def on_run_failed(self, error: BaseException) -> None: ...


def tiny_stage(*, gpu: bool, steps: int, batch: int) -> dict[str, Any]:
    import ray
    import torch

    from coin_ray.config import ExperimentConfig
    from coin_ray.models import build_tiny_vlm
    from coin_ray.training import prepare_data, run_continual

    root = Path(tempfile.mkdtemp(prefix="coin-ray-gpu-check-"))
    folder = root / "tiny-llava-fp16"
    model, processor = build_tiny_vlm(hidden=64, intermediate=128)
    model.to(torch.float16).save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    # scaling.use_gpu needs a Ray Train worker (ScalingConfig refuses it with num_workers 0): on a GPU the stage
    # runs on one worker with one GPU, on CPU in-process
    cfg = ExperimentConfig.from_dict({
        "order": ["ScienceQA"], "name": "gpu-check-tiny", "storage_path": str(root), "use_stage_cache": False,
        "eval.judge": "none",
        "model.source": str(folder), "model.dtype": "bf16", "train.precision": "bf16", "tuner.method": "moelora",
        "tuner.rank": 8, "tuner.num_experts": 2, "train.max_steps": steps, "train.batch_size": batch,
        "train.lr": 0.004, "data.train_rows": max(32, steps * batch), "data.test_rows": 16, "eval.batch_size": 16,
        **({"scaling.num_workers": 1, "scaling.use_gpu": True, "scaling.gpus_per_worker": 1} if gpu
           else {"scaling.num_workers": 0})})
    probe = root / "probe.json"
    if not ray.is_initialized():
        ray.init(num_cpus=min(os.cpu_count() or 2, 8), include_dashboard=False, log_to_driver=False)
    try:
        prepared = prepare_data(cfg)
        started = time.perf_counter()
        result = run_continual(cfg, prepared=prepared, hooks_factory=functools.partial(StageProbe, str(probe)))
        run_s = time.perf_counter() - started
    finally:
        ray.shutdown()
    seen = json.loads(probe.read_text())
    shutil.rmtree(root, ignore_errors=True)
    losses = [loss for _, loss in seen["losses"]]
    loss = losses[-1] if losses else None
    return {"check": "tiny_stage", "device": torch.cuda.get_device_name(0) if gpu else "cpu",
            "steps": steps, "batch": batch, "stage_s": round(seen["seconds"], 2), "run_s": round(run_s, 2),
            # the loop reports stage wall time only (train + eval of the stage): this per-step time includes eval
            "step_s": round(seen["seconds"] / steps, 4), "tokens_per_s": None, "mfu": None,
            "peak_mem_gib": round(seen["peak_bytes"] / GIB, 3) if seen["peak_bytes"] is not None else None,
            "estimated_gib": None, "loss": loss, "finite": loss is not None and all(map(math.isfinite, losses)),
            "matrix": result.matrix}


# ---- (b) llava-1.5-7b's shape at CoIN's settings -------------------------------------------------------------

def step_flops(model: Any, config: Any, *, batch: int, seq: int) -> dict[str, float]:
    """FLOPs of one training step of `model` (a LLaVA with its tuner applied; any device, meta included).

    Matmul FLOPs are 2 x parameters x tokens per pass, counted per part: the vision tower (frozen: forward only,
    as nothing upstream of it trains, B x (576 + CLS) tokens), the projector (trained: forward and weight
    gradients, B x 576 tokens) and the language model with lm_head (B x S tokens; token embeddings are lookups,
    not counted). A part through which gradients flow back - the language model, since the projector before it
    trains - costs forward 2 N T + input gradients 2 N T (through frozen weights too) + weight gradients
    2 N_trainable T, i.e. (4 N + 2 N_trainable) T. Attention scores and weighted values (QK^T and AV) are 2 x 2 S^2 H
    per layer and sequence forward, 3x that for forward + backward: 12 L H S^2 B (no saving counted for the
    causal mask). "model" FLOPs leave out gradient checkpointing's recompute; "hardware" FLOPs add it (one more
    forward of the language model: 2 N T + 4 L H S^2 B).
    """
    text, vision = config.text_config, config.vision_config
    parts = {"vision": [0, 0], "projector": [0, 0], "language": [0, 0]}  # [all, trainable]
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "position_embedding" in name or "class_embedding" in name:
            continue
        part = ("vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name
                else "language")
        parts[part][0] += p.numel()
        parts[part][1] += p.numel() if p.requires_grad else 0
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    t_vision, t_proj, t_text = batch * (image_tokens + 1), batch * image_tokens, batch * seq
    n_v, trained_v = parts["vision"]
    n_p, trained_p = parts["projector"]
    n_l, trained_l = parts["language"]
    vision_attn = 4 * vision.num_hidden_layers * vision.hidden_size * (image_tokens + 1) ** 2 * batch
    text_attn_fwd = 4 * text.num_hidden_layers * text.hidden_size * seq**2 * batch
    model_flops = (2 * n_v * t_vision + vision_attn + (4 * n_v * t_vision if trained_v else 0)
                   + (2 * n_p + 2 * trained_p) * t_proj
                   + (4 * n_l + 2 * trained_l) * t_text + 3 * text_attn_fwd)
    recompute = 2 * n_l * t_text + text_attn_fwd
    return {"model_flops": float(model_flops), "hardware_flops": float(model_flops + recompute),
            "total_params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def synthetic_batch(config: Any, *, batch: int, seq: int, device: Any) -> dict[str, Any]:
    """input_ids: BOS, the 576 image tokens, then random text ids; labels: the ids with the image positions
    ignored; pixel_values: random images at 336 px."""
    import torch

    from coin_ray.models import IGNORE_INDEX

    vision = config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    # text ids below the image token id (32000) and above the special ids 0-2
    ids = torch.randint(3, config.image_token_index, (batch, seq), generator=g)
    ids[:, 0] = 1
    ids[:, 1:1 + image_tokens] = config.image_token_index
    labels = ids.clone()
    labels[:, 1:1 + image_tokens] = IGNORE_INDEX
    pixels = torch.randn(batch, 3, vision.image_size, vision.image_size, generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device), "pixel_values": pixels.to(device, torch.bfloat16)}


def build_7b(tuner: dict[str, Any], device: Any):
    import torch
    from transformers import AutoModelForImageTextToText

    from coin_ray.models._precision import fp32_master_weights
    from coin_ray.models.memory import llava_1_5_7b_config
    from coin_ray.tuners import apply_tuner

    config = llava_1_5_7b_config()
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
        apply_tuner(model, tuner["method"], num_experts=tuner["num_experts"], rank=tuner["rank"],
                    alpha=tuner["alpha"])
    fp32_master_weights(model)  # as build_model does: trained parameters in fp32, the base in bf16
    return model, config


def estimate_gib(config: Any, tuner: dict[str, Any], batch: int, seq: int) -> float:
    from coin_ray.models.memory import estimate_memory

    return estimate_memory(config, method=tuner["method"], num_experts=tuner["num_experts"], rank=tuner["rank"],
                           dtype="bf16", gradient_checkpointing=True, batch_size=batch, seq_len=seq).total_gib


def llava7b_dry(check: str, *, batch: int, seq: int) -> dict[str, Any]:
    """The FLOP and parameter counts the GPU check would use, from a meta-device model (nothing allocated)."""
    model, config = build_7b(METHODS[check], "meta")
    flops = step_flops(model, config, batch=batch, seq=seq)
    return {"check": check, "device": "meta (dry run)", "batch": batch, "seq": seq,
            "tokens_per_step": batch * seq, **flops,
            "estimated_gib": round(estimate_gib(config, METHODS[check], batch, seq), 2)}


def llava7b_steps(check: str, *, batch: int, seq: int, steps: int, warmup: int,
                  peak: float | None) -> dict[str, Any]:
    import torch

    from coin_ray.tuners import tuner_aux_loss

    device = torch.device("cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    built = time.perf_counter()
    model, config = build_7b(METHODS[check], device)
    build_s = time.perf_counter() - built
    model.train()
    # as continual_worker does with train.gradient_checkpointing
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4)
    data = synthetic_batch(config, batch=batch, seq=seq, device=device)
    flops = step_flops(model, config, batch=batch, seq=seq)
    losses: list[float] = []

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**data)
            aux = tuner_aux_loss(model)  # None for LoRA and for MoELoRA without a balance loss
            loss = out.loss if aux is None else out.loss + aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())  # a host sync per step, as the loop's non-finite guard has

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - started) / steps
    peak_gib = torch.cuda.max_memory_allocated() / GIB
    reserved_gib = torch.cuda.max_memory_reserved() / GIB
    estimated = estimate_gib(config, METHODS[check], batch, seq)
    model = optimizer = params = data = None  # free the GPU memory before the next check (the step closure holds them)
    line = {"check": check, "device": torch.cuda.get_device_name(0), "batch": batch, "seq": seq, "steps": steps,
            "step_s": round(step_s, 4), "tokens_per_s": round(batch * seq / step_s, 1),
            "mfu": round(flops["model_flops"] / step_s / peak, 4) if peak else None,
            "hfu": round(flops["hardware_flops"] / step_s / peak, 4) if peak else None,
            "peak_tflops": peak / 1e12 if peak else None, "model_flops_per_step": flops["model_flops"],
            "peak_mem_gib": round(peak_gib, 2), "peak_reserved_gib": round(reserved_gib, 2),
            "estimated_gib": round(estimated, 2), "measured_over_estimated": round(peak_gib / estimated, 3),
            "total_params": flops["total_params"], "trainable_params": flops["trainable_params"],
            "build_s": round(build_s, 1), "loss": losses[-1], "finite": all(map(math.isfinite, losses))}
    return line


def _free_cuda() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per 7B-shape check (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8, help="per-GPU batch of the 7B-shape checks (CoIN's: 8)")
    p.add_argument("--seq", type=int, default=SEQ_LEN)
    p.add_argument("--tiny-steps", type=int, default=50, help="optimizer steps of the tiny stage on the GPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak of the device in TFLOP/s (default: from its name, see PEAK_BF16)")
    p.add_argument("--checks", default="tiny_stage,llava7b_moelora,llava7b_lora",
                   help="comma-separated subset of tiny_stage, llava7b_moelora, llava7b_lora")
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="no GPU needed: the tiny stage on CPU (3 steps) and the 7B FLOP counts on the meta device")
    args = p.parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = sorted(set(checks) - {"tiny_stage", *METHODS})
    if unknown:
        p.error(f"unknown checks {unknown}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch

    lines: list[dict[str, Any]] = []
    if args.dry_run_cpu:
        if "tiny_stage" in checks:
            lines.append(emit(tiny_stage(gpu=False, steps=3, batch=4)))
        for check in (c for c in checks if c in METHODS):
            lines.append(emit(llava7b_dry(check, batch=args.batch, seq=args.seq)))
        return 0 if all(line.get("finite", True) for line in lines) else 1
    if not torch.cuda.is_available():
        print(NO_GPU)
        return 0

    peak = peak_flops(torch.cuda.get_device_name(0), args.peak_tflops)
    for check in checks:
        try:
            if check == "tiny_stage":
                line = tiny_stage(gpu=True, steps=args.tiny_steps, batch=16)
            else:
                line = llava7b_steps(check, batch=args.batch, seq=args.seq, steps=args.steps, warmup=args.warmup,
                                     peak=peak)
        except torch.cuda.OutOfMemoryError as error:
            line = {"check": check, "device": torch.cuda.get_device_name(0), "error": f"CUDA OOM: {error}"[:2000],
                    "peak_mem_gib": round(torch.cuda.max_memory_allocated() / GIB, 2)}
        except Exception as error:  # report and go on to the next check
            line = {"check": check, "device": torch.cuda.get_device_name(0),
                    "error": f"{type(error).__name__}: {error}"[:2000]}
            traceback.print_exc()
        lines.append(emit(line))
        _free_cuda()
    failed = [line["check"] for line in lines if "error" in line or not line.get("finite", False)]
    if failed:
        print(f"gpu_check: failed or non-finite: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
