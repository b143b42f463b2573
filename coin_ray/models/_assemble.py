"""A LLaVA model assembled from its parts, once per content: a Llama/Vicuna language-model folder, a CLIP vision
folder and LLaVA's stage-1 projector file (``mm_projector.bin``), or a folder in LLaVA's original layout
(``model_type: llava_llama``: language model and ``model.mm_projector.*`` in one state dict, the CLIP tower
named by ``mm_vision_tower``).

`check_assembly` reads configs and tensor headers only (no weights, no Ray) and says in one line what is wrong;
`ensure_assembled` writes the HF LLaVA folder (LlavaForConditionalGeneration + LlavaProcessor, safetensors)
under ``<storage>/models/<content hash>/`` the first time and finds it after that. The hash covers the parts
as the preprocessing hash covers a model folder (small files by content, weight files by size and mtime) and
the assembly recipe (`ASSEMBLY_VERSION`), so a new projector gives a new folder, and the folder's path - and
with it the data hash of everything preprocessed with it - names the content.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coin_ray.models._build import ModelSourceError

__all__ = ["ASSEMBLY_VERSION", "AssemblyPlan", "check_assembly", "check_model", "ensure_assembled", "needs_assembly",
           "ORIGINAL_MODEL_TYPE", "resolve_model_source"]

# 1: transformers' LLaVA conversion (<image> and <pad> added, embeddings padded to a multiple of 64 with
# mean-resized rows), projector mlp2x_gelu, vision feature layer from the source (-2 for the parts)
ASSEMBLY_VERSION = 1
ORIGINAL_MODEL_TYPE = "llava_llama"
PROJECTOR_PREFIX = "model.mm_projector."
PAD_TO_MULTIPLE = 64  # as the conversion pads llava-1.5-7b-hf's 32002 tokens to 32064
MODELS_DIR = "models"
LAYOUT_SEED = 0  # the mean-resized embedding rows are sampled: seeded, so one content gives one folder


@dataclass(frozen=True)
class AssemblyPlan:
    """What will be assembled, checked: the parts' folders and files and the LlavaConfig they make."""

    language_model: Path  # an HF causal-LM folder, or the original-layout folder
    vision_tower: Path  # a CLIP vision folder with its image processor config
    projector: tuple[Path, ...]  # the files holding model.mm_projector.* (the original layout's shards)
    original: bool  # language_model is in LLaVA's original layout
    vision_feature_layer: int
    projector_shapes: dict[str, tuple[int, ...]]
    text_hidden: int
    vision_hidden: int

    def content_hash(self) -> str:
        """sha256 over the recipe and the parts (small files by content, weight files by size and mtime)."""
        from pipelines._hashing import ContentHasher

        hasher = ContentHasher()
        hasher.add_json("recipe", {"version": ASSEMBLY_VERSION, "original": self.original,
                                   "vision_feature_layer": self.vision_feature_layer})
        hasher.add_tree("language_model", self.language_model)
        hasher.add_tree("vision_tower", self.vision_tower)
        if not self.original:
            for path in self.projector:
                hasher.add_file("projector", path)
        return hasher.hexdigest()[:24]

    def llava_config(self, vocab_size: int | None = None) -> Any:
        """The LlavaConfig of the assembled model (`vocab_size`: the text model's after the added tokens;
        None: the parts' own plus the two added tokens, padded as assembly pads it)."""
        from transformers import AutoConfig, LlavaConfig

        text = _text_config(self.language_model, self.original)
        if vocab_size is None:
            vocab_size = -(-(text.vocab_size + 2) // PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE
        text.vocab_size = vocab_size
        vision = AutoConfig.from_pretrained(self.vision_tower, local_files_only=True)
        vision = getattr(vision, "vision_config", vision)
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=text.vocab_size - 1,
                           image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                           vision_feature_select_strategy="default", vision_feature_layer=self.vision_feature_layer,
                           projector_hidden_act="gelu")


