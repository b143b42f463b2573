"""Tests of the Ray Data preprocessing pipeline (pipelines/): validation, rejections, Parquet + manifest, cache.

The fast tier checks the driver-side rules (path escapes, bad records, bad files, hashing) without Ray.
The integration tier runs the real pipeline on a local 2-CPU Ray cluster once per module (one fixture run
serves most assertions: a worker process importing torch and transformers costs seconds on this machine).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from coin_ray.tasks import get_task
from pipelines import PipelineInputError, preprocess, resolve_image
from pipelines._hashing import ContentHasher
from pipelines._records import (EMPTY_ANSWER, MISSING_FIELD, MISSING_IMAGE, MULTI_TURN, PATH_ESCAPE,
                                read_json_list, split_files, validate_records)

TINY = {"image_size": 16, "patch_size": 8}  # 4 image tokens: rows stay short


def _image(path: Path, size: tuple[int, int] = (24, 16), color: tuple[int, int, int] = (200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _train(i: int, image: str, answer: str = "B", **over) -> dict:
    rec = {"id": f"t{i}", "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat is shown?\nAnswer with the option's letter from the given choices directly."},
        {"from": "gpt", "value": answer}]}
    rec.update(over)
    return rec


def _test(i: int, image: str, answer: str = "A") -> dict:
    return {"question_id": i, "image": image, "text": "What is shown?\nAnswer with the option's letter.",
            "answer": answer}


def make_coin(root: Path) -> tuple[Path, Path]:
    """Two tasks in CoIN format: ScienceQA (with one bad record of each kind) and Grounding (val.json)."""
    images, instr = root / "images", root / "Instructions"
    for i in range(6):
        _image(images / "sqa" / f"{i}.png", color=(40 * i, 100, 50))
    (images / "sqa" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    _image(root / "outside.png")  # exists, but outside the image root
    os.symlink(root / "outside.png", images / "sqa" / "link_out.png")
    train = [_train(i, f"sqa/{i}.png", answer="ABCDE"[i % 5]) for i in range(6)] + [
        _train(90, "sqa/missing.png"),                      # missing_image
        _train(91, "sqa/corrupt.jpg"),                      # unreadable_image (found by the Ray stage)
        _train(92, "../outside.png"),                       # path_escape (..)
        _train(93, str(root / "outside.png")),              # path_escape (absolute)
        _train(94, "sqa/link_out.png"),                     # path_escape (symlink out)
        {"id": "t95", "image": "sqa/0.png"},                # missing_field (no conversations)
        _train(96, "sqa/1.png", answer="   "),              # empty_answer
        _train(97, "sqa/./sub/../2.png"),                   # fine: resolves inside the root
    ]
    test = [_test(i, f"sqa/{i}.png", "ABCDE"[i % 5]) for i in range(4)] + [
        {"question_id": 98, "image": "sqa/0.png", "text": "What is shown?"},  # missing_field (no answer)
        _test(99, "sqa/1.png", answer=""),                                       # empty_answer
    ]
    (instr / "ScienceQA").mkdir(parents=True)
    (instr / "ScienceQA" / "train.json").write_text(json.dumps(train))
    (instr / "ScienceQA" / "test.json").write_text(json.dumps(test))
    for i in range(3):
        _image(images / "coco" / f"{i}.jpg", size=(30, 20))
    g_train = [_train(i, f"coco/{i}.jpg", answer="[0.10, 0.20, 0.50, 0.60]") for i in range(3)]
    g_test = [{"question_id": f"g{i}", "image": f"coco/{i}.jpg", "text": "Please provide the bounding box: a dog",
               "answer_bbox": "[0.1, 0.2, 0.5, 0.6]", "size": [30, 20]} for i in range(2)]
    (instr / "Grounding").mkdir(parents=True)
    (instr / "Grounding" / "train.json").write_text(json.dumps(g_train))
    (instr / "Grounding" / "val.json").write_text(json.dumps(g_test))
    return instr, images


HF_COLUMNS = {"question": "q", "answer": "a", "image": "img", "id": "qid"}


def make_hf(root: Path, images: Path) -> Path:
    """A VQAv2 DatasetDict saved to disk: train with embedded image bytes, validation with image paths."""
    import datasets

    _image(images / "hf" / "a.png")
    pics = [Image.new("RGB", (20, 12), (i * 50, 0, 0)) for i in range(3)]
    features = datasets.Features({"q": datasets.Value("string"), "a": datasets.Value("string"),
                                  "img": datasets.Image(), "qid": datasets.Value("string")})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(
            {"q": ["What is shown?"] * 3, "a": ["yes", "no", ""], "img": pics, "qid": ["h0", "h1", "h2"]},
            features=features),
        "validation": datasets.Dataset.from_dict(
            {"q": ["What is shown?", "Is it red?"], "a": ["yes", "no"], "img": ["hf/a.png", "../x.png"],
             "qid": ["v0", "v1"]}),
    })
    dd.save_to_disk(str(root / "hf"))
    return root / "hf"


# ---------------------------------------------------------------- fast tier: driver-side rules, no Ray
def test_resolve_image_refuses_escapes(tmp_path: Path) -> None:
    instr, images = make_coin(tmp_path)
    root = images.resolve()
    assert resolve_image(root, "sqa/0.png")[0] == root / "sqa" / "0.png"
    assert resolve_image(root, "sqa/./sub/../2.png")[0] == root / "sqa" / "2.png"
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "sqa/link_out.png", "sqa/../../outside.png"):
        path, kind, reason = resolve_image(root, bad)
        assert path is None and kind == PATH_ESCAPE, bad
        assert "image root" in reason
    assert resolve_image(root, "sqa/nope.png")[1] == MISSING_IMAGE
    assert resolve_image(root, "")[1] == MISSING_FIELD
    assert resolve_image(root, None)[1] == MISSING_FIELD


def test_validate_records_rejects_each_kind_with_reason(tmp_path: Path) -> None:
    instr, images = make_coin(tmp_path)
    records, _ = read_json_list(instr / "ScienceQA" / "train.json")
    out = validate_records("ScienceQA", "train", "x", records, images.resolve(),
                           get_task("ScienceQA").reference_from_record)
    kinds = {r.id: r.kind for r in out.rejections}
    assert kinds == {"t90": MISSING_IMAGE, "t92": PATH_ESCAPE, "t93": PATH_ESCAPE, "t94": PATH_ESCAPE,
                     "t95": MISSING_FIELD, "t96": EMPTY_ANSWER}
    assert all(r.reason for r in out.rejections)
    # the corrupt image passes the cheap checks; the Ray stage rejects it when decoding
    assert [i["id"] for i in out.items] == ["t0", "t1", "t2", "t3", "t4", "t5", "t91", "t97"]
    first = out.items[0]
    assert first["question"].startswith("What is shown?") and "<image>" not in first["question"]
    assert first["answer"] == "A" and len(out.fingerprint) == len(out.items)

    test, _ = read_json_list(instr / "ScienceQA" / "test.json")
    out = validate_records("ScienceQA", "test", "x", test, images.resolve(), get_task("ScienceQA").reference_from_record)
    assert {r.id: r.kind for r in out.rejections} == {"98": MISSING_FIELD, "99": EMPTY_ANSWER}
    assert [json.loads(i["reference"]) for i in out.items] == ["A", "B", "C", "D"]


def test_multi_turn_and_max_rows(tmp_path: Path) -> None:
    instr, images = make_coin(tmp_path)
    rec = _train(0, "sqa/0.png")
    rec["conversations"] += rec["conversations"]
    out = validate_records("ScienceQA", "train", "x", [rec] + [_train(i, f"sqa/{i}.png") for i in range(5)],
                           images.resolve(), get_task("ScienceQA").reference_from_record, max_rows=2)
    assert [r.kind for r in out.rejections] == [MULTI_TURN]
    assert [i["id"] for i in out.items] == ["t0", "t1"]  # stops after 2 accepted records


def test_grounding_reference_is_a_box(tmp_path: Path) -> None:
    instr, images = make_coin(tmp_path)
    records, _ = read_json_list(split_files(instr, "Grounding")["test"])
    out = validate_records("Grounding", "test", "x", records, images.resolve(), get_task("Grounding").reference_from_record)
    assert json.loads(out.items[0]["reference"]) == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert out.items[0]["size"] == [30, 20]


def test_bad_files_stop_the_run_naming_the_file(tmp_path: Path) -> None:
    instr, images = make_coin(tmp_path)
    (instr / "ScienceQA" / "test.json").write_text('[{"question_id": 1,\n "text": "x" "answer": "A"}]')
    with pytest.raises(PipelineInputError, match=r"test\.json: not valid JSON at line 2 column 14"):
        preprocess(instr, images, ["ScienceQA"], tmp_path / "out")
    with pytest.raises(PipelineInputError, match=r"task folder .*TextVQA does not exist"):
        preprocess(instr, images, ["TextVQA"], tmp_path / "out")
    with pytest.raises(PipelineInputError, match=r"unknown task 'NoSuchTask'.*max_length must be >= 1"):
        preprocess(instr, images, ["NoSuchTask"], tmp_path / "out", max_length=0)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(PipelineInputError, match="not a preprocessing output"):
        preprocess(instr, images, ["Grounding"], tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_content_hash_changes_with_inputs_and_config(tmp_path: Path) -> None:
    from pipelines import plan

    instr, images = make_coin(tmp_path)
    base = plan(instr, images, ["Grounding"], model_kwargs=TINY)
    assert plan(instr, images, ["grounding"], model_kwargs=TINY).content_hash == base.content_hash
    assert plan(instr, images, ["Grounding"], model_kwargs=TINY, max_length=99).content_hash != base.content_hash
    assert plan(instr, images, ["Grounding"], model_kwargs={**TINY, "image_size": 32}).content_hash != base.content_hash
    _image(images / "coco" / "1.jpg", size=(32, 20))  # an image rewritten in place
    after_image = plan(instr, images, ["Grounding"], model_kwargs=TINY)
    assert after_image.content_hash != base.content_hash
    test_json = instr / "Grounding" / "val.json"
    test_json.write_text(test_json.read_text().replace("a dog", "a cat"))  # one word of one question
    assert plan(instr, images, ["Grounding"], model_kwargs=TINY).content_hash != after_image.content_hash


def test_hf_records_become_coin_records(tmp_path: Path) -> None:
    from pipelines import HFSource, plan

    images = tmp_path / "images"
    hf = make_hf(tmp_path, images)
    p = plan(None, images, ["VQAv2"], hf_datasets={"VQAv2": HFSource(hf, HF_COLUMNS)})
    train, test = p.splits
    assert [i["id"] for i in train.items] == ["h0", "h1"] and train.items[0]["hf_image"]
    assert [(r.id, r.kind) for r in train.rejections] == [("h2", EMPTY_ANSWER)]
    assert [i["id"] for i in test.items] == ["v0"] and test.items[0]["image"].endswith("hf/a.png")
    assert [(r.id, r.kind) for r in test.rejections] == [("v1", PATH_ESCAPE)]
    with pytest.raises(PipelineInputError, match=r"no column\(s\) \['question'\]"):
        plan(None, images, ["VQAv2"], hf_datasets={"VQAv2": HFSource(hf, {**HF_COLUMNS, "question": "question"})})


def test_encoder_rejects_corrupt_and_truncated_rows(tmp_path: Path) -> None:
    """The actor-free core of the Ray stage: an all-rejected batch still yields a typed, empty table."""
    import pyarrow as pa

    from pipelines._encode import Encoder

    instr, images = make_coin(tmp_path)
    records, _ = read_json_list(instr / "ScienceQA" / "train.json")
    items = validate_records("ScienceQA", "train", "x", records, images.resolve(),
                             get_task("ScienceQA").reference_from_record).items
    corrupt, good = [i for i in items if i["id"] == "t91"], items[:2]
    table, rejected = Encoder("tiny", TINY, max_length=8).encode(pa.Table.from_pylist(corrupt + good))
    assert table.num_rows == 0 and table.schema.field("pixel_values").type.shape == (3, 16, 16)
    assert [(r["id"], r["kind"]) for r in rejected] == [("t91", "unreadable_image"), ("t0", "truncated"),
                                                        ("t1", "truncated")]
    table, rejected = Encoder("tiny", TINY, max_length=256).encode(pa.Table.from_pylist(good))
    assert table.num_rows == 2 and not rejected


def test_internal_fields_are_never_read_from_user_json(tmp_path: Path) -> None:
    """A user record naming the internal embedded-image field gets the image-root check like any other."""
    instr, images = make_coin(tmp_path)
    hf_ref = {"path": str(tmp_path / "hf"), "split": "train", "row": 0, "column": "img"}
    records = [_train(0, "../outside.png", _hf_image=hf_ref), {**_train(1, "sqa/1.png"), "_hf_image": hf_ref},
               {**_train(2, "sqa/2.png"), "hf_image": hf_ref}]
    (instr / "ScienceQA" / "train.json").write_text(json.dumps(records))
    loaded, _ = read_json_list(instr / "ScienceQA" / "train.json")
    out = validate_records("ScienceQA", "train", "x", loaded, images.resolve(), get_task("ScienceQA").reference_from_record)
    assert [(r.id, r.kind) for r in out.rejections] == [("t0", PATH_ESCAPE)]
    assert [(i["id"], i["hf_image"]) for i in out.items] == [("t1", ""), ("t2", "")]
    assert all(i["image"].startswith(str(images.resolve())) for i in out.items)


def test_grounding_train_answers_must_be_boxes(tmp_path: Path) -> None:
    from pipelines._records import INVALID_BOX

    instr, images = make_coin(tmp_path)
    answers = ["[0.10, 0.20, 0.50, 0.60]", "a dog", "[0.1, 0.2, 0.5]", "[0.1, 0.2, 5, 0.6]", "[0.5, 0.2, 0.1, 0.6]",
               "[nan, 0.2, 0.5, 0.6]"]
    records = [_train(i, "coco/0.jpg", answer=a) for i, a in enumerate(answers)]
    out = validate_records("Grounding", "train", "x", records, images.resolve(), get_task("Grounding").reference_from_record)
    assert [i["id"] for i in out.items] == ["t0"]
    assert [(r.id, r.kind) for r in out.rejections] == [(f"t{i}", INVALID_BOX) for i in range(1, 6)]
    reasons = {r.id: r.reason for r in out.rejections}
    assert "[x1, y1, x2, y2]" in reasons["t1"] and "[0, 1]" in reasons["t3"] and "x1 <= x2" in reasons["t4"]
    # other tasks' answers are not boxes and need not be
    out = validate_records("ScienceQA", "train", "x", [_train(0, "sqa/0.png", answer="a dog")], images.resolve(),
                           get_task("ScienceQA").reference_from_record)
    assert not out.rejections


def test_images_above_max_image_pixels_are_rejected_before_decoding(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa
    from PIL import Image as PILImage

    from pipelines._encode import Encoder
    from pipelines._records import IMAGE_TOO_LARGE

    instr, images = make_coin(tmp_path)
    _image(images / "sqa" / "big.png", size=(40, 30))  # 1200 px
    records = [_train(0, "sqa/0.png"), _train(1, "sqa/big.png")]  # 24x16 = 384 px, 1200 px
    items = validate_records("ScienceQA", "train", "x", records, images.resolve(),
                             get_task("ScienceQA").reference_from_record).items
    table, rejected = Encoder("tiny", TINY, max_length=256, max_image_pixels=1000).encode(pa.Table.from_pylist(items))
    assert table.column("id").to_pylist() == ["t0"]
    assert [(r["id"], r["kind"]) for r in rejected] == [("t1", IMAGE_TOO_LARGE)]
    assert "40x30 = 1200 pixels, above data.max_image_pixels (1000)" in rejected[0]["reason"]
    # PIL's own decompression-bomb limit still holds (lowered here so that a test image trips it: PIL errors
    # above twice its limit) and is reported alike
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 500)
    table, rejected = Encoder("tiny", TINY, max_length=256).encode(pa.Table.from_pylist(items))
    assert table.column("id").to_pylist() == ["t0"] and [(r["id"], r["kind"]) for r in rejected] == [
        ("t1", IMAGE_TOO_LARGE)]
    assert "decompression bomb" in rejected[0]["reason"]


def test_max_image_pixels_is_checked_and_part_of_the_hash(tmp_path: Path) -> None:
    from coin_ray.config import ConfigError, ExperimentConfig
    from pipelines.preprocess import plan

    instr, images = make_coin(tmp_path)
    default = plan(instr, images, ["ScienceQA"], model_kwargs=TINY).content_hash
    assert plan(instr, images, ["ScienceQA"], model_kwargs=TINY, max_image_pixels=10_000).content_hash != default
    with pytest.raises(PipelineInputError, match=r"max_image_pixels must be an integer >= 1"):
        plan(instr, images, ["ScienceQA"], max_image_pixels=0)
    assert ExperimentConfig().data.max_image_pixels == 64_000_000
    with pytest.raises(ConfigError, match=r"data.max_image_pixels must be >= 1"):
        ExperimentConfig.from_dict({"data.max_image_pixels": 0})


def test_chunked_validation_matches_one_loop(tmp_path: Path) -> None:
    """The Ray validation tasks' chunks, merged, give what one loop over the file gives, with any row cap."""
    import pickle

    from pipelines._records import from_portable, merge_chunks, to_portable

    instr, images = make_coin(tmp_path)
    records, _ = read_json_list(instr / "ScienceQA" / "train.json")
    root, ref = images.resolve(), get_task("ScienceQA").reference_from_record
    for size in (1, 3, 5, 100):
        for max_rows in (None, 1, 2, 3, 7, 8, 50):
            whole = validate_records("ScienceQA", "train", "x", records, root, ref, max_rows)
            chunks = [validate_records("ScienceQA", "train", "x", records[i:i + size], root, ref, start=i)
                      for i in range(0, len(records), size)]
            merged, keep = merge_chunks("ScienceQA", "train", "x", chunks, max_rows)
            items = [item for c, n in zip(chunks, keep) for item in c.items[:n]]
            assert (merged.rejections, merged.fingerprint, merged.accepted, items) == (
                whole.rejections, whole.fingerprint, whole.accepted, whole.items), (size, max_rows)
    # HF records keep their embedded-image reference through the pickling into a task (and nothing else does)
    hf = make_hf(tmp_path, images)
    from pipelines import HFSource, plan

    train = plan(None, images, ["VQAv2"], hf_datasets={"VQAv2": HFSource(hf, HF_COLUMNS)}).splits[0]
    from pipelines import _hf

    ds = _hf.load_splits(hf)["train"][1]
    hf_records = list(_hf.records(hf, "train", ds, "train", HF_COLUMNS))
    shipped = from_portable(pickle.loads(pickle.dumps(to_portable(hf_records))))
    again = validate_records("VQAv2", "train", "x", shipped, root, get_task("VQAv2").reference_from_record)
    assert again.items == train.items and again.rejections == train.rejections
    assert from_portable(pickle.loads(pickle.dumps(to_portable(records)))) == records


