"""List and prune the stage store.

    python -m coin_ray.training.store_cli list  --storage-path runs
    python -m coin_ray.training.store_cli prune --storage-path runs [--older-than-days 7] [--max-gb 20]
                                                [--grace-minutes 10] [--yes]

`list` prints one line per entry and one line per broken folder (then goes on). `prune` is a dry run that
lists what it would delete unless `--yes` is given. It never deletes an entry that a running trial has claimed,
one created or given an evaluation cell within the grace period, or one whose meta.json cannot be read now.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from coin_ray.training.store import DEFAULT_GRACE_S, StageStore


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("list", "prune"))
    p.add_argument("--storage-path", default="runs", help="the sweeps' --storage-path (store is <path>/stage_store)")
    p.add_argument("--older-than-days", type=float, help="prune: delete entries created more than this many days ago")
    p.add_argument("--max-gb", type=float, help="prune: then delete the oldest until the store fits (> 0)")
    p.add_argument("--grace-minutes", type=float, default=DEFAULT_GRACE_S / 60,
                   help="prune: keep entries created or evaluated this recently (default: %(default)g)")
    p.add_argument("--yes", action="store_true", help="prune: really delete (without it: list what would go)")
    args = p.parse_args(argv)
    root = Path(args.storage_path) / "stage_store"
    if not root.is_dir():
        return _error(f"no stage store at {root} (is --storage-path right?)")
    store = StageStore(root)
    if args.command == "list":
        total = 0
        now = time.time()
        print(f"{'key':26} {'age':>8} {'size':>10}  prefix")
        for item in store.scan():
            total += item.size
            age_h = (now - item.created) / 3600
            what = f"BROKEN: {item.problem}" if item.problem else (item.prefix or "(base: zero-shot)")
            print(f"{item.key:26} {age_h:7.1f}h {item.size / 1e6:8.2f}MB  {what}")
        print(f"total {total / 1e6:.2f} MB in {root}")
        return 0
    if args.older_than_days is None and args.max_gb is None:
        return _error("prune needs --older-than-days and/or --max-gb")
    if args.max_gb is not None and not args.max_gb > 0:
        return _error(f"--max-gb must be > 0, got {args.max_gb:g}: it is the size the store may keep")
    if args.older_than_days is not None and not args.older_than_days >= 0:
        return _error(f"--older-than-days must be >= 0, got {args.older_than_days:g}")
    if not args.grace_minutes >= 0:
        return _error(f"--grace-minutes must be >= 0, got {args.grace_minutes:g}")
    for item in store.scan():
        if item.state == "unreadable":
            print(f"skipped {item.key}: {item.problem}")
    pruned = store.prune(older_than_s=None if args.older_than_days is None else args.older_than_days * 86400,
                         max_bytes=None if args.max_gb is None else max(1, int(args.max_gb * 1e9)),
                         grace_s=args.grace_minutes * 60, dry_run=not args.yes)
    verb = "removed" if args.yes else "would remove"
    for entry in pruned:
        print(f"{verb} {entry.key} ({entry.size / 1e6:.2f} MB): {entry.reason}")
    print(f"{verb} {len(pruned)} entries, {sum(e.size for e in pruned) / 1e6:.2f} MB"
          + ("" if args.yes or not pruned else "; run again with --yes to delete them"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
