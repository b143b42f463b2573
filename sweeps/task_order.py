"""Task-order sensitivity study: which order of CoIN tasks makes a MoELoRA model forget most, and which
continual-learning method is robust to the order?

    python sweeps/task_order.py                  # embedded defaults: 4 synthetic tasks, Williams design x 2 seeds
    python sweeps/task_order.py --smoke-test     # all 6 orders of 3 tasks, tiny budgets (minutes)
    python sweeps/task_order.py --smoke-test --seeds 2 --methods lora,moelora,olora,ewc,lwf
    python sweeps/task_order.py --config configs/coin_llava7b.yaml --address auto --gpus-per-worker 1
    python sweeps/task_order.py --design given --orders 'ScienceQA>TextVQA>ImageNet' \
        --grid train.replay_per_task=0,100,500,1000 --baselines joint    # CoIN's replay study and the bound

One Tune trial per (order, seed[, method]); each trial is one Ray Train run carrying every stage of its order;
results go to MLflow (a parent run per sweep, a child run per trial) and to --storage-path.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coin_ray.studies import cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", nargs="+", default=None, metavar="DESIGN [N]",
                   help="order design: all | latin | williams | random N | optuna N | given "
                        "(default: williams; --smoke-test: all)")
    p.add_argument("--orders", help="orders for --design given: 'A>B>C;B>A>C' or a file with one order per line "
                                    "(without --tasks, the tasks are those of the orders)")
    p.add_argument("--metric", default="mfn", help=f"metric the analysis compares and --design optuna searches "
                                                   f"on: {', '.join(cli.METRICS)}")
    p.add_argument("--methods", help="continual-learning methods crossed with the orders: lora, moelora, full "
                                     "(plain sequential tuning), olora, ewc, lwf (on LoRA), each optionally "
                                     "+replay (default: the config's tuner.method and cl.method)")
    p.add_argument("--optuna-goal", choices=("worst", "best"), default="worst",
                   help="--design optuna searches for the order with the worst or the best --metric")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="run every order with each value of a config field (repeatable), e.g. "
                        "--grid train.replay_per_task=100,500,1000 or --grid data.train_fraction=0.1,0.5,1")
    p.add_argument("--baselines", choices=("joint",), nargs="+", default=[],
                   help="joint: add the multitask upper bound (one stage on the union of the tasks, evaluated "
                        "on every task; tagged coin_ray.baseline=joint in MLflow); the analysis reports each "
                        "order's gap to it")
    cli.add_common_args(p)
    args = p.parse_args(argv)
    if args.seeds is None:  # two seeds tell an order effect from seed noise; the smoke test is a check, optuna
        # samples each order once
        args.seeds = 1 if args.smoke_test or (args.design or [""])[0] == "optuna" else 2
    return args


def plan(args: argparse.Namespace):
    """The sweep's base config, design, count and orders (None for optuna) from the flags: every check of the
    user's input, before Ray is imported or started."""
    from coin_ray.studies import designs

    cfg = cli.build_base_config(args, default_experiment="coin-ray-task-order")
    design = args.design or (["all"] if args.smoke_test else ["williams"])
    kind, count = designs.parse_design(design)
    cli.check_metric(args.metric, cfg)
    if kind == "optuna" and args.seeds > 1:
        raise cli.UsageError("--design optuna runs each order it samples once (seed 0); --seeds is for the fixed "
                             "designs (latin, williams, all, random N, given)")
    if args.orders and kind != "given":
        raise cli.UsageError(f"--orders lists the orders of --design given (the design here is {kind}): "
                             f"add --design given or leave --orders out")
    methods = cli.check_methods(args.methods, cfg, args) if args.methods else None
    if methods and kind == "optuna":
        raise cli.UsageError("--methods crosses a fixed order design with the methods; --design optuna searches "
                             "orders of one method (set it with --set tuner.method=... / cl.method=...)")
    if args.baselines and kind == "optuna":
        raise cli.UsageError("--baselines is for the fixed designs (latin, williams, all, random N, given): "
                             "--design optuna samples its orders")
    tasks = list(cfg.order)
    orders = None
    if kind != "optuna":
        listed = cli.read_orders(args.orders) if args.orders else []
        # --design given without --tasks: the tasks are those of the orders
        orders = designs.build_design(kind, tasks if kind != "given" or args.tasks else None, n=count, seed=0,
                                      orders=listed)
        cfg = cfg.replace(order=list(orders[0]) if kind == "given" else tasks)
    return cfg, design, kind, count, orders, methods


