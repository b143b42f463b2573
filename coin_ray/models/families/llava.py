"""LLaVA-1.5 (``LlavaForConditionalGeneration``: CLIP vision tower, 2-layer projector, Llama/Vicuna LM).

CoIN's own setting: vicuna_v1 prompts, pad-to-square images of one fixed size, `<image>` expanded by the
LlavaProcessor to the tower's token count; pixel_values are stored as one fixed-shape tensor per row.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from coin_ray.models.families import Family

# vicuna_v1 as LLaVA-1.5 / CoIN use it: system + " " + "USER: <msg> ASSISTANT:" + " <answer></s>"
SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


class Llava(Family):
    name = "llava"
    architecture = "LlavaForConditionalGeneration"
    example = "llava-1.5-7b-hf"
    processor_classes = ("LlavaProcessor",)
    vision_components = ("vision_tower", "vision_model")
    projector_components = ("multi_modal_projector",)

    def build_tiny(self, **sizes: Any) -> tuple[Any, Any]:
        from coin_ray.models._build import build_tiny_vlm

        return build_tiny_vlm(**sizes)

    def prompt(self, processor: Any, question: str, template: bool) -> str:
        if template:
            return super().prompt(processor, question, template)
        return f"{SYSTEM_PROMPT} USER: <image>\n{question} ASSISTANT:"

    def prepare_image(self, processor: Any, image: Any) -> Any:
        from coin_ray.models._chat import expand_to_square, image_background

        return expand_to_square(image, image_background(processor))

    def image_rows(self, out: Mapping[str, Any], n: int, processor: Any = None
                   ) -> dict[str, list[np.ndarray]]:
        return {"pixel_values": [np.asarray(p, dtype=np.float32) for p in out["pixel_values"]]}

    def collate_images(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        if isinstance(columns["pixel_values"], torch.Tensor):
            return {"pixel_values": columns["pixel_values"]}
        return {"pixel_values": torch.as_tensor(
            np.stack([np.asarray(p, dtype=np.float32) for p in columns["pixel_values"]]))}

    def arrow_columns(self, columns: Mapping[str, Sequence[np.ndarray]], empty: Mapping[str, tuple[int, ...]]
                      ) -> dict[str, Any]:
        from ray.data.extensions import ArrowTensorArray

        pixels = columns["pixel_values"]
        stacked = (np.stack(pixels).astype(np.float32, copy=False) if len(pixels)
                   else np.zeros((0, *empty["pixel_values"]), np.float32))
        return {"pixel_values": ArrowTensorArray.from_numpy(stacked)}


LLAVA = Llava()
