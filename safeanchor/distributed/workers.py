"""A run's Ray Train workers, kept alive across its training phases: `TrainWorkers`.

Launching a Ray Train run costs a controller actor, a placement group, worker processes that
import torch / transformers / DeepSpeed, and a process group: measured 16-25 s per phase on
2 cores, paid again for every phase of a run (a SafeAnchor run with corrective replay has a dozen).
`TrainWorkers` launches ONE Train run per pipeline run and feeds it the run's phases:

    driver                            mailbox actor                 Train workers (rank 0..W-1)
    fit(spec) ── post(seq, spec) ──▶  job seq                 ◀──  take(after): the next job
              ◀─ result(seq) ──────  rank 0's PhaseResult    ◀──  put(seq, result)

A job is one phase (`trainer._train_rank`: model, engine and hooks built from the spec, as a
one-phase Train run builds them, and freed after it), so the phases of a run and of separate
Train runs compute the same thing; or one SSI (`TrainWorkers.ssi`, `distributed.ssi.ssi_rank`:
sharded over the ranks, whose factors meet at the rank that merges their block through Ray's
object store, `Exchange`), so SSI needs no task processes and no second copy of the devices. The Train run is named once per pipeline run
(`<run_id>-train`); a phase's Train checkpoints are named `<phase name>-step_<n>`, so a restarted
worker group (FailureConfig) and a restarted driver (a new `TrainWorkers` of the same name under
the same storage: Ray Train restores the run's latest checkpoint) resume the phase that checkpoint
belongs to, and a phase with no checkpoint of its own starts from step 0.

The workers hold their CPUs / GPUs for the whole run: `room_for_task` tells the driver whether a
Ray task (SSI as tasks, `cluster.ssi_workers: N`) can still be scheduled beside them; when not,
the driver closes the workers before the task (and the next phase starts them again).

Errors: a NON_RETRYABLE error in a phase comes back as the phase's result and is raised by
`fit`; a Train run that fails for good (restarts exhausted) is raised by `fit` as well.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any

from safeanchor.distributed.config import ClusterConfig
from safeanchor.train.phase import PhaseResult, PhaseSpec

logger = logging.getLogger(__name__)

#: seconds between the driver's checks that the Train run is still alive while it waits for a phase
POLL_S = 1.0


class Mailbox:
    """The jobs the driver posts and the results rank 0 puts back (a Ray actor, 0 CPUs)."""

    def __init__(self) -> None:
        self.seq = -1
        self.job: Any = None
        self.done: dict[int, Any] = {}  # seq -> result (rank 0's dict)
        self.parts: dict[tuple, dict[int, Any]] = {}  # (group, seq, key) -> rank -> ObjectRef (Exchange)
        self.stopped = False
        self.waiting = 0  # workers blocked in `take` (ready for a job)
        self.cond = asyncio.Condition()

    async def post(self, seq: int, job: Any) -> None:
        async with self.cond:
            self.seq, self.job = seq, job
            self.cond.notify_all()

    async def stop(self) -> None:
        async with self.cond:
            self.stopped = True
            self.cond.notify_all()

    async def take(self, after: int) -> tuple[int, Any] | None:
        """The current job once it is newer than `after` and unfinished; None after stop. A worker
        group restarted mid-phase passes -1 and gets the unfinished phase again."""
        async with self.cond:
            self.waiting += 1
            try:
                await self.cond.wait_for(lambda: self.stopped or (self.seq > after and self.seq not in self.done))
            finally:
                self.waiting -= 1
            return None if self.stopped else (self.seq, self.job)

    async def idle_workers(self) -> int:
        return self.waiting

    async def put(self, seq: int, value: Any) -> None:
        async with self.cond:
            self.done.setdefault(seq, value)  # the first answer wins (rank 0's, or an error)
            self.cond.notify_all()

    async def give(self, key: tuple, rank: int, ref: list) -> None:
        """A rank's part under `key` ([ObjectRef]: wrapped, so Ray hands the reference, not the value)."""
        async with self.cond:
            self.parts.setdefault(key, {})[rank] = ref[0]
            self.cond.notify_all()

    async def take_parts(self, key: tuple, n: int) -> list | None:
        """The `n` ranks' parts under `key` in rank order ([[ObjectRef], ...]), once all are given,
        and forgotten here; None after stop."""
        async with self.cond:
            await self.cond.wait_for(lambda: self.stopped or len(self.parts.get(key, ())) >= n)
            if self.stopped:
                return None
            got = self.parts.pop(key)
            return [[got[r]] for r in sorted(got)]

    async def result(self, seq: int) -> Any:
        async with self.cond:
            await self.cond.wait_for(lambda: seq in self.done)
            out, self.done[seq] = self.done[seq], None  # read once: the actor keeps no adapters
            return out


