"""One training phase on Ray Train workers (DeepSpeed engine) or in-process: `fit_phase`.

A phase is a `safeanchor.train.phase.PhaseSpec` (data: model reference, adapter bytes, method
name / options / state, examples, train config, seed). EVERY process that trains (each Ray Train
worker; the driver itself under `executor: local`) runs `build(spec)`, builds its engine around
the model, then the method's hooks from `engine.module` (`make_hooks`: caches on the device and
dtype the engine gave the parameters), and runs `safeanchor.train.loop.run_loop`. Rank 0 returns
a `PhaseResult` (adapter bytes, the hooks' stats, train stats).

executor ray: Ray Train workers (`make_trainer`: `num_workers` workers, ScalingConfig from
ClusterConfig, gloo on CPU / NCCL on GPU, RunConfig(storage_path, name, FailureConfig(max_failures)))
that serve phases (`safeanchor.distributed.workers.TrainWorkers`: one Train run for all the phases of
a pipeline run; `fit_phase` alone: one Train run named `spec.name` for one phase). The global batch
of step s is the single-process batch; each rank trains on its 1/W share. Every `checkpoint_every`
steps all ranks save the DeepSpeed engine state (trainable tensors, their ZeRO optimizer partition,
LambdaLR, step, losses, the hooks' counters, each rank's RNG state) and report it as the Train
checkpoint `<phase name>-step_<n>`; ZeRO-1/2 shard the optimizer state, so every rank contributes
its own files and Ray Train merges them into one checkpoint directory; the workers wait until Ray
Train has committed it (otherwise a worker that dies a few steps later restarts the phase from
scratch: measured). A restarted worker group (FailureConfig) resumes the phase from its latest
checkpoint, with the same number of workers; so does a driver restarted after a kill, whose new
Train run of the same name under the same storage path starts from that checkpoint (Ray Train
restores a run by name). Errors that a restart would only repeat (ConfigError, DataError,
NonFiniteLoss) are returned by the workers and re-raised by the driver, without restarts.

executor local: the same loop in this process on the plain torch engine (world size 1; DeepSpeed
runs only in Train workers); no checkpoints.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.config import ConfigError
from safeanchor.data import DataError, ExampleBatches, encode_dataset
from safeanchor.distributed import placement
from safeanchor.distributed.config import ClusterConfig, engine_config
from safeanchor.distributed.engine import DeepSpeedStepEngine, check_divisible
from safeanchor.train.loop import NonFiniteLoss, TorchStepEngine, batches_from, run_loop
from safeanchor.train.phase import (
    Built,
    PhaseResult,
    PhaseSpec,
    build,
    hooks_state,
    load_hooks_state,
    make_hooks,
    result,
)

logger = logging.getLogger(__name__)

#: errors that a worker-group restart would only repeat: returned by workers, raised by fit_phase
NON_RETRYABLE = (ConfigError, DataError, NonFiniteLoss)


def ensure_ray(cluster: ClusterConfig) -> None:
    """Attach to / start Ray unless this process already did (tests start their own)."""
    # Ray Train's PreemptionWatcher (an actor that watches for node drains) prints a core_worker
    # error line on every phase ("... constructor arguments in the object store and max_restarts
    # > 0"). Off unless the user sets the variable: a drained node's workers fail, and the phase
    # restarts from its last checkpoint (cluster.max_failures). Ray Train passes the driver's
    # value on to its controller, in a local Ray and in a `ray job submit` job alike.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    placement.ensure_ray(cluster.address, None)  # the node's CPUs when it starts a local Ray


def resolve_use_gpu(cluster: ClusterConfig) -> bool:
    if cluster.use_gpu != "auto":
        return bool(cluster.use_gpu)
    if cluster.executor == "local":
        return torch.cuda.is_available()
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_bf16(setting: bool | str, use_gpu: bool) -> bool:
    """auto: bf16 where the GPU supports it, fp32 on CPU; true: bf16 (DeepSpeed's CPU
    accelerator runs it too, slowly: meant for checking the bf16 path without a GPU)."""
    if setting == "auto":
        return use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def fit_phase(spec: PhaseSpec, cluster: ClusterConfig, storage_path: str,
              storage_filesystem: Any = None) -> PhaseResult:
    """Train one phase; its `PhaseResult` (stats: the loop's + zero_stage, bf16, timing).

    executor ray: a Train run of its own named `spec.name` (`TrainWorkers` for one phase; a
    pipeline run keeps one `TrainWorkers` for all its phases). storage_path: where Ray Train keeps
    the run's checkpoints (a path every node can reach, or a pyarrow URI such as s3://...);
    calling fit_phase again with a spec of the same name after a run failed or its driver was
    killed resumes it from its last checkpoint. storage_filesystem: a pyarrow.fs.FileSystem that
    storage_path is a path in (Ray Train's RunConfig(storage_filesystem=...)); None for local
    paths and URIs. Progress lines go to the "safeanchor" loggers (rank 0's, printed by the worker).
    """
    if cluster.executor == "local":
        return run_phase(spec, cluster)
    from safeanchor.distributed.workers import TrainWorkers

    with TrainWorkers(spec.name, cluster, storage_path, storage_filesystem) as workers:
        return workers.fit(spec)


def make_trainer(fn: Any, config: dict[str, Any], name: str, cluster: ClusterConfig, use_gpu: bool,
                 storage_path: str, storage_filesystem: Any = None) -> Any:
    """The TorchTrainer of a Train run named `name`: `cluster.num_workers` workers (ScalingConfig
    from ClusterConfig), gloo on CPU / NCCL on GPU, FailureConfig(max_failures), checkpoints kept."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    return TorchTrainer(
        fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name=name, storage_filesystem=storage_filesystem,
            storage_path=storage_path if "://" in str(storage_path) or storage_filesystem is not None
            else os.path.abspath(storage_path),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep),
            # Ray Train's own INFO lines (resources requested, worker group started, process group
            # set up) stay in its log files; the console keeps warnings and rank 0's progress,
            # which goes through the "safeanchor" loggers (workers._serve_worker), not `ray.train`.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def run_phase(spec: PhaseSpec, cluster: ClusterConfig | None = None) -> PhaseResult:
    """The in-process path (executor local): built from the spec, the loop on the torch engine."""
    use_gpu = resolve_use_gpu(cluster) if cluster is not None else False
    built = build(spec)
    batcher = _batcher(built)
    steps = spec.train.num_steps(len(batcher))
    engine = TorchStepEngine(built.model, spec.train, steps, torch.device("cuda" if use_gpu else "cpu"))
    torch.manual_seed(spec.seed)  # dropout etc., as the pipeline's in-process phases
    hooks = make_hooks(built, engine.module)
    stats = run_loop(engine, batches_from(batcher.epoch, len(batcher), 0), steps, spec.train, hooks,
                     tag=spec.tag)
    return result(engine.module, hooks, stats)


def _batcher(built: Built) -> ExampleBatches:
    cfg = built.spec.train
    feats = encode_dataset(built.tokenizer, built.spec.examples, cfg.max_length)
    return ExampleBatches(feats, cfg.batch_size, built.spec.seed, built.tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------
# inside a Ray Train worker
# ------------------------------------------------------------------------------------------


def _train_rank(spec: PhaseSpec, cluster: ClusterConfig, use_gpu: bool, ds: dict | None, rank: int,
                world: int, t_start: float, ckpt: Any = None) -> dict[str, Any]:
    """One phase on this rank (inside a Train worker: `workers._serve_worker`); rank 0's
    {"result": PhaseResult}. ckpt: the Train run's latest checkpoint when the worker group started;
    it resumes this phase only if it is one of this phase's (`_ckpt_name`)."""

    built = build(spec)
    t_built = time.time()
    cfg = spec.train
    check_divisible(cfg.batch_size, world)
    batcher = _batcher(built)
    steps = cfg.num_steps(len(batcher))
    bf16 = False
    if ds is None:  # plain torch (ClusterConfig allows it for one worker only)
        import ray.train.torch

        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        engine: TorchStepEngine | DeepSpeedStepEngine = TorchStepEngine(built.model, cfg, steps, device)
    else:
        bf16 = resolve_bf16(cluster.deepspeed.bf16, use_gpu)
        engine = DeepSpeedStepEngine(built.model, cfg, steps,
                                     engine_config(ds, cfg.batch_size, world, cfg.grad_clip, bf16), use_gpu)
    hooks = make_hooks(built, engine.module)  # after the engine: caches on its device / dtype

    t_engine = time.time()
    # Dropout etc.: a seeded stream per rank (each rank draws its own masks, as DDP does); its
    # state travels in checkpoints, so a restarted phase draws what the interrupted one would have.
    torch.manual_seed(seeds.rank_stream(spec.seed, rank))
    start, losses = 0, []
    if ckpt is not None and _phase_of(ckpt) == spec.name:
        start, losses = _load(engine, ckpt, hooks, rank)
        if rank == 0:
            logger.info(f"  [{spec.tag}] resumed from the checkpoint of step {start}/{steps}")

    def on_step(done: int, losses: list[float]) -> None:
        if cluster.checkpoint_every and done % cluster.checkpoint_every == 0 and done < steps:
            _save(engine, hooks, spec.name, done, losses, rank)

    stats = run_loop(engine, batches_from(batcher.epoch, len(batcher), start), steps, cfg, hooks,
                     rank=rank, world=world, start_step=start, losses=losses, on_step=on_step,
                     tag=spec.tag)
    stats["zero_stage"] = None if ds is None else engine.stage
    stats["bf16"] = bf16
    with engine.final_weights():  # collective (ZeRO-3 gather, bf16 master weights): every rank enters
        # where a worker's time went (epoch seconds for worker_start, so the driver can time the launch)
        stats["timing"] = {"worker_start": t_start, "build_s": t_built - t_start, "engine_s": t_engine - t_built,
                           "end": time.time()}
        return {"result": result(engine.module, hooks, stats)} if rank == 0 else {}


def _node_cores() -> int:
    """CPU cores this worker process may run on (its affinity mask: a container's or taskset's
    limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ckpt_name(phase: str, step: int) -> str:
    """A phase's Train checkpoint directory: the phase's name and the step it was saved at."""
    return f"{phase}-step_{step:08d}"


def _phase_of(ckpt: Any) -> str | None:
    """The phase a Train checkpoint belongs to (None: not one of `_ckpt_name`'s)."""
    base = os.path.basename(str(ckpt.path).rstrip("/"))
    phase, sep, step = base.rpartition("-step_")
    return phase if sep and step.isdigit() else None


def _save(engine: Any, hooks: Any, phase: str, step: int, losses: list[float], rank: int) -> None:
    """Every rank: its part of the engine state; Ray Train merges the parts into one checkpoint."""
    import ray.train

    client = {"step": step, "losses": list(losses), "hooks": hooks_state(hooks)}
    with tempfile.TemporaryDirectory() as d:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, f"{d}/rng_rank{rank}.pt")
        engine.save_checkpoint(d, client)
        ray.train.report({"step": step, "loss": losses[-1]}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=_ckpt_name(phase, step))
    # Reports are registered by the controller asynchronously: without this wait, a worker that
    # dies soon after (measured: 2 steps later) restarts the phase from scratch, not from here.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _load(engine: Any, ckpt: Any, hooks: Any, rank: int) -> tuple[int, list[float]]:
    with ckpt.as_directory() as d:
        rng = torch.load(f"{d}/rng_rank{rank}.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        client = engine.load_checkpoint(d)
    load_hooks_state(hooks, client["hooks"])
    return int(client["step"]), list(client["losses"])
