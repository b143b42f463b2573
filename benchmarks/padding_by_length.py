"""Padding tokens per optimizer step with and without train.group_by_length, on CoIN-layout rows of mixed length.

A stage that mixes ScienceQA rows (a question with its lecture and options) and ImageNet rows (one question, a
one-word answer) - a replay stage, or the joint bound - pads every short row of a micro-batch up to its longest.
Length grouping (LLaVA's group_by_modality_length) sorts each optimizer step's rows by length, so a micro-batch
holds rows of similar length; the step's rows and the epoch's are unchanged. Rows are encoded as training
encodes them (`encode_train_batch`: prompt, image tokens, answer), their order is the stage's seeded epoch order
(`coin_ray.training.data_order.epoch_orders`). Prints one line per setting and a JSON line
{"padding_per_step", "padding_per_step_grouped", "ratio", "tokens_per_step"}.

    python benchmarks/padding_by_length.py [--rows 448] [--batch-size 14 --grad-accum 8 --workers 8]
    python benchmarks/padding_by_length.py --instructions /data/CoIN/Instructions_Original --model /models/assembled
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LECTURE = ("Offspring phenotypes depend on the genotypes of their parents. A Punnett square shows each possible "
           "combination of the alleles the parents pass on, and the ratio of boxes gives the expected ratio of "
           "offspring types. Dominant alleles mask recessive ones, so an organism with one dominant allele shows "
           "the dominant trait. ")


def generated_rows(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(task, question, answer) in CoIN's wording: half ScienceQA with lectures of 1-4 paragraphs, half ImageNet."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % 2:
            context = LECTURE * rng.randint(1, 4)
            rows.append(("ScienceQA", f"Context: {context}\nWhich is the expected ratio?\nA. 0:4\nB. 1:3\nC. 2:2\n"
                         "Answer with the option's letter from the given choices directly.", rng.choice("ABC")))
        else:
            rows.append(("ImageNet", "What is the object in the image?\nAnswer the question using a single word or "
                         "phrase.", rng.choice(["goldfish", "tabby cat", "tractor", "volcano"])))
    return rows


def coin_rows(instructions: Path, n: int) -> list[tuple[str, str, str]]:
    """The first n/2 train rows of ScienceQA and of ImageNet from CoIN's instruction folders."""
    rows = []
    for task in ("ScienceQA", "ImageNet"):
        for record in json.loads((instructions / task / "train.json").read_text())[: n // 2]:
            turns = record["conversations"]
            rows.append((task, turns[0]["value"].replace("<image>\n", ""), turns[1]["value"]))
    return rows


def padding_per_step(order: np.ndarray, lengths: np.ndarray, micro: int, per_step: int) -> list[int]:
    """Padding tokens of each optimizer step: per micro-batch, rows x its longest row - its tokens."""
    steps = []
    for s in range(0, len(order) - per_step + 1, per_step):
        rows = lengths[order[s:s + per_step]]
        steps.append(int(sum(b.max() * len(b) - b.sum() for b in (rows[i:i + micro] for i in range(0, len(rows), micro)))))
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1792, help="rows of the stage (half ScienceQA, half ImageNet)")
    p.add_argument("--batch-size", type=int, default=14, help="per worker (CoIN: 14)")
    p.add_argument("--grad-accum", type=int, default=8, help="CoIN: 8")
    p.add_argument("--workers", type=int, default=8, help="data-parallel workers (CoIN: 8 GPUs)")
    p.add_argument("--instructions", type=Path, help="CoIN's instruction folder (default: generated rows)")
    p.add_argument("--model", default="tiny", help="a model folder whose processor encodes the rows")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    from PIL import Image

    from coin_ray.models import build_processor, encode_train_batch
    from coin_ray.training.data_order import epoch_orders

    rows = coin_rows(args.instructions, args.rows) if args.instructions else generated_rows(args.rows, args.seed)
    processor = build_processor(args.model)
    image = Image.new("RGB", (64, 48), (120, 90, 60))
    lengths = []
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        enc = encode_train_batch(processor, [q for _, q, _ in chunk], [a for _, _, a in chunk], [image] * len(chunk),
                                 args.max_length, on_overflow="flag")
        lengths += [len(ids) for ids in enc["input_ids"]]
    lengths = np.array(lengths)
    tasks = np.array([t for t, _, _ in rows], dtype=object)
    indices = np.arange(len(rows))
    micro, per_step = args.batch_size, args.batch_size * args.grad_accum * args.workers
    results = {}
    for grouped in (False, True):
        [order] = epoch_orders(args.seed, tasks, indices, 1, lengths if grouped else None, per_step)
        pads = padding_per_step(order, lengths, micro, per_step)
        results[grouped] = float(np.mean(pads))
        print(f"group_by_length {str(grouped).lower():5}: {results[grouped]:10.0f} padding tokens per optimizer "
              f"step ({len(pads)} steps of {per_step} rows, micro-batch {micro}; row lengths {lengths.min()}-"
              f"{lengths.max()}, mean {lengths.mean():.0f})")
    print(json.dumps({"padding_per_step": round(results[False]), "padding_per_step_grouped": round(results[True]),
                      "ratio": round(results[True] / results[False], 4) if results[False] else None,
                      "tokens_per_step": int(lengths.mean() * per_step)}))


if __name__ == "__main__":
    main()
