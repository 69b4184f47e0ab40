"""Run a comparison's cells on Ray, skip the finished ones, and write the report.

Every cell is one whole pipeline run (`safeanchor.pipeline.sequential.run_pipeline`) in a Ray
task that reserves the run's own CPUs (and a GPU when it trains in-process on a GPU cluster;
`safeanchor.distributed.placement`). Its training phases run in that task
(`cluster.executor: local`) or as Ray Train runs the task starts itself (`cluster.executor:
ray`), so at most (cluster CPUs / a cell's peak CPUs) cells run at once.

Layout under the storage root (a local path or any pyarrow.fs URI, through `RunDir`):

    <arm>-seed<s>-<order>/   one cell's run directory (summary.json once it finished)
    logs/<run id>.log        what the cell printed (appended on every attempt)
    compare.json             the arms, the reference order, the last failures, the MLflow run
    report.md, *.png         the report (safeanchor.compare.report)
    mlflow.db, mlartifacts/  the default MLflow store: one comparison run, every cell nested

Resumable by construction: a cell whose summary.json exists is never submitted again; one with
a config.yaml but no summary.json (interrupted) continues from its finished steps; a failed
cell is reported (compare.json, report.md, the exit code) and the others go on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from safeanchor import logs
from safeanchor.compare.cells import Arm, Cell, config_signature, first_difference, signature
from safeanchor.config import ConfigError
from safeanchor.distributed.placement import (
    check_resources,
    concurrency,
    ensure_ray,
    run_cpus,
    run_resources,
)
from safeanchor.storage import RunDir

logger = logging.getLogger(__name__)

STATE = "compare.json"


@dataclass
class CompareSpec:
    """One invocation of workflows/compare.py."""

    storage: str  # a local path or a pyarrow.fs URI
    arms: list[Arm]
    seeds: list[int]
    orders: list[tuple[str, ...]]  # methods' cells run on every order
    reference_order: tuple[str, ...] | None = None  # Table 1's order (None: compare.json's, else orders[0])
    overrides: list[str] = field(default_factory=list)  # every cell's --set
    threads: int | None = None  # torch threads (= CPUs) of a cell (None: the preset's, else 1)
    max_concurrent: int | None = None  # None: from the cluster's resources
    retries: int = 1  # Ray retries of a cell whose worker died (it resumes from its finished steps)


def plan(spec: CompareSpec, reference: tuple[str, ...]) -> list[Cell]:
    """Methods on every seed x order; variants (ablations) on every seed at the reference order.
    Seed-major, so the first seed of every arm finishes first."""
    cells = [Cell(a.name, s, o) for s in spec.seeds for o in spec.orders for a in spec.arms if not a.variant]
    cells += [Cell(a.name, s, reference) for s in spec.seeds for a in spec.arms if a.variant]
    return list(dict.fromkeys(cells))


def cell_config(spec: CompareSpec, arm: Arm, cell: Cell, storage: str):
    """The RunConfig of a cell: the arm's preset, every cell's overrides, the arm's own, the cell."""
    from safeanchor.pipeline.config import load_run_config

    try:
        cfg = load_run_config(arm.config, [*spec.overrides, *arm.overrides], method=arm.method, seed=cell.seed,
                              run_id=cell.run_id, storage=storage, **{"data.order": list(cell.order)})
    except ConfigError as e:
        raise ConfigError(e.key, f"{e.msg} (arm {arm.name}: {arm.describe()})") from None
    cfg.threads = int(spec.threads or cfg.threads or 1)
    if cfg.cluster.executor == "ray" and cfg.cluster.torch_threads_per_worker is None:
        # cells share nodes: a cell's Train workers use the CPUs they reserved, not their node's cores
        cfg.cluster.torch_threads_per_worker = max(1, int(cfg.cluster.cpus_per_worker))
    return cfg


def load_state(root: RunDir) -> dict[str, Any]:
    return root.read_json(STATE) if root.is_file(STATE) else {"arms": {}, "failures": {}}


def _merge_arms(state: dict[str, Any], arms: list[Arm]) -> None:
    for a in arms:
        old = state["arms"].get(a.name)
        new = asdict(a)
        if old is not None and (old["method"], old["overrides"], old["variant"]) != (a.method, a.overrides, a.variant):
            raise ConfigError("storage", f"arm {a.name!r} was defined otherwise in this storage ({old['method']}, "
                              f"{old['overrides']}); name it differently or use another --storage")
        state["arms"][a.name] = new


