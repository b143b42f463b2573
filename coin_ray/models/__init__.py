"""Build a LLaVA-style VLM (a tiny one from config, or a local checkpoint folder) and turn CoIN rows into
its inputs: vicuna_v1 prompts, pad-to-square images, masked labels, batched greedy generation."""
from coin_ray.models._build import (
    SUPPORTED_FAMILIES,
    ModelSourceError,
    build_processor,
    build_tiny_vlm,
    build_vlm,
    check_model_source,
    load_vlm,
)
from coin_ray.models._chat import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    build_prompt,
    collate_train,
    encode_prompt_batch,
    encode_train_batch,
    expand_to_square,
    image_background,
)
from coin_ray.models._generate import generate_batch
from coin_ray.models._tokenizer import VOCAB_WORDS, build_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "ModelSourceError",
    "SUPPORTED_FAMILIES",
    "build_processor",
    "check_model_source",
    "SYSTEM_PROMPT",
    "VOCAB_WORDS",
    "build_prompt",
    "build_tiny_vlm",
    "build_tokenizer",
    "build_vlm",
    "collate_train",
    "encode_prompt_batch",
    "encode_train_batch",
    "expand_to_square",
    "generate_batch",
    "image_background",
    "load_vlm",
]
