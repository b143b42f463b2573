"""What a stage trains on and in which order: seeded random subsets of a split (train_fraction,
max_train_rows, replay, max_test_rows) and a seeded global shuffle of every epoch of a stage.

Every choice is a function of (seed, task, row index) only - `row_keys` hashes them into one 64-bit key per
row - so it does not depend on how Ray splits the data into blocks, on the number of CPUs, or on the run:
the same seed gives the same rows in the same order in every trial, after a resume, and on a cluster.

- A subset of m rows of a split is the m rows with the smallest keys (`subset_indices`); the driver reads
  only the split's `index` column to pick them, and a filter keeps them (`keep_rows`).
- An epoch is the stage's rows (replay included) sorted by their keys under that epoch's seed; a stage of E
  epochs is E such epochs one after the other in one dataset (`epoch_stream`), iterated once by the training
  loop. A big stage is sorted by Ray Data (`sorted_epochs`: one distributed sort of all E epochs, nothing
  collected on the driver); a small one, already in the object store, is permuted here (the same order,
  without a sort's tasks).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# Part of every stage-store key. 1: file order with a local shuffle buffer, replay = the first m rows of each
# past task; 2: a seeded global shuffle per epoch, seeded random replay and train subsets.
DATA_ORDER_VERSION = 2
ORDER_COLUMN = "_order"
BUCKET_COLUMN = "_order_bucket"

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _hash64(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def row_keys(seed: int | str, tasks: Sequence[str] | np.ndarray | str, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    """One uint64 key per row from (seed, the row's task, the row's `index` column): sorting by it is a seeded
    random permutation; the smallest m keys are a seeded random sample. `tasks` may be one name for all rows."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    if isinstance(tasks, str):
        task_h = np.full(idx.shape, _hash64(tasks), dtype=np.uint64)
    else:
        names = np.asarray(tasks, dtype=object)
        task_h = np.empty(idx.shape, dtype=np.uint64)
        for name in set(names.tolist()):
            task_h[names == name] = _hash64(name)
    with np.errstate(over="ignore"):
        return _mix(_mix(task_h ^ _hash64(f"seed:{seed}")) ^ (idx * _GOLDEN))


def derived_seed(seed: int, *parts: Any) -> str:
    """A seed for one use of `seed` (an epoch, a replayed task, a subset), as text for `row_keys`."""
    return ":".join(str(p) for p in (seed, *parts))


def split_indices(folder: str | Path) -> np.ndarray:
    """The `index` column of one preprocessed split (Parquet), read alone: cheap even for 100k image rows."""
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files in {folder}: run pipelines/preprocess.py for this task first")
    return pads.dataset(files, format="parquet").to_table(columns=["index"]).column("index").to_numpy()


def subset_indices(indices: np.ndarray, task: str, seed: Any, m: int) -> np.ndarray:
    """The `index` values of a seeded random m-row subset of a split (all of them, in file order, when m >= n)."""
    if m >= len(indices):
        return np.asarray(indices)
    chosen = np.argsort(row_keys(seed, task, indices), kind="stable")[:m]
    return np.sort(np.asarray(indices)[chosen])


def fraction_rows(n: int, fraction: float) -> int:
    """Rows of a split that `data.train_fraction` keeps: round(f x n), at least one."""
    return n if fraction >= 1 else max(1, round(fraction * n))


def keep_rows(ds: Any, indices: np.ndarray) -> Any:
    """`ds` (one task's split) limited to the rows whose `index` is in `indices` (a lazy filter)."""
    import pyarrow as pa

    keep = pa.array(np.asarray(indices, dtype=np.int64))

    def select(table: "pa.Table") -> "pa.Table":
        import pyarrow.compute as pc

        return table.filter(pc.is_in(table["index"], value_set=keep))

    return ds.map_batches(select, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)


def order_keys(seed: Any, tasks: Any, indices: Any) -> np.ndarray:
    """The sort keys of one epoch: `row_keys` cut to 63 bits (int64, so sort boundaries are plain ints)."""
    return (row_keys(seed, tasks, indices) >> np.uint64(1)).astype(np.int64)


def length_grouped(order: np.ndarray, lengths: np.ndarray, per_step: int) -> np.ndarray:
    """`order` (row positions, one epoch) with each optimizer step's rows - consecutive runs of `per_step` - sorted
    longest first (ties keep their order): the rows of a step and of the epoch are unchanged, but each
    micro-batch holds rows of similar length, so padding shrinks. LLaVA's group_by_modality_length does the same
    with mega-batches of one step's rows."""
    order = np.asarray(order)
    out = order.copy()
    for start in range(0, len(order), max(1, per_step)):
        chunk = order[start:start + per_step]
        out[start:start + len(chunk)] = chunk[np.argsort(-np.asarray(lengths)[chunk], kind="stable")]
    return out


def epoch_orders(seed: Any, tasks: Any, indices: Any, epochs: int, lengths: Any = None, per_step: int = 0
                 ) -> list[np.ndarray]:
    """Each epoch's order of the rows (positions into tasks/indices): sorted by that epoch's `order_keys`, then,
    with `lengths` and `per_step`, grouped by length one optimizer step at a time (`length_grouped`)."""
    orders = [np.argsort(order_keys(derived_seed(seed, "epoch", e), tasks, indices), kind="stable")
              for e in range(max(1, epochs))]
    if lengths is not None and per_step > 0:
        orders = [length_grouped(o, lengths, per_step) for o in orders]
    return orders


