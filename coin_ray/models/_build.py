"""Build a VLM: a tiny LLaVA from config (offline, CPU-sized) or a local pretrained folder of a supported family.

The tiny model is a transformers ``LlavaForConditionalGeneration`` with a real ``LlavaProcessor``; a folder
loads as whatever AutoModelForImageTextToText resolves it to, with its family's processor
(coin_ray.models.families), so everything downstream runs one code path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from coin_ray.errors import UserError
from coin_ray.models._precision import TORCH_DTYPES
from coin_ray.models.families import FAMILIES, FAMILY_ATTR
from coin_ray.models._tokenizer import build_tokenizer

__all__ = ["ModelSourceError", "SUPPORTED_FAMILIES", "build_processor", "build_tiny_vlm", "build_vlm",
           "check_model_source", "load_vlm"]

# model_type in config.json -> the class that loads it; the families the prompt, image-token expansion and
# tuner targets are written for
SUPPORTED_FAMILIES = {name: family.architecture for name, family in FAMILIES.items()}
PROMPT_ATTR = "coin_prompt"  # on a processor: "vicuna_v1" or "checkpoint" (see coin_ray.models._chat)


class ModelSourceError(UserError):
    """model.source is not a usable checkpoint folder of a supported image-text family."""

# the config's names (coin_ray.models._precision) and torch's long ones
_DTYPES = {"auto": "auto", **TORCH_DTYPES, "float32": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def build_tiny_vlm(
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 4,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 256,
    initializer_range: float = 0.1,
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A randomly initialised LLaVA (CLIP vision tower + Llama LM + 2-layer GELU projector) and its processor.

    The image becomes (image_size / patch_size)^2 tokens (CLS dropped, as LLaVA-1.5 does). Unlike LLaVA-1.5
    the projector reads the *last* vision layer: with 2 layers, reading layer -2 would leave a layer unused
    (wasted compute, and an error under DDP with a trainable tower). initializer_range 0.1 (not Llama's
    0.02) lets the LM learn in a few hundred steps (measured).
    """
    problems = []
    for name, value in (("image_size", image_size), ("patch_size", patch_size), ("vision_hidden", vision_hidden),
                        ("vision_layers", vision_layers), ("vision_heads", vision_heads), ("hidden", hidden),
                        ("layers", layers), ("heads", heads), ("intermediate", intermediate)):
        if value < 1:
            problems.append(f"{name} must be >= 1, got {value}")
    if not problems:
        if image_size % patch_size:
            problems.append(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size}): "
                            f"use image_size={image_size - image_size % patch_size or patch_size}")
        if hidden % heads:
            problems.append(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if vision_hidden % vision_heads:
            problems.append(f"vision_hidden ({vision_hidden}) must be divisible by vision_heads ({vision_heads})")
    if initializer_range <= 0:
        problems.append(f"initializer_range must be > 0, got {initializer_range}")
    if problems:
        raise ValueError("invalid tiny VLM sizes: " + "; ".join(problems))

    tokenizer = build_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    num_image_tokens = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.eval()
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    gen.do_sample = False

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
    )
    return model, processor


