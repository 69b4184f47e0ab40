"""O-LoRA (Wang et al., 2023, "Orthogonal Subspace Learning for Language Model Continual
Learning"): one LoRA per domain; the earlier ones are frozen but stay in the forward pass, and
the new one's A matrices are pushed towards orthogonality with theirs. ALGORITHMS.md §6.3.

Per domain t:
  before_domain  t >= 2: the pipeline's trainable adapter "default" (trained on d_{t-1}) is copied
                 into a frozen adapter "olora<t-1>" (same LoraConfig), which stays active; then
                 "default" is re-initialised as peft would (kaiming-uniform A, seeded; B = 0).
                 Right after this the model computes exactly what it computed before.
  each step      loss = L_task + lam1 · Σ_modules Σ_prev Σ|A_prev A_newᵀ|   (A: (r, in), so each
                 cross-Gram is (r, r); L1 = sum of absolute entries, as the authors' code does).
  after_domain   every adapter is written with peft `save_pretrained` under
                 <run_dir>/olora/step<t>-<domain>/ ("default" at the top, "olora<i>" in sub-folders).

The pipeline checkpoints only "default", so the frozen adapters travel in `state_dict()` and
`attach()` re-creates them (idempotent). Also unrelated to peft's `init_lora_weights="olora"`.

Not implemented: the authors' optional L2 penalty on the new adapter (their lamda_2, 0 in their
scripts) and their instruction-prompt format (the pipeline's chat template is used).

The adapter helpers (frozen copies, re-initialisation, restore) live in `safeanchor.models`;
Vaccine freezes its re-alignment adapter with the same ones.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.config import check
from safeanchor.methods.base import Context, Method, register_method
from safeanchor.models import (
    TRAINABLE,
    freeze_copy,
    lora_layers,
    reinit_adapter,
    restore_frozen,
    set_active,
)

logger = logging.getLogger(__name__)


# ---- O-LoRA's penalty -----------------------------------------------------------------------
def orthogonality_loss(model, previous: list[str], trainable: str = TRAINABLE) -> torch.Tensor | None:
    """Σ_modules Σ_prev Σ_ij |(A_prev A_newᵀ)_ij| (None when there is no previous adapter)."""
    if not previous:
        return None
    terms = []
    for _, layer in lora_layers(model, trainable):
        a_new = layer.lora_A[trainable].weight  # (r, in)
        for name in previous:
            a_prev = layer.lora_A[name].weight.detach()  # (r_prev, in), frozen
            terms.append(torch.mm(a_prev, a_new.t()).abs().sum())
    return torch.stack(terms).sum()


# ---- the method ------------------------------------------------------------------------------
@dataclass
class OLoraConfig:
    """O-LoRA's options (the adapters' rank, alpha and targets are the run's `lora.*`)."""

    lam1: float = field(default=0.5, metadata={"doc": "weight λ1 of the L1 orthogonality loss Σ|A_prev A_newᵀ| (paper/code 0.5)"})
    save_adapters: bool = field(default=True, metadata={"doc": "write every adapter with peft save_pretrained to <run_dir>/olora/step<t>-<domain>/ after each domain"})

    def __post_init__(self) -> None:
        check(self.lam1 >= 0, "lam1", "must be >= 0")


@register_method("olora", OLoraConfig)
class OLora(Method):
    def __init__(self, cfg: OLoraConfig) -> None:
        self.cfg = cfg
        self.frozen: dict[str, dict[str, torch.Tensor]] = {}  # adapter name -> tensors, in creation order
        self.orth_last: float | None = None  # orthogonality loss of the last training step

    def _new_name(self, step: int) -> str:
        return f"olora{step - 1}"  # the adapter trained on domain step-1

    def before_domain(self, ctx: Context) -> None:
        if ctx.step < 2:
            return  # domain 1 trains the pipeline's fresh adapter itself
        name = self._new_name(ctx.step)
        if name in self.frozen:  # re-run of the same step: already done
            logger.info(f"  [olora] {name} already frozen; nothing to do")
            return
        self.frozen[name] = freeze_copy(ctx.model, name)
        set_active(ctx.model, list(self.frozen))
        reinit_adapter(ctx.model, seed=seeds.adapter_reinit(ctx.seed, ctx.step))
        self.orth_last = None
        logger.info(f"  [olora] froze the previous domain's adapter as {name}; {len(self.frozen)} frozen, "
                    f"'{TRAINABLE}' re-initialised for {ctx.domain}")

    def attach(self, ctx: Context) -> None:
        if self.frozen:
            restore_frozen(ctx.model, self.frozen)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task_loss: torch.Tensor) -> torch.Tensor:
        orth = orthogonality_loss(model, list(self.frozen))
        if orth is None:
            return task_loss
        self.orth_last = float(orth.detach())
        return task_loss + self.cfg.lam1 * orth

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        with torch.no_grad():
            orth = orthogonality_loss(ctx.model, list(self.frozen))
        info: dict[str, Any] = {"frozen_adapters": len(self.frozen),
                                "orth_loss": float(orth) if orth is not None else 0.0}
        if self.cfg.save_adapters and ctx.run_dir is not None:
            out = f"olora/step{ctx.step}-{ctx.domain}"
            with ctx.run_dir.staged(out) as tmp:  # peft writes to local disks only
                ctx.model.save_pretrained(str(tmp), selected_adapters=[TRAINABLE, *self.frozen])
            info["dir"] = ctx.run_dir.uri(out)
        return {"olora": info}

    def state_dict(self) -> dict[str, Any]:
        return {"frozen": {n: dict(w) for n, w in self.frozen.items()}, "orth_last": self.orth_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "frozen" in state:
            self.frozen = {n: dict(w) for n, w in state["frozen"].items()}
        if "orth_last" in state:
            self.orth_last = state["orth_last"]

    def summary(self) -> dict[str, Any]:
        return {"frozen_adapters": list(self.frozen), "orth_last": self.orth_last}
