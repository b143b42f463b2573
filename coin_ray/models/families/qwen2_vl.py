"""Qwen2-VL (``Qwen2VLForConditionalGeneration``: a ViT with 2x2 patch merging, a Qwen2 LM with M-RoPE).

Images keep their aspect ratio (dynamic resolution): the image processor resizes each to multiples of
patch_size x merge_size within [min_pixels, max_pixels] and flattens it into patches, so the number of
image tokens varies per image. Per row the store keeps the flattened patches (``pixel_values``,
list<float>), the patch grid (``image_grid_thw``: temporal, height, width) and the processor's
``mm_token_type_ids`` (1 on image tokens), which the model needs for its 3-D rotary positions. Prompts are
the checkpoint's own chat template (its `<|vision_start|><|image_pad|><|vision_end|>` placeholder). The
image processor is transformers' PIL one, and the processor carries no video processor, so neither
torchvision nor video support is needed.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from coin_ray.models.families import Family

# Qwen2-VL-7B-Instruct's chat template (its chat_template.json); the tiny model is saved with it
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
TEMPLATE_WORDS = ("system", "user", "assistant", "You", "are", "helpful")


def image_only(processor_class: type, saved_as: str) -> type:
    """`processor_class` without its video processor (which needs torchvision), saved in the layout the
    family's released checkpoints ship (preprocessor_config.json, the tokenizer files, chat_template.json)."""

    class ImageOnly(processor_class):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None,
                     **kwargs: Any) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.image_processor.save_pretrained(folder)
            cfg_path = folder / "preprocessor_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg.update(processor_class=saved_as, image_processor_type="Qwen2VLImageProcessor")
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
            self.tokenizer.save_pretrained(folder)
            if self.chat_template:
                (folder / "chat_template.json").write_text(json.dumps({"chat_template": self.chat_template}) + "\n")

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"{processor_class.__name__}ImageOnly"
    return ImageOnly


Qwen2VLImageProcessor = image_only(Qwen2VLProcessor, "Qwen2VLProcessor")


def read_chat_template(folder: Path, tokenizer: Any) -> str | None:
    """The folder's chat template: chat_template.json, chat_template.jinja, else the tokenizer's."""
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    return getattr(tokenizer, "chat_template", None)


class Qwen2VL(Family):
    name = "qwen2_vl"
    architecture = "Qwen2VLForConditionalGeneration"
    example = "Qwen2-VL-7B-Instruct"
    processor_classes = ("Qwen2VLProcessor",)
    prompts = ("checkpoint",)
    vision_components = ("visual",)
    projector_components = ("merger",)  # model.visual.merger: trains like LLaVA's projector, never adapted
    image_columns = ("pixel_values", "image_grid_thw")
    token_columns = ("mm_token_type_ids",)

    chat_template: str = CHAT_TEMPLATE
    processor_class: type = Qwen2VLImageProcessor

    def build_tiny(self, *, patch_size: int = 8, merge_size: int = 2, vision_embed: int = 32, vision_depth: int = 2,
                   vision_heads: int = 2, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 128, min_pixels: int = 32 * 32, max_pixels: int = 64 * 64,
                   initializer_range: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
        """A randomly initialised model of this layout and its processor (the offline tokenizer with the Qwen
        special tokens, the PIL image processor, the released Instruct checkpoint's chat template)."""
        import transformers

        from coin_ray.models._tokenizer import build_tokenizer

        head_dim = hidden // heads
        if hidden % heads or head_dim % 2 or heads % kv_heads:
            raise ValueError(f"invalid tiny {self.name} sizes: hidden ({hidden}) / heads ({heads}) must be an even "
                             f"head size and heads a multiple of kv_heads ({kv_heads})")
        half = head_dim // 2  # M-RoPE splits the rotary frequencies into temporal, height and width sections
        section = [half - 2 * (half // 3), half // 3, half // 3]
        tokenizer = build_tokenizer(SPECIAL_TOKENS, extra_words=TEMPLATE_WORDS, bos=None, eos="<|im_end|>",
                                    pad="<|endoftext|>", image_token="<|image_pad|>",
                                    extra_special={"video_token": "<|video_pad|>"})
        ids = tokenizer.convert_tokens_to_ids
        text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    max_position_embeddings=1024, initializer_range=initializer_range,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                    bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
        vision = self.tiny_vision(patch_size=patch_size, merge_size=merge_size, embed=vision_embed,
                                  depth=vision_depth, heads=vision_heads, hidden=hidden,
                                  initializer_range=initializer_range)
        config = getattr(transformers, self.architecture.replace("ForConditionalGeneration", "Config"))(
            vision_config=vision, text_config=text,
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, self.architecture)(config)
        model.eval()
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
        gen.do_sample = False
        image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels,
                                                   patch_size=patch_size, temporal_patch_size=2,
                                                   merge_size=merge_size)
        return model, self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=self.chat_template)

    def tiny_vision(self, *, patch_size: int, merge_size: int, embed: int, depth: int, heads: int, hidden: int,
                    initializer_range: float) -> dict[str, Any]:
        """The tiny model's vision_config."""
        return dict(depth=depth, embed_dim=embed, hidden_size=hidden, num_heads=heads, mlp_ratio=2,
                    patch_size=patch_size, spatial_merge_size=merge_size, temporal_patch_size=2,
                    initializer_range=initializer_range)

    def load_processor(self, folder: Any) -> Any:
        from transformers import AutoTokenizer

        folder = Path(folder).expanduser()
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=read_chat_template(folder, tokenizer))

    def image_rows(self, out: Mapping[str, Any], n: int, processor: Any = None
                   ) -> dict[str, list[np.ndarray]]:
        grids = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(n, 3)
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        ends = np.cumsum(grids.prod(axis=1))
        if n and ends[-1] != len(pixels):
            raise ValueError(f"the image processor returned {len(pixels)} patches for grids totalling {ends[-1]}")
        starts = np.concatenate([[0], ends[:-1]])
        return {"pixel_values": [pixels[a:b].reshape(-1) for a, b in zip(starts, ends)],
                "image_grid_thw": [g.astype(np.int32) for g in grids]}

    def collate_images(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        grids = np.stack([np.asarray(g, dtype=np.int64).reshape(3) for g in columns["image_grid_thw"]])
        patches = [np.asarray(p, dtype=np.float32).reshape(int(g.prod()), -1)
                   for p, g in zip(columns["pixel_values"], grids)]
        return {"pixel_values": torch.as_tensor(np.concatenate(patches)), "image_grid_thw": torch.as_tensor(grids)}

    def arrow_columns(self, columns: Mapping[str, Sequence[np.ndarray]], empty: Mapping[str, tuple[int, ...]]
                      ) -> dict[str, Any]:
        import pyarrow as pa

        return {"pixel_values": arrow_lists(columns["pixel_values"], np.float32, pa.float32()),
                "image_grid_thw": arrow_lists(columns["image_grid_thw"], np.int32, pa.int32()),
                "mm_token_type_ids": arrow_lists(columns["mm_token_type_ids"], np.int8, pa.int8())}


def arrow_lists(values: Sequence[np.ndarray], dtype: Any, arrow_type: Any) -> Any:
    """Per-row arrays (any shape) -> one Arrow list<arrow_type> column of the flattened rows."""
    import pyarrow as pa

    flat = [np.asarray(v, dtype=dtype).reshape(-1) for v in values]
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in flat])]).astype(np.int32)
    data = np.concatenate(flat) if flat else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(data, type=arrow_type))

QWEN2_VL = Qwen2VL()
