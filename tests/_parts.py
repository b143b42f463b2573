"""The parts CoIN assembles LLaVA from, built here with transformers (and its `tokenizers`) alone: a tiny
Llama causal LM whose tokenizer has no pad and no <image> token (as vicuna-7b-v1.5's), a tiny CLIP vision
folder with its image processor, LLaVA's stage-1 projector file, and a folder in LLaVA's original layout."""
from __future__ import annotations

import json
import string
from pathlib import Path

import torch

WORDS = ("A chat between a curious human and an artificial intelligence assistant The gives helpful detailed "
         "polite answers to the human's questions USER ASSISTANT Answer answer question using single word or "
         "phrase with option letter from given choices directly What is object in image red green blue circle "
         "square triangle yes no one two three four five left right top bottom color shape of the").split()
TEXT_HIDDEN, VISION_HIDDEN = 48, 32


def save_tokenizer(folder: Path):
    """A word-level Llama-style tokenizer (<unk>, <s>, </s>; adds <s>), without pad or <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *dict.fromkeys(
        [*WORDS, *string.ascii_letters, *string.digits, *string.punctuation])])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return fast


def language_model(folder: Path, dtype: torch.dtype = torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = save_tokenizer(folder)
    assert tokenizer.pad_token is None and "<image>" not in tokenizer.get_vocab()
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder


def vision_tower(folder: Path, hidden: int = VISION_HIDDEN) -> Path:
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8, projection_dim=hidden)
    CLIPVisionModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def projector_weights(vision_hidden: int = VISION_HIDDEN, text_hidden: int = TEXT_HIDDEN) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {"model.mm_projector.0.weight": torch.randn(text_hidden, vision_hidden, generator=g) * 0.1,
            "model.mm_projector.0.bias": torch.randn(text_hidden, generator=g) * 0.1,
            "model.mm_projector.2.weight": torch.randn(text_hidden, text_hidden, generator=g) * 0.1,
            "model.mm_projector.2.bias": torch.randn(text_hidden, generator=g) * 0.1}


def projector(path: Path, **shape) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(projector_weights(**shape), path)
    return path


def original_layout(folder: Path, lm: Path) -> Path:
    """LLaVA's original layout: config model_type llava_llama with mm_vision_tower a hub id, one state dict
    (pytorch_model.bin) holding the language model and model.mm_projector.*, the tokenizer beside it."""
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    state = {**load_file(str(lm / "model.safetensors")), **projector_weights()}
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((lm / "config.json").read_text())
    config.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
                  mm_vision_tower="openai/clip-vit-large-patch14-336", mm_vision_select_layer=-2,
                  mm_projector_type="mlp2x_gelu", mm_hidden_size=VISION_HIDDEN, mm_use_im_start_end=False,
                  image_aspect_ratio="pad", tune_mm_mlp_adapter=False)
    (folder / "config.json").write_text(json.dumps(config))
    save_tokenizer(folder)
    return folder
