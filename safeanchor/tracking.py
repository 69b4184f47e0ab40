"""Experiment tracking with MLflow: one parent run per pipeline run, one nested child per domain.

Only the driver (rank 0) creates a tracker. `make_tracker` returns a real :class:`Tracker` or,
with ``tracking.enabled: false``, a :class:`NullTracker` that has the same methods and does
nothing (it does not even import mlflow), so the pipeline never branches on it.

Where things go by default: the tracking store is ``sqlite:///<abs storage>/mlflow.db`` (unless
``tracking.tracking_uri`` or ``$MLFLOW_TRACKING_URI`` says otherwise) and the experiment is
created with ``artifact_location = <storage>/mlartifacts/<experiment>``, so nothing is
written to ``./mlruns`` in the current directory. Storage on an object store (``s3://``,
``gs://``, ``hdfs://``): MLflow writes the artifacts there itself (its own S3 / GCS / HDFS
clients), but SQLite needs a local disk, so ``tracking.tracking_uri`` (an MLflow server) is
required. Files MLflow only takes from a local disk (peft adapters, the plot) are staged in a
temporary directory; the run's copies go through `safeanchor.storage.RunDir`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.config import ConfigError, check
from safeanchor.storage import RunDir

__all__ = [
    "NullTracker",
    "Tracker",
    "TrackingConfig",
    "close_orphans",
    "flatten",
    "make_tracker",
    "numeric_scalars",
    "plot_trajectory",
]

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (characters)
PARAMS_PER_BATCH = 100  # MLflow's limit on params per log_batch call
METRICS_PER_BATCH = 1000  # MLflow's limit on metrics per log_batch call
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")  # what MLflow rejects in param / metric names
_LOCAL_SCHEMES = ("sqlite", "file", "")  # stores whose artifacts we place under storage/
_ARTIFACT_SCHEMES = ("s3://", "gs://", "hdfs://")  # storage URIs MLflow writes artifacts to itself
RUN_KEY_TAG = "safeanchor.run"  # the parent run's tag naming its pipeline run (resume finds it)


@dataclass
class TrackingConfig:
    """MLflow tracking of a pipeline run (parent run + one nested child run per domain)."""

    enabled: bool = field(default=True, metadata={"doc": "log to MLflow"})
    tracking_uri: str | None = field(default=None, metadata={
        "doc": "MLflow tracking URI (default: $MLFLOW_TRACKING_URI if set, "
               "else sqlite:///<abs storage>/mlflow.db)"})
    experiment: str = field(default="safeanchor", metadata={"doc": "MLflow experiment name"})
    parent_run_id: str | None = field(default=None, metadata={
        "doc": "nest the pipeline's run under this MLflow run of the same experiment (a sweep's run: "
               "workflows/sweep.py sets it per trial); null: a top-level run"})

    def __post_init__(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must not be empty")
        check(self.tracking_uri is None or bool(self.tracking_uri.strip()), "tracking_uri",
              "must not be empty (omit it for the default)")


# ---------------------------------------------------------------------------------------------
# helpers (pure; unit-testable without mlflow)
# ---------------------------------------------------------------------------------------------


def _key(k: str) -> str:
    """A param / metric name MLflow accepts (bad characters -> '_')."""
    return _BAD_KEY_CHARS.sub("_", k)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {dotted key: string value} for MLflow params (lists as JSON, truncated)."""
    out: dict[str, str] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
            continue
        if isinstance(v, (Mapping, list, tuple)):
            s = json.dumps(v, default=str)
        else:
            s = str(v)
        out[_key(key)] = s[:MAX_PARAM_VALUE]
    return out


def numeric_scalars(info: Mapping[str, Any], max_depth: int = 2) -> dict[str, float]:
    """Flat numeric (int / float / bool) leaves of `info` at depth <= max_depth, '/'-joined keys.

    ``{"ssi": {"k_mean": 1.5, "k": {...}}, "csm": {"rounds": 0, "triggered": False}}``
    -> ``{"ssi/k_mean": 1.5, "csm/rounds": 0.0, "csm/triggered": 0.0}`` (deeper dicts, strings
    and lists are skipped).
    """
    out: dict[str, float] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for k, v in node.items():
            p = (*path, str(k))
            if isinstance(v, Mapping):
                if len(p) < max_depth:
                    walk(v, p)
            elif isinstance(v, (bool, int, float)):
                out[_key("/".join(p))] = float(v)

    walk(info, ())
    return out


