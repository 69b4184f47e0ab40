"""Streaming SSI (safeanchor.ssi / subspace.fisher.FisherRows): the same subspaces as the whole
gradient matrix, from float32 rows, without ever holding every per-example gradient.

The reference is independent of the code under test: a float64 thin SVD of G/√N
(`reference_subspace`), the textbook definition of F's eigenpairs. Subspaces are compared by k,
eigenvalues, trace, and the projector distance ‖V1V1ᵀ − V2V2ᵀ‖_F (from k×k products only).
"""

from __future__ import annotations

import random
import weakref

import pytest
import torch
from tiny import toy_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.models import LoraConfig, add_lora, lora_parameters
from safeanchor.ssi import safety_gradients, safety_subspaces
from safeanchor.subspace.fisher import (
    FisherRows,
    Subspace,
    moment_factor,
    plan_groups,
    rows_subspace,
    select_rank,
)

WORDS = "alpha beta gamma delta river stone cloud bright quiet market garden paper window orange".split()


def reference_subspace(G: torch.Tensor, rho, k_max, k_fixed=None) -> Subspace:
    """F = GᵀG/N by a float64 thin SVD of G/√N: V = right singular vectors, λ = s²."""
    X = G.double() / G.shape[0] ** 0.5
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)
    lam = S**2
    trace = float((X * X).sum())
    lam = torch.where(lam > trace * 1e-12, lam, torch.zeros_like(lam))
    k = select_rank(lam, rho, k_max, k_fixed)
    return Subspace(Vh[:k].T, lam[:k], trace)


def projector_distance(V1: torch.Tensor, V2: torch.Tensor) -> float:
    V1, V2 = V1.double(), V2.double()
    d2 = (V1.T @ V1).pow(2).sum() + (V2.T @ V2).pow(2).sum() - 2 * (V1.T @ V2).pow(2).sum()
    return float(d2.clamp(min=0).sqrt())


def assert_same(got: Subspace, want: Subspace, tol: float = 1e-4) -> None:
    """Tolerances for float32 rows against the float64 reference: the Gram / moment is formed
    in float64 from the float32 numbers, so eigenvalues agree to ~1e-6 relative (of the trace)
    and V to float32 rounding (projector distance ~1e-6); `tol` leaves a margin."""
    assert got.k == want.k
    assert got.trace == pytest.approx(want.trace, rel=1e-6)
    torch.testing.assert_close(got.lam.double(), want.lam.double(), rtol=1e-5, atol=1e-6 * want.trace)
    assert projector_distance(got.V, want.V) < tol


def decaying(N: int, n: int, seed: int) -> torch.Tensor:
    """float32 rows with a decaying spectrum (so ρ picks a k strictly inside the rank)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -3, n, dtype=torch.float64)
    return (torch.randn(N, n, generator=g, dtype=torch.float64) * scale).float()


@pytest.mark.parametrize("N,n", [(30, 200), (200, 40)], ids=["gram_N<n", "moment_N>n"])
def test_fisher_rows_streamed_in_chunks_equal_reference(N, n):
    G = decaying(N, n, seed=N)
    rows = FisherRows(n, N)
    assert rows.gram_path == (n > N)
    for lo in range(0, N, 7):  # chunks of 7 (the last one shorter)
        rows.add(G[lo : lo + 7])
    for rho, k_max, k_fixed in [(0.9, 64, None), (None, 8, 8), (1.0, 512, None)]:
        assert_same(rows.subspace(rho, k_max, k_fixed), reference_subspace(G, rho, k_max, k_fixed))
    # the factor a Ray shard ships: float32, at most min(N, n) rows, RᵀR = GᵀG
    R = rows.factor()
    assert R.dtype == torch.float32 and R.shape[0] <= min(N, n)
    GtG = G.double().T @ G.double()
    torch.testing.assert_close(R.double().T @ R.double(), GtG, rtol=0, atol=1e-5 * float(GtG.diagonal().max()))
    assert rows.sq_norm() == pytest.approx(float(G.double().pow(2).sum()), rel=1e-12)


def test_fisher_rows_refuses_wrong_row_counts():
    rows = FisherRows(10, 4)
    rows.add(torch.ones(3, 10))
    with pytest.raises(ValueError, match="3 of 4"):
        rows.subspace(0.9, 4)
    with pytest.raises(ValueError, match="5 rows added"):
        rows.add(torch.ones(2, 10))


def test_merged_shard_factors_equal_reference():
    """Stacked float32 factors of two shards (one per path) give the whole matrix's eigenpairs."""
    G = decaying(50, 30, seed=1)
    parts = []
    for lo, hi in [(0, 20), (20, 50)]:  # shard of 20 (gram path: 30 > 20) and of 30 (moment path)
        r = FisherRows(30, hi - lo)
        r.add(G[lo:hi])
        parts.append((r.factor(), r.sq_norm()))
    M = torch.cat([R for R, _ in parts])
    trace = sum(sq for _, sq in parts) / 50
    assert_same(rows_subspace(M, 50, 0.95, 30, trace=trace), reference_subspace(G, 0.95, 30))
    assert moment_factor(torch.zeros(5, 5, dtype=torch.float64)).shape == (0, 5)


