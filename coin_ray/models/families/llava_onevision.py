"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, the -hf layout: a SigLIP tower, a 2-layer MLP
projector and a learned ``image_newline``, a Qwen2 LM).

Images use AnyRes: the PIL image processor picks the grid pinpoint closest to the image (up to 6x6 tiles of
the tower's size in the released checkpoints), cuts it into tiles plus a resized base image, and the model
unpads the tile features back to the image's aspect ratio (``image_sizes``), pooling them down past
anyres_max_9. A row stores only its real tiles, flattened with their shape, and ``image_sizes`` (original
height, width); a batch pads rows to the most tiles with zero tiles (the model reads each row's count from
``image_sizes``). Prompts are the checkpoint's chat template. The projector and ``image_newline`` train, neither
is adapted. No video processor.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import LlavaOnevisionProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from coin_ray.models.families._tiles import TiledFamily, collate_stack, save_processor

# llava-onevision-qwen2-7b-ov-hf's chat template in ChatML form: the assistant turn continues the generation
# prompt, so the answer is labelled alone
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
TEMPLATE_WORDS = ("system", "user", "assistant")
SETTINGS = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")


class LlavaOnevisionImageProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor without its video processor (which needs torchvision)."""

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, **kwargs: Any) -> None:
        super().__init__(image_processor, tokenizer, None, **kwargs)

    def save_pretrained(self, folder: Any, **kwargs: Any) -> None:
        save_processor(self, folder, {k: getattr(self, k) for k in SETTINGS})


class LlavaOnevision(TiledFamily):
    name = "llava_onevision"
    architecture = "LlavaOnevisionForConditionalGeneration"
    example = "llava-onevision-qwen2-7b-ov-hf"
    processor_classes = ("LlavaOnevisionProcessor",)
    prompts = ("checkpoint",)
    vision_components = ("vision_tower",)
    projector_components = ("multi_modal_projector", "image_newline")
    image_columns = ("pixel_values", "image_tiles", "image_sizes")
    processor_class = LlavaOnevisionImageProcessor
    image_processor_class = LlavaOnevisionImageProcessorPil
    processor_settings = SETTINGS

    def build_tiny(self, *, tile: int = 32, patch_size: int = 8, vision_embed: int = 32, vision_depth: int = 2,
                   vision_heads: int = 2, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 128, initializer_range: float = 0.1, seed: int = 0) -> tuple[Any, Any]:
        """A randomly initialised LLaVA-OneVision (SigLIP + Qwen2 LM) and its processor (offline tokenizer, the
        PIL AnyRes image processor with pinpoints up to 2x2 tiles, the chat template above)."""
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        from coin_ray.models._tokenizer import build_tokenizer

        tokenizer = build_tokenizer(SPECIAL_TOKENS, extra_words=TEMPLATE_WORDS, bos=None, eos="<|im_end|>",
                                    pad="<|endoftext|>", image_token="<image>",
                                    extra_special={"video_token": "<video>"})
        ids = tokenizer.convert_tokens_to_ids
        pinpoints = [[tile * a, tile * b] for a in (1, 2) for b in (1, 2)]
        config = LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=vision_embed,
                               intermediate_size=2 * vision_embed, num_hidden_layers=vision_depth,
                               num_attention_heads=vision_heads, image_size=tile, patch_size=patch_size,
                               vision_use_head=False),
            text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=hidden,
                             intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, max_position_embeddings=4096,
                             initializer_range=initializer_range, tie_word_embeddings=False,
                             bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")),
            image_token_index=ids("<image>"), video_token_index=ids("<video>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaOnevisionForConditionalGeneration(config)
            with torch.no_grad():  # a checkpoint's trained newline, not an uninitialised tensor
                model.model.image_newline.normal_(0, initializer_range)
        model.eval()
        gen = model.generation_config
        gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
        gen.do_sample = False
        image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                          image_grid_pinpoints=pinpoints, do_pad=True)
        return model, LlavaOnevisionImageProcessor(
            image_processor, tokenizer, num_image_tokens=(tile // patch_size) ** 2,
            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9", chat_template=CHAT_TEMPLATE)

    def split_tiles(self, out: Mapping[str, Any], n: int, processor: Any) -> list[np.ndarray]:
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        pixels = np.asarray(out["pixel_values"], dtype=np.float32)  # [n, most tiles, C, H, W], zero-padded
        pinpoints = processor.image_processor.image_grid_pinpoints
        side = processor.image_processor.size["height"]
        return [pixels[i, :image_size_to_num_patches(tuple(int(x) for x in out["image_sizes"][i]), pinpoints, side)]
                for i in range(n)]

    def image_rows(self, out: Mapping[str, Any], n: int, processor: Any = None) -> dict[str, list[np.ndarray]]:
        rows = super().image_rows(out, n, processor)
        rows["image_sizes"] = [np.asarray(s, dtype=np.int32).reshape(2) for s in out["image_sizes"]]
        return rows

    def collate_images(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        return {"pixel_values": collate_stack(self.row_tiles(columns)),
                "image_sizes": torch.as_tensor(np.stack([np.asarray(s, dtype=np.int64).reshape(2)
                                                         for s in columns["image_sizes"]]))}


LLAVA_ONEVISION = LlavaOnevision()
