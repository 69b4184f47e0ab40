"""Safety Subspace Identification (ALGORITHMS.md §1): pure torch, no Ray / DeepSpeed / MLflow.

For each LoRA tensor θ_i (flattened, length n_i) and N calibration examples:
    G_i = [∂L_safe(x_n)/∂θ_i]_n          (N, n_i)   per EXAMPLE, not per batch
    F_i = G_iᵀ G_i / N                    never formed (n_i × n_i)
    eigenpairs of F_i = thin SVD of G_i / √N:  V_i = right singular vectors, λ_i = s²
    trace_i = Σ λ = ‖G_i‖²_F / N
Rank: smallest k with Σ_{j<k} λ_j ≥ ρ·Σ λ, capped by k_max (or a fixed k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Subspace:
    """One tensor's safety subspace: orthonormal V (n, k), eigenvalues λ (k,), full trace."""

    V: torch.Tensor  # (n, k)
    lam: torch.Tensor  # (k,)
    trace: float

    @property
    def k(self) -> int:
        return int(self.V.shape[1])


def select_rank(lam: torch.Tensor, rho: float | None, k_max: int, k_fixed: int | None = None) -> int:
    """k by energy fraction ρ of the eigenvalues (sorted descending), capped by k_max; or fixed k."""
    positive = int((lam > 0).sum())
    if positive == 0:
        return 0
    if k_fixed is not None:
        return min(k_fixed, positive)
    total = lam[:positive].sum()
    cum = torch.cumsum(lam[:positive], 0) / total
    k = int(torch.searchsorted(cum, torch.tensor(rho, dtype=cum.dtype) - 1e-12).item()) + 1
    return min(k, k_max, positive)


# Elements of float64 scratch per chunk of the Gram / moment products (64 MiB): the rows stay in
# their own dtype (float32) and only one column (or row) slice is widened at a time.
_SCRATCH = 1 << 23


def fisher_subspace(
    G: torch.Tensor, rho: float | None, k_max: int, k_fixed: int | None = None, eps: float = 0.0
) -> Subspace:
    """Top eigenpairs of F = GᵀG/N from per-example gradients G (N, n); never n×n when N < n.

    With X = G/√N: F = XᵀX and the Gram matrix K = XXᵀ (N×N) share their non-zero eigenvalues;
    an eigenvector u of K with eigenvalue λ gives F's as v = Xᵀu/√λ. eigh of the small Gram
    matrix is the same maths as the thin SVD of X and ~10× cheaper on a CPU (measured on the
    toy world: 84 tensors of 128 × 2,048, float64). When n ≤ N, F itself is the small matrix.
    """
    return rows_subspace(G, G.shape[0], rho, k_max, k_fixed, eps)