def main(argv=None) -> None:
    from coin_ray.studies import designs

    args = parse_args(argv)
    cfg, design, kind, count, orders, methods = plan(args)
    grid = cli.parse_grid(args.grid, cfg)
    tasks = list(cfg.order)
    seeds = list(range(args.seeds))

    import ray.tune as tune

    from coin_ray.studies import space
    from coin_ray.studies.lifecycle import finish_sweep, plan_or_budget, preflight, prepare
    from coin_ray.studies.runner import SweepSpec, run_sweep

    if kind == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        # every stage reports the CL metrics of the tasks seen so far: the last report holds the final --metric
        worst = "max" if not cli.higher_is_better(args.metric) else "min"
        mode = worst if args.optuna_goal == "worst" else ("min" if worst == "max" else "max")
        search = OptunaSearch(metric=args.metric, mode=mode, sampler=TPESampler(seed=0))
        spec_kwargs = dict(param_space={**space.random_keys(tune, tasks), space.SEED_KEY: 0}, num_samples=count,
                           search_alg=search)
    else:
        spec_kwargs = dict(param_space={space.SEED_KEY: tune.grid_search(seeds)})
        if methods:
            spec_kwargs["param_space"][space.METHOD_KEY] = tune.grid_search(methods)
    spec_kwargs["param_space"].update({space.hp(key): tune.grid_search(values) for key, values in grid.items()})
    name = args.name or (cli.default_sweep_name("task_order", kind, count, tasks, args)
                         + (f"-{'_'.join(methods)}" if methods else ""))
    preflight(cfg, args, grid)
    prepared = prepare(cfg, args)
    if orders is not None:
        cells = len(seeds) * math.prod(len(v) for v in grid.values())
        per_order = cells * len(methods or [None])
        n_stages = len(orders) * per_order * len(tasks)
        by_method = f" x {len(methods)} methods" if methods else ""
        print(f"[coin-ray] sweep {name}: {len(orders)} orders x {cells} seeds/grid values{by_method} = "
              f"{len(orders) * per_order} trials, {n_stages} stages ({designs.distinct_prefixes(orders) * per_order} "
              "distinct with the stage cache)" + (f", plus {per_order} joint-bound trials" if args.baselines else ""))
    concurrency = cli.default_concurrency(cfg, args.max_concurrent_trials, prepared)
    if orders is not None:  # trials start in this order: shared prefixes trained once, trials at once rarely wait
        spec_kwargs["param_space"][space.ORDER_KEY] = tune.grid_search(
            [">".join(o) for o in designs.schedule_for_sharing(orders, concurrency)]
            + ([space.JOINT] if "joint" in args.baselines else []))
    spec = SweepSpec(name=name, base=cfg, max_concurrent_trials=concurrency,
                     resume=args.resume, tracking=not args.no_tracking, verbose=args.verbose,
                     sweep_params={"design": " ".join(design), "tasks": ",".join(tasks), "seeds": args.seeds,
                                   "metric": args.metric, "orders": len(orders) if orders else count,
                                   **({"methods": ",".join(methods)} if methods else {}),
                                   **({"grid": " ".join(args.grid)} if args.grid else {}),
                                   **({"baselines": ",".join(args.baselines)} if args.baselines else {}),
                                   **{k: v for k, v in cfg.flatten().items() if k != "order"}},
                     **spec_kwargs)
    plan_or_budget(spec, prepared, args)
    outcome = run_sweep(spec, prepared)
    finish_sweep(spec, outcome, metric=args.metric, design=kind)


if __name__ == "__main__":
    cli.run_main(main)