def test_content_hasher_separates_parts() -> None:
    a, b = ContentHasher(), ContentHasher()
    a.add("x", b"ab"), a.add("y", b"c")
    b.add("x", b"a"), b.add("y", b"bc")
    assert a.hexdigest() != b.hexdigest()


def test_cli_reports_input_errors_without_traceback(tmp_path: Path, capsys) -> None:
    from pipelines.preprocess import main

    instr, images = make_coin(tmp_path)
    code = main(["--instructions", str(instr), "--images", str(images), "--tasks", "VizWiz", "--out",
                 str(tmp_path / "o")])
    assert code == 2
    assert "error: task folder" in capsys.readouterr().err


# ---------------------------------------------------------------- integration tier: real Ray
# (the session's `ray_cluster` from conftest.py: a second ray.init here fails once another module started it)


@pytest.fixture(scope="module")
def coin_run(ray_cluster, tmp_path_factory):
    """One real run over ScienceQA + Grounding (JSON) and VQAv2 (HF dataset), two encoding tasks at a time."""
    from pipelines import HFSource

    root = tmp_path_factory.mktemp("coin")
    instr, images = make_coin(root)
    hf = {"VQAv2": HFSource(make_hf(root, images), HF_COLUMNS)}
    out = root / "out"
    manifest = preprocess(instr, images, "ScienceQA,Grounding,VQAv2", out, model_kwargs=TINY, max_length=256,
                          batch_size=4, num_actors=2, hf_datasets=hf)
    return root, instr, images, hf, out, manifest