def gram(R: torch.Tensor) -> torch.Tensor:
    """R Rᵀ (r, r) in float64 from rows R (r, n) of any float dtype, one column slice widened at a
    time: products of float32 numbers are exact in float64, so this equals R.double() @ R.double().T
    to float64 round-off without a float64 copy of R."""
    r, n = R.shape
    step = max(1, _SCRATCH // max(r, 1))
    K = torch.zeros(r, r, dtype=torch.float64, device=R.device)
    for j in range(0, n, step):
        x = R[:, j : j + step].double()
        K += x @ x.T
    return K


def moment(R: torch.Tensor) -> torch.Tensor:
    """Rᵀ R (n, n) in float64, one row slice widened at a time (see `gram`)."""
    r, n = R.shape
    step = max(1, _SCRATCH // max(n, 1))
    C = torch.zeros(n, n, dtype=torch.float64, device=R.device)
    for i in range(0, r, step):
        x = R[i : i + step].double()
        C += x.T @ x
    return C


def rows_subspace(
    R: torch.Tensor, N: int, rho: float | None, k_max: int, k_fixed: int | None = None, eps: float = 0.0,
    trace: float | None = None,
) -> Subspace:
    """The Fisher eigenpairs from any rows R (r, n) with RᵀR = GᵀG: the per-example gradients
    themselves (r = N), or factors of them (Ray shards: stacked per-shard factors). F = RᵀR / N.

    r < n: eigh of the Gram matrix K = RRᵀ/N (r×r), V = Rᵀu/√(Nλ); else eigh of F (n×n). Both in
    float64 from float32 (or float64) rows, widened slice by slice (`gram`, `moment`): the extra
    memory is r² + 64 MiB, or n² — never a float64 copy of R. V, λ are returned float32, on R's device.
    `trace`: tr F when known exactly (‖G‖²_F / N: the merge of shard factors that were rounded to
    float32); else tr(RᵀR) / N.
    """
    r, n = R.shape
    if r >= n:
        return _moment_subspace(moment(R), N, rho, k_max, k_fixed, eps, trace)
    K = gram(R) / N  # (r, r)
    trace = float(torch.diagonal(K).sum()) if trace is None else trace
    if trace <= eps:  # zero gradients (e.g. lora_A while lora_B = 0): empty subspace
        return _empty(n, trace, R.device)
    lam, U = _eig_desc(K, trace)
    k = select_rank(lam, rho, k_max, k_fixed)
    # v_j = Rᵀ u_j / √(N λ_j), one column slice of R at a time: (n, k)
    W = U[:, :k] / (N * lam[:k]).sqrt()  # (r, k)
    V = torch.empty(n, k, dtype=torch.float32, device=R.device)
    step = max(1, _SCRATCH // max(r, 1))
    for j in range(0, n, step):
        V[j : j + step] = (R[:, j : j + step].double().T @ W).float()
    return Subspace(V, lam[:k].float(), trace)


def _empty(n: int, trace: float, device: torch.device) -> Subspace:
    return Subspace(torch.zeros(n, 0, device=device), torch.zeros(0, device=device), trace)


def _eig_desc(small: torch.Tensor, trace: float) -> tuple[torch.Tensor, torch.Tensor]:
    """eigh, descending; eigenvalues below round-off of the trace set to zero (rank-deficient G:
    fewer examples than dimensions, or duplicated examples): they carry no direction."""
    lam, U = torch.linalg.eigh(small)  # ascending
    lam, U = lam.flip(0), U.flip(1)
    return torch.where(lam > trace * 1e-12, lam, torch.zeros_like(lam)), U


def moment_factor(C: torch.Tensor) -> torch.Tensor:
    """Float32 rows R (m, n) with RᵀR = C for a positive semi-definite C (n, n) (float64), m = its
    numerical rank: R = diag(√λ) Wᵀ over the eigenpairs λ > 0. What a Ray shard ships for a tensor
    with fewer dimensions than examples (n ≤ N_s): n×n instead of N_s×n numbers."""
    lam, W = torch.linalg.eigh(C)
    keep = lam > float(torch.diagonal(C).sum()) * 1e-12
    return (lam[keep].sqrt().unsqueeze(1) * W[:, keep].T).float()


class FisherRows:
    """The per-example gradients of ONE tensor, streamed in chunks of examples; holds only what
    its Fisher eigenpairs need:

    - n > N (Gram path): the rows G (N, n) in `dtype` (float32), filled chunk by chunk;
    - n ≤ N (moment path): the running second moment C = Σ_chunks G_cᵀG_c (n, n) float64, and no row.

    Memory N·n·4 or n²·8 bytes (`nbytes`, what `plan_groups` budgets). `subspace()` = what
    `fisher_subspace` gives for the stacked rows; `factor()` = float32 rows with RᵀR = GᵀG
    (min(N, n) of them) to ship to a merge.
    """

    def __init__(self, n: int, N: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.n, self.N, self.filled = n, N, 0
        self.gram_path = n > N
        if self.gram_path:
            self.rows = torch.empty(N, n, dtype=dtype, device=device)
        else:
            self.C = torch.zeros(n, n, dtype=torch.float64, device=device)

    @staticmethod
    def nbytes_of(n: int, N: int, itemsize: int = 4) -> int:
        return N * n * itemsize if n > N else n * n * 8

    def add(self, g: torch.Tensor) -> None:
        """The next examples' gradients, (c, n) (or (c, *shape)), in example order."""
        g = g.reshape(g.shape[0], -1)
        c = g.shape[0]
        if self.filled + c > self.N:
            raise ValueError(f"FisherRows: {self.filled + c} rows added, {self.N} expected")
        if self.gram_path:
            self.rows[self.filled : self.filled + c] = g
        else:
            x = g.double()
            self.C += x.T @ x
        self.filled += c

    def _check_full(self) -> None:
        if self.filled != self.N:
            raise ValueError(f"FisherRows: {self.filled} of {self.N} examples added")

    def subspace(self, rho: float | None, k_max: int, k_fixed: int | None = None, eps: float = 0.0) -> Subspace:
        self._check_full()
        if self.gram_path:
            return rows_subspace(self.rows, self.N, rho, k_max, k_fixed, eps)
        return _moment_subspace(self.C, self.N, rho, k_max, k_fixed, eps)

    def factor(self) -> torch.Tensor:
        """Float32 rows R with RᵀR = GᵀG: the gradients themselves (n > N: nothing smaller is exact),
        or diag(√λ)Wᵀ of the moment (n ≤ N: n rows at most)."""
        self._check_full()
        return self.rows.float() if self.gram_path else moment_factor(self.C)

    def sq_norm(self) -> float:
        """‖G‖²_F (the trace times N)."""
        if self.gram_path:
            return float(gram_trace(self.rows))
        return float(torch.diagonal(self.C).sum())


def gram_trace(R: torch.Tensor) -> float:
    """‖R‖²_F in float64, slice by slice."""
    r, n = R.shape
    step = max(1, _SCRATCH // max(r, 1))
    return sum(float(R[:, j : j + step].double().pow(2).sum()) for j in range(0, n, step))


def _moment_subspace(C: torch.Tensor, N: int, rho: float | None, k_max: int, k_fixed: int | None,
                     eps: float, trace: float | None = None) -> Subspace:
    """F = C/N from the second moment C = GᵀG (n, n), float64: eigh of F itself (n ≤ N)."""
    F = C / N
    trace = float(torch.diagonal(F).sum()) if trace is None else trace
    if trace <= eps:  # zero gradients (e.g. lora_A while lora_B = 0): empty subspace
        return _empty(C.shape[0], trace, C.device)
    lam, U = _eig_desc(F, trace)
    k = select_rank(lam, rho, k_max, k_fixed)
    return Subspace(U[:, :k].float().contiguous(), lam[:k].float(), trace)


def plan_groups(sizes: list[tuple[str, int]], N: int, budget_bytes: float) -> list[list[str]]:
    """Consecutive tensors (in the given order: the model's) grouped so that each group's
    `FisherRows` fit in `budget_bytes` together; a tensor larger than the budget is a group alone.
    Streaming SSI runs one pass over the calibration set per group: peak memory ~ one group's rows
    (≤ max(budget, N·n_max·4)), at the cost of len(groups) passes."""
    groups: list[list[str]] = []
    load = 0
    for name, n in sizes:
        b = FisherRows.nbytes_of(n, N)
        if groups and load + b <= budget_bytes:
            groups[-1].append(name)
            load += b
        else:
            groups.append([name])
            load = b
    return groups


def merge_subspaces(old: Subspace, new: Subspace, rho: float | None, k_max: int, k_fixed: int | None = None) -> Subspace:
    """Fisher-weighted incremental merge: M = [V_old·√λ_old | V_new·√λ_new] = U S Wᵀ, keep the
    ρ-prefix of S². Weighting by √λ makes the cut measure Fisher mass, not basis overlap."""
    if old.k == 0:
        return new
    if new.k == 0:
        return old
    M = torch.cat([old.V.double() * old.lam.double().sqrt(), new.V.double() * new.lam.double().sqrt()], dim=1)
    U, S, _ = torch.linalg.svd(M, full_matrices=False)  # (n, k_old + k_new)
    lam = S**2
    k = select_rank(lam, rho, k_max, k_fixed)
    return Subspace(U[:, :k].contiguous().float(), lam[:k].float(), old.trace + new.trace)


def random_basis(n: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded, uniformly random orthonormal basis (n, k): Q of the QR of a Gaussian matrix,
    signs fixed by R's diagonal (Haar measure). The random-subspace control (ALGORITHMS.md,
    after §6) projects with it in place of the Fisher eigenvectors, at the same k."""
    if k == 0:
        return torch.zeros(n, 0, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(R))).to(dtype)


def per_example_grads(
    loss_fn: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor],
    params: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    chunk: int = 16,
) -> dict[str, torch.Tensor]:
    """∂loss(x_n)/∂θ for every example n, with torch.func.vmap(grad(...)).

    loss_fn(params, example) computes the loss of ONE example (tensors without the batch dim
    are given with a leading dim of 1 inside vmap's view). Returns name -> (N, *shape).
    """
    from torch.func import grad, vmap

    detached = {k: v.detach() for k, v in params.items()}

    def one(p, ex):
        return loss_fn(p, {k: v.unsqueeze(0) for k, v in ex.items()})

    g = vmap(grad(one), in_dims=(None, 0), chunk_size=chunk)
    return g(detached, batch)


def project(g: torch.Tensor, V: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """ĝ = g − (1 − α)·V(Vᵀg) for one flattened gradient g (n,) and V (n, k). Never n×n."""
    return g - (1.0 - alpha) * (V @ (V.T @ g))


def project_batched(G: torch.Tensor, V: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Same-shape tensors in one bmm: G (B, n), V (B, n, k) (zero-padded columns allowed), α (B,)."""
    coeff = torch.bmm(V.transpose(1, 2), G.unsqueeze(2))  # (B, k, 1)
    return G - (1.0 - alpha).view(-1, 1) * torch.bmm(V, coeff).squeeze(2)
