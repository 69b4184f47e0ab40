"""Compare methods x seeds x domain orders x T on Ray: one pipeline run per cell, then a report.

    python workflows/compare.py --methods lora,safeanchor,ewc --seeds 0,1,2
    python workflows/compare.py --methods lora,safeanchor --seeds 0-2 --orders all     # the 6 orders
    python workflows/compare.py --methods lora,safeanchor --seeds 0-4 --T 5            # 5 domains
    python workflows/compare.py --config lora=workflows/configs/tuned/toy-lora.yaml \\
        --config safeanchor=workflows/configs/tuned/toy-safeanchor.yaml --seeds 0-4 \\
        --variant strict=methods.safeanchor.strict=true --variant no-csm=methods.safeanchor.csm=false
    python workflows/compare.py --report runs/compare          # rewrite the report of finished cells only

Each cell (arm, seed, order) is workflows/sequential.py's job in a Ray task that reserves its
CPUs (a GPU when it trains in-process on a GPU cluster); cells at once = the cluster's CPUs /
a cell's peak. Its run id <arm>-seed<seed>-<order> names its directory under --storage: a
finished cell is never run again, an interrupted one continues from its finished steps, a
failed one is reported and the others go on (exit code 1). Variants run at the reference
order. Writes <storage>/report.md and PNG plots (safeanchor.compare.report), one MLflow run
with every cell's run nested under it. Parse -> build -> run -> report; logic in
safeanchor.compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "configs" / "toy.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], metavar="[METHOD=]PATH",
                   help="preset of every method (default: the toy preset), or METHOD=PATH: that method's own "
                        "(its tuned config); repeatable")
    p.add_argument("--methods", help="comma-separated methods, or all (default: those given a preset with "
                   "--config METHOD=PATH, else lora,safeanchor)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                   help="an ablation row: a method's preset + overrides (method=NAME picks the method; default "
                        "safeanchor), run at the reference order; repeatable")
    p.add_argument("--seeds", default="0,1,2", help="seeds, e.g. 0-4 or 0,1,2 (default 0,1,2)")
    p.add_argument("--orders", default="preset", help="preset (the preset's data.order), all (its every "
                   "permutation) or explicit orders separated by ';', e.g. 'medical,legal,code;legal,code,medical'")
    p.add_argument("--T", dest="lengths", help="comma-separated numbers of domains: each order cut to / extended "
                   "to T domains (the preset's other domains, in data.domains order), e.g. 3,5")
    p.add_argument("--reference-order", help="Table 1's order (default: the storage's, else the first order)")
    p.add_argument("--storage", default="runs/compare", help="where the cells and the report go: a local path "
                   "or a pyarrow.fs URI (default: runs/compare)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every cell (repeatable)")
    p.add_argument("--threads", type=int, help="torch threads (= CPUs reserved) per cell (default: the preset's, else 1)")
    p.add_argument("--parallel", "--max-concurrent", dest="max_concurrent", type=int,
                   help="cells at once (default: the cluster's CPUs / a cell's peak CPUs)")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray this starts (default: all; ignored with an address)")
    p.add_argument("--retries", type=int, default=1, help="Ray retries of a cell whose worker died (default 1)")
    p.add_argument("--report", metavar="DIR", help="only write the report of the finished cells under DIR")
    p.add_argument("--out", help="also write Table 1 (markdown) to this file")
    return p.parse_args(argv)


def build_spec(args: argparse.Namespace):
    from safeanchor.compare.cells import expand_orders, make_arms, parse_configs
    from safeanchor.compare.driver import CompareSpec
    from safeanchor.config import ConfigError
    from safeanchor.methods import METHODS
    from safeanchor.pipeline.config import load_run_config
    from safeanchor.seeds import parse_seeds

    base, per = parse_configs(args.config)
    base = base or str(DEFAULT_CONFIG)
    if args.methods == "all":
        methods = sorted(METHODS)
    elif args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    else:
        methods = list(per) or ["lora", "safeanchor"]
    arms = make_arms(methods, args.variant, base, per, set(METHODS))
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError:
        raise ConfigError("seeds", f"expected e.g. 0-4 or 0,1,2, got {args.seeds!r}") from None
    try:
        lengths = [int(t) for t in args.lengths.split(",")] if args.lengths else None
    except ValueError:
        raise ConfigError("T", f"expected e.g. 3,5, got {args.lengths!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"at least one seed, none twice: {seeds}")
    for key, v in (("threads", args.threads), ("max_concurrent", args.max_concurrent)):
        if v is not None and v < 1:
            raise ConfigError(key, "must be >= 1")
    if args.retries < 0:
        raise ConfigError("retries", "must be >= 0")
    first = load_run_config(arms[0].config, args.overrides, method=arms[0].method)
    domains = list(first.data.domains)
    orders = expand_orders(args.orders, list(first.data.order), domains, lengths)
    reference = None
    if args.reference_order:
        reference = expand_orders(args.reference_order, list(first.data.order), domains, None)[0]
    return CompareSpec(storage=args.storage, arms=arms, seeds=seeds, orders=orders, reference_order=reference,
                       overrides=list(args.overrides), threads=args.threads, max_concurrent=args.max_concurrent,
                       retries=args.retries)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safeanchor import logs
    from safeanchor.config import ConfigError
    from safeanchor.data import DataError

    logs.setup()  # progress lines on stdout

    try:
        if args.report:
            from safeanchor.compare.driver import load_state
            from safeanchor.compare.report import collect, write_report
            from safeanchor.storage import RunDir

            root = RunDir.open(args.report)
            if not collect(root)[0]:
                raise ConfigError("report", f"no finished cell (summary.json) under {root.uri()}")
            out = {"failed": {}, **write_report(root, load_state(root))}
        else:
            from safeanchor.compare.driver import run_compare

            out = run_compare(build_spec(args), num_cpus=args.num_cpus)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out["table"])
    if args.out:
        Path(args.out).write_text(out["table"] + "\n")
    if out["failed"]:
        print(f"[compare] {len(out['failed'])} cells failed: {', '.join(sorted(out['failed']))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
