"""Shared by the families whose image processor cuts an image into fixed-size tiles (InternVL, LLaVA-OneVision):
a row stores its tiles flattened (``pixel_values``, list<float>) with their shape (``image_tiles``: tiles,
channels, height, width), so rows with different tile counts share one Parquet column."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coin_ray.models.families import Family
from coin_ray.models.families.qwen2_vl import arrow_lists, read_chat_template


class TiledFamily(Family):
    image_columns = ("pixel_values", "image_tiles")
    processor_class: Any = None  # the transformers processor class
    image_processor_class: Any = None  # its PIL image processor class

    def split_tiles(self, out: Mapping[str, Any], n: int, processor: Any) -> list[np.ndarray]:
        """The processor's tiles, one [tiles, C, H, W] array per row."""
        raise NotImplementedError

    def image_rows(self, out: Mapping[str, Any], n: int, processor: Any = None
                   ) -> dict[str, list[np.ndarray]]:
        tiles = self.split_tiles(out, n, processor)
        return {"pixel_values": [t.reshape(-1) for t in tiles],
                "image_tiles": [np.asarray(t.shape, dtype=np.int32) for t in tiles]}

    @staticmethod
    def row_tiles(columns: Mapping[str, Sequence[Any]]) -> list[np.ndarray]:
        return [np.asarray(p, dtype=np.float32).reshape(tuple(int(x) for x in np.asarray(s).reshape(4)))
                for p, s in zip(columns["pixel_values"], columns["image_tiles"])]

    def arrow_columns(self, columns: Mapping[str, Sequence[np.ndarray]], empty: Mapping[str, tuple[int, ...]]
                      ) -> dict[str, Any]:
        import pyarrow as pa

        out = {"pixel_values": arrow_lists(columns["pixel_values"], np.float32, pa.float32()),
               "image_tiles": arrow_lists(columns["image_tiles"], np.int32, pa.int32())}
        for name in self.image_columns[2:]:
            out[name] = arrow_lists(columns[name], np.int32, pa.int32())
        return out

    def processor_kwargs(self, folder: Path) -> dict[str, Any]:
        """The processor's own settings, from the folder's processor_config.json."""
        path = folder / "processor_config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def load_processor(self, folder: Any) -> Any:
        from transformers import AutoTokenizer

        folder = Path(folder).expanduser()
        image_processor = self.image_processor_class.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        kwargs = {k: v for k, v in self.processor_kwargs(folder).items() if k in self.processor_settings}
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=read_chat_template(folder, tokenizer), **kwargs)

    processor_settings: tuple[str, ...] = ()  # the processor attributes saved in processor_config.json


def save_processor(processor: Any, folder: Any, settings: Mapping[str, Any]) -> None:
    """The layout the family's -hf checkpoints ship: preprocessor_config.json, the tokenizer files,
    chat_template.json and processor_config.json (the processor's own settings)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.image_processor.save_pretrained(folder)
    cfg_path = folder / "preprocessor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["processor_class"] = type(processor).__mro__[1].__name__
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    processor.tokenizer.save_pretrained(folder)
    if processor.chat_template:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}) + "\n")
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": type(processor).__mro__[1].__name__, **settings}, indent=2) + "\n")


def collate_stack(tiles: Sequence[np.ndarray]) -> torch.Tensor:
    """Rows' tiles padded with zero tiles to the most tiles of the batch: [B, tiles, C, H, W]."""
    most = max(len(t) for t in tiles)
    out = np.zeros((len(tiles), most, *tiles[0].shape[1:]), np.float32)
    for i, t in enumerate(tiles):
        out[i, :len(t)] = t
    return torch.as_tensor(out)