class TrainWorkers:
    """One Ray Train run (`name`) whose workers train the phases `fit` sends them, started on the
    first `fit` and ended by `close` (also on leaving a `with` block)."""

    def __init__(self, name: str, cluster: ClusterConfig, storage_path: str, storage_filesystem: Any = None):
        self.name, self.cluster = name, cluster
        self.storage_path, self.storage_filesystem = storage_path, storage_filesystem
        self.box: Any = None
        self.thread: threading.Thread | None = None
        self.outcome: dict[str, Any] = {}
        self.seq = -1
        self.launches = 0  # Train runs started (a closed group is started again by the next fit)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.thread is not None

    def start(self) -> None:
        if self.alive:
            return
        import ray

        from safeanchor.distributed.trainer import ensure_ray, make_trainer, resolve_use_gpu

        ensure_ray(self.cluster)
        # "DEFAULT": outside any enclosing placement group (a Tune trial's), on the driver's node
        self.box = ray.remote(Mailbox).options(num_cpus=0, scheduling_strategy="DEFAULT").remote()
        use_gpu = resolve_use_gpu(self.cluster)
        ds_cfg = self.cluster.deepspeed
        ds = ds_cfg.resolved() if ds_cfg.on(self.cluster.num_workers, use_gpu) else None  # files read here
        trainer = make_trainer(_serve_worker, {"box": self.box, "cluster": self.cluster, "use_gpu": use_gpu, "ds": ds},
                               self.name, self.cluster, use_gpu, self.storage_path, self.storage_filesystem)
        self.outcome = {}
        outcome = self.outcome

        def run() -> None:
            try:
                outcome["result"] = trainer.fit()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting driver
                outcome["error"] = e

        self.thread = threading.Thread(target=run, name=f"train-{self.name}", daemon=True)
        self.thread.start()
        self.launches += 1

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Start the workers if needed and wait until every one of them waits for a job (the
        launch done); raises the Train run's error if it ends first, TimeoutError after `timeout`."""
        import ray

        self.start()
        t0 = time.monotonic()
        while ray.get(self.box.idle_workers.remote()) < self.cluster.num_workers:
            if not self.thread.is_alive():
                raise self.outcome.get("error") or RuntimeError(f"Train run {self.name!r} ended during its launch")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the workers of Train run {self.name!r} were not ready within {timeout:.0f}s")
            time.sleep(POLL_S)

    def close(self, timeout: float = 120.0) -> None:
        """Tell the workers to return and wait for the Train run to end."""
        if not self.alive:
            return
        import ray

        thread, self.thread = self.thread, None
        try:
            ray.get(self.box.stop.remote())
        except Exception as e:  # noqa: BLE001 - the run is ending either way
            logger.warning(f"  [train] stopping the workers of {self.name}: {e}")
        thread.join(timeout)
        if thread.is_alive():
            logger.warning(f"  [train] the Train run {self.name} did not end within {timeout:.0f}s; left to Ray")
        ray.kill(self.box)
        self.box = None

    def __enter__(self) -> TrainWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- work ------------------------------------------------------------------------------
    def fit(self, spec: PhaseSpec) -> PhaseResult:
        """Train one phase on the workers (starting them if needed); its `PhaseResult`."""
        return self._run(spec, f"phase {spec.name!r}")

    def ssi(self, work: Any) -> dict:
        """SSI on the workers (`distributed.ssi.SSIWork`; starting them if needed): name -> Subspace."""
        return self._run(work, "SSI")

    def _run(self, job: Any, what: str) -> Any:
        import ray

        self.start()
        self.seq += 1
        seq = self.seq
        ray.get(self.box.post.remote(seq, job))
        ref = self.box.result.remote(seq)
        while True:
            ready, _ = ray.wait([ref], timeout=POLL_S)
            if ready:
                out = ray.get(ref)
                break
            if not self.thread.is_alive():  # the Train run ended without answering: its error
                self.thread = None
                ray.kill(self.box)  # nothing will read it; the next fit starts afresh
                self.box = None
                err = self.outcome.get("error")
                if err is not None:
                    raise err
                raise RuntimeError(f"Train run {self.name!r} ended before {what} returned")
        if not isinstance(out, dict):
            raise RuntimeError(f"{what} returned no result from rank 0: {out!r}")
        if "error" in out:
            raise out["error"]
        return out["result"]

    def room_for_task(self) -> bool:
        """Whether the cluster holds these workers AND one more task of a worker's resources (an
        SSI task's, with `cluster.ssi_workers` set: `distributed.ssi`); when not, such a task would wait for resources the workers
        never release. Judged on the cluster's totals, so the answer does not depend on timing."""
        import ray

        from safeanchor.distributed.trainer import resolve_use_gpu

        total, c = ray.cluster_resources(), self.cluster
        gpus = c.gpus_per_worker if resolve_use_gpu(c) else 0.0
        return (total.get("CPU", 0.0) >= (c.num_workers + 1) * c.cpus_per_worker
                and total.get("GPU", 0.0) >= (c.num_workers + 1) * gpus)


