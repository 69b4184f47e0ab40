"""Invariants of the SSI / OSCA math (ALGORITHMS.md §1-§2), seeded, explicit tolerances."""

import torch

from safeanchor.subspace.fisher import (
    Subspace,
    fisher_subspace,
    merge_subspaces,
    per_example_grads,
    project,
    project_batched,
    select_rank,
)


def _orthonormal(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q.float()


def test_projection_scales_subspace_component_by_alpha():
    V = _orthonormal(50, 4)
    g = torch.randn(50, generator=torch.Generator().manual_seed(1))
    for alpha in (0.0, 0.3, 1.0):
        gh = project(g, V, alpha)
        torch.testing.assert_close(V.T @ gh, alpha * (V.T @ g), atol=1e-5, rtol=1e-5)
        # the orthogonal complement is untouched
        perp = g - V @ (V.T @ g)
        torch.testing.assert_close(gh - V @ (V.T @ gh), perp, atol=1e-5, rtol=1e-5)


def test_strict_projection_is_idempotent():
    V = _orthonormal(40, 5)
    g = torch.randn(40)
    once = project(g, V, 0.0)
    torch.testing.assert_close(project(once, V, 0.0), once, atol=1e-6, rtol=1e-6)


def test_projection_never_builds_n_by_n():
    # n x n float32 at n = 2e6 would need 16 TB: this only passes with the thin form.
    n, k = 2_000_000, 3
    V = torch.zeros(n, k)
    V[0, 0] = V[1, 1] = V[2, 2] = 1.0
    g = torch.ones(n)
    gh = project(g, V, 0.0)
    assert gh[:3].abs().max() == 0 and gh[3:].min() == 1


def test_batched_projection_matches_per_tensor():
    B, n = 3, 30
    Vs = [_orthonormal(n, k, seed=s) for s, k in enumerate((2, 4, 1))]
    Vpad = torch.zeros(B, n, 4)
    for i, V in enumerate(Vs):
        Vpad[i, :, : V.shape[1]] = V
    G = torch.randn(B, n)
    alpha = torch.tensor([0.0, 0.5, 0.9])
    out = project_batched(G, Vpad, alpha)
    for i in range(B):
        torch.testing.assert_close(out[i], project(G[i], Vs[i], float(alpha[i])), atol=1e-5, rtol=1e-5)


def test_fisher_eigenpairs_match_dense_eigh():
    N, n = 12, 20
    G = torch.randn(N, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    F = G.T @ G / N
    evals, evecs = torch.linalg.eigh(F)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = fisher_subspace(G, rho=1.0, k_max=n)
    assert s.k == N  # rank of G
    torch.testing.assert_close(s.lam.double(), evals[:N], atol=1e-8, rtol=1e-5)
    assert abs(s.trace - float(torch.trace(F))) < 1e-8
    # eigenvectors up to sign
    dots = (s.V.double() * evecs[:, :N]).sum(0).abs()
    torch.testing.assert_close(dots, torch.ones(N, dtype=torch.float64), atol=1e-5, rtol=0)


def test_fisher_eigenpairs_both_branches_and_rank_deficient():
    """More examples than dimensions (eigh of F itself), and a G of rank 3 whose Gram matrix has
    round-off eigenvalues: they must not become directions."""
    gen = torch.Generator().manual_seed(4)
    for G in (torch.randn(30, 10, generator=gen, dtype=torch.float64),
              (torch.randn(16, 3, generator=gen, dtype=torch.float64)
               @ torch.randn(3, 40, generator=gen, dtype=torch.float64))):
        F = G.T @ G / G.shape[0]
        evals, evecs = torch.linalg.eigh(F)
        evals, evecs = evals.flip(0), evecs.flip(1)
        r = int(torch.linalg.matrix_rank(G))
        s = fisher_subspace(G, rho=1.0, k_max=100)
        assert s.k == r
        torch.testing.assert_close(s.lam.double(), evals[:r], atol=1e-8, rtol=1e-5)
        torch.testing.assert_close(s.V.T @ s.V, torch.eye(r), atol=1e-5, rtol=0)
        dots = (s.V.double() * evecs[:, :r]).sum(0).abs()
        torch.testing.assert_close(dots, torch.ones(r, dtype=torch.float64), atol=1e-5, rtol=0)


def test_rank_by_energy_and_cap():
    lam = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.5])  # total 10
    assert select_rank(lam, 0.5, 10) == 1
    assert select_rank(lam, 0.8, 10) == 2
    assert select_rank(lam, 0.9, 10) == 3
    assert select_rank(lam, 0.9, 2) == 2
    assert select_rank(lam, None, 10, k_fixed=4) == 4
    assert select_rank(torch.zeros(3), 0.9, 10) == 0


def test_zero_gradients_give_empty_subspace():
    s = fisher_subspace(torch.zeros(8, 16), rho=0.9, k_max=4)
    assert s.k == 0 and s.V.shape == (16, 0) and s.trace == 0.0


def test_merge_equals_svd_of_weighted_concatenation():
    n = 25
    g = torch.Generator().manual_seed(5)
    old = fisher_subspace(torch.randn(6, n, generator=g, dtype=torch.float64), 1.0, n)
    new = fisher_subspace(torch.randn(4, n, generator=g, dtype=torch.float64), 1.0, n)
    merged = merge_subspaces(old, new, rho=1.0, k_max=n)
    # dense reference: the eigen-decomposition of the summed low-rank Fishers
    F = old.V.double() @ torch.diag(old.lam.double()) @ old.V.double().T
    F = F + new.V.double() @ torch.diag(new.lam.double()) @ new.V.double().T
    evals = torch.linalg.eigvalsh(F).flip(0)[: merged.k]
    torch.testing.assert_close(merged.lam.double(), evals, atol=1e-6, rtol=1e-5)
    # V orthonormal and spans the eigenvectors: F V = V diag(lam)
    torch.testing.assert_close(F @ merged.V.double(), merged.V.double() * merged.lam.double(), atol=1e-5, rtol=1e-4)
    # truncation by rho keeps the Fisher-mass prefix
    cut = merge_subspaces(old, new, rho=0.5, k_max=n)
    assert cut.k < merged.k
    assert float(cut.lam.sum()) >= 0.5 * float(merged.lam.sum()) - 1e-6


def test_merge_with_empty_side_returns_other():
    s = Subspace(_orthonormal(10, 2), torch.tensor([2.0, 1.0]), 3.0)
    empty = Subspace(torch.zeros(10, 0), torch.zeros(0), 0.0)
    assert merge_subspaces(empty, s, 0.9, 8) is s
    assert merge_subspaces(s, empty, 0.9, 8) is s


def test_per_example_grads_match_backward_loop():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3)
    W = lin.weight
    X = torch.randn(5, 6)
    y = torch.randint(0, 3, (5,))

    def loss_fn(p, ex):
        logits = ex["x"] @ p["w"].T + lin.bias
        return torch.nn.functional.cross_entropy(logits, ex["y"])

    G = per_example_grads(loss_fn, {"w": W}, {"x": X, "y": y}, chunk=2)["w"]
    for i in range(5):
        lin.zero_grad()
        torch.nn.functional.cross_entropy(lin(X[i : i + 1]), y[i : i + 1]).backward()
        torch.testing.assert_close(G[i], W.grad, atol=1e-6, rtol=1e-5)