@pytest.mark.integration
def test_rows_manifest_and_rejections(coin_run) -> None:
    root, instr, images, hf, out, manifest = coin_run
    assert manifest["version"] == 1 and len(manifest["content_hash"]) == 64
    tasks = manifest["tasks"]
    assert tasks["ScienceQA"]["train"]["rows"] == 7 and tasks["ScienceQA"]["train"]["rejected"] == 7
    assert tasks["ScienceQA"]["test"] == {**tasks["ScienceQA"]["test"], "rows": 4, "rejected": 2}
    assert tasks["Grounding"]["train"]["rows"] == 3 and tasks["Grounding"]["test"]["rows"] == 2
    assert tasks["Grounding"]["test"]["source"].endswith("val.json")
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rejected}
    assert by_id["t91"]["kind"] == "unreadable_image" and "cannot be decoded" in by_id["t91"]["reason"]
    assert {by_id[i]["kind"] for i in ("t92", "t93", "t94")} == {"path_escape"}
    assert by_id["t90"]["kind"] == "missing_image" and by_id["t95"]["kind"] == "missing_field"
    assert by_id["t96"]["kind"] == "empty_answer" and by_id["99"]["kind"] == "empty_answer"
    assert all(set(r) >= {"task", "split", "index", "reason"} for r in rejected)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert not list(root.glob(".out.*"))  # temp folders renamed or removed