def needs_assembly(source: str, vision_tower: str | None, projector: str | None) -> bool:
    """Whether model.source is to be assembled: parts given, or a folder in LLaVA's original layout."""
    if source == "tiny":
        return False
    if vision_tower or projector:
        return True
    config = _read_config(Path(source).expanduser())
    return config is not None and config.get("model_type") == ORIGINAL_MODEL_TYPE


def check_model(model: Any) -> AssemblyPlan | None:
    """The pre-Ray check of a ModelConfig's source: the assembly plan when it is assembled from parts (or from
    LLaVA's original layout), else None after checking the checkpoint folder ("tiny": nothing to check)."""
    from coin_ray.models._build import check_model_source

    if needs_assembly(model.source, model.vision_tower, model.projector):
        return check_assembly(model.source, model.vision_tower, model.projector)
    if model.source != "tiny":
        check_model_source(model.source)
    return None


def resolve_model_source(model: Any, storage: Path) -> str:
    """The folder (or "tiny") that preprocessing and every worker load for a ModelConfig: an assembled model's
    ``<storage>/models/<hash>/`` (assembled here the first time), else model.source itself."""
    plan = check_model(model)
    return str(ensure_assembled(plan, storage)) if plan is not None else model.source


def check_assembly(source: str, vision_tower: str | None, projector: str | None) -> AssemblyPlan:
    """The checked plan; ModelSourceError in one line naming the key and the shapes when a part is missing,
    of the wrong kind, or of the wrong width. Reads configs and tensor headers only."""
    folder = Path(source).expanduser()
    config = _read_config(folder)
    if config is None:
        raise ModelSourceError(f"model.source {source!r} is not a folder with a readable config.json: with "
                               "model.vision_tower and model.projector it is the language model (e.g. vicuna-7b-v1.5)")
    model_type = config.get("model_type")
    original = model_type == ORIGINAL_MODEL_TYPE
    if "vision_config" in config:
        raise ModelSourceError(
            f"model.projector/model.vision_tower given, but model.source {source!r} is already an image-text "
            f"checkpoint ({model_type}, with its own projector and vision tower): drop model.projector and "
            "model.vision_tower, or point model.source at the language model (e.g. vicuna-7b-v1.5)")
    if original:
        if projector:
            raise ModelSourceError(
                f"model.projector {projector!r} given, but model.source {source!r} is in LLaVA's original layout "
                "(model_type llava_llama), whose state dict holds its own model.mm_projector: drop model.projector")
        if not vision_tower:
            named = config.get("mm_vision_tower")
            if named and _read_config(Path(named).expanduser()) is not None:
                vision_tower = named
            else:
                raise ModelSourceError(
                    f"model.source {source!r} (LLaVA's original layout) names its vision tower mm_vision_tower "
                    f"{named!r}, which is not a local folder: set model.vision_tower to a local CLIP vision folder "
                    "(e.g. clip-vit-large-patch14-336); nothing is downloaded")
        projector_files = _weight_files(folder, PROJECTOR_PREFIX)
        if not projector_files:
            raise ModelSourceError(f"model.source {source!r} (LLaVA's original layout) holds no "
                                   f"{PROJECTOR_PREFIX}* weights in its .bin/.safetensors files")
        layer = int(config.get("mm_vision_select_layer", -2))
    else:
        if not vision_tower:
            raise ModelSourceError(f"model.projector {projector!r} needs model.vision_tower: the local CLIP vision "
                                   "folder the projector was trained on (e.g. clip-vit-large-patch14-336)")
        if not projector:
            raise ModelSourceError(f"model.vision_tower {vision_tower!r} needs model.projector: LLaVA's stage-1 "
                                   "projector file (mm_projector.bin) that maps it into model.source's language model")
        if not isinstance(config.get("hidden_size"), int) or "vocab_size" not in config:
            raise ModelSourceError(f"model.source {source!r} holds a {model_type!r} config without hidden_size/"
                                   "vocab_size: with model.projector it must be a causal language model folder")
        projector_files = (Path(projector).expanduser(),)
        if not projector_files[0].is_file():
            raise ModelSourceError(f"model.projector {projector!r} is not a file: LLaVA's stage-1 mm_projector.bin "
                                   "(or .safetensors) with keys model.mm_projector.{0,2}.{weight,bias}")
        layer = -2
    vision_folder = Path(vision_tower).expanduser()
    vision_config = _read_config(vision_folder)
    if vision_config is None:
        raise ModelSourceError(f"model.vision_tower {vision_tower!r} is not a folder with a readable config.json "
                               "(a local CLIP vision folder, e.g. clip-vit-large-patch14-336)")
    vision_config = vision_config.get("vision_config", vision_config)
    if not (vision_folder / "preprocessor_config.json").is_file():
        raise ModelSourceError(f"model.vision_tower {vision_tower!r} has no preprocessor_config.json: save its "
                               "CLIPImageProcessor beside the weights (image size and normalisation come from it)")
    shapes = _tensor_shapes(projector_files, PROJECTOR_PREFIX)
    expected = [f"{PROJECTOR_PREFIX}{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    missing = [k for k in expected if k not in shapes]
    where = f"model.source {source!r}" if original else f"model.projector {projector!r}"
    if missing:
        raise ModelSourceError(f"{where} lacks {', '.join(missing)} (has {sorted(shapes) or 'no projector keys'}): "
                               "LLaVA's mlp2x_gelu projector has model.mm_projector.{0,2}.{weight,bias}")
    text_config = config.get("text_config", config)
    text_hidden, vision_hidden = int(text_config["hidden_size"]), int(vision_config["hidden_size"])
    first, second = shapes[f"{PROJECTOR_PREFIX}0.weight"], shapes[f"{PROJECTOR_PREFIX}2.weight"]
    if first[1] != vision_hidden:
        raise ModelSourceError(
            f"{where}: {PROJECTOR_PREFIX}0.weight is {list(first)} (input width {first[1]}) but model.vision_tower "
            f"{str(vision_folder)!r} has hidden_size {vision_hidden}: the projector belongs to another vision tower")
    if first[0] != text_hidden or tuple(second) != (text_hidden, text_hidden):
        raise ModelSourceError(
            f"{where}: {PROJECTOR_PREFIX}0.weight is {list(first)} and {PROJECTOR_PREFIX}2.weight {list(second)} "
            f"(output width {second[0]}) but model.source {source!r} has hidden_size {text_hidden}: the projector "
            "belongs to another language model")
    return AssemblyPlan(language_model=folder, vision_tower=vision_folder, projector=projector_files,
                        original=original, vision_feature_layer=layer, projector_shapes=shapes,
                        text_hidden=text_hidden, vision_hidden=vision_hidden)


def ensure_assembled(plan: AssemblyPlan, storage: Path) -> Path:
    """``<storage>/models/<content hash>/``, assembled now unless it is there. One writer per content: the
    first caller claims it (as a stage is claimed), the others wait for the folder; written atomically."""
    from coin_ray._files import write_dir_atomic
    from coin_ray.training.store import take_claim

    target = Path(storage) / MODELS_DIR / plan.content_hash()

    def done() -> Path | None:  # a whole folder (renamed into place) holds config.json
        return target if (target / "config.json").is_file() else None

    if done() is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    got = take_claim(target.parent / f".claim-{target.name}", done, what=f"waiting for model {target.name}",
                     why="another process is assembling it")
    if isinstance(got, Path):
        return got
    try:
        started = time.time()
        write_dir_atomic(target, lambda tmp: assemble(plan, tmp))
        print(f"[coin-ray] model assembled in {time.time() - started:.1f} s at {target}", flush=True)
    finally:
        got.release()
    return target


def assemble(plan: AssemblyPlan, out: Path) -> None:
    """Build the HF LLaVA model and processor from the parts and save them in `out` (safetensors).

    As transformers' LLaVA conversion does: `<image>` and `<pad>` are added to the tokenizer, the embeddings are
    resized to a multiple of 64 with the new rows drawn around the old rows' mean, `model.mm_projector.0/.2`
    become `multi_modal_projector.linear_1/.2`. Every weight is held in the language model's dtype."""
    import torch
    from transformers import (AddedToken, AutoImageProcessor, AutoTokenizer, CLIPVisionModel,
                              LlavaForConditionalGeneration, LlavaProcessor)

    text_model = _load_language_model(plan)
    dtype = text_model.dtype
    tokenizer = AutoTokenizer.from_pretrained(plan.language_model, local_files_only=True)
    tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    vision = CLIPVisionModel.from_pretrained(plan.vision_tower, dtype=dtype, local_files_only=True)
    image_processor = AutoImageProcessor.from_pretrained(plan.vision_tower, local_files_only=True)

    config = plan.llava_config(vocab_size=text_model.config.vocab_size)
    config.text_config = text_model.config
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.model.language_model = text_model.model
    model.lm_head = text_model.lm_head
    model.model.vision_tower = vision
    projector = type(model.model.multi_modal_projector)(config).to(dtype)
    weights = _tensors(plan.projector, PROJECTOR_PREFIX)
    projector.load_state_dict({f"linear_{1 if i == '0' else 2}.{p}": weights[f"{PROJECTOR_PREFIX}{i}.{p}"].to(dtype)
                               for i in ("0", "2") for p in ("weight", "bias")})
    model.model.multi_modal_projector = projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(LAYOUT_SEED)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=PAD_TO_MULTIPLE)
    model.config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    model.config.pad_token_id = model.config.text_config.pad_token_id = tokenizer.pad_token_id
    model.config.dtype = dtype
    model.generation_config = text_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    vision_cfg = config.vision_config
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(out)
    (out / "assembled_from.json").write_text(json.dumps({
        "version": ASSEMBLY_VERSION, "language_model": str(plan.language_model), "original": plan.original,
        "vision_tower": str(plan.vision_tower), "projector": [str(p) for p in plan.projector]}, indent=1))


