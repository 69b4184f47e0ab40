"""Distributed execution: training phases on Ray Train + DeepSpeed, SSI on Ray tasks.

- `ClusterConfig` / `DeepSpeedConfig` (config.py): the `cluster:` section of a run.
- `fit_phase(PhaseJob, ClusterConfig, storage_path)` (trainer.py): one training phase; every
  worker builds its `PhaseSetup` from an importable builder (the contract is in trainer.py).
- `run_loop` (engine.py): the per-rank step loop that mirrors `safeanchor.train.loop.run_steps`.
- `identify_subspaces(SSIJob, ClusterConfig, ...)` (ssi.py): safety subspaces from sharded
  per-example gradients, merged per block of tensors.

Ray and DeepSpeed are imported lazily, inside the functions that use them.
"""

from safeanchor.distributed.config import ClusterConfig, DeepSpeedConfig
from safeanchor.distributed.trainer import PhaseJob, PhaseSetup, fit_phase, run_phase

__all__ = ["ClusterConfig", "DeepSpeedConfig", "PhaseJob", "PhaseSetup", "fit_phase", "run_phase"]
