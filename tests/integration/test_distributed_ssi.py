"""SSI on Ray, as Ray tasks (2 shard tasks: per-example gradients -> thin SVD factors; 2 merge tasks)
and on a run's Train workers (the default), equals `fisher_subspace` on the whole single-process
gradient matrix: eigenvalues, traces, and subspaces.

Subspaces are compared by the projector distance without forming n x n matrices:
‖V1V1ᵀ − V2V2ᵀ‖²_F = ‖V1ᵀV1‖²_F + ‖V2ᵀV2‖²_F − 2‖V1ᵀV2‖²_F (= k1 + k2 − 2‖V1ᵀV2‖²_F for
orthonormal V1 (n, k1), V2 (n, k2); the first form does not need exact orthonormality).
"""

from __future__ import annotations

import time

import pytest
import torch
from tiny_phase import make_world, tiny_examples

from safeanchor.data import collate, encode_dataset
from safeanchor.distributed import ClusterConfig
from safeanchor.distributed.ssi import (
    SSIJob,
    identify_subspaces,
    merge_block,
    shard_bounds,
    shard_factors,
)
from safeanchor.ssi import safety_gradients
from safeanchor.subspace.fisher import fisher_subspace
from safeanchor.train.phase import load_peft_model

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

N_CALIB = 13  # shards of 7 and 6 examples: a per-shard 1/N_s scaling would be caught


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def calib():
    return tiny_examples(N_CALIB, seed=5)


@pytest.fixture(scope="module")
def full_grads(calib, world):
    """name -> (N, n): the single-process per-example gradient matrix."""
    model, tok = load_peft_model(world.model, world.adapter)
    batch = collate(encode_dataset(tok, calib, 96), tok.pad_token_id)
    return {n: g.reshape(N_CALIB, -1) for n, g in safety_gradients(model, batch).items()}


def projector_distance(V1: torch.Tensor, V2: torch.Tensor) -> float:
    """‖V1V1ᵀ − V2V2ᵀ‖_F from k×k products only. ‖VVᵀ‖²_F = ‖VᵀV‖²_F holds for any V, so this
    is exact for the float32 V's as stored (using k for ‖VᵀV‖² would add their rounding)."""
    V1, V2 = V1.double(), V2.double()
    d2 = (V1.T @ V1).pow(2).sum() + (V2.T @ V2).pow(2).sum() - 2 * (V1.T @ V2).pow(2).sum()
    return float(d2.clamp(min=0).sqrt())


def assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name in want:
        g, w = got[name], want[name]
        assert g.k == w.k, name
        assert g.trace == pytest.approx(w.trace, rel=1e-9)
        torch.testing.assert_close(g.lam, w.lam, rtol=1e-5, atol=1e-9 * max(w.trace, 1e-30))
        assert projector_distance(g.V, w.V) < 1e-4, name


def test_shard_sends_float32_factors(full_grads, calib, world):
    """A shard's factor R (float32, min(N_s, n) rows: here N_s < n, so its gradient rows) has
    RᵀR = G_sᵀG_s and ships ‖G_s‖² exactly; the merge of the shards' factors equals
    fisher_subspace of the stacked gradients (in-process). One tensor per pass (group_mb 0)."""
    model, tok = load_peft_model(world.model, world.adapter)
    parts = [shard_factors(model, tok, calib[lo:hi], 96, 16, blocks=2, group_mb=0)
             for lo, hi in shard_bounds(N_CALIB, 2)]
    assert [p[0]["N"] for p in parts] == [7, 6] and len(parts[0]) == 2
    name = next(iter(parts[0][0]["tensors"]))
    R, sq = parts[0][0]["tensors"][name]
    assert R.dtype == torch.float32 and R.shape[0] == 7  # r = min(N_s, n) rows, not one per example of the set
    G = full_grads[name][:7].double()
    torch.testing.assert_close(R.double().T @ R.double(), G.T @ G, atol=1e-6 * float((G * G).sum()), rtol=0)
    assert sq == pytest.approx(float((G * G).sum()), rel=1e-6)
    merged = {}
    for b in range(2):
        merged.update(merge_block([p[b] for p in parts], rho=0.9, k_max=8))
    want = {n: fisher_subspace(full_grads[n], rho=0.9, k_max=8) for n in full_grads}
    assert_same({n: merged[n] for n in want}, want)


