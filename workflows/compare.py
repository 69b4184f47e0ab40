"""Run several methods × seeds of the sequential job and print one mean ± std table.

    python workflows/compare.py --methods lora,safeanchor,ewc --seeds 0,1,2 --parallel 2
    python workflows/compare.py --report runs/compare          # table of finished runs only

Each run is `workflows/sequential.py` in its own process (run id <method>-seed<seed>), so a
failed run is reported and does not stop the others; finished runs are not run again.
`--threads` sets torch threads per run (parallel × threads ≈ cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "configs" / "toy.yaml"), help="YAML preset")
    p.add_argument("--methods", default="lora,safeanchor", help="comma-separated method names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--storage", default="runs/compare", help="directory for the runs and the table")
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override passed to every run (repeatable)")
    p.add_argument("--report", metavar="DIR", help="only print the table of the summaries under DIR")
    p.add_argument("--out", help="also write the markdown table here")
    return p.parse_args(argv)


def _run(args: argparse.Namespace, method: str, seed: int) -> tuple[str, int, float]:
    run_id = f"{method}-seed{seed}"
    if (Path(args.storage) / run_id / "summary.json").exists():
        return run_id, 0, 0.0
    log = Path(args.storage) / f"{run_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(HERE / "sequential.py"), "--config", args.config, "--method", method,
           "--seed", str(seed), "--run-id", run_id, "--storage", args.storage]
    if (Path(args.storage) / run_id / "steps").exists():  # an interrupted earlier attempt
        cmd = [sys.executable, str(HERE / "sequential.py"), "--storage", args.storage, "--resume", run_id]
    else:
        for o in args.overrides:
            cmd += ["--set", o]
        if args.threads:
            cmd += ["--set", f"threads={args.threads}"]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ))
    return run_id, rc, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from safeanchor.pipeline.report import aggregate, load_summaries, markdown

    methods = [m for m in args.methods.split(",") if m]
    failed = []
    if not args.report:
        from safeanchor.methods import METHODS

        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            print(f"error: methods: unknown {unknown} (known: {', '.join(sorted(METHODS))})", file=sys.stderr)
            return 2
        seeds = [int(s) for s in args.seeds.split(",") if s]
        jobs = [(m, s) for s in seeds for m in methods]  # every method on seed 0 first
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            for run_id, rc, wall in pool.map(lambda j: _run(args, *j), jobs):
                print(f"[compare] {run_id}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} ({wall:.0f}s)", flush=True)
                if rc != 0:
                    failed.append(run_id)
    root = Path(args.report or args.storage)
    summaries = load_summaries(sorted(root.glob("*/summary.json")))
    if not summaries:
        print(f"error: no summary.json under {root}", file=sys.stderr)
        return 2
    table = markdown(aggregate(summaries), methods if not args.report else None)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
