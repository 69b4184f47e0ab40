"""Drive a sweep: check the space, start / restore the Tuner, write the outputs.

Layout under <storage>/<sweep_id>/ (Tune's experiment directory, plus):

    sweep.json        the sweep's settings (what --resume rebuilds it from) and its MLflow run
    runs/             one pipeline run per trial and tuning seed: <trial_id>-seed<s>/
    trials.csv, trials.md, pareto.png, best.yaml     written when every trial has ended
    mlflow.db, mlartifacts/                          the default MLflow store (sweep run + trials)
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.config import ConfigError, from_dict
from safeanchor.distributed.placement import check_resources, concurrency, ensure_ray
from safeanchor.distributed.placement import run_cpus as trial_cpus
from safeanchor.distributed.placement import run_resources as trial_resources
from safeanchor.sweep import report
from safeanchor.sweep.objective import ObjectiveConfig
from safeanchor.sweep.space import corners, to_tune
from safeanchor.sweep.trainable import TrialContext, run_trial, trial_config

logger = logging.getLogger(__name__)

TUNING_SEEDS = [100, 101, 102, 103, 104]
REPORTING_SEEDS = range(0, 5)  # the tables' seeds: never tuned on
SEARCHES = ("optuna", "random")
SCHEDULERS = ("asha", "fifo")


@dataclass
class SweepSpec:
    """One sweep's settings (saved as sweep.json; --resume reads them back)."""

    sweep_id: str
    storage: str  # absolute
    method: str
    config: str  # absolute path of the base preset
    space: dict[str, dict[str, Any]]  # dotted key -> distribution (safeanchor.sweep.space)
    space_file: str
    overrides: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: list(TUNING_SEEDS))
    trials: int = 16
    search: str = "optuna"
    search_seed: int = 0
    scheduler: str = "asha"
    reduction_factor: float = 3.0
    max_concurrent: int | None = None  # None: from the cluster's resources
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None

    @property
    def dir(self) -> Path:
        return Path(self.storage) / self.sweep_id