@pytest.mark.integration
def test_ray_validation_gives_the_same_one_line_errors_and_bytes_per_row(coin_run) -> None:
    """Validation in Ray tasks rejects the same records with the same reasons as `plan` in this process, and
    the manifest records Parquet bytes per row per split and per task."""
    from pipelines import plan

    root, instr, images, hf, out, manifest = coin_run
    local = plan(instr, images, "ScienceQA,Grounding,VQAv2", model_kwargs=TINY, max_length=256, hf_datasets=hf)
    assert local.content_hash == manifest["content_hash"]  # the same fingerprints reached the hash
    expected = [r.to_json() for s in local.splits for r in s.rejections]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r for r in rejected if r["kind"] != "unreadable_image"] == sorted(
        expected, key=lambda r: (local.tasks.index(r["task"]), ("train", "test").index(r["split"]), r["index"]))
    assert all(r["reason"] and "\n" not in r["reason"] for r in rejected)
    for task, splits in manifest["tasks"].items():
        nbytes = 0
        for split, info in splits.items():
            files = list((out / task / split).glob("*.parquet"))
            assert info["bytes"] == sum(f.stat().st_size for f in files) > 0
            assert info["bytes_per_row"] == pytest.approx(info["bytes"] / info["rows"], abs=0.1)
            nbytes += info["bytes"]
        rows = sum(info["rows"] for info in splits.values())
        assert manifest["bytes_per_row"][task] == pytest.approx(nbytes / rows, abs=0.1)


