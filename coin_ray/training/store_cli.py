"""List and prune the stage store.

    python -m coin_ray.training.store_cli list  --storage-path runs
    python -m coin_ray.training.store_cli prune --storage-path runs [--older-than-days 7] [--max-gb 20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from coin_ray.training.store import StageStore


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("list", "prune"))
    p.add_argument("--storage-path", default="runs", help="the sweeps' --storage-path (store is <path>/stage_store)")
    p.add_argument("--older-than-days", type=float, help="prune: delete entries older than this")
    p.add_argument("--max-gb", type=float, help="prune: then delete the oldest until the store fits")
    args = p.parse_args(argv)
    root = Path(args.storage_path) / "stage_store"
    if not root.is_dir():
        print(f"error: no stage store at {root} (is --storage-path right?)", file=sys.stderr)
        return 2
    store = StageStore(root)
    if args.command == "list":
        total = 0
        print(f"{'key':26} {'age':>8} {'size':>10}  prefix")
        for key, meta, size in store.entries():
            total += size
            age_h = (time.time() - meta.get("created", time.time())) / 3600
            prefix = ">".join(meta.get("material", {}).get("prefix", [])) or "(base: zero-shot)"
            print(f"{key:26} {age_h:7.1f}h {size / 1e6:8.2f}MB  {prefix}")
        print(f"total {total / 1e6:.2f} MB in {root}")
        return 0
    if args.older_than_days is None and args.max_gb is None:
        print("error: prune needs --older-than-days and/or --max-gb", file=sys.stderr)
        return 2
    removed = store.prune(older_than_s=None if args.older_than_days is None else args.older_than_days * 86400,
                          max_bytes=None if args.max_gb is None else int(args.max_gb * 1e9))
    print(f"removed {len(removed)} entries" + (f": {', '.join(removed)}" if removed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
