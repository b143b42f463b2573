"""Backbone families: everything that differs between image-text checkpoint layouts, one module per family.

A `Family` says how a checkpoint of its layout is recognised (config.json's ``model_type``) and loaded (model
and processor), how a CoIN conversation (one image, a question, an answer) becomes its chat-formatted prompt
and answer text, how images are prepared and their processor outputs are stored per row, batched and passed
to the model, and which module-name components are not the language model (the vision tower and the
projector: frozen, never adapted). Adding a family is one module here plus its entry in `FAMILIES`; the prompt
builders, the collators, batched generation, the tuners' target resolver and the preprocessing pipeline
all read this description.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["FAMILIES", "FAMILY_ATTR", "Family", "family_for_columns", "family_of", "family_for_source",
           "NOT_LANGUAGE_MODEL", "PROJECTOR_COMPONENTS", "VISION_COMPONENTS", "pad_rows"]

FAMILY_ATTR = "coin_family"  # on a processor built by coin_ray.models: the name of its family


class Family:
    """The description of one checkpoint family (subclassed once per family; instances are stateless)."""

    name: str = ""  # the family's key: config.json's model_type
    architecture: str = ""  # the transformers class a folder of this family loads as
    example: str = ""  # a folder name for messages, e.g. llava-1.5-7b-hf
    processor_classes: tuple[str, ...] = ()  # processor class names that identify the family
    prompts: tuple[str, ...] = ("vicuna_v1", "checkpoint")  # the model.prompt values it supports
    vision_components: tuple[str, ...] = ()  # module-name components of the vision tower
    projector_components: tuple[str, ...] = ()  # ... and of the vision-to-language projector (when separate)
    image_columns: tuple[str, ...] = ("pixel_values",)  # stored per row for the image
    token_columns: tuple[str, ...] = ()  # stored per row, one value per token (padded with 0 like input_ids)

    @property
    def extra_columns(self) -> tuple[str, ...]:
        """The stored per-row columns besides input_ids, labels and pixel_values (none for LLaVA)."""
        return tuple(c for c in (*self.image_columns, *self.token_columns) if c != "pixel_values")

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def build_tiny(self, **sizes: Any) -> tuple[Any, Any]:
        """A randomly initialised model of this layout and its processor, built from config (offline)."""
        raise NotImplementedError

    def load_processor(self, folder: Any) -> Any:
        """The folder's processor (image processor + tokenizer + chat template), without weights."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(folder, local_files_only=True)

    # ---- conversations -------------------------------------------------------------------------------------
    def prompt(self, processor: Any, question: str, template: bool) -> str:
        """The prompt text for one image + question, up to where the answer starts (image placeholder
        included, before the processor expands it). `template`: use the processor's chat template."""
        if template:
            return chat_template(processor, question, None)
        raise NotImplementedError

    def answer(self, processor: Any, question: str, answer: str, template: bool) -> tuple[str, bool]:
        """What follows the prompt in a training row, and whether the tokenizer's eos must be appended."""
        if not template:
            return answer, True
        prompt = chat_template(processor, question, None)
        full = chat_template(processor, question, answer)
        if not full.startswith(prompt):
            raise ValueError("the checkpoint's chat template does not write the assistant turn after its generation "
                             "prompt, so the answer cannot be labelled alone: use model.prompt vicuna_v1")
        return full[len(prompt):], False

    # ---- images --------------------------------------------------------------------------------------------
    def prepare_image(self, processor: Any, image: Any) -> Any:
        """The image as the processor should see it (RGB)."""
        return image.convert("RGB")

    def image_rows(self, out: Mapping[str, Any], n: int, processor: Any = None
                   ) -> dict[str, list[np.ndarray]]:
        """The processor's image outputs for `n` one-image rows, split per row (column -> n arrays);
        `processor`: the processor that made them."""
        raise NotImplementedError

    def collate_images(self, columns: Mapping[str, Sequence[Any]]) -> dict[str, torch.Tensor]:
        """Per-row image columns (as stored) -> the model's image inputs for the batch."""
        raise NotImplementedError

    def arrow_columns(self, columns: Mapping[str, Sequence[np.ndarray]], empty: Mapping[str, tuple[int, ...]]
                      ) -> dict[str, Any]:
        """Per-row image columns -> pyarrow arrays for Parquet; `empty` (column -> per-row shape) types a
        batch without rows."""
        raise NotImplementedError


def chat_template(processor: Any, question: str, answer: str | None) -> str:
    """One user turn (an image, then the question) and optionally the assistant's answer, in the processor's
    chat template; with no answer, up to the generation prompt."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return processor.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)


def pad_rows(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, int]], *, left: bool
             ) -> dict[str, torch.Tensor]:
    """Pad per-token columns of rows to one width: `columns` is (name, pad value); `attention_mask` is added.
    Right padding for training, left padding for generation (every prompt then ends where decoding starts)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {name: torch.full((len(rows), width), value, dtype=torch.long) for name, value in columns}
    out["attention_mask"] = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        span = slice(width - n, width) if left else slice(0, n)
        for name, _ in columns:
            out[name][i, span] = torch.from_numpy(np.array(r[name], dtype=np.int64))
        out["attention_mask"][i, span] = 1
    return out


def _registry() -> dict[str, Family]:
    from coin_ray.models.families.internvl import INTERNVL
    from coin_ray.models.families.llava import LLAVA
    from coin_ray.models.families.llava_onevision import LLAVA_ONEVISION
    from coin_ray.models.families.qwen2_5_vl import QWEN2_5_VL
    from coin_ray.models.families.qwen2_vl import QWEN2_VL
    from coin_ray.models.families.qwen3_vl import QWEN3_VL

    return {f.name: f for f in (LLAVA, QWEN2_VL, QWEN2_5_VL, QWEN3_VL, INTERNVL, LLAVA_ONEVISION)}


FAMILIES: dict[str, Family] = _registry()
VISION_COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.vision_components))
PROJECTOR_COMPONENTS = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.projector_components))
NOT_LANGUAGE_MODEL = (*VISION_COMPONENTS, *PROJECTOR_COMPONENTS, "lm_head")


def family_of(processor: Any) -> Family:
    """The family of a processor: the one coin_ray.models recorded on it, else the one its class belongs to."""
    name = getattr(processor, FAMILY_ATTR, None)
    if name in FAMILIES:
        return FAMILIES[name]
    classes = {c.__name__ for c in type(processor).__mro__}
    for family in FAMILIES.values():
        if classes & set(family.processor_classes):
            return family
    raise ValueError(f"{type(processor).__name__} is not the processor of a supported family "
                     f"({', '.join(FAMILIES)})")


def family_for_columns(names: Sequence[str]) -> Family:
    """The family whose stored image columns a row (or a batch of columns) holds: the most specific match."""
    have = set(names)
    matches = [f for f in FAMILIES.values() if set(f.image_columns) | set(f.token_columns) <= have]
    if not matches:
        raise ValueError(f"rows with columns {sorted(have)} hold no image columns of a supported family")
    return max(matches, key=lambda f: len(f.image_columns) + len(f.token_columns))


def family_for_source(source: Any) -> Family:
    """The family of model.source: the built-in tiny model is LLaVA; a folder's config.json names its own."""
    if source == "tiny":
        return FAMILIES["llava"]
    import json
    from pathlib import Path

    config = json.loads((Path(source).expanduser() / "config.json").read_text())
    return FAMILIES[config["model_type"]]