def plot_trajectory(summary: Mapping[str, Any], path: Path) -> Path:
    """Safety, over-refusal, general, helpfulness and each domain's score over steps 0..T (PNG)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    order = list(summary.get("order", []))
    series = {k: summary[k] for k in ("safety", "over_refusal", "general", "helpful") if k in summary}
    series.update({f"domain/{d}": v for d, v in summary.get("domain", {}).items()})
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    n = 0
    for name, ys in series.items():
        xs = list(range(len(ys)))
        n = max(n, len(ys))
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o",
                linestyle="--" if name.startswith("domain/") else "-", label=name)
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels(["0\naligned", *(f"{t}\n{order[t - 1]}" if t <= len(order) else str(t)
                                        for t in range(1, n))])
    ax.set_xlabel("step (after domain)")
    ax.set_ylabel("score")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"{summary.get('method', '?')} seed {summary.get('seed', '?')}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
    return path


def _storage_dir(storage: RunDir | str | Path) -> RunDir:
    return storage if isinstance(storage, RunDir) else RunDir.open(str(storage))


def default_tracking_uri(cfg: TrackingConfig, storage: RunDir | str | Path) -> str:
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    local = _storage_dir(storage).local_path()
    if local is None:
        raise ConfigError("tracking.tracking_uri", f"storage {_storage_dir(storage).uri()} is not on a local "
                          "disk, where the default MLflow store (SQLite) must live: set tracking.tracking_uri "
                          "(or MLFLOW_TRACKING_URI) to an MLflow server, or tracking.enabled=false")
    return f"sqlite:///{local.resolve() / 'mlflow.db'}"


# ---------------------------------------------------------------------------------------------
# trackers
# ---------------------------------------------------------------------------------------------


class NullTracker:
    """Tracking disabled: the same interface, does nothing, writes nothing, imports no mlflow."""

    run_id: str | None = None
    tracking_uri: str | None = None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
              key: str | None = None, resume: bool = False) -> None:
        pass

    @contextlib.contextmanager
    def domain(self, step: int, domain: str) -> Iterator[None]:
        yield

    def log_metrics(self, metrics: Mapping[str, float], step: int, child: bool = False) -> None:
        pass

    def log_artifact(self, path: Path, artifact_path: str | None = None, child: bool = False) -> None:
        pass

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str, child: bool = False) -> None:
        pass

    def finish(self, summary: Mapping[str, Any], run_dir: RunDir | Path) -> None:
        pass

    def fail(self, status: str = "FAILED") -> None:
        pass


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """An exclusive file lock next to a local SQLite store (no-op for other URIs)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///"):] + ".lock")
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Tracker:
    """Logs one pipeline run to MLflow through an explicit client (no global fluent-API state)."""

    def __init__(self, cfg: TrackingConfig, storage: RunDir | str | Path) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.cfg = cfg
        self.storage = _storage_dir(storage)
        self.tracking_uri = default_tracking_uri(cfg, self.storage)
        self.run_id: str | None = None
        self.child_id: str | None = None
        self._ended = False
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        try:
            # Several runs sharing one SQLite store (workflows/compare.py --parallel) would race
            # on MLflow's schema creation/migration: the first use of the store is serialised.
            with _store_lock(self.tracking_uri):
                self.client = MlflowClient(tracking_uri=self.tracking_uri)
                self.experiment_id = self._experiment()
        except MlflowException as e:
            raise ConfigError("tracking.tracking_uri", f"{self.tracking_uri!r}: {e.message}") from None

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.cfg.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            scheme = self.tracking_uri.split(":", 1)[0] if ":" in self.tracking_uri else ""
            location = None
            if scheme in _LOCAL_SCHEMES:  # a remote server keeps its own artifact root
                local = self.storage.local_path("mlartifacts", name.replace("/", "_"))
                if local is not None:
                    location = local.resolve().as_uri()
                elif self.storage.scheme in _ARTIFACT_SCHEMES:  # MLflow's own S3 / GCS / HDFS stores
                    location = self.storage.uri("mlartifacts", name.replace("/", "_"))
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created concurrently by another run: use that one
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # -- runs ---------------------------------------------------------------------------
    def _find(self, **tags: str) -> str | None:
        """The newest run of the experiment whose tags have these values (None: no such run)."""
        cond = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=cond, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def start(self, run_name: str, params: Mapping[str, Any], tags: Mapping[str, Any] | None = None,
              key: str | None = None, resume: bool = False) -> None:
        """Open the parent run; `params` is a nested or flat dict (flattened to dotted keys).

        `key` identifies the pipeline run (its run directory), stored as the tag
        `safeanchor.run`; with `resume`, the parent run of that key is reopened (status RUNNING,
        params as logged the first time) instead of a new one, so an interrupted pipeline run
        stays one MLflow run.
        """
        from mlflow.entities import Param

        tags = {k: str(v) for k, v in (tags or {}).items()}
        if self.cfg.parent_run_id:
            tags["mlflow.parentRunId"] = self.cfg.parent_run_id
        if key is not None:
            tags[RUN_KEY_TAG] = key
            if resume:
                self.run_id = self._find(**{RUN_KEY_TAG: key})
                if self.run_id is not None:
                    self.client.update_run(self.run_id, status="RUNNING")
                    for k, v in tags.items():
                        self.client.set_tag(self.run_id, k, v)
                    return
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        flat = flatten(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + PARAMS_PER_BATCH])

    @contextlib.contextmanager
    def domain(self, step: int, domain: str) -> Iterator[None]:
        """A nested child run ``step<t>-<domain>`` for the duration of the block."""
        assert self.run_id is not None, "start() first"
        # a resumed parent run already has this domain's child when an earlier execution got there
        self.child_id = self._find(**{"mlflow.parentRunId": self.run_id, "step": str(step)})
        if self.child_id is None:
            run = self.client.create_run(
                self.experiment_id, run_name=f"step{step}-{domain}",
                tags={"mlflow.parentRunId": self.run_id, "step": str(step), "domain": domain})
            self.child_id = run.info.run_id
        else:
            self.client.update_run(self.child_id, status="RUNNING")
        status = "FAILED"
        try:
            yield
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self.client.set_terminated(self.child_id, status)
            self.child_id = None

    def _target(self, child: bool) -> str:
        rid = self.child_id if child else self.run_id
        if rid is None:
            raise RuntimeError("no active " + ("child run (use `with tracker.domain(...)`)" if child
                                               else "parent run (call start() first)"))
        return rid

    def log_metrics(self, metrics: Mapping[str, float], step: int, child: bool = False) -> None:
        """Log numeric metrics at `step` (NaN is kept: MLflow stores it; non-numbers skipped)."""
        from mlflow.entities import Metric

        rid = self._target(child)
        ts = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (bool, int, float))]
        for i in range(0, len(items), METRICS_PER_BATCH):
            self.client.log_batch(rid, metrics=items[i : i + METRICS_PER_BATCH])

    def log_artifact(self, path: Path, artifact_path: str | None = None, child: bool = False) -> None:
        """Log a file, or a directory's contents, under `artifact_path` of the parent / child."""
        rid = self._target(child)
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(rid, str(path), artifact_path)
        else:
            self.client.log_artifact(rid, str(path), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str, child: bool = False) -> None:
        """Rows (dicts; a key missing from a row is None there) as an MLflow table artifact
        (`artifact_file` ends in .json), browsable in the UI's evaluation view."""
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols]
        self.client.log_table(self._target(child), {c: [r.get(c) for r in rows] for c in cols}, artifact_file)

    def finish(self, summary: Mapping[str, Any], run_dir: RunDir | Path) -> None:
        """Log summary.json and trajectory.png (both also written to run_dir), end the parent run."""
        run_dir = _storage_dir(run_dir)
        if not run_dir.is_file("summary.json"):
            run_dir.write_text("summary.json", json.dumps(summary, indent=2, default=float))
        with run_dir.local_copy("summary.json") as path:
            self.log_artifact(path)
        with tempfile.TemporaryDirectory(prefix="safeanchor-plot-") as tmp:
            png = plot_trajectory(summary, Path(tmp) / "trajectory.png")
            run_dir.write_bytes("trajectory.png", png.read_bytes())
            self.log_artifact(png)
        self.client.set_terminated(self._target(False), "FINISHED")
        self._ended = True  # run_id stays readable after the run ended

    def fail(self, status: str = "FAILED") -> None:
        """End the open child (if any) and the parent with `status`; safe to call twice."""
        if self.child_id is not None:
            self.client.set_terminated(self.child_id, status)
            self.child_id = None
        if self.run_id is not None and not self._ended:
            self.client.set_terminated(self.run_id, status)
            self._ended = True


def close_orphans(client, experiment_id: str, parent: str) -> int:
    """End the runs under `parent` (recursively) still marked RUNNING as KILLED: a pipeline run
    whose process was stopped from outside (a Tune trial ASHA stopped, a cancelled Ray task, an
    interrupt) dies with it and cannot end its own runs. Returns how many were ended."""
    n = 0
    for run in client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"):
        n += close_orphans(client, experiment_id, run.info.run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED")
            n += 1
    return n


def make_tracker(cfg: TrackingConfig, storage: RunDir | str | Path) -> Tracker | NullTracker:
    """A real MLflow tracker, or a no-op one when tracking is disabled."""
    return Tracker(cfg, storage) if cfg.enabled else NullTracker()
