"""Safety-subspace identification (ALGORITHMS.md §1) as Ray tasks: shard the examples, merge per block.

For one LoRA tensor θ (flattened, n) and N calibration examples split into shards s:

    G  = [G_1; G_2; ...]              (N, n) per-example gradients, G_s (N_s, n) on shard s
    G_s = U_s S_s V_sᵀ                 thin SVD on the shard's task (r_s = min(N_s, n))
    GᵀG = Σ_s G_sᵀ G_s = Σ_s V_s S_s² V_sᵀ = MᵀM   with M = [S_1 V_1ᵀ; S_2 V_2ᵀ; ...]  (Σ r_s, n)

so the thin SVD of M / √N has exactly the singular values and right singular vectors of G / √N:
the eigenpairs of F = GᵀG / N that `fisher_subspace` computes from the whole G, and the trace
Σ_s ‖G_s‖²_F / N. Shard tasks send (S_s, V_sᵀ) and ‖G_s‖², never the raw per-example gradients
(nor U_s, which the Fisher does not need); one merge task per block of tensors runs the second
SVD and the rank selection (`select_rank`: ρ, k_max, k_fixed) for its tensors, in parallel.

Every shard task loads the model from the job's data (`ModelSpec` + the adapter's bytes: the
peft model at θ_{t-1}), as a training worker does (`safeanchor.train.phase`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from safeanchor.config import ConfigError
from safeanchor.distributed.config import ClusterConfig
from safeanchor.distributed.trainer import ensure_ray, resolve_use_gpu
from safeanchor.ssi import safety_gradients, safety_subspaces
from safeanchor.subspace.fisher import Subspace, select_rank
from safeanchor.train.phase import ModelSpec, load_peft_model


@dataclass
class SSIJob:
    """What SSI needs: the model (by reference + adapter bytes, as for a phase) and the
    calibration examples."""

    model: ModelSpec
    adapter: bytes  # the adapter "default" at θ_{t-1} (safetensors)
    examples: list  # list[ChatExample]: safe responses (the calibration set)
    max_length: int = 96  # tokens per example (prompt + response), truncated on the right
    chunk: int = 16  # examples per vmap chunk of the per-example gradients


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


def shard_factors(model: Any, tokenizer: Any, examples: list, max_length: int, chunk: int,
                  blocks: int) -> list[dict[str, Any]]:
    """One shard: per-example gradients, then per tensor its thin SVD factors, grouped by block.

    Returns one dict per block: {"N": N_s, "order": [all names], "tensors": {name: (S (r,), Vh (r, n),
    ‖G_s‖²_F)}} in float64.
    """
    from safeanchor.data import collate, encode_dataset

    batch = collate(encode_dataset(tokenizer, examples, max_length), tokenizer.pad_token_id)
    device = next(model.parameters()).device
    grads = safety_gradients(model, {k: v.to(device) for k, v in batch.items()}, chunk=chunk)  # name -> (N_s, *shape)
    order = list(grads)
    n_s = len(examples)
    factors = {}
    for name, g in grads.items():
        G = g.reshape(n_s, -1).to(torch.float64).cpu()  # (N_s, n)
        _, S, Vh = torch.linalg.svd(G, full_matrices=False)  # S (r,), Vh (r, n), r = min(N_s, n)
        factors[name] = (S, Vh, float((G * G).sum()))
    groups = assign_blocks([(n, grads[n][0].numel()) for n in order], blocks)
    return [{"N": n_s, "order": order, "tensors": {n: factors[n] for n in names}} for names in groups]


def merge_block(parts: list[dict[str, Any]], rho: float | None, k_max: int, k_fixed: int | None = None,
                eps: float = 0.0) -> dict[str, Subspace]:
    """The exact Fisher eigenpairs of one block's tensors from every shard's factors."""
    N = sum(p["N"] for p in parts)
    out = {}
    for name in parts[0]["tensors"]:
        rows = [p["tensors"][name] for p in parts]
        trace = sum(sq for _, _, sq in rows) / N
        n = rows[0][1].shape[1]
        if trace <= eps:  # as fisher_subspace: zero gradients give an empty subspace
            z = torch.zeros(n, 0, dtype=torch.float64)
            out[name] = Subspace(z.float(), z.new_zeros(0).float(), trace)
            continue
        M = torch.cat([S.unsqueeze(1) * Vh for S, Vh, _ in rows]) / N**0.5  # (Σ r_s, n)
        _, S, Vh = torch.linalg.svd(M, full_matrices=False)
        lam = S**2
        k = select_rank(lam, rho, k_max, k_fixed)
        out[name] = Subspace(Vh[:k].T.contiguous().float(), lam[:k].float(), trace)
    return out


def identify_subspaces(job: SSIJob, cluster: ClusterConfig, rho: float | None, k_max: int,
                       k_fixed: int | None = None, eps: float = 0.0, model: Any = None, tokenizer: Any = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Subspace]:
    """name -> Subspace for every LoRA tensor, in the model's parameter order. The one place
    that chooses where SSI runs:

    executor ray: `cluster.ssi_workers` shard tasks, then `cluster.ssi_blocks` merge tasks;
    executor local: `safety_subspaces` (`fisher_subspace` on the whole gradient matrix) in this
    process, on `model` / `tokenizer` when given (the live model at θ_{t-1}), else loaded from the job.
    """
    if not job.examples:
        raise ConfigError("data.safety_calib", "SSI needs at least one calibration example")
    if cluster.executor == "local":
        if model is None:
            model, tokenizer = load_peft_model(job.model, job.adapter)
        return safety_subspaces(model, tokenizer, job.examples, job.max_length, rho, k_max, k_fixed,
                                chunk=job.chunk, eps=eps)

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
    if log is not None:
        log(f"  [ssi] {len(out)} tensors from {len(bounds)} shards x {blocks} blocks, "
            f"k = {sum(s.k for s in out.values())} in total")
    return {n: out[n] for n in order}


def _shard_task(job: SSIJob, examples: list, blocks: int, threads: int, use_gpu: bool) -> Any:
    torch.set_num_threads(threads)
    model, tokenizer = load_peft_model(job.model, job.adapter)
    model = model.to("cuda") if use_gpu else model
    parts = shard_factors(model, tokenizer, examples, job.max_length, job.chunk, blocks)
    parts += [{"N": len(examples), "order": parts[0]["order"], "tensors": {}}] * (blocks - len(parts))
    return tuple(parts) if blocks > 1 else parts[0]


def _merge_task(rho: float | None, k_max: int, k_fixed: int | None, eps: float,
                *parts: dict) -> tuple[list[str], dict[str, Subspace]]:
    return parts[0]["order"], merge_block(list(parts), rho, k_max, k_fixed, eps)