@pytest.mark.parametrize("rho,k_max,k_fixed", [(0.9, 8, None), (None, 64, 13)], ids=["rho0.9", "all13"])
def test_ray_ssi_equals_fisher_subspace(ray_instance, full_grads, calib, world, rho, k_max, k_fixed):
    """2 shard tasks x 2 merge tasks on Ray == fisher_subspace on the full gradient matrix."""
    job = SSIJob(world.model, world.adapter, calib)
    t0 = time.perf_counter()
    got = identify_subspaces(job, ClusterConfig(ssi_workers=2, ssi_blocks=2), rho, k_max, k_fixed)
    print(f"\n[timings] ray ssi {rho=} {k_fixed=}: {time.perf_counter() - t0:.1f}s")
    want = {n: fisher_subspace(G, rho, k_max, k_fixed) for n, G in full_grads.items()}
    assert_same(got, want)
    ks = [s.k for s in want.values()]
    assert min(ks) >= 2 and all(s.trace > 0 for s in want.values())  # non-trivial subspaces
    if k_fixed is not None:  # every eigenpair: the whole row space of G, λ summing to the trace
        for s in got.values():
            assert float(s.lam.double().sum()) == pytest.approx(s.trace, rel=1e-5)


def test_ssi_on_train_workers_equals_fisher_subspace(ray_instance, full_grads, calib, world, tmp_path):
    """SSI as a job of a run's Train workers (the default, `cluster.ssi_workers: null`), three jobs
    on the SAME 2 workers (one Train run):

    1. 13 examples, one shard per rank, 3 blocks merged by rank b mod 2 through the object store:
       equal to fisher_subspace on the full gradient matrix;
    2. 1 example: rank 1 has no shard, and the result is still exact;
    3. adapter bytes that are not safetensors: an error outside NON_RETRYABLE, which fails the
       worker group; with max_failures 0 the Train run ends for good while the driver waits, and
       the driver raises the run's error (carrying the worker's traceback), frees the mailbox and
       marks the workers closed (the next job would start a new Train run)."""
    from safeanchor.distributed.ssi import SSIWork
    from safeanchor.distributed.workers import TrainWorkers

    cluster = ClusterConfig(num_workers=2, ssi_blocks=3, max_failures=0)
    assert cluster.ssi_workers is None
    with TrainWorkers("ssi-test", cluster, str(tmp_path / "ray")) as workers:
        workers.wait_ready()  # both workers launched and waiting for a job
        assert workers.alive and workers.launches == 1
        t0 = time.perf_counter()
        got = identify_subspaces(SSIJob(world.model, world.adapter, calib), cluster, 0.9, 8, workers=workers)
        print(f"\n[timings] ssi on 2 Train workers (launched): {time.perf_counter() - t0:.1f}s")
        assert_same(got, {n: fisher_subspace(G, 0.9, 8) for n, G in full_grads.items()})
        one = identify_subspaces(SSIJob(world.model, world.adapter, calib[:1]), cluster, 0.9, 8, workers=workers)
        assert_same(one, {n: fisher_subspace(G[:1], 0.9, 8) for n, G in full_grads.items()})
        assert all(s.k == 1 for s in one.values())
        assert workers.launches == 1 and workers.alive

        with pytest.raises(Exception) as err:
            workers.ssi(SSIWork(SSIJob(world.model, b"not safetensors", calib), 0.9, 8))
        assert "ssi_rank" in str(err.value)  # the worker's traceback, not a driver-side error
        assert not workers.alive and workers.box is None and workers.launches == 1


def test_ssi_without_a_run_starts_its_own_train_run(ray_instance, full_grads, calib, world, tmp_path, monkeypatch):
    """`identify_subspaces` called with executor ray and no run's workers (the default
    `ssi_workers: null`): a one-off Train run of one worker computes it, exactly, and its run
    state (under a temporary directory) is gone afterwards."""
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    from safeanchor.distributed import workers as workers_mod

    started = []
    real_init = workers_mod.TrainWorkers.__init__

    def spy(self, name, cluster, storage_path, *a, **kw):
        started.append((name, storage_path, list(tmp.iterdir())))
        real_init(self, name, cluster, storage_path, *a, **kw)

    monkeypatch.setattr(workers_mod.TrainWorkers, "__init__", spy)
    cluster = ClusterConfig(num_workers=1)
    got = identify_subspaces(SSIJob(world.model, world.adapter, calib), cluster, 0.9, 8)
    assert_same(got, {n: fisher_subspace(G, 0.9, 8) for n, G in full_grads.items()})
    assert len(started) == 1  # one Train run, for this call
    name, storage, existing = started[0]
    assert name.startswith("ssi-") and storage.startswith(str(tmp)) and existing
    assert list(tmp.iterdir()) == []  # the one-off run's directory removed