def test_plan_groups_respects_the_budget_in_order():
    sizes = [("a", 100), ("b", 100), ("c", 300), ("d", 50), ("e", 10)]
    N = 200  # a, b, c: gram rows (N·n·4 bytes); d, e: n ≤ N, moments (n²·8 bytes)
    groups = plan_groups(sizes, N, budget_bytes=N * 200 * 4)
    assert groups == [["a", "b"], ["c"], ["d", "e"]]  # c alone exceeds the budget: a group of its own
    assert plan_groups(sizes, N, 0) == [[n] for n, _ in sizes]
    assert plan_groups(sizes, N, 2**40) == [[n for n, _ in sizes]]


# ---- at a model ------------------------------------------------------------------------------
def _examples(n: int, seed: int) -> list[ChatExample]:
    rng = random.Random(seed)
    return [ChatExample(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7))),
                        " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 10)))) for _ in range(n)]


def _model(tok, hidden: int, r: int, targets: list[str]):
    """A 2-layer Llama with LoRA, lora_B drawn non-zero (every tensor has a gradient)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    model = add_lora(LlamaForCausalLM(cfg), LoraConfig(r=r, alpha=2 * r, target_modules=targets), seed=0)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(_examples(60, seed=9))


@pytest.mark.parametrize("N,r,group_mb", [(20, 4, 64), (36, 1, 0.02)], ids=["gram-one-pass", "moment-N>n-2-per-pass"])
def test_streaming_ssi_equals_whole_matrix_reference(tok, N, r, group_mb):
    """New streaming SSI == float64 SVD of all per-example gradients (held at once, the old way):
    same k per tensor, same eigenvalues and trace, projector distance < 1e-4."""
    model = _model(tok, 32, r, ["q_proj", "v_proj"])
    ex = _examples(N, seed=N + r)
    batch = collate(encode_dataset(tok, ex, 48), tok.pad_token_id)
    G = {n: g.reshape(N, -1) for n, g in safety_gradients(model, batch).items()}
    seen = []
    got = safety_subspaces(model, tok, ex, 48, rho=0.9, k_max=64, chunk=8, group_mb=group_mb,
                           on_group=lambda names, acc: seen.append(names))
    assert list(got) == list(G)
    assert len(seen) == (1 if group_mb == 64 else len(G) // 2)  # 0.02 MiB: two 32×32 float64 moments
    for name, g in G.items():
        assert (g.shape[1] > N) == (r == 4)  # the parametrisation covers both paths
        assert_same(got[name], reference_subspace(g, 0.9, 64))
        assert got[name].k >= 2


class LiveRows:
    """Counts the bytes of gradient storage that FisherRows hold alive (rows or moments), by a
    weakref finaliser on each buffer: `peak` is the most alive at once."""

    def __init__(self, monkeypatch) -> None:
        self.live = self.peak = 0
        init = FisherRows.__init__

        def tracked(rows, *a, **kw):
            init(rows, *a, **kw)
            buf = rows.rows if rows.gram_path else rows.C
            size = buf.numel() * buf.element_size()
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(buf, self._free, size)

        monkeypatch.setattr(FisherRows, "__init__", tracked)

    def _free(self, size: int) -> None:
        self.live -= size


def test_streaming_holds_one_group_of_gradient_rows_at_a_time(tok, monkeypatch):
    """The streaming path never holds every per-example gradient: with one tensor per pass, the
    gradient storage alive at once is one tensor's rows (N·n·4 bytes), 1/16 of the N·Σn·4 bytes
    that the whole-matrix path returns for these 16 tensors; with a budget of 4 tensors, 4 of them.
    The subspaces stay those of the reference. (Whole-process RSS at 7B shape:
    workflows/benchmark.py --ssi-7b-layer.)"""
    model = _model(tok, 32, 4, ["q_proj", "k_proj", "v_proj", "o_proj"])  # 16 tensors of 128
    N = 12
    ex = _examples(N, seed=3)
    sizes = [p.numel() for p in lora_parameters(model).values()]
    all_grads = N * sum(sizes) * 4
    batch = collate(encode_dataset(tok, ex, 32), tok.pad_token_id)
    whole = safety_gradients(model, batch, chunk=12)
    assert sum(g.numel() * g.element_size() for g in whole.values()) == all_grads
    for group_mb, tensors in [(0, 1), (4 * N * 128 * 4 / 2**20, 4)]:
        live = LiveRows(monkeypatch)
        got = safety_subspaces(model, tok, ex, 32, 0.9, 16, chunk=12, group_mb=group_mb)
        for name, g in whole.items():
            assert_same(got[name], reference_subspace(g.reshape(N, -1), 0.9, 16))
        assert live.peak == tensors * N * 128 * 4, group_mb
        assert live.peak <= all_grads * tensors / 16
        assert live.live == 0  # everything freed at the end
        monkeypatch.undo()
