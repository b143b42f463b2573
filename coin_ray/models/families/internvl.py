"""InternVL3 (``InternVLForConditionalGeneration``, the -hf layout: an InternViT tower, pixel-shuffle 2x2
downsampling and a 2-layer MLP projector, a Qwen2.5 LM).

Images are tiled dynamically: the PIL image processor (Got-OCR-2's, ``crop_to_patches``) picks the tile grid
closest to the image's aspect ratio within [min_patches, max_patches] tiles of the tower's size, plus a
thumbnail, and each tile becomes ``image_seq_length`` image tokens between ``<img>`` and ``</img>``. A row
stores its tiles flattened with their shape (coin_ray.models.families._tiles); a batch concatenates every
row's tiles, as the model takes them. Prompts are the checkpoint's chat template (its ``<IMG_CONTEXT>``
placeholder). No video processor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

from coin_ray.models.families._tiles import TiledFamily, save_processor

# InternVL3-8B-hf's chat template without its default (Chinese) system turn
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                  "<video>")
TEMPLATE_WORDS = ("system", "user", "assistant")


class InternVLImageProcessor(InternVLProcessor):
    """InternVLProcessor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, image_seq_length: int = 256,
                 chat_template: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
        save_processor(self, folder, {"image_seq_length": self.image_seq_length})


class InternVL(TiledFamily):
    name = "internvl"
    architecture = "InternVLForConditionalGeneration"
    example = "InternVL3-8B-hf"
    processor_classes = ("InternVLProcessor",)
    prompts = ("checkpoint",)
    vision_components = ("vision_tower",)
    projector_components = ("multi_modal_projector",)
    processor_class = InternVLImageProcessor
    image_processor_class = GotOcr2ImageProcessorPil
    processor_settings = ("image_seq_length",)

    def build_tiny(self, *, tile: int = 32, patch_size: int = 8, max_tiles: int = 4, vision_embed: int = 32,
                   vision_depth: int = 2, vision_heads: int = 2, hidden: int = 64, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 128, initializer_range: float = 0.1, seed: int = 0
                   ) -> tuple[Any, Any]:
        """A randomly initialised InternVL (InternViT + Qwen2 LM) and its processor (offline tokenizer with
        InternVL's image tokens, the PIL tiling image processor, the chat template above)."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        from coin_ray.models._tokenizer import build_tokenizer

        tokenizer = build_tokenizer(SPECIAL_TOKENS, extra_words=TEMPLATE_WORDS, bos=None, eos="<|im_end|>",
                                    pad="<|endoftext|>", image_token="<IMG_CONTEXT>",
                                    extra_special={"start_image_token": "<img>", "end_image_token": "</img>",
                                                   "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        ids = tokenizer.convert_tokens_to_ids
        seq = (tile // patch_size) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5
        config = InternVLConfig(
            vision_config=dict(hidden_size=vision_embed, num_hidden_layers=vision_depth,
                               num_attention_heads=vision_heads, intermediate_size=2 * vision_embed,
                               image_size=[tile, tile], patch_size=[patch_size, patch_size],
                               initializer_range=initializer_range),
            text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                             intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, max_position_embeddings=1024,
                             initializer_range=initializer_range, tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
            image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5,
            tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = InternVLForConditionalGeneration(config)
        model.eval()
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
        gen.do_sample = False
        image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                                   min_patches=1, max_patches=max_tiles)
        return model, InternVLImageProcessor(image_processor, tokenizer, image_seq_length=seq,
                                             chat_template=CHAT_TEMPLATE)

    def split_tiles(self, out: Mapping[str, Any], n: int, processor: Any) -> list[np.ndarray]:
        # the processor drops its per-image tile counts; every tile is the same number of image tokens
        pixels = np.asarray(out["pixel_values"], dtype=np.float32)
        context = processor.image_token_id
        tokens = np.asarray([sum(1 for t in row if t == context) for row in out["input_ids"]])
        per_tile = tokens.sum() // max(len(pixels), 1)
        ends = np.cumsum(tokens // max(per_tile, 1))
        if n and ends[-1] != len(pixels):
            raise ValueError(f"the image processor returned {len(pixels)} tiles for {tokens.sum()} image tokens")
        return [pixels[a:b] for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]

    def collate_images(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.as_tensor(np.concatenate(self.row_tiles(columns)))}


INTERNVL = InternVL()
