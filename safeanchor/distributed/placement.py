"""How many whole pipeline runs a Ray cluster holds at once (sweep trials, comparison cells).

A pipeline run launched by `workflows/sweep.py` (a Tune trial) or `workflows/compare.py` (a
Ray task per cell) holds CPUs in two ways:

- `cluster.executor: local` — it trains and evaluates in its own process on `threads` CPUs
  (and, on a cluster with GPUs, one worker's GPUs);
- `cluster.executor: ray` — its own process (evaluation, gates) takes 1 CPU, and each training
  phase / SSI starts Ray Train workers / Ray tasks of `cluster.cpus_per_worker` CPUs (and their
  own GPUs) that Ray places outside the run's reservation.

So the number of runs at once is bounded by the runs' PEAK CPUs, not by what their own process
reserves: runs that each reserve 1 CPU and then wait for Train workers would otherwise fill
the cluster and wait forever.
"""

from __future__ import annotations

import math
import os

from safeanchor.config import ConfigError


def run_cpus(cfg) -> tuple[float, float]:
    """(CPUs pinned to the run's own process, CPUs the run holds at its peak) for a RunConfig."""
    c = cfg.cluster
    own = float(cfg.threads or 1)
    if c.executor == "local":
        return own, own
    return 1.0, 1.0 + c.cpus_per_worker * max(c.num_workers, c.ssi_workers or 0)


def run_resources(cfg, cluster_gpus: float) -> dict[str, float]:
    """What the run's own process reserves: its CPUs and, when it trains in-process on a cluster
    with GPUs, one worker's GPUs (Ray Train workers and SSI tasks reserve their own)."""
    own, _ = run_cpus(cfg)
    res = {"CPU": own}
    c = cfg.cluster
    if c.executor == "local" and cluster_gpus > 0 and c.use_gpu is not False:
        res["GPU"] = c.gpus_per_worker
    return res


def concurrency(cluster_cpus: float, peak: float, runs: int, cluster_gpus: float = 0.0,
                run_gpus: float = 0.0) -> int:
    """Runs at once: as many as the cluster's CPUs (and GPUs) hold at their peak (1 to `runs`)."""
    n = int(math.floor(cluster_cpus / peak + 1e-9))
    if run_gpus > 0:
        n = min(n, int(math.floor(cluster_gpus / run_gpus + 1e-9)))
    return max(1, min(runs, n))


def check_resources(cfg, own: float, what: str = "a trial") -> None:
    """Refuse runs that could never be placed on the connected Ray cluster (they would wait forever)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    c = cfg.cluster
    need = own + (c.cpus_per_worker * c.num_workers if c.executor == "ray" else 0.0)
    if need > cpus:
        key = "cluster.num_workers" if c.executor == "ray" else "threads"
        raise ConfigError(key, f"{what} needs {need:g} CPUs at once ({own:g} for its own process"
                          + (f", {c.num_workers} Train workers x {c.cpus_per_worker:g}" if c.executor == "ray" else "")
                          + f"); the Ray cluster has {cpus:g}")


def ensure_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to (address) or start (num_cpus; None: all) Ray unless this process already did."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus)
        # Helper processes Ray Train starts attach with a bare ray.init(): point them at this
        # instance. (A caller that started Ray itself owns its environment: left alone.)
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