def check_finished_cells(root: RunDir, cfgs: dict[str, Any]) -> None:
    """A cell directory that already holds a run of another config is a conflict (its result
    would be reported under this comparison's settings): refuse before running anything."""
    bad = []
    for run_id, cfg in cfgs.items():
        run_dir = root.sub(run_id)
        if not run_dir.is_file("config.yaml"):
            continue
        diff = first_difference(signature(yaml.safe_load(run_dir.read_text("config.yaml"))), config_signature(cfg))
        if diff is not None:
            bad.append(f"{run_id} ({diff})")
    if bad:
        raise ConfigError("storage", f"{root.uri()} holds cells run with another config: {', '.join(bad[:5])}"
                          + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
                          + "; use another --storage (or remove those cells)")


def finished(root: RunDir, cell: Cell, cfg) -> bool:
    """The cell's summary.json exists — under its run id, or under `<method>-seed<s>`, where
    compare.py wrote runs before it knew orders, if that run's config is this cell's."""
    if root.sub(cell.run_id).is_file("summary.json"):
        return True
    legacy = root.sub(f"{cell.arm}-seed{cell.seed}")
    if not (legacy.is_file("summary.json") and legacy.is_file("config.yaml")):
        return False
    saved = signature(yaml.safe_load(legacy.read_text("config.yaml")))
    return first_difference(saved, config_signature(cfg)) is None


class _Lines(logging.Handler):
    """Keeps the formatted records (a cell's log on a filesystem without append)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def cell_log(root: RunDir, run_id: str) -> Iterator[None]:
    """While the block runs, the "safeanchor" records (what the pipeline prints) go to the cell's
    log <storage>/logs/<run id>.log, and only there: appended line by line on a local disk
    (`safeanchor.logs.to_file`), or collected and written when the block ends on other
    filesystems (no append there)."""
    name = f"logs/{run_id}.log"
    local = root.local_path(name)
    if local is not None:
        with logs.to_file(local):
            yield
        return
    lines = _Lines()
    try:
        with logs.to_handler(lines):
            yield
    finally:
        if lines.lines:
            old = root.read_text(name) if root.is_file(name) else ""
            root.write_text(name, old + "\n".join(lines.lines) + "\n")


def run_cell(cfg) -> dict[str, Any]:
    """One cell (the body of its Ray task): the pipeline, resumed if an earlier attempt started
    it. Failures come back as a record (never raised), with the traceback in the cell's log."""
    import ray

    from safeanchor.pipeline.sequential import run_pipeline

    if ray.is_initialized():  # Ray Train helpers started from here attach with a bare ray.init()
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    root = RunDir.open(cfg.storage)
    run_id = cfg.resolved_run_id()
    resume = root.sub(run_id).is_file("config.yaml")
    t0 = time.perf_counter()
    out = {"run_id": run_id, "resumed": resume}
    with cell_log(root, run_id):
        logger.info(f"=== {run_id}: {'resumed' if resume else 'started'} (pid {os.getpid()}) ===")
        try:
            run_pipeline(cfg, resume=resume)
            out.update(status="ok")
        except Exception as e:  # reported, the other cells go on
            logger.error(traceback.format_exc())
            text = str(e).strip().splitlines()
            out.update(status="failed", error=f"{type(e).__name__}: {text[0] if text else ''}")
        finally:
            out["wall_s"] = time.perf_counter() - t0
    return out


