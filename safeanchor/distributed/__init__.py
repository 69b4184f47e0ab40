"""Distributed execution: training phases on Ray Train + DeepSpeed, SSI on the same workers.

- `ClusterConfig` / `DeepSpeedConfig` (config.py): the `cluster:` section of a run.
- `fit_phase(PhaseSpec, ClusterConfig, storage_path)` (trainer.py): one training phase, a
  `safeanchor.train.phase.PhaseSpec` in, a `PhaseResult` out; every worker builds from the spec.
- `TrainWorkers` (workers.py): one Ray Train run whose workers train every phase of a pipeline
  run and compute its SSI (`fit_phase` is a one-phase TrainWorkers).
- `DeepSpeedStepEngine` (engine.py): the engine behind the one step loop
  (`safeanchor.train.loop.run_loop`) on a Train worker.
- `identify_subspaces(SSIJob, ClusterConfig, ...)` (ssi.py): safety subspaces from sharded
  per-example gradients, merged per block of tensors (on the Train workers, on Ray tasks with
  `cluster.ssi_workers`, or in-process).

Ray and DeepSpeed are imported lazily, inside the functions that use them.
"""

from safeanchor.distributed.config import ClusterConfig, DeepSpeedConfig
from safeanchor.distributed.trainer import fit_phase, run_phase

__all__ = ["ClusterConfig", "DeepSpeedConfig", "fit_phase", "run_phase"]
