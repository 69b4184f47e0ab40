"""The Tune function trainable: one trial runs the whole sequential pipeline on every tuning
seed, one seed after another, and reports after every domain.

Training phases run in-process (`cluster.executor: local`) or on Ray Train workers started from
inside the trial (`cluster.executor: ray`: each pipeline run starts one Train run,
`safeanchor.distributed.workers.TrainWorkers`, whose name carries the trial's run id, and feeds
it the run's phases) — the pattern Ray >= 2.51 recommends for Train inside Tune, where the trial
function itself drives Train.

Report i (Tune's training_iteration i) is domain t of seed j, in seed-major order, so every
trial reports the same (seed, domain) at the same iteration and ASHA compares like with like;
its first rung is the first domain of the first seed. Each report carries:

    objective, retention, domain_plastic   over the seeds so far: finished seeds' final values
                                           and the current seed's running values, averaged
    seed, domain_step, seeds_done          where the trial is
    safety, over_refusal, helpful, general, safety_seen_topics   the current step's evaluation

and a tiny Tune checkpoint (reports made, finished seeds' finals), so a trial restarted by
`Tuner.restore` reports only what it had not reported; the pipeline itself resumes from its
durable steps under <sweep>/runs/<trial_id>-seed<s>/ (a finished step is never rerun).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.sweep.objective import (
    STEP_METRICS,
    ObjectiveConfig,
    mean_over_seeds,
    objective,
    running_metrics,
)
from safeanchor.sweep.space import as_overrides

PROGRESS = "progress.json"


@dataclass
class TrialContext:
    """What every trial needs besides its sampled point (picklable; handed over by
    tune.with_parameters and saved in sweep.json so a resumed sweep rebuilds it)."""

    config: str  # the base preset (absolute path)
    overrides: list[str]  # the user's --set / --order, then eval.split=val
    method: str
    seeds: list[int]
    runs_dir: str  # <sweep>/runs
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    threads: int | None = None  # torch threads of the trial process (None: the preset's)
    tracking: list[str] = field(default_factory=list)  # tracking.* overrides (store, parent run)


def trial_config(ctx: TrialContext, point: dict[str, Any], seed: int, run_id: str):
    """The RunConfig of one (trial, seed): base preset + user overrides + the point."""
    from safeanchor.pipeline.config import load_run_config

    sets = [*ctx.overrides, *as_overrides(point), *ctx.tracking]
    if ctx.threads is not None:
        sets.append(f"threads={ctx.threads}")
    return load_run_config(ctx.config, sets, method=ctx.method, seed=seed, run_id=run_id, storage=ctx.runs_dir)


def history_from_metrics(path: Path) -> list[dict[str, float]]:
    """metrics.jsonl of a finished run -> the per-step evaluations (step 0..T)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in ("step", "domain")} for r in rows]


def run_trial(point: dict[str, Any], ctx: TrialContext) -> None:
    """Tune function trainable (see the module docstring)."""
    import ray
    from ray import tune

    from safeanchor import logs
    from safeanchor.pipeline.sequential import run_pipeline

    logs.setup()  # the pipeline's progress lines on the trial's stdout, which Tune shows on its console
    # Helper processes Ray Train starts from this trial (its PlacementGroupCleaner) attach with a
    # bare ray.init(): point them at this cluster, or they fail when a machine runs several.
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    trial_id = tune.get_context().get_trial_id()
    progress = {"reported": 0, "finals": {}}
    ckpt = tune.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            progress = json.loads((Path(d) / PROGRESS).read_text())
    finals: dict[str, dict[str, float]] = dict(progress["finals"])  # seed -> final metrics
    count = 0  # reports made so far in this (re)run, including those skipped as already made

    def report(metrics: dict[str, Any], n: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / PROGRESS).write_text(json.dumps({"reported": n, "finals": finals}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    for seed in ctx.seeds:
        cfg = trial_config(ctx, point, seed, f"{trial_id}-seed{seed}")
        order = cfg.data.order
        pending: list[tuple[dict[str, Any], int]] = []

        def on_domain(t: int, history: list[dict[str, float]], seed=seed, order=order, pending=pending) -> None:
            nonlocal count
            count += 1
            current = running_metrics(history, order)
            if t == len(order):
                finals[str(seed)] = current
            if count <= progress["reported"]:
                return  # reported before the trial was restarted
            seen = [m for s, m in finals.items() if s != str(seed)] + [current]
            agg = mean_over_seeds(seen)
            metrics = {
                "objective": objective(agg["retention"], agg["domain_plastic"], ctx.objective),
                **agg, "seed": seed, "domain_step": t, "seeds_done": len(finals),
                **{k: history[t][k] for k in STEP_METRICS if k in history[t]},
            }
            if t == len(order):
                # A seed's last report waits until its run is written (summary.json, MLflow run
                # closed): Tune may stop the trial as soon as it sees the trial's last report.
                pending.append((metrics, count))
            else:
                report(metrics, count)

        run_dir = Path(cfg.storage) / cfg.resolved_run_id()
        if str(seed) in finals:  # every report of this seed was made before a restart
            count += len(order)
            continue
        if (run_dir / "summary.json").exists():  # finished, but its reports were not all recorded
            history = history_from_metrics(run_dir / "metrics.jsonl")
            for t in range(1, len(history)):
                on_domain(t, history[: t + 1])
        else:
            run_pipeline(cfg, resume=(run_dir / "config.yaml").is_file(), on_domain=on_domain)
        for metrics, n in pending:
            report(metrics, n)
