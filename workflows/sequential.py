"""Sequential continual domain adaptation of an aligned chat model (the main job).

    python workflows/sequential.py                                  # toy world, default method
    python workflows/sequential.py --method lora --seed 1 --order medical,legal,code
    python workflows/sequential.py --config workflows/configs/toy.yaml --set train.lr=5e-4
    python workflows/sequential.py --resume safeanchor-seed0-medical-legal-code   # continue a run
    python workflows/sequential.py --help-config                    # every --set key, documented
    python workflows/sequential.py --config workflows/configs/llama2-7b-chat.yaml --dry-run   # the plan, offline

Parse -> build -> run -> report; all logic lives in the `safeanchor` package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML preset (default: the toy preset)")
    p.add_argument("--method", help="method name (e.g. lora)")
    p.add_argument("--seed", type=int, help="run seed")
    p.add_argument("--order", help="comma-separated domain order, e.g. medical,legal,code")
    p.add_argument("--run-id", help="run directory name under --storage")
    p.add_argument("--storage", help="where run directories go: a local path (default: runs/) or a pyarrow.fs URI "
                   "(file:///abs/dir, s3://bucket/prefix, gs://bucket/prefix, hdfs://host/path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override parsed as YAML, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue the run RUN_ID under --storage with its saved config; finished steps are skipped")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan (model, data and what would be downloaded, judge, workers, "
                        "ZeRO stage, precision, storage, estimated memory per GPU) and exit; downloads nothing, "
                        "reads no weights, starts no Ray")
    p.add_argument("--help-config", action="store_true",
                   help="list every config key (for --set) with its type, value and meaning, and exit; "
                        "the method's options for the chosen --method")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safeanchor import logs
    from safeanchor.config import ConfigError, to_dict
    from safeanchor.data import DataError

    logs.setup()  # the pipeline's progress lines on stdout

    try:
        from safeanchor.pipeline.config import load_run_config

        order = args.order.split(",") if args.order else None
        if args.resume:
            given = [f for f, v in (("--method", args.method), ("--seed", args.seed), ("--order", order),
                                    ("--run-id", args.run_id), ("--set", args.overrides)) if v]
            if given:
                raise ConfigError("resume", f"--resume uses the run's saved config; drop {', '.join(given)}")
            import yaml

            from safeanchor.storage import RunDir

            storage = args.storage or "runs"
            run_dir = RunDir.open(storage, args.resume)
            if not run_dir.is_file("config.yaml"):
                raise ConfigError("resume", f"nothing to resume: {run_dir.uri('config.yaml')} does not exist")
            saved = yaml.safe_load(run_dir.read_text("config.yaml"))
            if not isinstance(saved, dict):
                raise ConfigError("resume", f"{run_dir.uri('config.yaml')} does not hold a config mapping")
            cfg = load_run_config(saved, [], storage=storage)
        else:
            cfg = load_run_config(args.config, args.overrides, method=args.method, seed=args.seed,
                                  run_id=args.run_id, storage=args.storage, **{"data.order": order})
        if args.help_config:
            print(_config_help(cfg))
            return 0
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        if args.dry_run:
            from safeanchor.dryrun import render_plan

            print(render_plan(cfg))
            return 0
        from safeanchor.pipeline.sequential import run_pipeline

        run_pipeline(cfg, resume=bool(args.resume))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _config_help(cfg) -> str:
    from safeanchor.config import from_dict, help_text
    from safeanchor.methods import METHODS

    entry = METHODS[cfg.method]
    parts = [help_text(cfg)]
    if entry.config_cls is not None:
        options = from_dict(entry.config_cls, cfg.methods.get(cfg.method) or {}, prefix=f"methods.{cfg.method}")
        parts.append(f"\n# options of method {cfg.method!r} (--method NAME lists another's)\n"
                     + help_text(options, prefix=f"methods.{cfg.method}"))
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
