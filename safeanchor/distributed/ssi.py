"""Safety-subspace identification (ALGORITHMS.md §1) as Ray tasks: shard the examples, merge per block.

For one LoRA tensor θ (flattened, n) and N calibration examples split into shards s:

    G  = [G_1; G_2; ...]              (N, n) per-example gradients, G_s (N_s, n) on shard s
    R_s with R_sᵀ R_s = G_sᵀ G_s       the shard's factor, float32: G_s itself when n > N_s
                                       (nothing smaller is exact), else diag(√λ)Wᵀ of the n×n
                                       moment G_sᵀG_s = W diag(λ) Wᵀ (at most n rows)
    GᵀG = Σ_s G_sᵀ G_s = MᵀM           with M = [R_1; R_2; ...]   (Σ r_s, n)

so `rows_subspace(M, N)` gives exactly the eigenpairs of F = GᵀG / N that `fisher_subspace`
computes from the whole G, and the trace Σ_s ‖G_s‖²_F / N (shipped exactly, as a float64 scalar).
Shard tasks send (R_s, ‖G_s‖²) per tensor — min(N_s, n)·n float32 numbers, never float64 and
never more than the shard's gradients; one merge task per block of tensors runs the eigh and the
rank selection (`select_rank`: ρ, k_max, k_fixed) for its tensors, in parallel.

A shard task streams (`safeanchor.ssi.stream_fisher_rows`): block by block, the block's tensors in
groups under `SSIJob.group_mb`, one pass over the shard's examples per group; it is a generator that
yields each block's factors as soon as the block is done (Ray stores each yielded return value at
once and the task frees it), so a shard holds one block's factors + one group's rows at a time.

Where it runs (`identify_subspaces`, the one dispatch):

- executor local: in this process, streaming (`safeanchor.ssi.safety_subspaces`).
- executor ray, `cluster.ssi_workers: null` (the default): on the run's Ray Train workers
  (`safeanchor.distributed.workers.TrainWorkers`), warm processes that already hold the devices:
  rank r computes the factors of shard r (one shard per worker), and block b is merged by rank
  b mod W from every shard's factors (handed over through Ray's object store and the workers'
  mailbox, `ssi_rank`), so no process ever holds the rows of every tensor; one worker alone
  computes the whole set as executor local does.
- executor ray, `cluster.ssi_workers: N`: N shard tasks and `cluster.ssi_blocks` merge tasks
  (more SSI parallelism than training has workers; each task loads the model).

Every shard loads the model from the job's data (`ModelSpec` + the adapter's bytes: the peft
model at θ_{t-1}), as a training worker does (`safeanchor.train.phase`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from safeanchor.config import ConfigError
from safeanchor.distributed.config import ClusterConfig
from safeanchor.distributed.trainer import ensure_ray, resolve_use_gpu
from safeanchor.ssi import DEFAULT_GROUP_MB, lora_sizes, safety_subspaces, stream_fisher_rows
from safeanchor.subspace.fisher import Subspace, plan_groups, rows_subspace
from safeanchor.train.phase import ModelSpec, load_peft_model

logger = logging.getLogger(__name__)


@dataclass
class SSIJob:
    """What SSI needs: the model (by reference + adapter bytes, as for a phase) and the
    calibration examples."""

    model: ModelSpec
    adapter: bytes  # the adapter "default" at θ_{t-1} (safetensors)
    examples: list  # list[ChatExample]: safe responses (the calibration set)
    max_length: int = 96  # tokens per example (prompt + response), truncated on the right
    chunk: int = 16  # examples per vmap chunk of the per-example gradients
    group_mb: float = DEFAULT_GROUP_MB  # MiB of gradient rows per group of tensors (one pass each)


@dataclass
class SSIWork:
    """SSI as a job for the run's Train workers (`TrainWorkers.ssi`): the job and the rank rule."""

    job: SSIJob
    rho: float | None
    k_max: int
    k_fixed: int | None = None
    eps: float = 0.0
    blocks: int = 1  # blocks of LoRA tensors, merged by rank b mod W


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) ranges, sizes differing by at most one; no empty shard."""
    shards = min(shards, n)
    base, extra = divmod(n, shards)
    out, lo = [], 0
    for s in range(shards):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def assign_blocks(sizes: list[tuple[str, int]], blocks: int) -> list[list[str]]:
    """Greedy balance of tensors by numel over `blocks` lists (deterministic: same on every shard)."""
    out: list[list[str]] = [[] for _ in range(min(blocks, len(sizes)))]
    load = [0] * len(out)
    for name, n in sorted(sizes, key=lambda t: -t[1]):
        b = min(range(len(out)), key=lambda i: (load[i], i))
        out[b].append(name)
        load[b] += n
    return out


def iter_shard_factors(model: Any, tokenizer: Any, examples: list, max_length: int, chunk: int, blocks: int,
                       group_mb: float = DEFAULT_GROUP_MB) -> Iterator[dict[str, Any]]:
    """One shard, streamed: for each block (`assign_blocks`, the same on every shard) a dict
    {"N": N_s, "order": [all names], "tensors": {name: (R (r, n) float32 on CPU, ‖G_s‖²_F)}},
    yielded as soon as the block's tensors are done (R: `FisherRows.factor`)."""
    from safeanchor.data import collate, encode_dataset

    batch = collate(encode_dataset(tokenizer, examples, max_length), tokenizer.pad_token_id)
    sizes = lora_sizes(model)
    order = [n for n, _ in sizes]
    n_s = len(examples)
    for names in assign_blocks(sizes, blocks):
        mine = set(names)
        groups = plan_groups([(n, k) for n, k in sizes if n in mine], n_s, group_mb * 2**20)
        tensors = {}
        for acc in stream_fisher_rows(model, batch, groups, chunk):
            for name, rows in acc.items():
                tensors[name] = (rows.factor().cpu(), rows.sq_norm())
            del acc, rows  # before the next group's pass
        yield {"N": n_s, "order": order, "tensors": {n: tensors[n] for n in names}}


