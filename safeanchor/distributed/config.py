"""Where training steps run: in-process or on Ray (Train workers; SSI on them or on tasks), and the DeepSpeed engine.

`ClusterConfig` is the `cluster:` section of a run's config. The DeepSpeed JSON that the engine
receives is assembled here from three layers, later ones winning:

    1. `cluster.deepspeed.config_file` (e.g. cluster/deepspeed/zero2.json), if given;
    2. the fields of `DeepSpeedConfig` that are set (zero_stage, overlap_comm, bucket sizes);
    3. the keys the training loop owns and always sets: batch sizes (from `train.batch_size` and
       the number of workers), `gradient_clipping` (from `train.grad_clip`), bf16, and
       `zero_allow_untested_optimizer` (the loop's optimiser is torch's AdamW, its schedule
       `safeanchor.train.loop.make_scheduler`; a file that declares `optimizer` or `scheduler`
       is refused, since DeepSpeed would silently replace the loop's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.config import ConfigError, check

#: keys of a DeepSpeed JSON that the training loop sets itself (a config_file may not set them
#: to something else: they would be overwritten, so they are refused to avoid surprises)
LOOP_OWNED_KEYS = ("optimizer", "scheduler", "fp16", "train_batch_size", "train_micro_batch_size_per_gpu",
                   "gradient_accumulation_steps")


@dataclass
class DeepSpeedConfig:
    """The DeepSpeed engine of each Train worker (fp32 + torch AdamW on CPU; bf16 where a GPU has it)."""

    enabled: bool | str = field(default="auto", metadata={"doc": "train through a DeepSpeed engine: auto (when there is something for it to do: several workers, a GPU, a config_file, a zero_stage or bf16 true; a lone CPU worker trains in the plain torch loop, as in-process) | true | false (plain torch loop, one worker only)"})
    zero_stage: int | None = field(default=None, metadata={"doc": "ZeRO stage 0..3 (null: the config_file's stage, else 2); >= 1 shards optimizer state, >= 2 gradients"})
    config_file: str | None = field(default=None, metadata={"doc": "base DeepSpeed JSON (cluster/deepspeed/zero*.json); the fields here and the train config override it"})
    bf16: bool | str = field(default="auto", metadata={"doc": "auto (bf16 where the GPU supports it; fp32 on CPU) | true (also on CPU, through DeepSpeed's CPU accelerator: slow, for checking the bf16 path) | false"})
    overlap_comm: bool | None = field(default=None, metadata={"doc": "overlap gradient reduction with backward (null: file / DeepSpeed default)"})
    reduce_bucket_size: int | None = field(default=None, metadata={"doc": "elements per gradient reduction bucket (null: file / DeepSpeed default 5e8)"})
    allgather_bucket_size: int | None = field(default=None, metadata={"doc": "elements per parameter all-gather bucket, ZeRO-1/2 (null: file / DeepSpeed default 5e8)"})

    def __post_init__(self) -> None:
        check(self.enabled in ("auto", True, False), "enabled", f"must be auto, true or false, got {self.enabled!r}")
        check(self.zero_stage is None or self.zero_stage in (0, 1, 2, 3), "zero_stage",
              f"must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        check(self.bf16 in ("auto", True, False), "bf16", f"must be auto, true or false, got {self.bf16!r}")
        for key in ("reduce_bucket_size", "allgather_bucket_size"):
            v = getattr(self, key)
            check(v is None or v >= 1, key, "must be >= 1")
        if self.config_file is not None:
            self.base_config()  # fail now, at config time, not in a worker

    def base_config(self) -> dict[str, Any]:
        """The config_file's content, checked (empty dict without a file)."""
        if self.config_file is None:
            return {}
        path = Path(self.config_file)
        if not path.is_file():
            raise ConfigError("config_file", f"no such file: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError("config_file", f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(data, dict):
            raise ConfigError("config_file", f"{path}: top level must be an object")
        owned = [k for k in LOOP_OWNED_KEYS if k in data]
        if owned:
            raise ConfigError("config_file", f"{path}: sets {', '.join(owned)}, which the training loop owns "
                              "(torch AdamW + train.* schedule and batch size); remove them")
        stage = data.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2, 3):
            raise ConfigError("config_file", f"{path}: zero_optimization.stage must be 0..3, got {stage!r}")
        return data

    def on(self, num_workers: int, use_gpu: bool) -> bool:
        """Whether Train workers run DeepSpeed. auto: unless it has nothing to do, i.e. one CPU
        worker with no DeepSpeed setting: ZeRO shards nothing across one process, and its
        per-tensor gradient path made the toy run's steps ~25% slower than the torch loop's
        batched one (measured 2026-11-29: 24 s against 18 s for a 54-step phase on 2 cores)."""
        if self.enabled != "auto":
            return bool(self.enabled)
        return (num_workers > 1 or use_gpu or self.config_file is not None or self.zero_stage is not None
                or self.bf16 is True)

    def stage(self) -> int:
        """The effective ZeRO stage: zero_stage, else the file's, else 2."""
        if self.zero_stage is not None:
            return self.zero_stage
        if self.config_file is not None:
            return int(self.base_config().get("zero_optimization", {}).get("stage", 0))
        return 2

    def resolved(self) -> dict[str, Any]:
        """File + set fields (without the loop-owned keys, added per phase by `engine_config`)."""
        data = self.base_config()
        zero = dict(data.get("zero_optimization", {}))
        zero["stage"] = self.stage()
        for key in ("overlap_comm", "reduce_bucket_size", "allgather_bucket_size"):
            v = getattr(self, key)
            if v is not None:
                zero[key] = v
        if zero["stage"] == 3:  # stage 3 has no all-gather bucket of this name
            zero.pop("allgather_bucket_size", None)
        data["zero_optimization"] = zero
        data.setdefault("steps_per_print", 2**31 - 1)  # progress lines come from rank 0 of the loop
        data.setdefault("wall_clock_breakdown", False)
        return data


