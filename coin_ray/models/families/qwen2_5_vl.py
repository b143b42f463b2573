"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``: a ViT with window attention, RMSNorm and SwiGLU, 2x2
patch merging; a Qwen2.5 LM with M-RoPE).

Stored, collated and prompted as Qwen2-VL (coin_ray.models.families.qwen2_vl): dynamic resolution, the
flattened patches, ``image_grid_thw`` and ``mm_token_type_ids`` per row, the checkpoint's chat template
(Qwen2.5-VL-7B-Instruct ships Qwen2-VL's). The PIL image processor is Qwen2-VL's; no video processor.
"""
from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLProcessor

from coin_ray.models.families.qwen2_vl import Qwen2VL, image_only


class Qwen2_5VL(Qwen2VL):
    name = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    example = "Qwen2.5-VL-7B-Instruct"
    processor_classes = ("Qwen2_5_VLProcessor",)
    processor_class = image_only(Qwen2_5_VLProcessor, "Qwen2_5_VLProcessor")

    def tiny_vision(self, *, patch_size: int, merge_size: int, embed: int, depth: int, heads: int, hidden: int,
                    initializer_range: float) -> dict[str, Any]:
        # window attention over windows of 2x2 merged patches; the last block attends to the whole image
        return dict(depth=depth, hidden_size=embed, intermediate_size=2 * embed, num_heads=heads,
                    out_hidden_size=hidden, patch_size=patch_size, spatial_merge_size=merge_size,
                    temporal_patch_size=2, window_size=2 * patch_size * merge_size,
                    fullatt_block_indexes=[depth - 1], initializer_range=initializer_range)


QWEN2_5_VL = Qwen2_5VL()