def shard_factors(model: Any, tokenizer: Any, examples: list, max_length: int, chunk: int, blocks: int,
                  group_mb: float = DEFAULT_GROUP_MB) -> list[dict[str, Any]]:
    """`iter_shard_factors` as a list (one dict per block)."""
    return list(iter_shard_factors(model, tokenizer, examples, max_length, chunk, blocks, group_mb))


def merge_block(parts: list[dict[str, Any]], rho: float | None, k_max: int, k_fixed: int | None = None,
                eps: float = 0.0) -> dict[str, Subspace]:
    """The exact Fisher eigenpairs of one block's tensors from every shard's factors."""
    N = sum(p["N"] for p in parts)
    out = {}
    for name in parts[0]["tensors"]:
        rows = [p["tensors"][name] for p in parts]
        trace = sum(sq for _, sq in rows) / N
        M = torch.cat([R for R, _ in rows])  # (Σ r_s, n) float32
        out[name] = rows_subspace(M, N, rho, k_max, k_fixed, eps, trace=trace)
    return out


def identify_subspaces(job: SSIJob, cluster: ClusterConfig, rho: float | None, k_max: int,
                       k_fixed: int | None = None, eps: float = 0.0, model: Any = None,
                       tokenizer: Any = None, workers: Any = None) -> dict[str, Subspace]:
    """name -> Subspace for every LoRA tensor, in the model's parameter order. The one place
    that chooses where SSI runs (module docstring):

    executor local: `safety_subspaces` in this process, on `model` / `tokenizer` when given (the
    live model at θ_{t-1}), else loaded from the job;
    executor ray, `cluster.ssi_workers` null: on `workers` (the run's `TrainWorkers`; when None, a
    Train run started for this call alone, its run state under a temporary directory of this node);
    executor ray, `cluster.ssi_workers` N: N shard tasks, then `cluster.ssi_blocks` merge tasks
    (when `workers` hold the cluster so that no task fits beside them, they are ended first and
    the next phase starts them again).
    """
    if not job.examples:
        raise ConfigError("data.safety_calib", "SSI needs at least one calibration example")
    if cluster.executor == "local":
        if model is None:
            model, tokenizer = load_peft_model(job.model, job.adapter)
        return safety_subspaces(model, tokenizer, job.examples, job.max_length, rho, k_max, k_fixed,
                                chunk=job.chunk, eps=eps, group_mb=job.group_mb)
    if cluster.ssi_workers is None:
        work = SSIWork(job, rho, k_max, k_fixed, eps, cluster.ssi_blocks)
        if workers is not None:
            return workers.ssi(work)
        import tempfile
        import uuid

        from safeanchor.distributed.workers import TrainWorkers

        with tempfile.TemporaryDirectory(prefix="safeanchor-ssi-") as tmp, \
                TrainWorkers(f"ssi-{uuid.uuid4().hex[:8]}", cluster, tmp) as one_off:
            return one_off.ssi(work)
    if workers is not None and workers.alive and not workers.room_for_task():
        logger.info("  [ssi] no room for an SSI task beside the run's Train workers: ending them "
                    "(the next phase starts them again)")
        workers.close()
    return _ssi_tasks(job, cluster, rho, k_max, k_fixed, eps)