def engine_config(base: dict[str, Any], batch_size: int, world: int, grad_clip: float, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON of one phase: `base` (from `DeepSpeedConfig.resolved`) + the loop's keys."""
    out = json.loads(json.dumps(base))  # deep copy
    out["train_micro_batch_size_per_gpu"] = max(1, batch_size // world)
    out["gradient_accumulation_steps"] = 1
    out["train_batch_size"] = out["train_micro_batch_size_per_gpu"] * world
    out["gradient_clipping"] = float(grad_clip)
    out["bf16"] = {**out.get("bf16", {}), "enabled": bool(bf16)}
    out["zero_allow_untested_optimizer"] = True  # torch AdamW under ZeRO-1/2/3
    return out


@dataclass
class ClusterConfig:
    """Where a run's steps execute: Ray (Train workers for training phases and SSI; Ray tasks for SSI with ssi_workers) or in-process."""

    executor: str = field(default="ray", metadata={"doc": "ray (Ray Train workers; SSI on them or on Ray tasks) | local (in-process, one worker, no Ray)"})
    address: str | None = field(default=None, metadata={"doc": "Ray address: null starts/attaches a local Ray (RAY_ADDRESS if set); auto inside `ray job submit`"})
    num_workers: int = field(default=1, metadata={"doc": "Ray Train workers of a run (data parallel; started once, they train every phase of the run)"})
    use_gpu: bool | str = field(default="auto", metadata={"doc": "auto (GPUs if the Ray cluster has any) | true | false; backend NCCL on GPU, gloo on CPU"})
    cpus_per_worker: float = field(default=1.0, metadata={"doc": "CPUs reserved by each Train worker (and SSI task, with ssi_workers)"})
    gpus_per_worker: float = field(default=1.0, metadata={"doc": "GPUs per Train worker / SSI task when GPUs are used"})
    resources_per_worker: dict[str, float] = field(default_factory=dict, metadata={"doc": "extra Ray custom resources per Train worker"})
    placement_strategy: str = field(default="PACK", metadata={"doc": "Train workers' placement group strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD (one worker per node)"})
    torch_threads_per_worker: int | None = field(default=None, metadata={"doc": "torch intra-op threads in a Train worker (null: the node's cores shared among the Train workers on it, as torch uses them in-process; at least cpus_per_worker) and an SSI task (null: max(1, cpus_per_worker))"})
    max_failures: int = field(default=2, metadata={"doc": "worker-group restarts over a run's Train workers (Ray Train FailureConfig; -1 = unlimited); a restarted group resumes the phase from its last checkpoint"})
    checkpoint_every: int = field(default=0, metadata={"doc": "optimizer steps between Train checkpoints a restarted phase resumes from (0 = none)"})
    checkpoints_to_keep: int = field(default=2, metadata={"doc": "Train checkpoints kept (the latest ones, over the phases of a run)"})
    ssi_workers: int | None = field(default=None, metadata={"doc": "SSI: null = on the run's Train workers (one shard of the calibration set per worker, no new processes); N = N Ray tasks, one shard each (each loads the model)"})
    ssi_blocks: int = field(default=2, metadata={"doc": "SSI: blocks of LoRA tensors merged in parallel (on the Train workers: block b by rank b mod num_workers; with ssi_workers: one Ray task each); more blocks, less memory per merge"})
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata={"doc": "the DeepSpeed engine of each Train worker"})

    def __post_init__(self) -> None:
        check(self.placement_strategy in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"), "placement_strategy",
              f"must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {self.placement_strategy!r}")
        check(self.executor in ("ray", "local"), "executor", f"must be ray or local, got {self.executor!r}")
        check(self.num_workers >= 1, "num_workers", "must be >= 1")
        check(self.use_gpu in ("auto", True, False), "use_gpu", f"must be auto, true or false, got {self.use_gpu!r}")
        check(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0")
        check(self.gpus_per_worker > 0, "gpus_per_worker", "must be > 0")
        check(all(v >= 0 for v in self.resources_per_worker.values()), "resources_per_worker", "amounts must be >= 0")
        check(not {"CPU", "GPU"} & set(self.resources_per_worker), "resources_per_worker",
              "set CPU / GPU with cpus_per_worker / gpus_per_worker")
        check(self.torch_threads_per_worker is None or self.torch_threads_per_worker >= 1, "torch_threads_per_worker",
              "must be >= 1")
        check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = unlimited)")
        check(self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0")
        check(self.checkpoints_to_keep >= 1, "checkpoints_to_keep", "must be >= 1")
        check(self.ssi_workers is None or self.ssi_workers >= 1, "ssi_workers", "must be null or >= 1")
        check(self.ssi_blocks >= 1, "ssi_blocks", "must be >= 1")
        check(self.executor == "ray" or self.num_workers == 1, "num_workers",
              "the local executor runs one worker; use executor: ray for data parallelism")
        check(self.deepspeed.enabled is not False or self.num_workers == 1, "deepspeed.enabled",
              "data parallelism (num_workers > 1) runs through DeepSpeed; enable it")

    def torch_threads(self, node_cores: int | None = None, local_workers: int = 1) -> int:
        """torch threads of a Train worker (given its node's cores and the Train workers placed on
        that node) or of an SSI task (node_cores None). Ray starts workers with OMP_NUM_THREADS=1,
        so without this a lone worker on a C-core node trains on one thread where the in-process
        executor uses C (measured: the main part of the Ray executor's 2.2x on 2 cores)."""
        if self.torch_threads_per_worker:
            return self.torch_threads_per_worker
        reserved = max(1, int(self.cpus_per_worker))
        if node_cores is None:
            return reserved
        return max(reserved, node_cores // max(1, local_workers))