def check_seeds(seeds: list[int], allow_reporting_seeds: bool) -> None:
    if not seeds:
        raise ConfigError("seeds", "at least one tuning seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("seeds", f"a seed is listed twice: {seeds}")
    bad = sorted(set(seeds) & set(REPORTING_SEEDS))
    if bad and not allow_reporting_seeds:
        raise ConfigError("seeds", f"{bad} are reporting seeds (0-4: the comparison tables' seeds), never used "
                          "for tuning; tune on 100-104, or pass --allow-reporting-seeds if you mean it")


def check_space(spec: SweepSpec, ctx: TrialContext):
    """Build the trial config at every corner of the space (errors name the key); returns one."""
    cfg = None
    for point in corners(spec.space):
        try:
            cfg = trial_config(ctx, point, spec.seeds[0], "check")
        except ConfigError as e:
            raise ConfigError(e.key, f"{e.msg} (at the point {point} of {spec.space_file})") from None
    if cfg.eval.split != "val":
        raise ConfigError("eval.split", "a sweep reads the validation split only")
    return cfg


def _save_spec(spec: SweepSpec) -> None:
    spec.dir.mkdir(parents=True, exist_ok=True)
    report.write_text(spec.dir / "sweep.json", json.dumps(asdict(spec), indent=2))


def load_spec(storage: str, sweep_id: str) -> SweepSpec:
    path = Path(storage).resolve() / sweep_id / "sweep.json"
    if not path.is_file():
        raise ConfigError("resume", f"nothing to resume: {path} does not exist")
    data = json.loads(path.read_text())
    data["objective"] = from_dict(ObjectiveConfig, data["objective"])
    return SweepSpec(**data)


def run_sweep(spec: SweepSpec, resume: bool = False, num_cpus: int | None = None) -> dict[str, Any]:
    """Run (or continue) the sweep; returns {"complete": bool, "best": row or None, "dir": path}."""
    if not resume and (spec.dir / "sweep.json").exists():
        raise ConfigError("sweep_id", f"{spec.dir} already holds a sweep: continue it with --resume {spec.sweep_id} "
                          "(--storage the same), or choose another --sweep-id / --storage")
    ctx = TrialContext(config=spec.config, overrides=[*spec.overrides, "eval.split=val"], method=spec.method,
                       seeds=list(spec.seeds), runs_dir=str(spec.dir / "runs"), objective=spec.objective)
    cfg = check_space(spec, ctx)
    ctx.threads = int(cfg.threads or 1)
    if cfg.cluster.executor == "ray" and cfg.cluster.torch_threads_per_worker is None:
        # trials share nodes: a Train worker uses the CPUs it reserved, not its node's cores
        ctx.overrides.append(f"cluster.torch_threads_per_worker={max(1, int(cfg.cluster.cpus_per_worker))}")
    own, peak = trial_cpus(cfg)
    ensure_ray(cfg.cluster.address, num_cpus)
    check_resources(cfg, own, "a trial")

    from safeanchor.tracking import Tracker, close_orphans, make_tracker

    tracker = make_tracker(cfg.tracking, spec.dir)
    if isinstance(tracker, Tracker):
        if resume and spec.mlflow_run_id:
            tracker.run_id = spec.mlflow_run_id
            tracker.client.update_run(spec.mlflow_run_id, status="RUNNING")
        else:
            tracker.start(spec.sweep_id, {"sweep": {k: v for k, v in asdict(spec).items() if k != "space"},
                                          "space": spec.space},
                          tags={"kind": "sweep", "method": spec.method})
        spec.mlflow_run_id, spec.tracking_uri = tracker.run_id, tracker.tracking_uri
        ctx.tracking = [f"tracking.tracking_uri={json.dumps(tracker.tracking_uri)}",
                        f"tracking.parent_run_id={json.dumps(tracker.run_id)}"]
    _save_spec(spec)
    status = "FAILED"
    try:
        out = _tune(spec, ctx, cfg, peak, resume)
        if isinstance(tracker, Tracker):
            closed = close_orphans(tracker.client, tracker.experiment_id, tracker.run_id)
            if closed:
                logger.info(f"[sweep] {closed} MLflow runs of stopped trials ended as KILLED")
        status = "FINISHED" if out["complete"] else "KILLED"
        if out["best"] is not None:
            tracker.log_metrics({k: out["best"][k] for k in ("objective", "retention", "domain_plastic")}, step=0)
        for name in ("trials.csv", "trials.md", "pareto.png", "best.yaml"):
            if (spec.dir / name).exists():
                tracker.log_artifact(spec.dir / name)
        return out
    finally:
        tracker.fail(status)  # ends the sweep run with this status (FINISHED included)


def _tune(spec: SweepSpec, ctx: TrialContext, cfg, peak: float, resume: bool) -> dict[str, Any]:
    import ray
    from ray import tune

    gpus = ray.cluster_resources().get("GPU", 0.0)
    res = trial_resources(cfg, gpus)
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), res)
    if resume:
        if not tune.Tuner.can_restore(str(spec.dir)):
            raise ConfigError("resume", f"{spec.dir} holds no Tune experiment state to restore")
        logger.info(f"[sweep] resuming {spec.dir}: finished trials are kept, unfinished ones continue")
        tuner = tune.Tuner.restore(str(spec.dir), trainable, resume_unfinished=True, resume_errored=True)
    else:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        conc = spec.max_concurrent or concurrency(cpus, peak, spec.trials, gpus, res.get("GPU", 0.0))
        logger.info(f"[sweep] {spec.trials} trials of {spec.method} ({spec.search}, seed {spec.search_seed}; "
                    f"{spec.scheduler}), seeds {spec.seeds}, {conc} at once ({cpus:g} CPUs, {peak:g} per trial) -> {spec.dir}")
        reports = len(cfg.data.order) * len(spec.seeds)
        if spec.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            search = OptunaSearch(seed=spec.search_seed)
        else:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            # it takes the concurrency itself (Tune ignores max_concurrent_trials for it, with a warning)
            search = BasicVariantGenerator(random_state=spec.search_seed, max_concurrent=conc)
        scheduler = None
        if spec.scheduler == "asha":
            from ray.tune.schedulers import ASHAScheduler

            # the first rung is the first domain of the first tuning seed
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=reports, grace_period=1,
                                      reduction_factor=spec.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune(spec.space),
            tune_config=tune.TuneConfig(metric="objective", mode="max", num_samples=spec.trials,
                                        max_concurrent_trials=conc if spec.search == "optuna" else None,
                                        search_alg=search, scheduler=scheduler,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=spec.sweep_id, storage_path=spec.storage,
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
        )
    tuner.fit()
    return write_outputs(spec, cfg)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def write_outputs(spec: SweepSpec, cfg) -> dict[str, Any]:
    """Read the experiment's trials back; write the table (always) and, once every trial has
    ended, the Pareto plot and best.yaml."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(spec.dir))
    trials = [{"trial_id": t.trial_id, "status": t.status, "point": dict(t.config), "metrics": dict(t.last_result or {}),
               "error": t.status == "ERROR"} for t in analysis.trials]
    reports = len(cfg.data.order) * len(spec.seeds)
    rows = report.trial_rows(trials, list(spec.space), reports)
    ended = len(trials) >= spec.trials and all(t["status"] in ("TERMINATED", "ERROR") for t in trials)
    header = (f"# Sweep {spec.sweep_id}: {spec.method}, {len(trials)}/{spec.trials} trials, tuning seeds {spec.seeds}, "
              f"validation split\n\nobjective = domain_plastic - {spec.objective.penalty:g} * "
              f"max(0, {spec.objective.retention_target:g} - retention); a trial is complete after "
              f"{reports} reports ({len(cfg.data.order)} domains x {len(spec.seeds)} seeds)")
    report.write_csv(rows, spec.dir / "trials.csv")
    report.write_text(spec.dir / "trials.md", report.markdown(rows, header))
    best = next((r for r in rows if r["best"]), None)
    if not ended:
        logger.warning(f"[sweep] interrupted: {sum(t['status'] in ('TERMINATED', 'ERROR') for t in trials)}/{spec.trials} "
                       f"trials ended; continue with --resume {spec.sweep_id} --storage {spec.storage}")
        return {"complete": False, "best": best, "dir": str(spec.dir), "rows": rows}
    report.plot_pareto(rows, spec.objective, spec.dir / "pareto.png", f"{spec.sweep_id} ({spec.method}, validation)")
    if best is None:
        logger.warning("[sweep] no complete trial: no best.yaml")
    else:
        point = next(t["point"] for t in trials if t["trial_id"] == best["trial_id"])
        comment = (f"python workflows/sequential.py --config {spec.dir / 'best.yaml'}\n"
                   f"Best of sweep {spec.sweep_id} ({spec.method}): trial {best['trial_id']}, chosen on the validation\n"
                   f"split with tuning seeds {spec.seeds}: objective {best['objective']:.4f}, retention "
                   f"{best['retention']:.4f}, domain_plastic {best['domain_plastic']:.4f}.\n"
                   f"Tuned: {', '.join(f'{k}={v}' for k, v in sorted(point.items()))}")
        report.write_text(spec.dir / "best.yaml", report.best_yaml(spec.config, spec.overrides, spec.method, point,
                                                                    comment))
    logger.info(f"[sweep] {spec.dir}: trials.csv, trials.md, pareto.png" + (", best.yaml" if best else ""))
    return {"complete": True, "best": best, "dir": str(spec.dir), "rows": rows}
