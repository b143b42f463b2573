"""Per-GPU memory preflight: estimate what one Train worker needs before Ray starts, and refuse what cannot fit.

The parameter counts are exact: the model is built on the meta device from its config.json (no weights are
read), and the tuner's targets are resolved on it as training resolves them. The rest is the usual accounting:

- frozen weights: count x bytes of ``model.dtype``;
- trained parameters: fp32 master weight + fp32 gradient + AdamW's two fp32 moments = 16 bytes each, plus one
  more fp32 gradient bucket per parameter under DDP (more than one worker);
- activations saved for backward, per language-model layer: its hidden input, and - for the layer being
  recomputed under gradient checkpointing, or for every layer without it - the inputs of its projections and
  MLP ((8 H + 4 I) values per token) plus each adapted Linear's adapter input and hidden (in + r values per
  token); attention itself is taken as memory-efficient (no S x S matrix kept);
- the logits (B x S x V) in the compute dtype plus their fp32 copy and gradient for the loss;
- a fixed 1.5 GiB for the CUDA context and kernels, and 10 % of the total for allocator fragmentation.

    python -m coin_ray.models.memory --config configs/coin_llava7b.yaml --shape llava-1.5-7b
    python -m coin_ray.models.memory --config configs/coin_qwen2vl7b.yaml --shape qwen2-vl-7b
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coin_ray.errors import UserError

GIB = 1024**3
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CONTEXT_GIB = 1.5
FRAGMENTATION = 0.10

__all__ = ["MemoryEstimate", "MemoryPreflightError", "SHAPES", "estimate_memory", "estimate_for_config",
           "llava_1_5_7b_config", "qwen2_vl_7b_config", "qwen2_5_vl_7b_config", "qwen3_vl_8b_config",
           "internvl3_8b_config", "llava_onevision_7b_config", "check_memory"]


class MemoryPreflightError(UserError):
    """The estimated per-GPU memory exceeds what the GPU has."""


@dataclass
class MemoryEstimate:
    total_params: int
    trainable_params: int
    parts_gib: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_gib(self) -> float:
        return sum(self.parts_gib.values())

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.parts_gib.items())
        s = self.settings
        return (f"estimated {self.total_gib:.1f} GiB per GPU for {s['method']} ({self.trainable_params / 1e6:.1f} M "
                f"of {self.total_params / 1e9:.2f} B parameters trained), {s['dtype']} weights, batch {s['batch']} x "
                f"{s['seq']} tokens, gradient checkpointing {'on' if s['checkpointing'] else 'off'}, "
                f"{s['world']} worker(s): {parts} GiB")


def llava_1_5_7b_config():
    """The architecture of llava-1.5-7b-hf (CLIP ViT-L/14 at 336 px, 576 image tokens; a Llama-2-7B-shaped
    Vicuna), built from config: nothing is downloaded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_select_strategy="default", vision_feature_layer=-2, projector_hidden_act="gelu")


def qwen2_vl_7b_config():
    """The architecture of Qwen2-VL-7B-Instruct (a 32-layer ViT with 2x2 patch merging; a 28-layer Qwen2-7B LM
    with grouped-query attention and M-RoPE), built from config: nothing is downloaded."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
    return Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653)


def qwen2_5_vl_7b_config():
    """The architecture of Qwen2.5-VL-7B-Instruct (a 32-layer window-attention ViT with 2x2 patch merging; a
    28-layer Qwen2.5-7B LM with grouped-query attention and M-RoPE), built from config."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False)


def qwen3_vl_8b_config():
    """The architecture of Qwen3-VL-8B-Instruct (a 27-layer SigLIP-2-style ViT, 2x2 merging and three
    DeepStack mergers; a 36-layer Qwen3-8B LM with interleaved M-RoPE), built from config."""
    from transformers import Qwen3VLConfig

    vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                  patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                  deepstack_visual_indexes=[8, 16, 24])
    text = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                    "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False)


def internvl3_8b_config():
    """The architecture of InternVL3-8B-hf (InternViT-300M at 448 px, pixel shuffle to 256 tokens per tile, an
    MLP projector; a 28-layer Qwen2.5-7B LM), built from config."""
    from transformers import InternVLConfig

    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=[448, 448], patch_size=[14, 14])
    text = dict(model_type="qwen2", vocab_size=151674, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, tie_word_embeddings=False)


def llava_onevision_7b_config():
    """The architecture of llava-onevision-qwen2-7b-ov-hf (SigLIP-so400m at 384 px, 729 tokens per tile, an MLP
    projector; a 28-layer Qwen2-7B LM), built from config."""
    from transformers import LlavaOnevisionConfig

    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=152128, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=151646,
                                video_token_index=151647, vision_feature_select_strategy="full",
                                vision_feature_layer=-1, tie_word_embeddings=False)


# --shape: the built-in architectures
SHAPES = {"llava-1.5-7b": llava_1_5_7b_config, "qwen2-vl-7b": qwen2_vl_7b_config,
          "qwen2.5-vl-7b": qwen2_5_vl_7b_config, "qwen3-vl-8b": qwen3_vl_8b_config,
          "internvl3-8b": internvl3_8b_config, "llava-onevision-7b": llava_onevision_7b_config}


def _meta_model(model_config: Any, method: str, *, num_experts: int, rank: int, target_modules: Any):
    import torch
    from transformers import AutoModelForImageTextToText

    from coin_ray.tuners import apply_tuner

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(model_config)
        apply_tuner(model, method, num_experts=num_experts, rank=rank, alpha=2.0 * rank, dropout=0.0,
                    target_modules=target_modules)
    return model


