"""What a stage trains on and in which order (coin_ray.training.data_order): a seeded global shuffle of every
epoch, seeded random replay and train subsets, seeded random test subsets - on real preprocessed Parquet
read through Ray Data."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from coin_ray.config import ExperimentConfig
from coin_ray.training.data_order import derived_seed, order_keys, row_keys, split_indices

integration = pytest.mark.integration  # the `prepared` benchmark: preprocessed once (about a minute on 2 cores)

ROWS = 48  # train rows of ScienceQA / TextVQA in the prepared benchmark below


def _cfg(storage, **extra):
    return ExperimentConfig.from_dict({
        "order": ["ScienceQA", "TextVQA"], "storage_path": str(storage), "scaling.num_workers": 0,
        "model.pretrain_steps": 0, "data.train_rows": ROWS, "data.test_rows": 16, "train.batch_size": 8,
        "train.max_steps": ROWS // 8, **extra})  # one epoch per stage


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    from coin_ray.training import prepare_data

    storage = tmp_path_factory.mktemp("order-data")
    return storage, prepare_data(_cfg(storage))


def _stage_rows(cfg, data, k, local=True):
    """(task, index) of every row stage k trains on, in order; `local`: the small-stage path (the splits in
    the object store, permuted on the driver), else the Ray Data sort of a streamed split."""
    from coin_ray.training.continual import stage_datasets, with_train_datasets
    from coin_ray.training.worker import quiet_data_context

    quiet_data_context()  # ordered execution, as every run sets it (a sort's blocks in key order)
    datasets, rows = stage_datasets(cfg, with_train_datasets(cfg, data) if local else data)
    batches = list(datasets[f"stage_{k}"].iter_batches(batch_size=8, batch_format="pandas"))
    return [(t, int(i)) for b in batches for t, i in zip(b["task"], b["index"])], rows[k]


@integration
def test_a_sorted_split_is_trained_in_a_seeded_global_order_every_epoch(prepared):
    storage, data = prepared
    cfg = _cfg(storage, **{"train.max_steps": 2 * ROWS // 8})  # two epochs of stage 0
    order, n = _stage_rows(cfg, data, 0)
    assert n == ROWS and len(order) == 2 * ROWS
    first, second = [i for _, i in order[:ROWS]], [i for _, i in order[ROWS:]]
    assert sorted(first) == sorted(second) == list(range(ROWS))  # each epoch is a permutation of the split
    assert first != second  # ... in its own order
    head = first[:8]  # the first batch holds rows from across the file, not its first 8
    assert max(head) - min(head) > ROWS // 2 and head != sorted(head)
    assert _stage_rows(cfg, data, 0)[0] == order  # same seed, same order
    assert _stage_rows(cfg.replace(**{"train.seed": 1}), data, 0)[0] != order


def _key_order(rows, seed, epochs):
    """`rows` ((task, index) pairs) as `epochs` passes, pass e sorted by the keys of its seed: the order the
    keys define, computed here without Ray."""
    tasks, indices = [t for t, _ in rows], [i for _, i in rows]
    return [rows[j] for e in range(epochs)
            for j in np.argsort(order_keys(derived_seed(seed, "epoch", e), tasks, indices), kind="stable")]


@integration
def test_a_streamed_stage_is_sorted_into_the_order_of_a_small_one_whatever_its_blocks(prepared):
    """A stage over data.materialize_below_mb streams from Parquet and Ray Data sorts it: the same rows in the
    same order as the small-stage path - the order the keys define, epoch after epoch - for any block split."""
    import ray

    from coin_ray.training.data_order import epoch_stream
    from coin_ray.training.stages import stage_seed

    storage, data = prepared
    n = ROWS + 8
    cfg = _cfg(storage, **{"train.replay_per_task": 8, "train.max_steps": 3 * n // 8})  # stage 1: 3 epochs
    local, rows = _stage_rows(cfg, data, 1)
    assert rows == n and len(local) == 3 * n
    assert local == _key_order(sorted(set(local)), stage_seed(0, ("ScienceQA", "TextVQA")), 3)
    streamed, _ = _stage_rows(cfg.replace(**{"data.materialize_below_mb": 0}), data, 1)  # as a run streams it
    assert streamed == local
    # one split read in other block splits, sorted into other numbers of partitions per epoch
    split = data.splits["ScienceQA"]["train"]
    expected = _key_order([("ScienceQA", i) for i in range(ROWS)], 7, 2)
    blocks = set()
    for n_blocks, partitions in ((1, 2), (6, 3)):
        read = ray.data.read_parquet(split).repartition(n_blocks).materialize()
        blocks.add(read.num_blocks())
        ds = epoch_stream(read, 7, 2, local=False, partitions=partitions)
        assert [(t, int(i)) for b in ds.iter_batches(batch_size=8, batch_format="pandas")
                for t, i in zip(b["task"], b["index"])] == expected
        assert ds.schema().names == read.schema().names  # the sort columns are dropped
    assert len(blocks) == 2


@integration
def test_a_length_grouped_stage_reorders_within_each_step_alike_streamed_or_small(prepared):
    """train.group_by_length: each optimizer step (here 8 rows) holds the rows it holds without grouping, sorted
    longest first; a streamed stage (the Ray Data sort) gets the same order as a small one."""
    storage, data = prepared
    n = ROWS + 8
    cfg = _cfg(storage, **{"train.replay_per_task": 8, "train.max_steps": n // 8, "train.group_by_length": True})
    grouped, _ = _stage_rows(cfg, data, 1)
    plain, _ = _stage_rows(cfg.replace(**{"train.group_by_length": False}), data, 1)
    assert grouped != plain
    assert all(sorted(grouped[s:s + 8]) == sorted(plain[s:s + 8]) for s in range(0, len(plain), 8))
    streamed, _ = _stage_rows(cfg.replace(**{"data.materialize_below_mb": 0}), data, 1)
    assert streamed == grouped


@integration
def test_replay_is_a_seeded_random_sample_spread_through_the_stage(prepared):
    storage, data = prepared
    cfg = _cfg(storage, **{"train.replay_per_task": 8})
    order, n = _stage_rows(cfg, data, 1)
    assert n == ROWS + 8 and len(order) == n
    positions = [p for p, (t, _) in enumerate(order) if t == "ScienceQA"]
    replayed = sorted(i for t, i in order if t == "ScienceQA")
    assert len(replayed) == 8 and len(set(replayed)) == 8
    assert replayed != list(range(8)) and max(replayed) > ROWS // 2  # not the first m rows of the file
    assert min(positions) < n // 3 and max(positions) > 2 * n // 3  # mixed through the stage, not appended
    assert _stage_rows(cfg, data, 1)[0] == order
    other = sorted(i for t, i in _stage_rows(cfg.replace(**{"train.seed": 1}), data, 1)[0] if t == "ScienceQA")
    assert other != replayed


@integration
def test_train_fraction_and_max_train_rows_draw_seeded_random_subsets(prepared):
    storage, data = prepared
    half, n = _stage_rows(_cfg(storage, **{"data.train_fraction": 0.5}), data, 0)
    assert n == ROWS // 2 and len({i for _, i in half}) == ROWS // 2
    kept = sorted(i for _, i in half)
    assert kept != list(range(ROWS // 2))
    capped, m = _stage_rows(_cfg(storage, **{"data.max_train_rows": 10, "train.seed": 3}), data, 0)
    assert m == 10 and sorted(i for _, i in capped) != list(range(10))
    # the subset is data, not training randomness: the same rows for every trial seed
    assert sorted(i for _, i in _stage_rows(_cfg(storage, **{"data.train_fraction": 0.5, "train.seed": 5}),
                                            data, 0)[0]) == kept


@integration
def test_the_slim_test_subset_is_random_and_the_same_in_every_trial(prepared):
    from coin_ray.evaluation.generation import iter_test_batches, test_subset

    _, data = prepared
    split = data.splits["TextVQA"]["test"]
    chosen = test_subset(split, "TextVQA", 5, seed=0)
    assert len(chosen) == 5 and chosen != set(range(5)) and chosen == test_subset(split, "TextVQA", 5, seed=0)
    assert test_subset(split, "TextVQA", 5, seed=1) != chosen  # data.seed picks another subset
    assert test_subset(split, "TextVQA", 100, seed=0) is None  # more than the split: every row
    seen = [int(i) for b in iter_test_batches(split, 2, max_rows=5) for i in b["index"]]
    assert sorted(seen) == sorted(chosen)
    sharded = [int(i) for r in (0, 1) for b in iter_test_batches(split, 2, rank=r, world=2, max_rows=5)
               for i in b["index"]]
    assert sorted(sharded) == sorted(chosen)  # disjoint rank shards of the same subset


def test_row_keys_depend_on_seed_task_and_index_only():
    idx = np.arange(1000)
    a = row_keys(0, "GQA", idx)
    assert len(set(a.tolist())) == 1000 and np.array_equal(a, row_keys(0, ["GQA"] * 1000, idx))
    assert not np.array_equal(a, row_keys(1, "GQA", idx)) and not np.array_equal(a, row_keys(0, "OCRVQA", idx))
    ranks = np.argsort(a)[:100]
    assert 300 < ranks.mean() < 700  # a sample of the smallest keys is spread over the split


@integration
def test_synthetic_instruction_styles_are_generated(tmp_path):
    from coin_ray.models import build_tokenizer
    from coin_ray.synthetic import write_synthetic_benchmark
    from coin_ray.synthetic._instructions import DIVERSE, TEN_TYPE

    tok = build_tokenizer()
    for style, table in (("diverse", DIVERSE), ("10type", TEN_TYPE)):
        root = write_synthetic_benchmark(tmp_path / style, tasks=["VQAv2", "Grounding"], train_rows=40, test_rows=4,
                                         instruction_style=style)
        lines = {r["conversations"][0]["value"].rsplit("\n", 1)[-1]
                 for r in json.loads((root / "Instructions" / "VQAv2" / "train.json").read_text())}
        assert lines <= set(table["VQAv2"]) and len(lines) == (1 if style == "diverse" else len(lines))
        if style == "10type":
            assert len(lines) >= 6  # drawn per example among the ten
    words = {w for table in (DIVERSE, TEN_TYPE) for lines in table.values() for line in lines
             for w in re.findall(r"[A-Za-z]+", line.replace("{ref}", ""))}
    multi = sorted(w for w in words if len(w) > 1 and len(tok(" " + w, add_special_tokens=False)["input_ids"]) != 1)
    assert multi == [], f"words outside the tiny vocabulary: {multi}"


@integration
def test_split_indices_reads_the_index_column(prepared):
    _, data = prepared
    assert sorted(split_indices(data.splits["ScienceQA"]["train"]).tolist()) == list(range(ROWS))


def test_coin_instruction_styles_are_found_beside_or_inside_the_original_folder(tmp_path):
    from coin_ray.training.continual import RunSetupError, coin_instructions

    original = tmp_path / "CoIN" / "Instructions_Original"
    original.mkdir(parents=True)
    assert coin_instructions(str(original), "original") == original
    (tmp_path / "CoIN" / "Instructions_Diverse").mkdir()
    assert coin_instructions(str(original), "diverse") == tmp_path / "CoIN" / "Instructions_Diverse"
    (original / "Instructions_10Type").mkdir()  # not a sibling: the sub-folder of that name inside
    assert coin_instructions(str(original), "10type") == original / "Instructions_10Type"
    plain = tmp_path / "Instructions"  # not a style folder: only the sub-folder is a candidate
    plain.mkdir()
    (tmp_path / "Instructions_Diverse").mkdir()
    with pytest.raises(RunSetupError) as missing:
        coin_instructions(str(plain), "diverse")
    assert str(missing.value).split(";")[0].endswith(f"no Instructions_Diverse folder at {plain / 'Instructions_Diverse'}")
    (tmp_path / "CoIN" / "Instructions_Diverse").rmdir()
    with pytest.raises(RunSetupError) as neither:
        coin_instructions(str(original), "diverse")
    message = str(neither.value)
    assert "\n" not in message and "data.instruction_style diverse" in message
    assert f"{tmp_path / 'CoIN' / 'Instructions_Diverse'} or {original / 'Instructions_Diverse'}" in message
