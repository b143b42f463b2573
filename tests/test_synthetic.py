"""The synthetic benchmark generator: CoIN's file layout and schema, determinism, option checks."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from coin_ray.synthetic import MIN_IMAGE_SIZE, TRAIN_SCALE, generate_examples, write_synthetic_benchmark
from coin_ray.models import build_tokenizer
from coin_ray.tasks import TASK_NAMES, get_task
from pipelines._records import validate_records

ROWS = {"train_rows": 12, "test_rows": 6}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return write_synthetic_benchmark(tmp_path_factory.mktemp("synth") / "bench", **ROWS, seed=0)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_schema_match_coin(bench: Path):
    assert sorted(p.name for p in (bench / "Instructions").iterdir()) == sorted(TASK_NAMES)
    for task in TASK_NAMES:
        t = get_task(task)
        train = json.loads((bench / "Instructions" / task / "train.json").read_text())
        test = json.loads((bench / "Instructions" / task / "test.json").read_text())
        assert len(train) == ROWS["train_rows"] * TRAIN_SCALE.get(task, 1) and len(test) == ROWS["test_rows"]
        for rec in train:
            assert set(rec) == {"id", "image", "conversations"}
            human, gpt = rec["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n")
            assert gpt["from"] == "gpt" and gpt["value"]
            assert human["value"].endswith(t.instruction(ref=_ref(human["value"]) if task == "Grounding" else None))
            assert (bench / "images" / rec["image"]).is_file() and not Path(rec["image"]).is_absolute()
        for rec in test:
            expected = {"question_id", "image", "text", t.reference_key} | ({"size"} if task == "Grounding" else set())
            assert set(rec) == expected
            assert "<image>" not in rec["text"]
            with Image.open(bench / "images" / rec["image"]) as im:
                if task == "Grounding":
                    assert list(im.size) == rec["size"]
            t.reference_from_record(rec)  # the task registry accepts the reference
        ids = [r["id"] for r in train] + [r["question_id"] for r in test]
        assert len(set(ids)) == len(ids)


def test_slow_tasks_get_more_train_rows_and_the_folder_says_so(bench: Path):
    info = json.loads((bench / "synthetic.json").read_text())
    assert info["train_rows"] == ROWS["train_rows"]
    assert info["train_rows_per_task"] == {t: ROWS["train_rows"] * TRAIN_SCALE.get(t, 1) for t in TASK_NAMES}
    assert set(TRAIN_SCALE) <= set(TASK_NAMES) and all(v >= 1 for v in TRAIN_SCALE.values())


def _ref(text: str) -> str:
    return text.rsplit("describes: ", 1)[1]


def test_the_coin_reader_accepts_every_record(bench: Path):
    root = (bench / "images").resolve()
    for task in TASK_NAMES:
        for split in ("train", "test"):
            path = bench / "Instructions" / task / f"{split}.json"
            records = json.loads(path.read_text())
            out = validate_records(task, split, str(path), records, root, get_task(task).reference_from_record)
            assert out.rejections == [] and len(out.items) == len(records)


def test_answers_have_each_task_format_and_score_perfectly(bench: Path):
    for task in TASK_NAMES:
        t = get_task(task)
        test = json.loads((bench / "Instructions" / task / "test.json").read_text())
        for rec in test:
            ref = t.reference_from_record(rec)
            gold = rec["answer_bbox"] if task == "Grounding" else (rec["answer"] if isinstance(rec["answer"], str)
                                                                   else rec["answer"][0])
            assert t.score(gold, ref) == 1.0
            if task == "ScienceQA":
                assert re.fullmatch(r"[A-E]", gold)
            if task == "Grounding":
                coords = [float(v) for v in gold.strip("[]").split(", ")]
                assert len(coords) == 4 and all(0 <= c <= 1 for c in coords)
                assert coords[0] < coords[2] and coords[1] < coords[3]


def test_deterministic_per_seed_and_independent_of_other_tasks(tmp_path: Path, bench: Path):
    again = write_synthetic_benchmark(tmp_path / "again", **ROWS, seed=0)
    assert _tree_digest(again) == _tree_digest(bench)
    other = write_synthetic_benchmark(tmp_path / "other", **ROWS, seed=1)
    assert _tree_digest(other) != _tree_digest(bench)
    one = write_synthetic_benchmark(tmp_path / "one", tasks=["GQA"], **ROWS, seed=0)
    assert (one / "Instructions/GQA/test.json").read_bytes() == (bench / "Instructions/GQA/test.json").read_bytes()


def test_bad_options_are_named(tmp_path: Path):
    with pytest.raises(ValueError, match=r"train_rows must be an integer >= 1, got 0"):
        write_synthetic_benchmark(tmp_path / "x", train_rows=0)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['Nope'\]"):
        write_synthetic_benchmark(tmp_path / "x", tasks=["GQA", "Nope"])
    with pytest.raises(ValueError, match=rf"image_size must be an integer in \[{MIN_IMAGE_SIZE}, "):
        write_synthetic_benchmark(tmp_path / "x", image_size=8)
    assert not (tmp_path / "x").exists()


def test_small_and_large_image_sizes_work():
    for size in (MIN_IMAGE_SIZE, 64):
        for task in TASK_NAMES:
            for ex in generate_examples(task, 5, split="train", image_size=size, seed=3):
                assert max(ex.image.size) == size


def test_every_generated_word_is_one_token(bench: Path):
    tok = build_tokenizer()
    words: set[str] = set()
    for task in TASK_NAMES:
        for split in ("train", "base"):
            for ex in generate_examples(task, 30, split=split, seed=0):
                text = get_task(task).format_question(ex.body, ref=ex.ref) + " " + ex.answer
                words |= set(re.findall(r"[A-Za-z]+", text))
    multi = sorted(w for w in words if len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1
                   and len(w) > 1)
    assert multi == [], f"add these words to coin_ray/models/_tokenizer.py VOCAB_WORDS: {multi}"


def test_base_family_asks_other_questions_in_the_same_format():
    for task in TASK_NAMES:
        task_q = {ex.body for ex in generate_examples(task, 80, split="train", seed=0)}
        base = list(generate_examples(task, 80, split="base", seed=0))
        base_q = {ex.body for ex in base}
        if task not in ("ImageNet", "Grounding"):  # their question is the instruction itself
            assert not task_q & base_q, task
        if task == "ScienceQA":
            assert all(re.fullmatch(r"[A-E]", ex.answer) for ex in base)
        if task == "Grounding":
            assert all(ex.answer.startswith("[") and ex.ref == "the object" for ex in base)


def test_pretrain_base_trains_then_reuses_its_cache(tmp_path: Path):
    import torch

    from coin_ray.synthetic.base import pretrain_base
    from coin_ray.models import build_tiny_vlm, build_vlm

    kwargs = dict(steps=6, lr=2e-3, seed=0, tasks=["VQAv2", "ScienceQA"], rows_per_task=8, batch_size=4)
    model, processor = build_tiny_vlm(layers=1, vision_layers=1, seed=0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    folder = pretrain_base(model, processor, tmp_path, **kwargs)
    info = json.loads((folder / "base.json").read_text())
    assert info["final_loss"] < info["first_loss"]
    assert not torch.equal(start["lm_head.weight"], model.state_dict()["lm_head.weight"])

    fresh, processor2 = build_tiny_vlm(layers=1, vision_layers=1, seed=0)
    assert pretrain_base(fresh, processor2, tmp_path, **kwargs) == folder  # same inputs: cache hit
    trained = model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    loaded, _ = build_vlm(str(folder))
    assert torch.equal(loaded.state_dict()["lm_head.weight"], trained["lm_head.weight"])
    other = pretrain_base(build_tiny_vlm(layers=1, vision_layers=1, seed=0)[0], processor, tmp_path,
                          **{**kwargs, "steps": 5})
    assert other != folder


def test_every_task_reference_reaches_a_judge_as_text(bench: Path):
    """The knowledge judge needs the ground truth as text for every task (a Grounding box included), the way
    evaluation hands it over: reference_from_record -> JSON (the Parquet column) -> text."""
    from coin_ray.evaluation.generation import _reference_text
    from coin_ray.evaluation.judges import check_judge_inputs

    for task in TASK_NAMES:
        t = get_task(task)
        test = json.loads((bench / "Instructions" / task / "test.json").read_text())
        refs = [_reference_text(json.loads(json.dumps(t.reference_from_record(r)))) for r in test]
        check_judge_inputs(["q"] * len(refs), refs, ["reply"] * len(refs))
        assert all(isinstance(x, str) and x for x in refs), (task, refs)
        if task == "Grounding":
            assert all(x.startswith("[") and x.count(",") == 3 for x in refs), refs

