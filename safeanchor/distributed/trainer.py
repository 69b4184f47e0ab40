"""One training phase on Ray Train workers (DeepSpeed engine) or in-process: `fit_phase`.

The contract with the pipeline
------------------------------
A phase is described by a `PhaseJob`: an importable builder "pkg.module:function" plus
picklable `args`. EVERY process that trains (each Ray Train worker; the driver itself under
`executor: local`) calls `builder(args)` and gets a `PhaseSetup`:

    model        peft model with the LoRA adapter trainable (requires_grad) and everything else
                 frozen, fp32, on CPU (the engine moves it); identical in every process (seeded)
    tokenizer    its tokenizer (pad_token_id set)
    hooks        the phase's StepHooks (`method.phase_hooks(ctx, phase)`) or None; its
                 `needs_full_grad` attribute (default False) is read by the engine
    examples     list[ChatExample] to train on
    cfg          safeanchor.train.loop.TrainConfig
    seed, tag    batch order seed (as in train_examples) and the name in progress lines
    save         save(model, hooks, out_dir) -> dict, called on rank 0 only after the last step
                 (model = the trained peft model; out_dir = PhaseJob.out_dir); it writes the
                 adapter etc. to out_dir and returns small picklable values WITHOUT torch tensors
                 (Ray Train refuses tensors in a worker's return value); that dict becomes
                 fit_phase's result, plus "stats" (the train stats)
    phase_state  () -> picklable: the state the hooks change during the phase (counters,
                 statistics; e.g. the method's packed state_dict()), saved in every checkpoint;
                 None if there is none
    load_phase_state  (that value) -> None: puts a checkpoint's phase state back into the hooks
                 of a restarted worker (before its first step); None if there is none

The builder must be deterministic (same model, hooks and examples in every process), must not
read state that only the driver has, and must not start training. out_dir must be reachable by
rank 0 (a local path on one machine; shared storage on a cluster).

What fit_phase does
-------------------
executor ray: a `TorchTrainer` with `num_workers` workers (ScalingConfig from ClusterConfig),
gloo on CPU / NCCL on GPU, RunConfig(storage_path, name, FailureConfig(max_failures)). Each
worker runs `safeanchor.distributed.engine.run_loop` on a DeepSpeed engine: the global batch of
step s is the single-process batch, each rank trains on its 1/W share. Every
`checkpoint_every` steps all ranks save the DeepSpeed engine state (trainable tensors, their
ZeRO optimizer partition, LambdaLR, step, losses, phase state, each rank's RNG state) and
report it; ZeRO-1/2 shard
the optimizer state, so every rank contributes its own files and Ray Train merges them into one
checkpoint directory; the workers wait until Ray Train has committed it (otherwise a worker
that dies a few steps later restarts the phase from scratch: measured). A restarted worker
group (FailureConfig) resumes from the latest one, with the same number of workers. Errors that a restart would only repeat (ConfigError, DataError,
NonFiniteLoss) are returned by the workers and re-raised here, without restarts.

executor local: the same loop in this process on the plain torch engine (world size 1;
DeepSpeed runs only in Train workers), which is run_steps exactly; no checkpoints.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from safeanchor.config import ConfigError
from safeanchor.data import DataError, ExampleBatches, encode_dataset
from safeanchor.distributed.config import ClusterConfig, engine_config
from safeanchor.distributed.engine import (
    DeepSpeedStepEngine,
    TorchStepEngine,
    batches_from,
    check_divisible,
    refuse_full_grad,
    run_loop,
)
from safeanchor.train.loop import NonFiniteLoss, TrainConfig

#: errors that a worker-group restart would only repeat: returned by workers, raised by fit_phase
NON_RETRYABLE = (ConfigError, DataError, NonFiniteLoss)
CKPT_TAG = "phase"


@dataclass
class PhaseSetup:
    """What a builder returns in each training process (see the module docstring)."""

    model: Any
    tokenizer: Any
    hooks: Any
    examples: list
    cfg: TrainConfig
    seed: int
    tag: str = "train"
    save: Callable[[Any, Any, str | None], dict] | None = None
    phase_state: Callable[[], Any] | None = None
    load_phase_state: Callable[[Any], None] | None = None


@dataclass
class PhaseJob:
    """A training phase by reference: `builder(args) -> PhaseSetup` runs in every worker."""

    builder: str  # "pkg.module:function", importable in every Ray worker (not a test file)
    args: Any = None  # picklable
    out_dir: str | None = None  # given to setup.save on rank 0


def load_builder(ref: str) -> Callable[[Any], PhaseSetup]:
    """Resolve "pkg.module:function" (errors name the job field)."""
    mod, sep, fn = ref.partition(":")
    if not sep or not mod or not fn:
        raise ConfigError("builder", f"expected 'pkg.module:function', got {ref!r}")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise ConfigError("builder", f"cannot import {ref!r}: {e}") from None
    if not callable(obj):
        raise ConfigError("builder", f"{ref!r} is not callable")
    return obj


def ensure_ray(cluster: ClusterConfig) -> None:
    """Attach to / start Ray unless this process already did (tests start their own)."""
    import ray

    # Ray Train's PreemptionWatcher (an actor that watches for node drains) prints a core_worker
    # error line on every phase ("... constructor arguments in the object store and max_restarts
    # > 0"). Off unless the user sets the variable: a drained node's workers fail, and the phase
    # restarts from its last checkpoint (cluster.max_failures). Ray Train passes the driver's
    # value on to its controller, in a local Ray and in a `ray job submit` job alike.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if not ray.is_initialized():
        ray.init(address=cluster.address)
        # Helper processes Ray Train starts (e.g. its PlacementGroupCleaner) attach with a bare
        # ray.init(): point them at THIS instance, or they fail when several run on one machine.
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


def resolve_use_gpu(cluster: ClusterConfig) -> bool:
    if cluster.use_gpu != "auto":
        return bool(cluster.use_gpu)
    if cluster.executor == "local":
        return torch.cuda.is_available()
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_bf16(setting: bool | str, use_gpu: bool) -> bool:
    if setting == "auto":
        return use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if setting and not use_gpu:
        raise ConfigError("cluster.deepspeed.bf16", "bf16 needs a GPU here (CPU training is fp32); use auto or false")
    return bool(setting)


def fit_phase(
    job: PhaseJob,
    cluster: ClusterConfig,
    storage_path: str,
    name: str | None = None,
    log: Callable[[str], None] | None = print,
    storage_filesystem: Any = None,
) -> dict[str, Any]:
    """Train one phase; returns setup.save(...)'s dict plus "stats" (run_steps' stats + world_size,
    resumed_from_step, zero_stage, timing).

    storage_path: where Ray Train keeps the run's checkpoints (a path every node can reach, or a
    pyarrow URI such as s3://...). name: the Train run's name (default: "phase-" + a random
    suffix); calling fit_phase again with the name of a run that failed resumes it from its last
    checkpoint (measured), which lets a restarted driver continue an interrupted phase.
    log: progress lines of the in-process path (on Ray, rank 0 logs through Ray Train's logger).
    storage_filesystem: a pyarrow.fs.FileSystem that storage_path is a path in (Ray Train's
    RunConfig(storage_filesystem=...)); None for local paths and URIs.
    """
    load_builder(job.builder)  # a typo fails here, not in every worker
    if cluster.executor == "local":
        setup = load_builder(job.builder)(job.args)
        return run_phase(setup, cluster, job.out_dir, log=log)

    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(cluster)
    use_gpu = resolve_use_gpu(cluster)
    resources = {"CPU": cluster.cpus_per_worker, **cluster.resources_per_worker}
    if use_gpu:
        resources["GPU"] = cluster.gpus_per_worker
    ds = cluster.deepspeed.resolved() if cluster.deepspeed.enabled else None
    run_name = name or f"phase-{uuid.uuid4().hex[:12]}"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"job": job, "cluster": cluster, "use_gpu": use_gpu, "ds": ds},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cluster.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_filesystem=storage_filesystem,
            storage_path=storage_path if "://" in str(storage_path) or storage_filesystem is not None
            else os.path.abspath(storage_path),
            failure_config=FailureConfig(max_failures=cluster.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cluster.checkpoints_to_keep),
            # Ray Train's own INFO lines (resources requested, worker group started, process group
            # set up) stay in its log files; the console keeps warnings and rank 0's progress,
            # which goes through the root logger (_worker_log), not `ray.train`.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    out = trainer.fit().return_value
    if not isinstance(out, dict):
        raise RuntimeError(f"Train run {run_name!r} returned no result from rank 0: {out!r}")
    if "error" in out:
        raise out["error"]
    return out["result"]


def run_phase(setup: PhaseSetup, cluster: ClusterConfig | None = None, out_dir: str | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """The in-process path (executor local): the loop on the torch engine, world size 1."""
    use_gpu = resolve_use_gpu(cluster) if cluster is not None else False
    device = torch.device("cuda" if use_gpu else "cpu")
    cfg = setup.cfg
    batcher = _batcher(setup)
    steps = cfg.num_steps(len(batcher))
    engine = TorchStepEngine(setup.model, cfg, steps, device)
    stats = run_loop(engine, batches_from(batcher.epoch, len(batcher), 0), steps, cfg, setup.hooks,
                     log=log, tag=setup.tag)
    saved = setup.save(engine.module, setup.hooks, out_dir) if setup.save is not None else {}
    return _result(saved, stats)


def _batcher(setup: PhaseSetup) -> ExampleBatches:
    feats = encode_dataset(setup.tokenizer, setup.examples, setup.cfg.max_length)
    return ExampleBatches(feats, setup.cfg.batch_size, setup.seed, setup.tokenizer.pad_token_id)


def _result(saved: dict | None, stats: dict) -> dict[str, Any]:
    saved = dict(saved or {})
    if "stats" in saved:
        raise ConfigError("PhaseSetup.save", "returned a 'stats' key, which fit_phase reserves for the train stats")
    if _has_tensor(saved):
        raise ConfigError("PhaseSetup.save", "returned torch tensors, which Ray Train cannot return from a worker; "
                          "write them to out_dir and return paths / plain values")
    saved["stats"] = stats
    return saved


def _has_tensor(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, dict):
        return any(_has_tensor(v) for v in x.values())
    if isinstance(x, (list, tuple, set)):
        return any(_has_tensor(v) for v in x)
    return False


# ------------------------------------------------------------------------------------------
# inside a Ray Train worker
# ------------------------------------------------------------------------------------------


def _train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's train_loop_per_worker (importable from the package, as Ray workers need)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cluster: ClusterConfig = config["cluster"]
    torch.set_num_threads(cluster.torch_threads())
    try:
        out = _train_rank(config["job"], cluster, config["use_gpu"], config["ds"], rank, world, time.time())
    except NON_RETRYABLE as e:
        return {"error": e}
    return out if rank == 0 else None


def _train_rank(job: PhaseJob, cluster: ClusterConfig, use_gpu: bool, ds: dict | None, rank: int,
                world: int, t_start: float) -> dict[str, Any]:
    import ray.train

    setup = load_builder(job.builder)(job.args)
    t_built = time.time()
    cfg = setup.cfg
    check_divisible(cfg.batch_size, world)
    batcher = _batcher(setup)
    steps = cfg.num_steps(len(batcher))
    if ds is None:  # plain torch (ClusterConfig allows it for one worker only)
        refuse_full_grad(setup.hooks, None)
        import ray.train.torch

        device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        engine: TorchStepEngine | DeepSpeedStepEngine = TorchStepEngine(setup.model, cfg, steps, device)
    else:
        refuse_full_grad(setup.hooks, int(ds["zero_optimization"]["stage"]))
        bf16 = resolve_bf16(cluster.deepspeed.bf16, use_gpu)
        engine = DeepSpeedStepEngine(setup.model, cfg, steps,
                                     engine_config(ds, cfg.batch_size, world, cfg.grad_clip, bf16), use_gpu)

    t_engine = time.time()
    # Dropout etc.: a seeded stream per rank (each rank draws its own masks, as DDP does); its
    # state travels in checkpoints, so a restarted phase draws what the interrupted one would have.
    torch.manual_seed(setup.seed * 1_000_003 + rank)
    start, losses = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        start, losses = _load(engine, ckpt, setup, rank)
        if rank == 0:
            _worker_log(f"  [{setup.tag}] resumed from the checkpoint of step {start}/{steps}")

    def on_step(done: int, losses: list[float]) -> None:
        if cluster.checkpoint_every and done % cluster.checkpoint_every == 0 and done < steps:
            _save(engine, setup, done, losses, rank)

    stats = run_loop(engine, batches_from(batcher.epoch, len(batcher), start), steps, cfg, setup.hooks,
                     rank=rank, world=world, start_step=start, losses=losses, on_step=on_step,
                     log=_worker_log if rank == 0 else None, tag=setup.tag)
    stats["zero_stage"] = None if ds is None else engine.stage
    with _gathered(engine):  # collective under ZeRO-3: every rank enters
        saved = setup.save(engine.module, setup.hooks, job.out_dir) if rank == 0 and setup.save else {}
    # where a worker's time went (epoch seconds for worker_start, so the driver can time the launch)
    stats["timing"] = {"worker_start": t_start, "build_s": t_built - t_start, "engine_s": t_engine - t_built,
                       "end": time.time()}
    return {"result": _result(saved, stats)} if rank == 0 else {}


def _worker_log(msg: str) -> None:
    # Ray Train patches print() in workers to tee into its logger, which shows every line twice
    # on the driver; its logger alone shows it once.
    logging.getLogger().info(msg)


def _gathered(engine: Any):
    if isinstance(engine, DeepSpeedStepEngine) and engine.stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(engine.params, modifier_rank=None)
    return nullcontext()


def _save(engine: Any, setup: PhaseSetup, step: int, losses: list[float], rank: int) -> None:
    """Every rank: its part of the engine state; Ray Train merges the parts into one checkpoint."""
    import ray.train

    client = {"step": step, "losses": list(losses),
              "phase_state": setup.phase_state() if setup.phase_state is not None else None}
    with tempfile.TemporaryDirectory() as d:
        rng = {"cpu": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, f"{d}/rng_rank{rank}.pt")
        if isinstance(engine, DeepSpeedStepEngine):
            engine.engine.save_checkpoint(d, tag=CKPT_TAG, client_state=client, exclude_frozen_parameters=True)
        else:
            trainable = {n: p.detach().cpu() for n, p in engine.module.named_parameters() if p.requires_grad}
            torch.save({"module": trainable, "optimizer": engine.opt.state_dict(),
                        "scheduler": engine.sched.state_dict(), **client}, f"{d}/torch_state.pt")
        ray.train.report({"step": step, "loss": losses[-1]}, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"step_{step:08d}")
    # Reports are registered by the controller asynchronously: without this wait, a worker that
    # dies soon after (measured: 2 steps later) restarts the phase from scratch, not from here.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)


def _load(engine: Any, ckpt: Any, setup: PhaseSetup, rank: int) -> tuple[int, list[float]]:
    with ckpt.as_directory() as d:
        rng = torch.load(f"{d}/rng_rank{rank}.pt", weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if isinstance(engine, DeepSpeedStepEngine):
            path, client = engine.engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False,
                                                         load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None or client is None:
                raise RuntimeError(f"checkpoint {d} holds no DeepSpeed state under tag {CKPT_TAG!r}")
        else:
            client = torch.load(f"{d}/torch_state.pt", weights_only=False)
            params = dict(engine.module.named_parameters())
            with torch.no_grad():
                for n, t in client["module"].items():
                    params[n].copy_(t)
            engine.opt.load_state_dict(client["optimizer"])
            engine.sched.load_state_dict(client["scheduler"])
    if setup.load_phase_state is not None and client.get("phase_state") is not None:
        setup.load_phase_state(client["phase_state"])
    return int(client["step"]), list(client["losses"])
