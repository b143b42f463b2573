"""Checks of a checkpoint folder that read only small files (config.json, processor and tokenizer files, the
safetensors headers), so a sweep refuses a folder it cannot use before Ray starts: the family, the prompt it
supports, and weights that cannot be read (a truncated or missing weights file). No weights are loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coin_ray.models._build import ModelSourceError, check_model_source
from coin_ray.models.families import FAMILIES

__all__ = ["check_model_folder", "check_prompt", "check_weights"]

# a safetensors header is JSON of a few hundred KiB at most; a larger length field means a damaged file
MAX_HEADER_BYTES = 100 * 2**20
CHAT_TEMPLATE_FILES = ("chat_template.json", "chat_template.jinja")


def check_model_folder(source: str, prompt: str) -> None:
    """model.source is a folder of a supported family whose weights can be read and which supports `prompt`."""
    config = check_model_source(source)
    check_prompt(source, prompt, config)
    check_weights(source)


def check_prompt(source: str, prompt: str, config: dict[str, Any] | None = None) -> None:
    """The family of `source` supports model.prompt `prompt` (`auto`: its own), and `checkpoint` finds a chat
    template among the folder's files."""
    config = config if config is not None else check_model_source(source)
    family = FAMILIES[config["model_type"]]
    prompt = family.prompts[0] if prompt == "auto" else prompt
    if prompt not in family.prompts:
        raise ModelSourceError(
            f"model.prompt is {prompt!r} but {source!r} is a {family.name} checkpoint, which is prompted with "
            f"{' or '.join(family.prompts)} only: set model.prompt {family.prompts[0]} (or auto)")
    if prompt == "checkpoint" and not _has_chat_template(Path(source).expanduser()):
        raise ModelSourceError(
            f"model.prompt is 'checkpoint' but {source!r} holds no chat template (chat_template.json, "
            "chat_template.jinja, or chat_template in tokenizer_config.json): use model.prompt vicuna_v1 (CoIN's "
            "prompt) or save a processor with a chat template")


def _has_chat_template(folder: Path) -> bool:
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    for name in ("tokenizer_config.json", "processor_config.json"):
        try:
            if json.loads((folder / name).read_text()).get("chat_template"):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def check_weights(source: str) -> None:
    """Every weights file of the folder can be read: each safetensors file's header parses and the tensors it
    describes fit in the file (a truncated copy fails here), the files a shard index names exist, and a
    folder without safetensors has a PyTorch weights file. Reads the headers only."""
    folder = Path(source).expanduser()
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelSourceError(f"model.source {source!r}: {index.name} cannot be read ({e}): copy the "
                                   "checkpoint again") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelSourceError(f"model.source {source!r}: {index.name} names {len(missing)} weights file(s) "
                                   f"the folder lacks ({', '.join(missing[:3])}): copy the checkpoint again")
    if not files:
        if not any(folder.glob("pytorch_model*.bin")):
            raise ModelSourceError(f"model.source {source!r} holds no weights (model.safetensors or "
                                   "pytorch_model.bin): save the model with save_pretrained into it")
        return
    for path in files:
        problem = safetensors_problem(path)
        if problem:
            raise ModelSourceError(f"model.source {source!r}: weights file {path.name} cannot be read ({problem}): "
                                   "copy the checkpoint again")


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header (None: nothing): 8 bytes of header length, the JSON
    header, and tensor offsets that end within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER_BYTES):
            return f"its header claims {n} bytes, the file has {size}: truncated or not a safetensors file"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header has tensors without data_offsets"
    if 8 + n + end > size:
        return f"truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    return None
