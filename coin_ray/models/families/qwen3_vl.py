"""Qwen3-VL (``Qwen3VLForConditionalGeneration``: a SigLIP-2-style ViT with learned, interpolated position
embeddings, 2x2 patch merging and DeepStack mergers that feed early LM layers; a Qwen3 LM with interleaved
M-RoPE).

Stored and collated as Qwen2-VL (coin_ray.models.families.qwen2_vl): dynamic resolution, the flattened
patches, ``image_grid_thw`` and ``mm_token_type_ids`` per row. Prompts are the checkpoint's chat template
(Qwen3-VL-8B-Instruct's adds no default system turn). The projector is the main ``merger`` and the DeepStack
``deepstack_merger_list``: both train, neither is adapted. The PIL image processor is Qwen2-VL's (the
released checkpoints set patch_size 16); no video processor.
"""
from __future__ import annotations

from typing import Any

from transformers import Qwen3VLProcessor

from coin_ray.models.families.qwen2_vl import Qwen2VL, image_only

# The image/text part of Qwen3-VL-8B-Instruct's chat template (its tool-call and reasoning branches left out)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"
    example = "Qwen3-VL-8B-Instruct"
    processor_classes = ("Qwen3VLProcessor",)
    projector_components = ("merger", "deepstack_merger_list")
    processor_class = image_only(Qwen3VLProcessor, "Qwen3VLProcessor")
    chat_template = CHAT_TEMPLATE

    def tiny_vision(self, *, patch_size: int, merge_size: int, embed: int, depth: int, heads: int, hidden: int,
                    initializer_range: float) -> dict[str, Any]:
        return dict(depth=depth, hidden_size=embed, intermediate_size=2 * embed, num_heads=heads,
                    out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=merge_size,
                    temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0],
                    initializer_range=initializer_range)


QWEN3_VL = Qwen3VL()