def estimate_memory(model_config: Any, *, method: str, num_experts: int, rank: int, dtype: str,
                    gradient_checkpointing: bool, batch_size: int, seq_len: int, world: int = 1,
                    target_modules: Any = None) -> MemoryEstimate:
    """The per-GPU estimate of one Train worker (see the module docstring for what is counted)."""
    from torch import nn

    from coin_ray.tuners.moelora import MoELoRALinear

    if dtype not in _BYTES:
        raise ValueError(f"dtype must be one of {sorted(_BYTES)} (resolve 'auto' first), got {dtype!r}")
    model = _meta_model(model_config, method, num_experts=num_experts, rank=rank, target_modules=target_modules)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    text = model_config.text_config if hasattr(model_config, "text_config") else model_config
    hidden, inter, layers, vocab = text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.vocab_size
    act = _BYTES[dtype] if dtype != "fp32" else 4
    tokens = batch_size * seq_len
    adapter_values = 0  # per token, over every adapted Linear of the model
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            adapter_values += module.in_features + module.rank + module.num_experts
        elif hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), nn.Linear):
            adapter_values += module.base_layer.in_features + rank
    per_layer_full = (8 * hidden + 4 * inter) * act + adapter_values / max(layers, 1) * act
    saved_layers = 1 if gradient_checkpointing else layers
    parts = {
        "weights": (total - trainable) * _BYTES[dtype] / GIB,
        "trained (fp32 weight, grad, AdamW)": trainable * 16 / GIB,
    }
    if world > 1:
        parts["DDP gradient buckets"] = trainable * 4 / GIB
    parts["activations"] = tokens * (layers * hidden * act + saved_layers * per_layer_full) / GIB
    parts["logits"] = tokens * vocab * (act + 8) / GIB
    parts["CUDA context"] = CONTEXT_GIB
    parts["fragmentation"] = FRAGMENTATION * sum(parts.values())
    return MemoryEstimate(total_params=total, trainable_params=trainable, parts_gib=parts,
                          settings={"method": method, "dtype": dtype, "batch": batch_size, "seq": seq_len,
                                    "checkpointing": gradient_checkpointing, "world": world})


def estimate_for_config(cfg: Any, model_config: Any = None) -> MemoryEstimate:
    """The estimate for an ExperimentConfig on a GPU (model.dtype auto -> bf16), from its checkpoint folder's
    config.json (or, for a model assembled from parts, the LlavaConfig the parts make) unless `model_config` is
    given."""
    from transformers import AutoConfig

    if model_config is None and cfg.model.source == "tiny":
        from coin_ray.models._build import build_tiny_vlm

        model_config = build_tiny_vlm(**cfg.model.tiny_kwargs())[0].config
    if model_config is None:
        from coin_ray.models._assemble import check_model

        plan = check_model(cfg.model)  # a model assembled from parts: the config it will have
        model_config = plan.llava_config() if plan is not None else AutoConfig.from_pretrained(
            Path(cfg.model.source).expanduser(), local_files_only=True)
    dtype = "bf16" if cfg.model.dtype == "auto" else cfg.model.dtype
    t = cfg.tuner
    # O-LoRA adds a rank-r block per task and keeps the earlier ones: by the last stage the adapters hold r x T
    # (counted as trained: an upper bound, the frozen blocks need no optimizer state)
    rank = t.rank * len(cfg.order) if cfg.cl.method == "olora" else t.rank
    return estimate_memory(model_config, method=t.method, num_experts=t.num_experts, rank=rank, dtype=dtype,
                           gradient_checkpointing=cfg.train.gradient_checkpointing, batch_size=cfg.train.batch_size,
                           seq_len=cfg.data.max_length, world=max(cfg.scaling.num_workers, 1),
                           target_modules=list(t.target_modules) if t.target_modules else None)


def check_memory(estimate: MemoryEstimate, gpu_gib: float) -> None:
    """Raise MemoryPreflightError with the estimate and the ways out when it does not fit `gpu_gib`."""
    if estimate.total_gib <= gpu_gib:
        return
    s = estimate.settings
    ways = []
    if s["method"] == "full":
        ways.append("tuner.method moelora or lora (full fine-tuning keeps 16 bytes per parameter in fp32)")
    if not s["checkpointing"]:
        ways.append("train.gradient_checkpointing true")
    if s["batch"] > 1:
        ways.append(f"a smaller train.batch_size with a larger train.grad_accum (batch {s['batch']})")
    if s["dtype"] == "fp32":
        ways.append("model.dtype bf16")
    ways.append("scaling.gpu_memory_gb if your GPUs have more memory")
    raise MemoryPreflightError(f"will not fit: {estimate.line()}; the GPU has {gpu_gib:.0f} GiB. Way out: "
                               + "; or ".join(ways))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Per-GPU memory estimate of an experiment config (nothing is loaded).")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/coin_llava7b.yaml")
    p.add_argument("--shape", choices=tuple(SHAPES),
                   help="use this built-in architecture instead of the config's model.source folder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    args = p.parse_args(argv)
    from coin_ray.config import ExperimentConfig, load_yaml_file, parse_override

    # the same YAML reader and --set typing as the sweep scripts; dotted overrides after the sections win
    raw: dict[str, Any] = dict(load_yaml_file(args.config))
    for pair in args.set:
        key, _, value = pair.partition("=")
        raw[key.strip()] = parse_override(key.strip(), value)
    cfg = ExperimentConfig.from_dict(raw)
    est = estimate_for_config(cfg, SHAPES[args.shape]() if args.shape else None)
    print(est.line())
    print(json.dumps({"total_gib": round(est.total_gib, 2), "gpu_memory_gb": cfg.scaling.gpu_memory_gb,
                      "fits": est.total_gib <= cfg.scaling.gpu_memory_gb,
                      "parts_gib": {k: round(v, 2) for k, v in est.parts_gib.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