def run_compare(spec: CompareSpec, num_cpus: int | None = None) -> dict[str, Any]:
    """Run the cells that have not finished, then write the report. Returns {"ran", "skipped",
    "failed": {run_id: error}, "report": uri}."""
    root = RunDir.open(spec.storage)
    root.check_writable()
    storage = root.uri()
    state = load_state(root)
    reference = tuple(spec.reference_order or state.get("reference_order") or spec.orders[0])
    arms = {a.name: a for a in spec.arms}
    cells = plan(spec, reference)
    cfgs = {c.run_id: cell_config(spec, arms[c.arm], c, storage) for c in cells}  # every config checked first
    check_finished_cells(root, cfgs)
    _merge_arms(state, spec.arms)
    state.update(reference_order=list(reference), overrides=list(spec.overrides))
    todo = [c for c in cells if not finished(root, c, cfgs[c.run_id])]
    logger.info(f"[compare] {len(cells)} cells ({len(spec.arms)} arms x {len(spec.seeds)} seeds x {len(spec.orders)} orders"
                f"{'; variants at the reference order' if any(a.variant for a in spec.arms) else ''}): "
                f"{len(cells) - len(todo)} finished earlier, {len(todo)} to run -> {storage}")

    from safeanchor.tracking import Tracker, close_orphans, make_tracker

    first = cfgs[cells[0].run_id]
    tracker = make_tracker(first.tracking, root)
    if isinstance(tracker, Tracker):
        old = state.get("mlflow_run_id")
        if old and state.get("tracking_uri") == tracker.tracking_uri and _run_exists(tracker.client, old):
            tracker.run_id = old
            tracker.client.update_run(old, status="RUNNING")
        else:
            tracker.start(f"compare-{root.path().rstrip('/').rpartition('/')[2]}",
                          {"arms": {a.name: asdict(a) for a in spec.arms}, "seeds": spec.seeds,
                           "orders": [",".join(o) for o in spec.orders], "overrides": spec.overrides},
                          tags={"kind": "compare"})
        state.update(mlflow_run_id=tracker.run_id, tracking_uri=tracker.tracking_uri)
        for cfg in cfgs.values():
            if cfg.tracking.enabled:
                cfg.tracking.tracking_uri, cfg.tracking.parent_run_id = tracker.tracking_uri, tracker.run_id
    root.write_json(STATE, state)

    status = "FAILED"
    failed: dict[str, str] = {}
    try:
        if todo:
            failed = _run_on_ray(spec, [cfgs[c.run_id] for c in todo], num_cpus)
        # failures of earlier invocations stay listed until their cell finishes
        state["failures"] = {k: v for k, v in state.get("failures", {}).items()
                             if not root.sub(k).is_file("summary.json")} | failed
        root.write_json(STATE, state)
        if isinstance(tracker, Tracker):
            closed = close_orphans(tracker.client, tracker.experiment_id, tracker.run_id)
            if closed:
                logger.info(f"[compare] {closed} MLflow runs of interrupted cells ended as KILLED")
        from safeanchor.compare.report import write_report

        rep = write_report(root, state)
        tracker.log_metrics(rep["metrics"], step=0)
        for name in rep["files"]:
            with root.local_copy(name) as path:
                tracker.log_artifact(path)
        status = "FINISHED" if not failed else "FAILED"
        return {"ran": len(todo), "skipped": len(cells) - len(todo), "failed": failed, "report": root.uri("report.md"),
                "table": rep["table"]}
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.fail(status)


def _run_exists(client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(run_id)
        return True
    except MlflowException:
        return False


def _run_on_ray(spec: CompareSpec, cfgs: list, num_cpus: int | None) -> dict[str, str]:
    """Submit the cells as Ray tasks, at most `concurrency` at once; returns {run_id: error}."""
    import ray

    ensure_ray(cfgs[0].cluster.address, num_cpus)
    peak_cfg = max(cfgs, key=lambda c: run_cpus(c)[1])
    check_resources(peak_cfg, run_cpus(peak_cfg)[0], "a cell")
    cpus = ray.cluster_resources().get("CPU", 1.0)
    gpus = ray.cluster_resources().get("GPU", 0.0)
    res = [run_resources(c, gpus) for c in cfgs]
    conc = spec.max_concurrent or concurrency(cpus, run_cpus(peak_cfg)[1], len(cfgs), gpus,
                                              max(r.get("GPU", 0.0) for r in res))
    logger.info(f"[compare] {conc} cells at once ({cpus:g} CPUs, {run_cpus(peak_cfg)[1]:g} per cell at its peak"
                + (f", {gpus:g} GPUs" if gpus else "") + ")")
    task = ray.remote(run_cell)
    pending = list(zip(cfgs, res, strict=True))
    running: dict[Any, str] = {}
    failed: dict[str, str] = {}
    done = 0
    while pending or running:
        while pending and len(running) < conc:
            cfg, r = pending.pop(0)
            ref = task.options(num_cpus=r["CPU"], num_gpus=r.get("GPU", 0.0), max_retries=spec.retries,
                               name=f"cell:{cfg.resolved_run_id()}").remote(cfg)
            running[ref] = cfg.resolved_run_id()
        ready, _ = ray.wait(list(running), num_returns=1)
        run_id = running.pop(ready[0])
        try:
            out = ray.get(ready[0])
        except ray.exceptions.RayError as e:  # the worker died (OOM, killed) after its retries
            out = {"status": "failed", "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0]}", "wall_s": 0.0,
                   "resumed": False}
        done += 1
        if out["status"] == "ok":
            logger.info(f"[compare] {done}/{len(cfgs)} {run_id}: ok ({out['wall_s']:.0f}s{', resumed' if out['resumed'] else ''})")
        else:
            failed[run_id] = out["error"]
            logger.warning(f"[compare] {done}/{len(cfgs)} {run_id}: FAILED: {out['error']} (log: logs/{run_id}.log)")
    return failed

