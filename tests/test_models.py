"""The tiny VLM and its chat/tokenisation helpers: build, train step, batched generation, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coin_ray.models import (
    IGNORE_INDEX,
    ModelSourceError,
    build_prompt,
    build_tiny_vlm,
    build_tokenizer,
    build_vlm,
    collate_train,
    encode_prompt_batch,
    encode_train_batch,
    expand_to_square,
    generate_batch,
    image_background,
    load_vlm,
)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_tiny_vlm(seed=0)


def _images(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size - 4 * (i % 2), 3), dtype=np.uint8)) for i in range(n)]


QUESTIONS = ["What color is the circle?\nAnswer the question using a single word or phrase.",
             "How many squares are there?",
             "Please provide the bounding box coordinate of the region this sentence describes: the red star"]
ANSWERS = ["red", "3", "[0.12, 0.50, 0.33, 0.91]"]


def test_tokenizer_round_trips_ascii_and_splits_digits():
    tok = build_tokenizer()
    text = "[0.12, 0.50, 0.33, 0.91] Unanswerable; x=7! wörld"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(tok("0.12345", add_special_tokens=False)["input_ids"])
    assert [p.lstrip("\u2581") for p in pieces] == list("0.12345")
    assert tok("red")["input_ids"][0] == tok.bos_token_id
    assert [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<image>")] == [0, 1, 2, 3, 4]
    assert build_tokenizer()("Answer the question")["input_ids"] == tok("Answer the question")["input_ids"]


def test_build_from_config_image_tokens_match(tiny):
    model, processor = tiny
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    enc = encode_prompt_batch(processor, QUESTIONS[:1], _images(1))
    n_image = int((enc["input_ids"][0] == model.config.image_token_index).sum())
    assert n_image == (32 // 8) ** 2
    assert enc["pixel_values"][0].shape == (3, 32, 32) and enc["pixel_values"][0].dtype == np.float32
    lm_std = float(model.model.language_model.layers[0].mlp.up_proj.weight.detach().std())
    assert 0.09 < lm_std < 0.11  # initializer_range=0.1 reached the LM
    with pytest.raises(ValueError, match="multiple of patch_size"):
        build_tiny_vlm(image_size=30)


def test_build_is_deterministic_per_seed():
    a, _ = build_tiny_vlm(seed=3, layers=1, vision_layers=1)
    b, _ = build_tiny_vlm(seed=3, layers=1, vision_layers=1)
    c, _ = build_tiny_vlm(seed=4, layers=1, vision_layers=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])


def test_prompt_format_and_label_masking(tiny):
    _, processor = tiny
    tok = processor.tokenizer
    assert build_prompt("Q?").endswith("USER: <image>\nQ? ASSISTANT:")
    rows = encode_train_batch(processor, QUESTIONS, ANSWERS, _images(3), max_length=200)
    prompts = encode_prompt_batch(processor, QUESTIONS, _images(3))
    for i, answer in enumerate(ANSWERS):
        ids, labels = rows["input_ids"][i], rows["labels"][i]
        assert len(ids) == len(labels)
        n_prompt = len(prompts["input_ids"][i])
        assert list(ids[:n_prompt]) == list(prompts["input_ids"][i])  # training prompt == generation prompt
        assert (labels[:n_prompt] == IGNORE_INDEX).all()
        target = labels[n_prompt:]
        assert (target != IGNORE_INDEX).all() and target[-1] == tok.eos_token_id
        assert tok.decode(target, skip_special_tokens=True) == answer
        assert rows["valid"][i] and not rows["truncated"][i]


def test_truncation_keeps_image_tokens_and_overflow_is_reported(tiny):
    model, processor = tiny
    full = encode_train_batch(processor, QUESTIONS[2:], ANSWERS[2:], _images(1), max_length=500)
    n_prompt = int((full["labels"][0] == IGNORE_INDEX).sum())
    cut = encode_train_batch(processor, QUESTIONS[2:], ANSWERS[2:], _images(1), max_length=n_prompt + 3)
    assert len(cut["input_ids"][0]) == n_prompt + 3 and cut["truncated"][0]
    assert int((cut["input_ids"][0] == model.config.image_token_index).sum()) == 16
    with pytest.raises(ValueError, match="max_length"):
        encode_train_batch(processor, QUESTIONS[2:], ANSWERS[2:], _images(1), max_length=n_prompt)
    flagged = encode_train_batch(processor, QUESTIONS[2:], ANSWERS[2:], _images(1), max_length=n_prompt,
                                 on_overflow="flag")
    assert flagged["valid"] == [False] and (flagged["labels"][0] == IGNORE_INDEX).all()


def test_expand_to_square_centres_original():
    im = Image.new("RGB", (10, 4), (255, 0, 0))
    sq = expand_to_square(im, (1, 2, 3))
    assert sq.size == (10, 10)
    arr = np.asarray(sq)
    assert tuple(arr[0, 0]) == (1, 2, 3) and tuple(arr[2, 0]) == (1, 2, 3)
    assert tuple(arr[3, 0]) == (255, 0, 0) and tuple(arr[6, 9]) == (255, 0, 0) and tuple(arr[7, 0]) == (1, 2, 3)


def test_one_optimizer_step_lowers_loss():
    model, processor = build_tiny_vlm(seed=1)
    batch = collate_train(encode_train_batch(processor, QUESTIONS, ANSWERS, _images(3), max_length=200),
                          processor.tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model(**batch).loss
    before.backward()
    opt.step()
    opt.zero_grad()
    after = model(**batch).loss
    assert float(after.detach()) < float(before.detach()) - 0.05


def test_batched_left_padded_generation_equals_per_row(tiny):
    model, processor = tiny
    questions = ["What?", QUESTIONS[0], QUESTIONS[2]]  # different lengths -> real left padding
    enc = encode_prompt_batch(processor, questions, _images(3))
    batched = generate_batch(model, processor, enc["input_ids"], enc["pixel_values"], max_new_tokens=6)
    single = [generate_batch(model, processor, [ids], [px], max_new_tokens=6)[0]
              for ids, px in zip(enc["input_ids"], enc["pixel_values"])]
    assert batched == single
    assert all(isinstance(s, str) and s == s.strip() for s in batched)
    assert any(batched)  # a random model still emits some text


def test_save_load_round_trip_identical_logits(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_proc = build_vlm(str(tmp_path))
    assert image_background(loaded_proc) == image_background(processor)
    enc = encode_prompt_batch(processor, QUESTIONS, _images(3))
    enc2 = encode_prompt_batch(loaded_proc, QUESTIONS, _images(3))
    assert all(np.array_equal(a, b) for a, b in zip(enc["input_ids"], enc2["input_ids"]))
    assert all(np.allclose(a, b) for a, b in zip(enc["pixel_values"], enc2["pixel_values"]))
    batch = collate_train([{**{k: enc[k][i] for k in enc}, "labels": enc["input_ids"][i]} for i in range(3)],
                          processor.tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


def test_load_vlm_missing_folder_is_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="not a local folder"):
        load_vlm(tmp_path / "nope")
    with pytest.raises(ValueError, match="only apply to source='tiny'"):
        build_vlm(str(tmp_path), hidden=64)