def _ssi_tasks(job: SSIJob, cluster: ClusterConfig, rho: float | None, k_max: int, k_fixed: int | None,
               eps: float) -> dict[str, Subspace]:
    import ray

    ensure_ray(cluster)
    use_gpu = resolve_use_gpu(cluster)
    # "DEFAULT": never inside an enclosing placement group (a Ray Tune trial's, which reserves only
    # the trial's own CPU: SSI inside a sweep trial takes its CPUs from the cluster, as Train does)
    opts = {"num_cpus": cluster.cpus_per_worker, "num_gpus": cluster.gpus_per_worker if use_gpu else 0,
            "scheduling_strategy": "DEFAULT"}
    bounds = shard_bounds(len(job.examples), cluster.ssi_workers)
    blocks = cluster.ssi_blocks
    shard_task = ray.remote(_shard_task).options(num_returns=blocks, **opts)
    refs = [shard_task.remote(job, job.examples[lo:hi], blocks, cluster.torch_threads(), use_gpu)
            for lo, hi in bounds]
    if blocks == 1:
        refs = [[r] for r in refs]
    merge = ray.remote(_merge_task).options(num_cpus=cluster.cpus_per_worker, scheduling_strategy="DEFAULT")
    merged = ray.get([merge.remote(rho, k_max, k_fixed, eps, *[r[b] for r in refs]) for b in range(blocks)])
    order = merged[0][0]
    out: dict[str, Subspace] = {}
    for _, part in merged:
        out.update(part)
    logger.info(f"  [ssi] {len(out)} tensors from {len(bounds)} shard tasks x {blocks} blocks, "
                f"k = {sum(s.k for s in out.values())} in total")
    return {n: out[n] for n in order}


def ssi_rank(work: SSIWork, rank: int, world: int, device: Any, exchange: Any) -> dict[str, Subspace] | None:
    """SSI on Train worker `rank` of `world` (`workers._serve_worker`); rank 0 returns every
    tensor's subspace in the model's parameter order, the other ranks None.

    world 1: the whole calibration set here (`safety_subspaces`, what executor local computes).
    world W > 1: this rank's shard (`shard_bounds(N, W)[rank]`; none when N < W) gives every
    block's factors, each handed to `exchange.give(block, part)`; then rank r merges the blocks
    b ≡ r (mod W) from `exchange.take(block)` (one part per rank) and gives its subspaces as
    block "merged", which rank 0 takes and joins. `exchange` (`workers.Exchange`) carries them
    through Ray's object store: a block's parts exist only until their merge."""
    job = work.job
    model, tokenizer = load_peft_model(job.model, job.adapter)
    model = model.to(device)
    if world == 1:
        return safety_subspaces(model, tokenizer, job.examples, job.max_length, work.rho, work.k_max, work.k_fixed,
                                chunk=job.chunk, eps=work.eps, group_mb=job.group_mb)
    sizes = lora_sizes(model)
    order = [n for n, _ in sizes]
    blocks = len(assign_blocks(sizes, work.blocks))
    bounds = shard_bounds(len(job.examples), world)
    if rank < len(bounds):
        lo, hi = bounds[rank]
        parts = iter_shard_factors(model, tokenizer, job.examples[lo:hi], job.max_length, job.chunk, work.blocks,
                                   job.group_mb)
    else:  # fewer examples than workers: this rank has no shard
        parts = iter({"N": 0, "order": order, "tensors": {}} for _ in range(blocks))
    for b, part in enumerate(parts):
        exchange.give(b, part)
        del part
    del model
    mine: dict[str, Subspace] = {}
    for b in range(rank, blocks, world):
        got = [p for p in exchange.take(b) if p["N"] > 0]
        mine.update(merge_block(got, work.rho, work.k_max, work.k_fixed, work.eps))
        del got
    exchange.give("merged", mine)
    if rank != 0:
        return None
    out: dict[str, Subspace] = {}
    for part in exchange.take("merged"):
        out.update(part)
    logger.info(f"  [ssi] {len(out)} tensors from {len(bounds)} shards on the Train workers x {blocks} blocks, "
                f"k = {sum(s.k for s in out.values())} in total")
    return {n: out[n] for n in order}


def _shard_task(job: SSIJob, examples: list, blocks: int, threads: int, use_gpu: bool) -> Iterator[dict]:
    """A generator with num_returns = blocks: Ray stores each block's factors as it is yielded."""
    torch.set_num_threads(threads)
    model, tokenizer = load_peft_model(job.model, job.adapter)
    model = model.to("cuda") if use_gpu else model
    done = 0
    for part in iter_shard_factors(model, tokenizer, examples, job.max_length, job.chunk, blocks, job.group_mb):
        yield part
        done += 1
    order = [n for n, _ in lora_sizes(model)]
    for _ in range(blocks - done):  # more blocks than tensors: empty ones
        yield {"N": len(examples), "order": order, "tensors": {}}


def _merge_task(rho: float | None, k_max: int, k_fixed: int | None, eps: float,
                *parts: dict) -> tuple[list[str], dict[str, Subspace]]:
    return parts[0]["order"], merge_block(list(parts), rho, k_max, k_fixed, eps)