class Exchange:
    """What one SSI job's ranks hand each other (`distributed.ssi.ssi_rank`), through Ray's object
    store: `give(key, obj)` puts this rank's part, `take(key)` waits for every rank's part under
    `key` and returns them in rank order. Keys carry the worker group's token, so the parts of a
    group that died mid-SSI are never mixed with its restarted group's."""

    def __init__(self, box: Any, group: str, seq: int, rank: int, world: int) -> None:
        self.box, self.group, self.seq, self.rank, self.world = box, group, seq, rank, world

    def give(self, key: Any, obj: Any) -> None:
        import ray

        ray.get(self.box.give.remote((self.group, self.seq, key), self.rank, [ray.put(obj)]))

    def take(self, key: Any) -> list:
        import ray

        refs = ray.get(self.box.take_parts.remote((self.group, self.seq, key), self.world))
        if refs is None:
            raise RuntimeError("the run's Train workers were stopped during SSI")
        return ray.get([r[0] for r in refs])


def _group_token(world: int) -> str:
    """A token shared by this worker group's ranks (rank 0's, broadcast), new for each restart."""
    token = [uuid.uuid4().hex]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(token, src=0)
    return token[0]


def _serve_worker(config: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: phases and SSI jobs from the mailbox until it says stop."""
    import gc

    import ray
    import ray.train
    import ray.train.torch
    import torch

    from safeanchor import logs
    from safeanchor.distributed.ssi import SSIWork, ssi_rank
    from safeanchor.distributed.trainer import NON_RETRYABLE, _node_cores, _train_rank

    logs.setup()
    # Ray forwards a worker's console line by line, each redraw of a progress bar as a line of its
    # own, and a worker loads its model for every phase: transformers' (and the hub's) bars off here.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cluster: ClusterConfig = config["cluster"]
    torch.set_num_threads(cluster.torch_threads(_node_cores(), ctx.get_local_world_size()))
    box, ds, use_gpu = config["box"], config["ds"], config["use_gpu"]
    group = _group_token(world)
    # the run's latest checkpoint when this group started: it resumes the phase it belongs to
    ckpt = ray.train.get_checkpoint()
    after = -1
    while True:
        job = ray.get(box.take.remote(after))
        if job is None:
            return None
        seq, spec = job
        try:
            if isinstance(spec, SSIWork):
                device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
                out = {"result": ssi_rank(spec, rank, world, device, Exchange(box, group, seq, rank, world))}
            else:
                out = _train_rank(spec, cluster, use_gpu, ds, rank, world, time.time(), ckpt)
        except NON_RETRYABLE as e:
            out = {"error": e}
        if rank == 0 or "error" in out:
            ray.get(box.put.remote(seq, out))
        after = seq
        del out
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