@pytest.mark.integration
def test_train_rows_mask_prompt_and_collate(coin_run) -> None:
    from coin_ray.models import IGNORE_INDEX, build_vlm
    from pipelines import load_split, train_collate_fn

    _, _, _, _, out, _ = coin_run
    processor = build_vlm("tiny", **TINY)[1]
    tok = processor.tokenizer
    ds = load_split(out, "ScienceQA", "train")
    assert ds.columns() == ["id", "task", "index", "input_ids", "labels", "pixel_values", "question", "answer"]
    rows = sorted(ds.take_all(), key=lambda r: r["index"])
    assert [r["id"] for r in rows] == ["t0", "t1", "t2", "t3", "t4", "t5", "t97"]
    for row in rows:
        labels, ids = np.asarray(row["labels"]), np.asarray(row["input_ids"])
        assert labels.shape == ids.shape
        answer_pos = labels != IGNORE_INDEX
        assert tok.decode(ids[answer_pos], skip_special_tokens=True).strip() == row["answer"]
        assert np.array_equal(labels[answer_pos], ids[answer_pos])
        assert ids[answer_pos][-1] == tok.eos_token_id and answer_pos.sum() <= 3
        assert row["pixel_values"].shape == (3, 16, 16) and row["pixel_values"].dtype == np.float32
    batch = next(iter(ds.iter_torch_batches(batch_size=4, collate_fn=train_collate_fn(tok.pad_token_id))))
    assert batch["input_ids"].shape == batch["labels"].shape and batch["pixel_values"].shape[1:] == (3, 16, 16)


