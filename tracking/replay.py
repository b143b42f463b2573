"""Send MLflow writes that a tracker could not deliver (server down at the end of a run) and kept on disk.

    python -m tracking.replay ~/.coin_ray/mlflow_spool --tracking-uri http://mlflow.internal:5000
"""
from __future__ import annotations

import argparse

from coin_ray.redact import redact_text

from tracking._outbox import replay_spool
from tracking._tracker import default_spool_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spool_dir", nargs="?", default=str(default_spool_dir()),
                        help="spool folder (default: $COIN_RAY_MLFLOW_SPOOL or ~/.coin_ray/mlflow_spool)")
    parser.add_argument("--tracking-uri", required=True, help="the MLflow tracking URI the runs live in")
    args = parser.parse_args(argv)
    sent = replay_spool(args.spool_dir, args.tracking_uri)
    print(f"sent {sent} spooled write(s) to {redact_text(args.tracking_uri)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
