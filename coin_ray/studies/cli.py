"""Shared command-line plumbing of the sweep scripts: flags, presets, YAML config, pre-flight checks,
Ray start-up and the closing report. The scripts in sweeps/ stay readable top to bottom."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from coin_ray.config import ConfigError, ExperimentConfig, dotted, load_yaml_file, parse_override, preset
from coin_ray.errors import UserError
from coin_ray.evaluation.metrics import METRIC_NAMES, higher_is_better  # noqa: F401 (the sweep scripts use it)
from coin_ray.training.types import PreparedData


class UsageError(UserError):
    """Bad command-line input, reported as one line before anything starts."""


# The embedded default is the dataclass defaults of coin_ray.config (configs/default.yaml shows them);
# --smoke-test layers configs/smoke.yaml over them, or configs/smoke_config.yaml over a --config.
SMOKE_PRESET, SMOKE_CONFIG_PRESET = "smoke", "smoke_config"


def add_common_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--config", help="YAML experiment config (e.g. configs/coin_llava7b.yaml); flags override it")
    g.add_argument("--tasks", help="comma-separated CoIN tasks (default: the config's order; embedded: GQA, "
                                   "Grounding, VQAv2, OCRVQA)")
    g.add_argument("--seeds", type=int, default=None,
                   help="replicates: run every configuration with seeds 0..N-1 (default: task_order.py 2, or 1 with "
                        "--smoke-test or --design optuna; hparams.py 1)")
    g.add_argument("--smoke-test", action="store_true", help="3 tasks, tiny budgets: a minutes-long check")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set tuner.rank=32 --set train.lr=1e-3")
    g.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the untrained model first (the zero-shot row; needed for fwt); default: on for "
                        "benchmark coin, else eval.zero_shot")
    g.add_argument("--no-cache", action="store_true", help="do not share or reuse stages across trials/sweeps")
    g.add_argument("--name", help="sweep name (default derived from the script and options; deterministic)")
    s = p.add_argument_group("scale")
    s.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray on this machine's CPUs)")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: all)")
    s.add_argument("--workers-per-trial", type=int, help="Ray Train workers per trial (data parallel); 0 = in-process")
    s.add_argument("--gpus-per-worker", type=float, help="GPUs per Train worker (turns on use_gpu when > 0)")
    s.add_argument("--max-concurrent-trials", type=int, help="trials at once (default: what the cluster fits)")
    s.add_argument("--storage-path", help="where checkpoints, the stage store and Tune state go (shared on a cluster)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted sweep from its storage path")
    c = p.add_argument_group("cost")
    c.add_argument("--plan", action="store_true",
                   help="print what the sweep would train, reuse and cost (stage tree, tokens, answers, memory, "
                        "device-hours; last line JSON) and exit without starting a trial")
    c.add_argument("--throughput", type=float, metavar="TOKENS_PER_S",
                   help="training tokens per second of one trial, for the plan's device-hours (default: measured "
                        "on comparable stages in the stage store)")
    c.add_argument("--budget-hours", type=float, metavar="H",
                   help="refuse the sweep, before any trial, when its plan estimates more than H device-hours "
                        "(or cannot estimate them)")
    c.add_argument("--pilot", metavar="SWEEP",
                   help="with --plan: a finished sweep (its MLflow sweep-run name) whose order and seed variance "
                        "size the seeds the question needs")
    t = p.add_argument_group("tracking")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlflow.db)")
    t.add_argument("--experiment", help="MLflow experiment name")
    t.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    t.add_argument("--verbose", action="store_true",
                   help="also Ray's own logs and Tune's trial table (default: one line per stage, Ray's warnings)")


# the metrics the analysis and the trials table compare trials by (coin_ray.evaluation.metrics)
METRICS = METRIC_NAMES


def check_count(flag: str, value: float | None, minimum: int = 1) -> None:
    """A count flag (None: not given) must be >= minimum."""
    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum}, got {value:g}")


def check_common_args(args: argparse.Namespace) -> None:
    """The counts of `add_common_args`, before anything is read or started."""
    check_count("--seeds", args.seeds)
    check_count("--num-cpus", args.num_cpus)
    check_count("--max-concurrent-trials", args.max_concurrent_trials)
    check_count("--workers-per-trial", args.workers_per_trial, 0)
    check_count("--gpus-per-worker", args.gpus_per_worker, 0)
    if args.throughput is not None and not args.throughput > 0:
        raise UsageError(f"--throughput must be > 0 tokens per second, got {args.throughput:g}")
    check_count("--budget-hours", args.budget_hours, 0)
    if args.pilot and not args.plan:
        raise UsageError("--pilot sizes the seeds in a plan: add --plan")


def parse_list(flag: str, text: str, cast: type = int, minimum: float | None = 1) -> list:
    """A comma-separated flag value (`--experts 1,2,4`) as values of `cast`, each >= minimum."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    kind = {int: "whole numbers", float: "numbers"}.get(cast, "names")
    try:
        values = [cast(x) for x in items]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated {kind}, got {text!r} (e.g. {flag} 1,2,4)") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value, got {text!r}")
    for value in values if minimum is not None else ():
        check_count(flag, value, minimum)
    return values