def check_model_source(source: str | Path) -> dict[str, Any]:
    """The checkpoint folder's config.json, after checking that it is an image-text model of a supported family
    with its processor files; raises ModelSourceError with the fix. Reads JSON only (no weights, no Ray)."""
    import json

    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise ModelSourceError(
            f"model.source {str(source)!r} is not a local folder: pass 'tiny' for the built-in model or the path "
            "of a checkpoint folder holding config.json (e.g. llava-1.5-7b-hf or Qwen2-VL-7B-Instruct); nothing is "
            "downloaded")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"model folder {str(folder)!r} has no config.json: is it a transformers checkpoint?")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelSourceError(f"model folder {str(folder)!r}: config.json cannot be read ({e})") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES or "vision_config" not in config:
        arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
        raise ModelSourceError(
            f"model folder {str(folder)!r} holds a {model_type!r} checkpoint ({arch}), not an image-text model of a "
            f"supported family ({', '.join(f'{k}: {v}' for k, v in SUPPORTED_FAMILIES.items())}): point model.source "
            f"at e.g. a {' or '.join(f.example for f in FAMILIES.values())} folder, or (a language model) give "
            "model.vision_tower and model.projector to assemble LLaVA from it")
    has_processor = any((folder / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    if not (has_processor and has_tokenizer):
        raise ModelSourceError(
            f"model folder {str(folder)!r} has no {'image processor' if not has_processor else 'tokenizer'} files: "
            "save the processor beside the weights (processor.save_pretrained(folder)); the image size and the "
            "number of image tokens come from it")
    return config


def load_vlm(path: str | Path, dtype: str | torch.dtype = "auto") -> tuple[PreTrainedModel, ProcessorMixin]:
    """A local checkpoint folder (e.g. llava-1.5-7b-hf, or a saved tiny model) with its processor.

    Never downloads: ``local_files_only=True``. The PIL image backend is chosen automatically when
    torchvision is absent. dtype: "auto" (as saved), "fp32", "bf16", "fp16" or a torch.dtype: the frozen
    weights are held in it whatever the folder's own dtype.
    """
    check_model_source(path)
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")
        dtype = _DTYPES[dtype]
    folder = Path(path).expanduser()
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, local_files_only=True)
    processor = _folder_processor(folder)
    model.eval()
    return model, processor


def build_processor(source: str = "tiny", prompt: str = "vicuna_v1", **tiny_kwargs: Any) -> ProcessorMixin:
    """The model's processor only (tokenizer + image processor), without loading weights: the tiny model's,
    or the checkpoint folder's own (its image size, image-token count and image-token expansion). `prompt`
    ("vicuna_v1" or "checkpoint": the folder's chat template) is recorded on it for the prompt builders; a
    family that supports only its chat template (Qwen2-VL) refuses vicuna_v1."""
    if source == "tiny":
        processor = build_tiny_vlm(**tiny_kwargs)[1]  # building the tiny model costs milliseconds
        setattr(processor, FAMILY_ATTR, "llava")
        prompt = FAMILIES["llava"].prompts[0] if prompt == "auto" else prompt
    else:
        family = FAMILIES[check_model_source(source)["model_type"]]
        if prompt == "auto":  # the family's own prompt (coin_ray.config.auto_prompt)
            prompt = family.prompts[0]
        if prompt not in family.prompts:
            raise ModelSourceError(
                f"model.prompt is {prompt!r} but {source!r} is a {family.name} checkpoint, which is prompted with "
                f"{' or '.join(family.prompts)} only: set model.prompt {family.prompts[0]}")
        processor = _folder_processor(Path(source).expanduser())
        if prompt == "checkpoint" and not getattr(processor, "chat_template", None):
            raise ModelSourceError(
                f"model.prompt is 'checkpoint' but the processor in {source!r} has no chat_template: use "
                "model.prompt vicuna_v1 (CoIN's prompt) or save a processor with a chat template")
    setattr(processor, PROMPT_ATTR, prompt)
    return processor


def _folder_processor(folder: Path) -> ProcessorMixin:
    """The processor of a checked checkpoint folder, as its family loads it, tagged with the family."""
    import json

    name = json.loads((folder / "config.json").read_text())["model_type"]
    processor = FAMILIES[name].load_processor(folder)
    setattr(processor, FAMILY_ATTR, name)
    return processor


def build_vlm(source: str = "tiny", **tiny_kwargs: Any) -> tuple[PreTrainedModel, ProcessorMixin]:
    """"tiny" -> build_tiny_vlm(**tiny_kwargs); anything else -> load_vlm(source) (tiny_kwargs must be empty,
    except ``dtype``)."""
    if source == "tiny":
        return build_tiny_vlm(**tiny_kwargs)
    extra = sorted(set(tiny_kwargs) - {"dtype"})
    if extra:
        raise ValueError(f"tiny-model sizes {extra} only apply to source='tiny', got source={source!r}")
    return load_vlm(source, **tiny_kwargs)