# ---- reading the parts -------------------------------------------------------------------------------------------

def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _text_config(folder: Path, original: bool) -> Any:
    """The language model's config: the folder's own, or (original layout) a LlamaConfig of its fields."""
    from transformers import AutoConfig, LlamaConfig

    if not original:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    raw = json.loads((folder / "config.json").read_text())
    fields = {k: v for k, v in raw.items() if not k.startswith(("mm_", "tune_mm", "freeze_mm", "image_"))
              and k not in ("model_type", "architectures", "transformers_version", "use_mm_proj")}
    return LlamaConfig(**fields)


def _load_language_model(plan: AssemblyPlan) -> Any:
    """The causal LM (as saved: dtype auto). An original-layout folder loads as a Llama over its own state
    dict (its model.mm_projector.* / vision keys are left out by from_pretrained as unexpected)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    if not plan.original:
        return AutoModelForCausalLM.from_pretrained(plan.language_model, dtype="auto", local_files_only=True)
    config = _text_config(plan.language_model, True)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the projector keys are expected to be "unexpected" here
    try:
        return LlamaForCausalLM.from_pretrained(plan.language_model, config=config, dtype=config.dtype or "auto",
                                                local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


def _weight_files(folder: Path, prefix: str) -> tuple[Path, ...]:
    """The .safetensors/.bin files of `folder` that hold keys starting with `prefix` (via an index file when
    there is one)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            weight_map = json.loads((folder / index).read_text()).get("weight_map", {})
            return tuple(sorted({folder / f for k, f in weight_map.items() if k.startswith(prefix)}))
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return tuple(f for f in files if any(k.startswith(prefix) for k in _tensor_shapes((f,), "")))


def _tensor_shapes(files: tuple[Path, ...], prefix: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors under `prefix` in `files`: safetensors headers, or a memory-mapped torch.load."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as f:
                    shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)})
            else:
                shapes.update({k: tuple(v.shape) for k, v in _torch_load(path).items() if k.startswith(prefix)})
        except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix, named here
            raise ModelSourceError(f"{path} cannot be read as a state dict ({type(e).__name__}: {e})") from None
    return shapes


def _tensors(files: tuple[Path, ...], prefix: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for path in files:
        state = load_file(str(path)) if path.suffix == ".safetensors" else _torch_load(path)
        out.update({k: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _torch_load(path: Path) -> dict[str, Any]:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a legacy (non-zip) file cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
