"""OSCA's gradient projection over a set of named tensors (ALGORITHMS.md §2), pure torch.

    ĝ_i = g_i − (1 − α_i)·V_i (V_iᵀ g_i)        V_i (n_i, k_i) orthonormal, α_i ∈ [0, 1)

One object, two forms of the same linear map, used by every training loop that projects (the
pipeline's single-process and DeepSpeed engines, `safeanchor.api`, the transformers callback):

- `transform_grad(name, g)`: one tensor, for a per-tensor gradient hook on the LOCAL gradient
  (before any data-parallel reduction or gradient accumulation: the map is linear, so projecting
  each micro-batch / rank and summing equals projecting the sum);
- `transform_grads(grads)`: every full gradient at once, in place, tensors of the same size
  stacked into one bmm (`fisher.project_batched`), V zero-padded to the group's largest k.

Tensors with k = 0 or α ≥ 1 project nothing and are left out.
"""

from __future__ import annotations

import torch

from safeanchor.subspace.fisher import project, project_batched


class GradientProjection:
    """Per-tensor (V, α), each V on its parameter's device and dtype, and the batched groups."""

    def __init__(self, entries: dict[str, tuple[torch.Tensor, float]]) -> None:
        self.entries = entries  # name -> (V (n, k), α)
        by_size: dict[tuple[int, torch.dtype, torch.device], list[str]] = {}
        for name, (V, _) in entries.items():
            by_size.setdefault((V.shape[0], V.dtype, V.device), []).append(name)
        # (names, V stacked (B, n, k_max) zero-padded, α (B,))
        self.groups: list[tuple[list[str], torch.Tensor, torch.Tensor]] = []
        for (n, dtype, device), names in by_size.items():
            k = max(entries[x][0].shape[1] for x in names)
            Vs = torch.zeros(len(names), n, k, dtype=dtype, device=device)
            for i, x in enumerate(names):
                V = entries[x][0]
                Vs[i, :, : V.shape[1]] = V
            alpha = torch.tensor([entries[x][1] for x in names], dtype=dtype, device=device)
            self.groups.append((names, Vs, alpha))

    @classmethod
    def for_params(cls, params: dict[str, torch.Tensor], bases: dict[str, torch.Tensor],
                   alpha: dict[str, float]) -> GradientProjection:
        """Bases V (n, k) of the named parameters, moved to each parameter's device and dtype
        (subspaces arrive on the CPU from SSI or a file, so a step moves nothing); a tensor
        without a basis, with k = 0 or with α ≥ 1 (no α: 1) is skipped."""
        entries = {}
        for name, p in params.items():
            V = bases.get(name)
            if V is None or V.shape[1] == 0 or alpha.get(name, 1.0) >= 1.0:
                continue
            if V.shape[0] != p.numel():
                raise ValueError(f"subspace of {name!r} has {V.shape[0]} rows, the tensor {p.numel()} elements")
            entries[name] = (V.to(device=p.device, dtype=p.dtype), float(alpha[name]))
        return cls(entries)

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """ĝ of one tensor's gradient (None: the tensor is not projected)."""
        entry = self.entries.get(name)
        if entry is None:
            return None
        V, alpha = entry
        return project(grad.reshape(-1), V, alpha).view_as(grad)

    def transform_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """The same map on every given gradient, in place, one bmm per group of same-size tensors."""
        for names, V, alpha in self.groups:
            idx = [i for i, x in enumerate(names) if x in grads]
            if not idx:
                continue
            if len(idx) < len(names):
                sel = torch.tensor(idx, device=V.device)
                V, alpha = V[sel], alpha[sel]
            G = torch.stack([grads[names[i]].reshape(-1) for i in idx])
            out = project_batched(G, V, alpha)
            for j, i in enumerate(idx):
                g = grads[names[i]]
                g.copy_(out[j].view_as(g))
