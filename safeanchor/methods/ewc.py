"""EWC + LoRA (ALGORITHMS.md §6.2): a quadratic pull of the LoRA tensors towards an anchor θ*.

    loss = L_task + lam · Σ_i Σ_j F_ij (θ_ij − θ*_ij)²          over every LoRA tensor θ_i

F is the diagonal empirical Fisher: the mean over examples of the SQUARED PER-EXAMPLE gradient
of the response NLL (`safeanchor.subspace.fisher.safety_gradients`). The authors' code squares
batch gradients instead, which is a different (much smaller, batch-size dependent) quantity.
The penalty carries no ½ and lam multiplies the sum directly, as ALGORITHMS.md writes it and as
the authors' code does (lam = 100 there and in the paper).

Where F and θ* come from (`fisher_source`):

- "previous_domain" (the paper's variant; default): after each domain t, F_t is measured on d_t's
  training data at the model as it is after d_t, and θ* becomes that model. Domain t+1 is then
  pulled back towards the end of domain t, weighted by how much d_t's loss cares about each
  coordinate. The first domain trains without a penalty (nothing to protect yet).
- "safety": F is measured once on the safety calibration set at the ALIGNED model, before the
  first domain, and θ* = the aligned parameters (the fresh adapter). Not refreshed by default:
  re-anchoring at a model that has already drifted would protect the drift, not the alignment
  (`refresh_safety: true` re-measures F on the safety set after every domain and re-anchors).

Online accumulation (Schwarz et al. 2018, "online EWC"): F ← online_gamma·F_old + F_new at every
refresh, θ* ← the current parameters. online_gamma = 1 (default) keeps every earlier domain's
importance at full weight; online_gamma = 0 reproduces the authors' code, which REPLACES the
Fisher after each domain (only the last domain is protected).

B = 0 at a fresh adapter: ∂L/∂A = Bᵀ(...) = 0 exactly, so every lora_A tensor has F = 0 at the
aligned model. With `fisher_source: safety` (and no refresh) EWC therefore never constrains A:
only the B tensors are pulled towards θ*_B = 0. That still bounds the function change to first
order (ΔW = B·A·s with B ≈ 0), but the Fisher of B was measured at the initial A and goes stale
as A moves. With "previous_domain" the issue vanishes after the first domain (B ≠ 0 by then).
after_domain reports how many tensors have an all-zero Fisher.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.config import check
from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.methods.base import Context, Method, register_method, trainable_device
from safeanchor.models import lora_parameters
from safeanchor.ssi import safety_gradients

logger = logging.getLogger(__name__)

FISHER_SOURCES = ("previous_domain", "safety")


@dataclass
class EwcConfig:
    """EWC + LoRA; defaults are the paper's (lam 100, Fisher on the previous domain's data)."""

    lam: float = field(default=100.0, metadata={"doc": "penalty weight: lam · Σ F (θ − θ*)² (paper 100)"})
    fisher_source: str = field(default="previous_domain", metadata={
        "doc": "'previous_domain' (paper: Fisher on each finished domain's training data, θ* = the model after "
               "it) or 'safety' (Fisher on the safety calibration set at the aligned model, θ* = aligned)"})
    refresh_safety: bool = field(default=False, metadata={
        "doc": "fisher_source 'safety' only: re-measure F on the safety set after every domain and re-anchor "
               "θ* there (default off: θ* stays the aligned model)"})
    online_gamma: float = field(default=1.0, metadata={
        "doc": "online accumulation F ← γ·F_old + F_new (1: every domain kept at full weight; 0: replace, as "
               "the authors' code does)"})
    fisher_samples: int | None = field(default=500, metadata={
        "doc": "examples used per Fisher estimate, sampled with a seeded RNG (null: all)"})
    grad_chunk: int = field(default=16, metadata={
        "doc": "examples per per-example-gradient call (bounds memory: chunk × LoRA parameters floats)"})

    def __post_init__(self) -> None:
        check(self.lam >= 0, "lam", "must be >= 0")
        check(self.fisher_source in FISHER_SOURCES, "fisher_source",
              f"must be one of {', '.join(FISHER_SOURCES)}, got {self.fisher_source!r}")
        check(not self.refresh_safety or self.fisher_source == "safety", "refresh_safety",
              "only applies to fisher_source 'safety'")
        check(0 <= self.online_gamma <= 1, "online_gamma", "must be in [0, 1]")
        check(self.fisher_samples is None or self.fisher_samples >= 1, "fisher_samples", "must be >= 1 or null")
        check(self.grad_chunk >= 1, "grad_chunk", "must be >= 1")


def diagonal_fisher(model, tokenizer, examples: list[ChatExample], max_length: int,
                    chunk: int = 16) -> dict[str, torch.Tensor]:
    """F_i = (1/N) Σ_n (∂L(x_n)/∂θ_i)² per LoRA tensor (float32, the tensor's shape).

    Per-example gradients come in blocks of `chunk` examples, so memory stays at
    chunk × (LoRA parameters) floats whatever N is.
    """
    if not examples:
        raise ValueError("diagonal_fisher: no examples")
    feats = encode_dataset(tokenizer, examples, max_length)
    params = lora_parameters(model)
    fisher = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()}
    for s in range(0, len(feats), chunk):
        batch = collate(feats[s : s + chunk], tokenizer.pad_token_id)
        batch = {k: v.to(next(iter(params.values())).device) for k, v in batch.items()}
        grads = safety_gradients(model, batch, chunk=chunk)  # name -> (b, *shape)
        for n, g in grads.items():
            fisher[n] += g.float().pow(2).sum(0)
    return {n: f / len(feats) for n, f in fisher.items()}


def ewc_penalty(params: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor],
                anchor: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """lam · Σ_i Σ F_i (θ_i − θ*_i)² (differentiable in θ)."""
    total = None
    for n, f in fisher.items():
        if n not in params:
            raise KeyError(f"ewc: LoRA tensor {n!r} of the stored Fisher is not in the model")
        p = params[n]
        term = (f * (p - anchor[n]).pow(2)).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("ewc_penalty: empty Fisher")
    return lam * total


@register_method("ewc", EwcConfig)
class Ewc(Method):
    def __init__(self, cfg: EwcConfig) -> None:
        self.cfg = cfg
        self.fisher: dict[str, torch.Tensor] = {}  # F_i, float32
        self.anchor: dict[str, torch.Tensor] = {}  # θ*_i, float32
        self.log: list[dict[str, Any]] = []  # one record per Fisher estimate
        self._pen_sum = 0.0  # penalty statistics of the domain's phases (what after_domain reports)
        self._pen_n = 0
        self._pen_last = 0.0

    # ---- Fisher estimates (driver) --------------------------------------------------
    def _sample(self, ctx: Context, examples: list[ChatExample], tag: str) -> list[ChatExample]:
        k = self.cfg.fisher_samples
        if k is not None and len(examples) > k:
            # str seeds are hashed with sha512 by `random`: stable across processes
            return seeds.ewc_sample(ctx.seed, tag, ctx.step).sample(examples, k)
        return list(examples)

    def refresh(self, ctx: Context, examples: list[ChatExample], tag: str) -> dict[str, Any]:
        """F ← γ·F_old + F_new on `examples` at the current model; θ* ← the current model."""
        if not examples:
            key = "data.safety_calib" if tag == "safety" else f"data.domains.{ctx.domain}.train"
            raise ValueError(f"{key}: no examples to estimate the EWC Fisher on")
        t0 = time.perf_counter()
        ex = self._sample(ctx, examples, tag)
        new = diagonal_fisher(ctx.model, ctx.tokenizer, ex, ctx.max_length, self.cfg.grad_chunk)
        g = self.cfg.online_gamma
        self.fisher = {n: (g * self.fisher[n].to(f) + f) if n in self.fisher else f for n, f in new.items()}
        self.anchor = {n: p.detach().float().clone() for n, p in lora_parameters(ctx.model).items()}
        zero = sorted(n for n, f in new.items() if not bool(f.any()))
        rec = {
            "domain": ctx.domain, "step": ctx.step, "source": tag, "examples": len(ex),
            "fisher_s": time.perf_counter() - t0,
            "fisher_trace_new": float(sum(f.sum() for f in new.values())),
            "fisher_trace": float(sum(f.sum() for f in self.fisher.values())),
            "fisher_trace_A": float(sum(f.sum() for n, f in self.fisher.items() if "lora_A" in n)),
            "fisher_trace_B": float(sum(f.sum() for n, f in self.fisher.items() if "lora_B" in n)),
            "fisher_max": float(max(f.max() for f in self.fisher.values())),
            "fisher_zero_tensors": len(zero),
        }
        self.log.append(rec)
        logger.info(f"  [ewc] Fisher on {len(ex)} {tag} examples ({rec['fisher_s']:.1f}s): trace {rec['fisher_trace']:.3e} "
                    f"(A {rec['fisher_trace_A']:.3e}, B {rec['fisher_trace_B']:.3e}); {len(zero)} tensors with F = 0"
                    + (" (lora_A at B = 0: unconstrained)" if zero and all("lora_A" in n for n in zero) else ""))
        return rec

    # ---- hooks ----------------------------------------------------------------------
    def before_domain(self, ctx: Context) -> None:
        if self.cfg.fisher_source == "safety" and not self.fisher:
            self.refresh(ctx, ctx.safety_calib, "safety")  # at the aligned model, before domain 1

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        st = self.penalty_stats()
        info: dict[str, Any] = {"penalty_mean": st["mean"], "penalty_last": st["last"], "penalty_steps": st["steps"]}
        self._reset_stats()
        if self.cfg.fisher_source == "previous_domain":
            info.update(self.refresh(ctx, ctx.domain_train, "domain"))
        elif self.cfg.refresh_safety:
            info.update(self.refresh(ctx, ctx.safety_calib, "safety"))
        elif self.log:
            info["fisher_trace"] = self.log[-1]["fisher_trace"]
        return info

    def phase_hooks(self, ctx: Context, phase: str) -> Any:
        """F and θ* go to the parameters' device (float32: the penalty is summed in float32);
        the phase's hooks count the penalty (`end_phase` folds their stats in)."""
        if phase != "domain":
            return super().phase_hooks(ctx, phase)
        dev = trainable_device(ctx.model)
        self.fisher = {n: f.to(dev) for n, f in self.fisher.items()}
        self.anchor = {n: a.to(dev) for n, a in self.anchor.items()}
        return _Penalty(self)

    def penalty(self, model) -> torch.Tensor | None:
        """lam · Σ F (θ − θ*)² at the model's LoRA tensors (None: no Fisher yet, or lam = 0)."""
        if not self.fisher or self.cfg.lam == 0:
            return None
        return ewc_penalty(lora_parameters(model), self.fisher, self.anchor, self.cfg.lam)

    def loss(self, model, batch, task_loss):
        pen = self.penalty(model)
        return task_loss if pen is None else task_loss + pen.to(task_loss.dtype)

    def end_phase(self, ctx: Context, phase: str, stats: dict[str, Any]) -> None:
        if stats.get("n"):
            self._pen_sum += float(stats["sum"])
            self._pen_n += int(stats["n"])
            self._pen_last = float(stats["last"])

    def _reset_stats(self) -> None:
        self._pen_sum, self._pen_n, self._pen_last = 0.0, 0, 0.0

    def penalty_stats(self) -> dict[str, float]:
        """The penalty over the domain's steps: mean, last value, number of steps."""
        return {"mean": self._pen_sum / self._pen_n if self._pen_n else 0.0, "last": self._pen_last,
                "steps": self._pen_n}

    # ---- persistence ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "fisher": {n: f.detach().cpu().clone() for n, f in self.fisher.items()},
            "anchor": {n: a.detach().cpu().clone() for n, a in self.anchor.items()},
            "log": [dict(r) for r in self.log],
            "penalty": {"sum": self._pen_sum, "n": self._pen_n, "last": self._pen_last},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "fisher" in state:
            self.fisher = {n: f.float().clone() for n, f in state["fisher"].items()}
            self.anchor = {n: a.float().clone() for n, a in state["anchor"].items()}
            if set(self.fisher) != set(self.anchor):
                raise ValueError("ewc state: Fisher and anchor name different tensors")
        if "log" in state:
            self.log = [dict(r) for r in state["log"]]
        if "penalty" in state:
            pen = state["penalty"]
            self._pen_sum, self._pen_n, self._pen_last = float(pen["sum"]), int(pen["n"]), float(pen["last"])

    def summary(self) -> dict[str, Any]:
        return {"fisher_source": self.cfg.fisher_source, "fisher_log": self.log}


class _Penalty:
    """A domain phase's hooks: task loss + the EWC penalty, whose values it sums over the
    phase (device-side, no sync per step; saved in Train checkpoints)."""

    def __init__(self, ewc: Ewc) -> None:
        self.ewc = ewc
        self.n = 0
        self.sum: torch.Tensor | float = 0.0
        self.last: torch.Tensor | float = 0.0

    def loss(self, model, batch, task_loss):
        pen = self.ewc.penalty(model)
        if pen is None:
            return task_loss
        d = pen.detach()
        self.sum, self.last, self.n = self.sum + d, d, self.n + 1
        return task_loss + pen.to(task_loss.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "sum": float(self.sum), "last": float(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.sum, self.last = int(state["n"]), float(state["sum"]), float(state["last"])

    def stats(self) -> dict[str, Any]:
        return self.state_dict()