def check_metric(metric: str, cfg: ExperimentConfig) -> None:
    """`--metric` must be a metric every finished trial has."""
    if metric not in METRICS:
        raise UsageError(f"--metric {metric!r} is not a metric: use one of {', '.join(METRICS)}")
    if metric.removeprefix("gk_") == "fwt" and not cfg.eval.zero_shot:
        raise UsageError(f"--metric {metric} needs the zero-shot row: add --set eval.zero_shot=true")
    if metric.startswith("gk_") and cfg.eval.judge == "none":
        raise UsageError(f"--metric {metric} compares the knowledge matrix, which needs a judge: "
                         f"add --set eval.judge=embedding (or llm)")


def read_orders(value: str) -> list[str]:
    """`--orders`: a file with one order per line (blank lines and # comments skipped) when the value is a
    path to one, else orders separated by ';'. A value that looks like a path but is not a file is an error."""
    path = Path(value).expanduser()
    if path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--orders {value}: cannot be read ({e})") from None
        entries = [part for line in lines if not line.lstrip().startswith("#") for part in line.split(";")]
    elif "/" in value or os.sep in value or value.endswith(".txt"):
        raise UsageError(f"--orders {value}: no such file (a file of orders has one order per line, "
                         f"e.g. ScienceQA>TextVQA; or pass the orders themselves: 'ScienceQA>TextVQA;TextVQA>ScienceQA')")
    else:
        entries = value.split(";")
    orders = [e.strip() for e in entries if e.strip()]
    if not orders:
        raise UsageError(f"--orders {value}: no orders in it: list them as 'ScienceQA>TextVQA;TextVQA>ScienceQA'")
    return orders


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` pairs; each value is typed by its field (coin_ray.config.parse_override)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--set takes KEY=VALUE, got {pair!r} (e.g. --set tuner.rank=32)")
        check_not_inside_mapping(key.strip(), "--set")
        out[key.strip()] = parse_override(key.strip(), value)
    return out


def check_not_inside_mapping(key: str, flag: str) -> None:
    """`section.field.sub` where section.field is a mapping (eval.judge_options, train.batch_size_per_task):
    refused with the form that sets it (the value is never echoed: it may be a secret)."""
    from coin_ray.config import _field_owner, _hints, _is_mapping, _optional

    section, _, rest = key.partition(".")
    name, dot, sub = rest.partition(".")
    owner = _field_owner(f"{section}.{name}") if dot else None
    if owner is not None and _is_mapping(_optional(_hints(owner[0])[owner[1]])[1]):
        whole = "{base_url: ..., model: ..., %s: ...}" % sub if name == "judge_options" else "{%s: ...}" % sub
        raise UsageError(f"{flag} {key}=...: {section}.{name} is a mapping, set as a whole: "
                         f"{flag} '{section}.{name}={whole}'")


def parse_grid(pairs: list[str], cfg: ExperimentConfig) -> dict[str, list[Any]]:
    """`--grid KEY=V1,V2,...` pairs: config field -> the values a sweep runs every trial with (each checked
    against the field now, e.g. --grid train.replay_per_task=100,500,1000)."""
    out: dict[str, list[Any]] = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        key = key.strip()
        values = [parse_override(key, v.strip()) for v in text.split(",") if v.strip()]
        if not eq or not key or not values:
            raise UsageError(f"--grid takes KEY=V1,V2,..., got {pair!r} (e.g. --grid train.replay_per_task=100,500,1000)")
        if key == "order" or "." not in key:
            raise UsageError(f"--grid {key}: grid a section field (section.field); orders come from --design")
        for value in values:
            try:
                cfg.replace(**{key: value})  # naming the key (unknown) or the value
            except ConfigError as e:
                raise UsageError(f"--grid {key}: {'; '.join(e.problems)}") from None
        out[key] = values
    return out


def build_base_config(args: argparse.Namespace, *, default_experiment: str) -> ExperimentConfig:
    """Defaults < --config YAML < --smoke-test preset < flags. Every problem is reported together (ConfigError)."""
    check_common_args(args)
    raw: dict[str, Any] = {}  # over the dataclass defaults (the embedded default)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UsageError(f"--config {path}: no such file")
        raw.update(dotted(load_yaml_file(path)))
    if args.smoke_test:
        raw.update(preset(SMOKE_CONFIG_PRESET if args.config else SMOKE_PRESET))
    if raw.get("data.benchmark") == "coin":
        raw.setdefault("eval.zero_shot", True)  # real CoIN reports the zero-shot row beside the matrix
    if getattr(args, "zero_shot", None) is not None:
        raw["eval.zero_shot"] = args.zero_shot
    if args.tasks:
        raw["order"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.workers_per_trial is not None:
        raw["scaling.num_workers"] = args.workers_per_trial
    if args.gpus_per_worker:
        raw["scaling.use_gpu"] = True
        raw["scaling.gpus_per_worker"] = args.gpus_per_worker
    if args.storage_path:
        raw["storage_path"] = args.storage_path
    raw.setdefault("storage_path", "runs")
    if isinstance(raw["storage_path"], str) and "://" not in raw["storage_path"]:
        # absolute: Tune runs each trial in its own working directory (a scheme:// URI is refused by the config)
        raw["storage_path"] = str(Path(raw["storage_path"]).expanduser().resolve())
    if args.no_cache:
        raw["use_stage_cache"] = False
    if args.tracking_uri:
        raw["tracking.tracking_uri"] = args.tracking_uri
    if args.experiment:
        raw["tracking.experiment"] = args.experiment
    raw.setdefault("tracking.experiment", default_experiment)
    raw.update(parse_overrides(args.set))
    cfg = ExperimentConfig.from_dict(raw)
    if len(cfg.order) < 2:
        raise UsageError(f"--tasks needs at least 2 tasks for an order study, got {list(cfg.order)}")
    return cfg


def check_methods(text: str, cfg: ExperimentConfig, args: argparse.Namespace | None = None) -> list[str]:
    """The names of a `--methods` flag, each checked as the config it makes of `cfg` (coin_ray.methods). A
    field a method sets that `--set` or `--grid` (in `args`) also sets to another value is a contradiction,
    refused: the method would silently win (e.g. `--methods olora --set tuner.method=moelora`)."""
    from coin_ray.methods import method_changes, parse_methods

    try:
        names = parse_methods(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    given = parse_overrides(getattr(args, "set", None) or [])
    gridded = {pair.partition("=")[0].strip() for pair in getattr(args, "grid", None) or []}
    for name in names:  # e.g. olora with train.weight_decay > 0: the config error names the fix
        changes = method_changes(name, cfg.train.replay_per_task)
        for key, value in changes.items():
            if key in gridded:
                raise UsageError(f"--methods {text} sets {key} itself, so --grid {key} contradicts it: vary the "
                                 f"methods with --methods only")
            if key in given and given[key] != value:
                hint = (f"for {changes['cl.method']} on {given[key]}, leave --methods out and --set "
                        f"cl.method={changes['cl.method']}" if key == "tuner.method" and changes["cl.method"] != "none"
                        else f"drop --set {key}=... or choose the method that trains it")
                raise UsageError(f"--methods {name} trains with {key} {value}, but --set {key}={given[key]} asks for "
                                 f"another: {hint}")
        cfg.replace(**changes)
    return names


def check_storage(path: str) -> None:
    """The storage path must be a folder this process can write (created when missing)."""
    if "://" in path:  # never made into a local folder named "s3:"
        raise UsageError(f"--storage-path {path}: storage_path must be a local or mounted shared folder "
                         f"(mount the bucket and pass the mount point)")
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".write-probe-{uuid.uuid4().hex[:8]}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--storage-path {path} is not writable ({e.strerror}): pass a folder you can write to")


def init_ray(args: argparse.Namespace) -> None:
    import ray

    if args.address and args.address not in ("auto", "local") and not args.address.startswith("ray://"):
        host, _, port = args.address.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
                pass
        except (OSError, ValueError):
            raise UsageError(f"Ray cluster at --address {args.address} does not answer: start it with `ray start --head` "
                             f"or leave --address out to run on this machine") from None
    import logging

    from coin_ray.studies.quiet import quiet_ray_sources

    level = logging.INFO if args.verbose else logging.WARNING
    cpus = args.num_cpus or os.cpu_count() or 1
    # the job's processes (driver, Tune and Train actors, Ray Data) log at warning level unless --verbose:
    # Ray Data's progress lines and libraries' info lines ("Loading SentenceTransformer model ...")
    logging_config = ray.LoggingConfig(log_level=logging.getLevelName(level))
    local = not (args.address and args.address != "local")
    quiet_ray_sources(args.verbose, cpus=cpus, workers_per_trial=getattr(args, "workers_per_trial", None) or 1,
                      local=local)
    if not local:
        ray.init(address=args.address, logging_level=level, logging_config=logging_config)
    else:
        # address="local" always starts a Ray of our own: without it, ray.init() follows the address file that a
        # `ray start --head` leaves behind (/tmp/ray/ray_current_cluster), even after that head died.
        # The dashboard serves the State API that the Train controller polls (without it, it floods warnings).
        ray.init(address="local", num_cpus=cpus, logging_level=level, logging_config=logging_config)
    from coin_ray.training.worker import quiet_data_context, quiet_ray_logs

    quiet_data_context()
    quiet_ray_logs(args.verbose)  # in the driver too: it reads datasets and saves the pretrained base


def default_concurrency(cfg: ExperimentConfig, requested: int | None, prepared: PreparedData | None = None) -> int:
    """Trials at once: as many as the cluster's CPUs fit, less one CPU for Ray Data ingest when the runs stream
    their training data (see `ingest_needs_cpu`). Trials that share a prefix wait for each other in the stage
    store instead of training it twice."""
    import ray

    from coin_ray.training.continual import ingest_needs_cpu

    if requested is not None:
        return requested
    cpus = ray.cluster_resources().get("CPU", 1)
    per_trial = max(cfg.scaling.num_workers, 1) * cfg.scaling.cpus_per_worker
    ingest = 1 if prepared is None or ingest_needs_cpu(cfg, prepared) else 0
    return max(1, int((cpus - ingest) // per_trial))


def fail(message: str) -> "NoReturn":  # noqa: F821
    from coin_ray.redact import redact_text

    print(f"error: {redact_text(message)}", file=sys.stderr)
    raise SystemExit(2)


def _address_from_argv(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--address" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--address="):
            return arg.partition("=")[2]
    return os.environ.get("RAY_ADDRESS")


def ray_auth_for_existing_cluster(address: str | None) -> bool:
    """Turn on Ray's token authentication in this driver when it joins an existing cluster and a token is at
    hand; True when it did.

    Ray 2.60's `ray start` turns token authentication on and writes the token to ~/.ray/auth_token; a driver
    then connects only with RAY_AUTH_MODE=token, which Ray reads once, when it is first imported. A driver in
    token mode still joins a cluster started without authentication, so setting it is safe whenever a token
    exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or the default file). An explicit RAY_AUTH_MODE is left as it is.
    """
    if not address or address == "local" or "RAY_AUTH_MODE" in os.environ or "ray" in sys.modules:
        return False
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").is_file()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


def run_main(main) -> None:
    """Run a script's main(); user errors (every `UserError`: flags, config, task orders, designs, data, an
    unreachable tracking server) become one clear line and exit code 2; anything else keeps its traceback."""
    ray_auth_for_existing_cluster(_address_from_argv(sys.argv[1:]))  # before anything imports ray
    try:
        main()
    except Exception as e:
        _fail_open_sweep_runs(e)  # a sweep that died never leaves its MLflow sweep run RUNNING
        if isinstance(e, (UserError, FileNotFoundError)):
            fail(str(e))
        raise


def _fail_open_sweep_runs(error: BaseException) -> None:
    if "tracking._sweep" in sys.modules:  # only a script that opened a sweep run imported it
        sys.modules["tracking._sweep"].fail_open_sweep_runs(error)


def default_sweep_name(script: str, design: str, count: int | None, tasks: list[str], args: argparse.Namespace) -> str:
    """Deterministic: the same command gives the same name, so a rerun or --resume finds the sweep."""
    abbrev = "+".join(t[:4] for t in tasks)
    parts = [script, design + (str(count) if count else ""), abbrev, f"seeds{args.seeds}"]
    if args.smoke_test:
        parts.append("smoke")
    return "-".join(parts)
