"""MoELoRA hyper-parameter search: how many experts, what rank (and alpha, lr, method) protect old skills?

    python sweeps/hparams.py                       # TPE over num_experts x rank on embedded defaults
    python sweeps/hparams.py --smoke-test          # 4 trials on 3 tasks, minutes
    python sweeps/hparams.py --multi-objective     # Pareto front: maximise MFN, minimise forgetting
    python sweeps/hparams.py --config configs/coin_llava7b.yaml --address auto --gpus-per-worker 1

Ray Tune with OptunaSearch; each stage reports, so ASHA stops weak trials between stages and frees their
workers. The task order is fixed (--tasks gives it) unless --search-order adds it to the space.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from coin_ray.studies import cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-samples", type=int, default=None, help="trials (default 12; --smoke-test 4)")
    p.add_argument("--experts", default="1,2,4,8", help="num_experts choices")
    p.add_argument("--ranks", default="8,16,32", help="total rank choices (each made divisible by num_experts)")
    p.add_argument("--alphas", default=None, help="alpha choices searched (default: alpha = 2 x rank in every "
                                                   "trial, CoIN's ratio, so rank is not confounded with the scale)")
    p.add_argument("--lr", default=None, help="lr range LOW,HIGH searched log-uniformly (default: fixed)")
    p.add_argument("--methods", default=None, help="methods to compare: lora, moelora, full (plain "
                                                    "sequential tuning), olora, ewc, lwf (on LoRA), each "
                                                    "optionally +replay (default: the config's method, moelora)")
    p.add_argument("--search-order", action="store_true", help="also search the task order (random keys)")
    p.add_argument("--multi-objective", action="store_true", help="maximise MFN and minimise forgetting (NSGA-II)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha", help="stage-level early stopping")
    p.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="Optuna sampler")
    p.add_argument("--metric", default="mfn", help=f"metric the report sorts by: {', '.join(cli.METRICS)}")
    cli.add_common_args(p)
    args = p.parse_args(argv)
    args.seeds = 1 if args.seeds is None else args.seeds
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # every check of the user's input comes before Ray is imported or started
    cfg = cli.build_base_config(args, default_experiment="coin-ray-hparams")
    if args.seeds > 1:
        raise cli.UsageError("--seeds is for task_order.py; for hparams.py repeat the sweep with --set train.seed=N")
    cli.check_count("--num-samples", args.num_samples)
    cli.check_metric(args.metric, cfg)
    num_samples = args.num_samples or (4 if args.smoke_test else 12)
    experts, ranks = cli.parse_list("--experts", args.experts), cli.parse_list("--ranks", args.ranks)
    alphas = cli.parse_list("--alphas", args.alphas, float, minimum=None) if args.alphas else None
    if alphas and min(alphas) <= 0:
        raise cli.UsageError(f"--alphas must be > 0, got {args.alphas}")
    lr = cli.parse_list("--lr", args.lr, float, minimum=None) if args.lr else None
    if lr and not (len(lr) == 2 and 0 < lr[0] < lr[1]):
        raise cli.UsageError(f"--lr takes a range LOW,HIGH with 0 < LOW < HIGH, got {args.lr!r} (e.g. --lr 1e-4,1e-2)")
    from coin_ray.methods import method_changes, method_label

    # without --methods, the config's own method (tuner.method / cl.method as --set or --config give them)
    args.methods = args.methods or method_label(cfg)
    methods = cli.check_methods(args.methods, cfg, args) if "(" not in args.methods else [args.methods]

    import ray.tune as tune
    from optuna.samplers import NSGAIISampler, RandomSampler, TPESampler
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from coin_ray.studies import space as keys
    from coin_ray.studies.lifecycle import finish_sweep, plan_or_budget, preflight, prepare
    from coin_ray.studies.runner import SweepSpec, run_sweep

    space: dict = {keys.hp("tuner.num_experts"): tune.choice(experts), keys.hp("tuner.rank"): tune.choice(ranks)}
    if alphas:
        space[keys.hp("tuner.alpha")] = tune.choice(alphas)
    else:
        space[keys.ALPHA_PER_RANK_KEY] = 2.0  # CoIN's ratio (r=128, alpha=256)
    if lr:
        space[keys.hp("train.lr")] = tune.loguniform(*lr)
    if len(methods) > 1:
        space[keys.METHOD_KEY] = tune.choice(methods)
    else:
        if methods[0] != method_label(cfg):
            cfg = cfg.replace(**method_changes(methods[0], cfg.train.replay_per_task))
    if args.search_order:
        space.update(keys.random_keys(tune, cfg.order))

    if args.multi_objective:
        metric, mode = ["avg_seen_acc", "forgetting"], ["max", "min"]
        sampler = NSGAIISampler(seed=0)
    else:
        metric, mode = "avg_seen_acc", "max"  # avg_seen_acc after the last stage equals MFN
        sampler = TPESampler(seed=0) if args.sampler == "tpe" else RandomSampler(seed=0)
    search = OptunaSearch(metric=metric, mode=mode, sampler=sampler)
    scheduler = None
    if args.scheduler == "asha" and not args.multi_objective:
        # one training_iteration = one stage; judge a trial after its second stage at the earliest
        scheduler = ASHAScheduler(metric=metric, mode=mode, time_attr="training_iteration", max_t=len(cfg.order), grace_period=min(2, len(cfg.order)),
                                  reduction_factor=2)
    name = args.name or cli.default_sweep_name("hparams", "tpe" if not args.multi_objective else "nsga2",
                                               num_samples, list(cfg.order), args)
    preflight(cfg, args)
    prepared = prepare(cfg, args)
    spec = SweepSpec(name=name, base=cfg, param_space=space, num_samples=num_samples,
                     search_alg=search, scheduler=scheduler,
                     max_concurrent_trials=cli.default_concurrency(cfg, args.max_concurrent_trials, prepared),
                     resume=args.resume, tracking=not args.no_tracking, verbose=args.verbose,
                     sweep_params={"search": "nsga2" if args.multi_objective else args.sampler,
                                   "scheduler": args.scheduler, "num_samples": num_samples,
                                   "experts": args.experts, "ranks": args.ranks, "methods": args.methods,
                                   "tasks": ">".join(cfg.order),
                                   # only when given, so the sweeps of the default space keep their names
                                   **{k: v for k, v in (("alphas", args.alphas), ("lr", args.lr)) if v},
                                   **({"search_order": True} if args.search_order else {})})
    plan_or_budget(spec, prepared, args)
    outcome = run_sweep(spec, prepared)
    finish_sweep(spec, outcome, metric=args.metric, design="hparams", pareto=args.multi_objective)


if __name__ == "__main__":
    cli.run_main(main)