def _row_lengths(table: Any) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)


def sorted_epochs(ds: Any, seed: Any, epochs: int, partitions: int = 2, per_step: int = 0) -> Any:
    """`epochs` passes over `ds` as one dataset, pass e in the order of `order_keys(derived_seed(seed, "epoch",
    e), task, index)`: one distributed Ray Data sort of every pass's rows by (pass, key), into `partitions`
    blocks per pass (nothing collected on the driver). The keys are uniform, so the boundaries are known
    without sampling: a row's bucket is its pass x partitions + the partition its key falls in, the primary
    sort column, and its key breaks the ties within a bucket.

    With `per_step` > 0 (length grouping) a row's key is its place in `epoch_orders` (spread over the same
    range), which needs every row's (task, index, length): those three columns are read here, not the rows.

    The passes are sorted together, not each on its own and then concatenated: Ray Data's `union` of datasets
    interleaves their blocks (round-robin under preserve_order, in arrival order without it), so the union of
    per-pass sorts would mix the passes' blocks, by a pattern that depends on how many blocks each pass has."""
    import pyarrow as pa

    parts = max(2, partitions)
    width = 2**63 // parts
    positions = None
    if per_step > 0:  # length grouping needs each row's place in the epoch: (task, index, length) read here
        meta = ds.map_batches(lambda t: pa.table({"task": t["task"], "index": t["index"],
                                                  "length": pa.array(_row_lengths(t))}),
                              batch_format="pyarrow", batch_size=None).to_arrow_refs()
        import ray

        meta = pa.concat_tables(ray.get(meta))
        tasks, indices = meta["task"].to_numpy(zero_copy_only=False), meta["index"].to_numpy()
        positions = []
        for e, order in enumerate(epoch_orders(seed, tasks, indices, epochs, meta["length"].to_numpy(), per_step)):
            keys = order_keys(derived_seed(seed, "epoch", e), tasks, indices)
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            by_key = np.argsort(keys, kind="stable")  # the grouped position of a row, found by its epoch key
            scale = 2**63 // max(len(order), 1)
            positions.append((keys[by_key], rank[by_key] * scale))

    def keyed(e: int) -> Any:
        pass_seed = derived_seed(seed, "epoch", e)

        def add_keys(table: Any) -> Any:
            keys = order_keys(pass_seed, table["task"].to_numpy(zero_copy_only=False), table["index"].to_numpy())
            if positions is not None:  # the grouped position, spread over the key range like the keys
                sorted_keys, spread = positions[e]
                keys = spread[np.searchsorted(sorted_keys, keys)]
            buckets = e * parts + np.minimum(keys // width, parts - 1)
            return (table.append_column(BUCKET_COLUMN, pa.array(buckets, type=pa.int64()))
                    .append_column(ORDER_COLUMN, pa.array(keys, type=pa.int64())))

        return ds.map_batches(add_keys, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)

    passes = [keyed(e) for e in range(max(1, epochs))]
    both = passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]  # any block order: sorted next
    return (both.sort([BUCKET_COLUMN, ORDER_COLUMN], boundaries=list(range(1, len(passes) * parts)))
            .drop_columns([BUCKET_COLUMN, ORDER_COLUMN]))


def epoch_stream(ds: Any, seed: int, epochs: int, *, local: bool = False, partitions: int = 2,
                 per_step: int = 0) -> Any:
    """`epochs` passes over `ds`, each in its own seeded random order, as one dataset. `local` (a small stage
    whose rows are already in the object store): the rows are read here once and each epoch is a permuted copy
    (`Table.take`), without a Ray sort's tasks; else `sorted_epochs`. Both give the same order (the same keys).
    `per_step` > 0: each run of that many rows (one optimizer step) is sorted by length (`length_grouped`)."""
    epochs = max(1, epochs)
    if not local:
        return sorted_epochs(ds, seed, epochs, partitions, per_step)
    import pyarrow as pa
    import ray

    table = pa.concat_tables([ray.get(ref) for ref in ds.to_arrow_refs()])
    tasks, indices = table["task"].to_numpy(zero_copy_only=False), table["index"].to_numpy()
    lengths = _row_lengths(table) if per_step > 0 else None
    perms = epoch_orders(seed, tasks, indices, epochs, lengths, per_step)
    return ray.data.from_arrow([table.take(pa.array(p)) for p in perms])


def stage_steps(max_steps: int, epochs: float, rows: int, per_step: int) -> int:
    """Optimizer steps of a stage: `max_steps` when > 0, else ceil(epochs x rows / rows per step)."""
    return max_steps or max(1, math.ceil(epochs * rows / per_step))


def epochs_needed(steps: int, rows: int, per_step: int) -> int:
    """Passes over a stage's `rows` that `steps` optimizer steps of `per_step` rows consume."""
    return max(1, math.ceil(steps * per_step / max(rows, 1)))