@pytest.mark.integration
def test_encoding_tasks_write_the_rows_one_process_writes(coin_run, tmp_path: Path) -> None:
    """The Ray tasks' Parquet holds exactly the rows of `encode_block` over the same items in this process
    (as the throughput benchmark's plain loop runs it), whichever worker process and block wrote them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import plan
    from pipelines._encode import ITEM_SCHEMA, Encoder, encode_block

    _, instr, images, _, out, _ = coin_run
    local = plan(instr, images, "ScienceQA,Grounding", model_kwargs=TINY, max_length=256)
    encoder = Encoder("tiny", TINY, 256)
    for s in local.splits:
        encode_block(encoder, pa.Table.from_pylist(s.items, schema=ITEM_SCHEMA), tmp_path, 4)
    for task in ("ScienceQA", "Grounding"):
        for split in ("train", "test"):
            def rows(folder: Path) -> pa.Table:
                table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
                return table.sort_by("index")
            ours, theirs = rows(tmp_path / task / split), rows(out / task / split)
            assert ours.num_rows > 0 and ours.equals(theirs), (task, split)


@pytest.mark.integration
def test_test_rows_keep_what_evaluation_needs(coin_run) -> None:
    from pipelines import load_split

    _, _, _, _, out, _ = coin_run
    rows = sorted(load_split(out, "Grounding", "test").take_all(), key=lambda r: r["index"])
    assert [r["question_id"] for r in rows] == ["g0", "g1"]
    assert json.loads(rows[0]["reference"]) == pytest.approx([0.1, 0.2, 0.5, 0.6])
    assert list(rows[0]["size"]) == [30, 20] and rows[0]["question"].startswith("Please provide")
    sqa = load_split(out, "ScienceQA", "test")
    assert "labels" not in sqa.columns() and sqa.count() == 4


@pytest.mark.integration
def test_cache_reused_then_invalidated(coin_run) -> None:
    import shutil

    root, instr, images, hf, first_out, manifest = coin_run
    out = root / "copy"  # the output path is not part of the hash; the copy keeps the shared run intact
    shutil.copytree(first_out, out)
    marker = out / "ScienceQA" / "train" / "marker"
    marker.write_text("x")  # survives only if the output is reused
    again = preprocess(instr, images, "ScienceQA,Grounding,VQAv2", out, model_kwargs=TINY, max_length=256,
                       batch_size=8, hf_datasets=hf)  # batch size is not part of the hash
    assert again == manifest and marker.exists()
    # a changed image invalidates (stat-based fingerprint) and the run is recomputed into place
    _image(images / "coco" / "0.jpg", size=(31, 20))
    changed = preprocess(instr, images, "Grounding", out, model_kwargs=TINY, max_length=256, num_actors=1)
    assert changed["content_hash"] != manifest["content_hash"] and not marker.exists()
    assert set(changed["tasks"]) == {"Grounding"} and changed["tasks"]["Grounding"]["train"]["rows"] == 3
    assert json.loads((out / "manifest.json").read_text()) == changed


@pytest.mark.integration
def test_hf_dataset_rows(coin_run) -> None:
    from pipelines import load_split

    *_, out, manifest = coin_run
    assert manifest["tasks"]["VQAv2"]["train"]["rows"] == 2  # "" answer rejected
    assert manifest["tasks"]["VQAv2"]["test"]["rows"] == 1   # ../x.png escapes the root
    assert manifest["tasks"]["VQAv2"]["test"]["rejected_kinds"] == {"path_escape": 1}
    rows = sorted(load_split(out, "VQAv2", "train").take_all(), key=lambda r: r["index"])
    assert [r["id"] for r in rows] == ["h0", "h1"] and [r["answer"] for r in rows] == ["yes", "no"]
    assert rows[0]["pixel_values"].shape == (3, 16, 16)


def _textvqa(root: Path) -> tuple[Path, Path, Path]:
    """A TextVQA folder whose test.json holds one answer per question, and an annotation file with 10."""
    images, instr = root / "images", root / "Instructions"
    for i in range(2):
        _image(images / "tv" / f"{i}.png", color=(90, 20 * i, 200))
    (instr / "TextVQA").mkdir(parents=True)
    (instr / "TextVQA" / "train.json").write_text(json.dumps([_train(i, f"tv/{i}.png", answer="coke") for i in range(2)]))
    (instr / "TextVQA" / "test.json").write_text(json.dumps(
        [{"question_id": 7, "image": "tv/0.png", "text": "What brand is it?\nAnswer the question using a single word "
          "or phrase.", "answer": "pepsi"}]))
    annotations = root / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": [
        {"question_id": 7, "answers": ["coke", "coke", "coke", "pepsi", "pepsi", "pepsi", "pepsi", "pepsi",
                                       "pepsi", "pepsi"]}]}))
    return instr, images, annotations


@pytest.mark.integration
def test_textvqa_test_rows_carry_the_ten_human_answers_and_score_softly(ray_cluster, tmp_path: Path, capsys) -> None:
    """With the annotation file the preprocessed TextVQA test rows hold its 10 answers in `reference`, and an
    answer given by 3 of 10 annotators scores 0.9 (VQA accuracy averaged over the 10 leave-one-out subsets);
    without it, a warning says TextVQA falls back to exact match against test.json's single answer."""
    import pyarrow.parquet as pq

    from coin_ray.tasks import get_task

    instr, images, annotations = _textvqa(tmp_path)
    preprocess(instr, images, "TextVQA", tmp_path / "out", model_kwargs=TINY, max_length=256, batch_size=4,
               num_actors=1, textvqa_annotations=annotations)
    rows = pq.read_table(tmp_path / "out" / "TextVQA" / "test").to_pylist()
    (row,) = rows
    reference = json.loads(row["reference"]) if isinstance(row["reference"], str) else row["reference"]
    assert len(reference) == 10 and reference.count("coke") == 3
    task = get_task("TextVQA")
    assert task.score("coke", reference) == pytest.approx(0.9)
    assert task.score("pepsi", reference) == pytest.approx(1.0)
    capsys.readouterr()
    preprocess(instr, images, "TextVQA", tmp_path / "plain", model_kwargs=TINY, max_length=256, batch_size=4,
               num_actors=1)
    assert "TextVQA falls back to exact match" in capsys.readouterr().err
    (plain,) = pq.read_table(tmp_path / "plain" / "TextVQA" / "test").to_pylist()
    plain_ref = json.loads(plain["reference"]) if plain["reference"].startswith(("[", '"')) else plain["reference"]
    assert task.score("coke", plain_ref) == 0.0 and task.score("pepsi", plain_ref) == 1.0
