"""Task-order sensitivity study: which order of CoIN tasks makes a MoELoRA model forget most?

    python sweeps/task_order.py                  # embedded defaults: synthetic benchmark, tiny VLM, local Ray
    python sweeps/task_order.py --smoke-test     # all 6 orders of 3 tasks, tiny budgets (minutes)
    python sweeps/task_order.py --config configs/coin_llava7b.yaml --address auto --gpus-per-worker 1

One Tune trial per (order, seed); each trial is one Ray Train run carrying every stage of its order;
results go to MLflow (a parent run per sweep, a child run per trial) and to --storage-path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coin_ray.sweeps import cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--design", nargs="+", default=None, metavar="DESIGN [N]",
                   help="order design: all | latin | williams | random N | optuna N | given "
                        "(default: latin; --smoke-test: all)")
    p.add_argument("--orders", help="orders for --design given: 'A>B>C;B>A>C' or a file with one order per line")
    p.add_argument("--metric", default="mfn", help="metric the analysis (and --design optuna) compares: mfn, bwt, ...")
    p.add_argument("--optuna-goal", choices=("worst", "best"), default="worst",
                   help="--design optuna searches for the worst (most forgetting) or the best order")
    cli.add_common_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    from coin_ray.sweeps import designs
    from coin_ray.sweeps.report import finish_sweep, preflight, prepare
    from coin_ray.sweeps.runner import SweepSpec, run_sweep

    args = parse_args(argv)
    cfg = cli.build_base_config(args, default_experiment="coin-ray-task-order")
    design = args.design or (["all"] if args.smoke_test else ["latin"])
    kind, count = design[0], (int(design[1]) if len(design) > 1 else None)
    tasks = list(cfg.order)
    seeds = list(range(args.seeds))

    import ray.tune as tune

    if kind == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        if count is None:
            raise cli.UsageError("--design optuna needs a trial count: --design optuna 20")
        orders = None
        space = {f"key.{t}": tune.uniform(0.0, 1.0) for t in tasks}
        mode = "min" if args.optuna_goal == "worst" else "max"
        # the search ranks orders by avg_seen_acc after the last stage, which equals MFN
        search = OptunaSearch(metric="avg_seen_acc", mode=mode, sampler=TPESampler(seed=0))
        spec_kwargs = dict(param_space={**space, "seed": 0}, num_samples=count, search_alg=search)
    else:
        order_file = Path(args.orders) if args.orders and Path(args.orders).is_file() else None
        listed = (order_file.read_text().split() if order_file else args.orders.split(";")) if args.orders else []
        orders = designs.build_design(kind, tasks, n=count, seed=0, orders=listed)
        tasks = list(orders[0]) if kind == "given" else tasks
        cfg = cfg.replace(order=sorted(tasks, key=tasks.index))
        spec_kwargs = dict(param_space={"seed": tune.grid_search(seeds)})
    name = args.name or cli.default_sweep_name("task_order", kind, count, tasks, args)
    preflight(cfg, args)
    prepared = prepare(cfg, args)
    if orders is not None:
        n_stages = len(orders) * len(seeds) * len(tasks)
        print(f"[coin-ray] sweep {name}: {len(orders)} orders x {len(seeds)} seeds = {len(orders) * len(seeds)} trials, "
              f"{n_stages} stages ({designs.distinct_prefixes(orders) * len(seeds)} distinct with the stage cache)")
    concurrency = cli.default_concurrency(cfg, args.max_concurrent_trials, prepared)
    if orders is not None:  # trials start in this order: shared prefixes trained once, trials at once rarely wait
        spec_kwargs["param_space"]["order"] = tune.grid_search(
            [">".join(o) for o in designs.schedule_for_sharing(orders, concurrency)])
    spec = SweepSpec(name=name, base=cfg, max_concurrent_trials=concurrency,
                     resume=args.resume, tracking=not args.no_tracking,
                     sweep_params={"design": " ".join(design), "tasks": ",".join(tasks), "seeds": args.seeds,
                                   "metric": args.metric, "orders": len(orders) if orders else count,
                                   **{k: v for k, v in cfg.flatten().items() if k != "order"}},
                     **spec_kwargs)
    outcome = run_sweep(spec, prepared)
    finish_sweep(spec, outcome, metric=args.metric, design=kind)


if __name__ == "__main__":
    cli.run_main(main)
