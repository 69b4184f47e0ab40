"""Sweep one method's options with Ray Tune on the validation split (tuning seeds 100-104).

    python workflows/sweep.py --method safeanchor --config workflows/configs/toy.yaml --trials 16
    python workflows/sweep.py --method lora --config workflows/configs/tiny.yaml --trials 3 \\
        --order medical --seeds 100 --storage /tmp/sweeps                   # seconds-scale smoke
    python workflows/sweep.py --resume safeanchor-toy --storage sweeps      # continue an interrupted sweep

Each trial runs the whole sequential pipeline (workflows/sequential.py's job) on every tuning
seed and reports after every domain; ASHA stops weak trials from the first domain on. The
search space is workflows/configs/sweeps/<method>.yaml (or --space). Objective (maximised):
validation domain_plastic - penalty * max(0, retention_target - retention); see
safeanchor/sweep/objective.py. Writes <storage>/<sweep_id>/: trials.csv, trials.md,
pareto.png, best.yaml (a preset for `workflows/sequential.py --config`), one MLflow run with
every trial's runs nested under it. Parse -> build -> run -> report; logic in safeanchor.sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "toy.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", help="method to tune (default: the preset's)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="base preset (default: the toy preset)")
    p.add_argument("--space", help="search-space YAML (default: workflows/configs/sweeps/<method>.yaml)")
    p.add_argument("--trials", type=int, default=16, help="trials (samples of the space)")
    p.add_argument("--seeds", default="100-104", help="tuning seeds, e.g. 100-104 or 100,101 (default 100-104)")
    p.add_argument("--allow-reporting-seeds", action="store_true",
                   help="allow seeds 0-4 (the reporting seeds, refused by default)")
    p.add_argument("--order", help="comma-separated domain order (default: the preset's)")
    p.add_argument("--search", choices=["optuna", "random"], default="optuna", help="search algorithm")
    p.add_argument("--search-seed", type=int, default=0, help="seed of the search algorithm")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha",
                   help="asha: stop weak trials early (per-domain reports); fifo: run every trial to the end")
    p.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's reduction factor")
    p.add_argument("--retention-target", type=float, default=0.9, help="validation retention to keep")
    p.add_argument("--penalty", type=float, default=10.0, help="domain-score points per point of retention below target")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: from the cluster's CPUs)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this starts (default: all; ignored with an address)")
    p.add_argument("--storage", default="sweeps", help="directory that holds sweeps (default: sweeps/)")
    p.add_argument("--sweep-id", help="sweep directory name (default: <method>-<preset name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the base preset for every trial (repeatable)")
    p.add_argument("--resume", metavar="SWEEP_ID", help="continue the sweep SWEEP_ID under --storage")
    return p.parse_args(argv)


def parse_seeds(text: str) -> list[int]:
    from safeanchor.seeds import parse_seeds as parse

    return parse(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safeanchor import logs
    from safeanchor.config import ConfigError
    from safeanchor.data import DataError

    logs.setup()  # progress lines on stdout

    try:
        from safeanchor.sweep.driver import SweepSpec, check_seeds, load_spec, run_sweep
        from safeanchor.sweep.objective import ObjectiveConfig
        from safeanchor.sweep.space import load_space

        storage = str(Path(args.storage).resolve())
        if args.resume:
            defaults = parse_args([])
            given = [f"--{k.replace('_', '-')}" for k in ("method", "config", "space", "trials", "seeds", "order",
                                                          "search", "search_seed", "scheduler", "reduction_factor",
                                                          "retention_target", "penalty", "sweep_id", "overrides",
                                                          "allow_reporting_seeds")
                     if getattr(args, k) != getattr(defaults, k)]
            if given:
                raise ConfigError("resume", f"--resume uses the sweep's saved settings; drop {', '.join(given)}")
            spec = load_spec(storage, args.resume)
        else:
            from safeanchor.pipeline.config import load_run_config

            try:
                seeds = parse_seeds(args.seeds)
            except ValueError:
                raise ConfigError("seeds", f"expected e.g. 100-104 or 100,101, got {args.seeds!r}") from None
            check_seeds(seeds, args.allow_reporting_seeds)
            method = args.method or load_run_config(args.config, args.overrides).method
            space_file = args.space or str(HERE / "configs" / "sweeps" / f"{method}.yaml")
            space_method, space = load_space(space_file)
            if space_method != method:
                raise ConfigError("method", f"{space_file} is a space for {space_method!r}, not {method!r}")
            overrides = list(args.overrides) + ([f"data.order=[{args.order}]"] if args.order else [])
            spec = SweepSpec(
                sweep_id=args.sweep_id or f"{method}-{Path(args.config).stem}", storage=storage, method=method,
                config=str(Path(args.config).resolve()), space=space, space_file=str(Path(space_file).resolve()),
                overrides=overrides, seeds=seeds, trials=args.trials, search=args.search,
                search_seed=args.search_seed, scheduler=args.scheduler, reduction_factor=args.reduction_factor,
                max_concurrent=args.max_concurrent,
                objective=ObjectiveConfig(retention_target=args.retention_target, penalty=args.penalty))
            for key, bad in (("trials", args.trials < 1), ("reduction_factor", args.reduction_factor <= 1),
                             ("max_concurrent", args.max_concurrent is not None and args.max_concurrent < 1)):
                if bad:
                    raise ConfigError(key, "must be >= 1" if key != "reduction_factor" else "must be > 1")
        out = run_sweep(spec, resume=bool(args.resume), num_cpus=args.num_cpus)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not out["complete"]:
        return 1
    best = out["best"]
    print(f"[sweep] best: {best['trial_id']} objective {best['objective']:.4f} retention {best['retention']:.4f} "
          f"domain_plastic {best['domain_plastic']:.4f} -> {Path(out['dir']) / 'best.yaml'}" if best
          else "[sweep] no trial completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
