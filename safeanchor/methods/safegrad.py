"""SafeGrad + LoRA (ALGORITHMS.md §6.6; Yi et al. 2025, arXiv 2508.07172): gradient surgery
against an alignment gradient, every step.

    g_a = ∇θ [ NLL(safe responses of an alignment batch) + kl_weight · KL(p_aligned ‖ p_θ) ]
    g_u = the full task gradient (p.grad of every trainable tensor, flattened together)
    if ⟨g_u, g_a⟩ < 0:   g_u ← g_u − (⟨g_u, g_a⟩ / ‖g_a‖²) · g_a        (else g_u untouched)

After the surgery ⟨g_u, g_a⟩ = 0: to first order the step no longer increases the alignment
loss. SafeGrad's code is not public; every choice made here:

- Alignment data: the safety calibration set (harmful → refusal, benign → helpful answer),
  shuffled once with the run seed and cut into batches of `align_batch`; step k uses batch
  k mod (number of batches), k counted over the run. A phase's hooks (`Surgery`) count its
  steps from the run's total so far (the method's state) and `end_phase` adds them to it, so a
  fresh process continues the cycle where the last phase stopped. `align_size` caps the set (seeded sample; SafeGrad reports
  that ~20 alignment examples suffice).
- Alignment loss: token NLL of the safe responses (mean over response tokens) plus kl_weight ·
  forward KL(p_aligned ‖ p_θ) averaged over the same response tokens. The paper's KL term
  "learns the distributional safety profile of the aligned model"; the NLL keeps a non-zero
  direction at the start, where θ = aligned and the KL and its gradient are exactly 0.
- The frozen ALIGNED model is the loaded checkpoint: the base weights with the LoRA adapter
  switched off. Its log-probs are computed under peft's `model.disable_adapter()` (no copy of
  the model; tests/unit/test_baseline_safegrad.py checks that they equal the checkpoint's own).
  This holds as long as nothing merges the adapter into the base weights during a run. Since
  the adapter starts at B = 0, θ at the start of domain 1 IS the aligned model.
  The reference is recomputed every step (one no-grad forward of the alignment batch) rather
  than cached: a cache of full-vocabulary log-probs for the whole set is tokens × vocab floats
  (≈ 4 GB for 500 examples at a 32k vocabulary), against +1 forward of `align_batch` examples.
- g_a and its reference are computed in eval mode (no dropout), so the direction the task
  gradient is tested against is deterministic; the mode is restored afterwards.
- g_a comes from torch.autograd.grad, so p.grad (the task gradient) is not touched while it is
  computed. Tensors the alignment loss does not reach count as g_a = 0 there; a trainable
  tensor without a task gradient counts as g_u = 0 and receives −c·g_a if there is a conflict.
  Dot products and norms are accumulated in float64.
- When ‖g_a‖² ≤ eps the step is left alone (counted as `skipped`).
- Data parallel: the surgery needs the FULL reduced gradient, which the loop hands to
  after_backward (`FullGrads`: p.grad under ZeRO-0, DeepSpeed's safe_get_full_grad /
  safe_set_full_grad under ZeRO >= 1). Every rank cycles the same alignment batches with the
  same counter, so every rank computes the same g_a and applies the same correction (and
  writes its own partition of it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from safeanchor import seeds
from safeanchor.config import check
from safeanchor.data import collate, encode_dataset
from safeanchor.methods.base import Context, Method, register_method, trainable_device
from safeanchor.models import lora_parameters
from safeanchor.subspace.anchor import shifted
from safeanchor.train.loop import FullGrads

logger = logging.getLogger(__name__)

COUNTERS = ("steps", "conflicts", "skipped")


@dataclass
class SafeGradConfig:
    """SafeGrad's options (no public code: the choices are documented in the module docstring)."""

    align_batch: int = field(default=8, metadata={"doc": "alignment examples per step (one g_a per step)"})
    align_size: int | None = field(default=None, metadata={
        "doc": "cap on the alignment examples taken from the safety calibration set (seeded sample; null: all)"})
    kl_weight: float = field(default=1.0, metadata={
        "doc": "weight of KL(p_aligned ‖ p_θ) next to the safe-response NLL in the alignment loss"})
    eps: float = field(default=1e-20, metadata={"doc": "no surgery when ‖g_a‖² ≤ eps (counted as skipped)"})

    def __post_init__(self) -> None:
        check(self.align_batch >= 1, "align_batch", "must be >= 1")
        check(self.align_size is None or self.align_size >= 1, "align_size", "must be >= 1 or null")
        check(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        check(self.eps >= 0, "eps", "must be >= 0")


def alignment_loss(model, batch: dict[str, torch.Tensor], kl_weight: float) -> torch.Tensor:
    """NLL of the batch's safe responses + kl_weight · KL(p_aligned ‖ p_θ), both mean over response
    tokens; p_aligned = the model with its LoRA adapter disabled (no gradient)."""
    # The reference first: disable_adapter() toggles requires_grad on the LoRA tensors, which
    # should not happen between the differentiable forward and its autograd.grad.
    ref = reference_logprobs(model, batch) if kl_weight else None
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    logits = model(input_ids=ids, attention_mask=mask).logits
    lg, lb = shifted(logits, labels)
    pos = lb != -100
    logp = F.log_softmax(lg[pos].float(), dim=-1)  # (n_tokens, V)
    nll = -logp.gather(1, lb[pos].unsqueeze(1)).mean()
    if ref is None:
        return nll
    kl = (ref.exp() * (ref - logp)).sum(-1).mean()  # forward KL(p_aligned ‖ p_θ), mean over tokens
    return nll + kl_weight * kl


@torch.no_grad()
def reference_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p_aligned at the batch's response positions (n_tokens, V): the adapter switched off."""
    with model.disable_adapter():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = shifted(logits, batch["labels"])
    return F.log_softmax(lg[lb != -100].float(), dim=-1)


def project_conflict(gu: list[torch.Tensor | None], ga: list[torch.Tensor | None],
                     eps: float = 0.0) -> tuple[list[torch.Tensor | None], dict[str, float]]:
    """g_u − (⟨g_u,g_a⟩/‖g_a‖²)·g_a when ⟨g_u,g_a⟩ < 0 (tensors listed in the same order; None = 0).

    Returns the new list (the input tensors themselves where nothing changes) and facts:
    dot, cos, conflict (0/1), skipped (0/1).
    """
    dot = torch.zeros((), dtype=torch.float64)
    na = torch.zeros((), dtype=torch.float64)
    nu = torch.zeros((), dtype=torch.float64)
    for u, a in zip(gu, ga, strict=True):
        if a is not None:
            na = na + a.double().pow(2).sum().cpu()
            if u is not None:
                dot = dot + (u.double() * a.double()).sum().cpu()
        if u is not None:
            nu = nu + u.double().pow(2).sum().cpu()
    dot_f, na_f, nu_f = float(dot), float(na), float(nu)
    cos = dot_f / (na_f**0.5 * nu_f**0.5) if na_f > 0 and nu_f > 0 else 0.0
    facts = {"dot": dot_f, "cos": cos, "conflict": 0.0, "skipped": 0.0}
    if na_f <= eps:
        facts["skipped"] = 1.0
        return list(gu), facts
    if dot_f >= 0:
        return list(gu), facts
    facts["conflict"] = 1.0
    c = dot_f / na_f
    out: list[torch.Tensor | None] = []
    for u, a in zip(gu, ga, strict=True):
        if a is None:
            out.append(u)
        elif u is None:
            out.append((-c * a.double()).to(a.dtype))
        else:
            out.append((u.double() - c * a.double()).to(u.dtype))
    return out, facts


@register_method("safegrad", SafeGradConfig)
class SafeGrad(Method):
    def __init__(self, cfg: SafeGradConfig) -> None:
        self.cfg = cfg
        self.counters = {k: 0 for k in COUNTERS}  # over the run, folded in by end_phase
        self.cos_sum = 0.0  # Σ cos(g_u, g_a) over steps (mean cosine = cos_sum / steps)
        self.reported = {k: 0 for k in COUNTERS}  # counters at the previous after_domain
        self.domain_log: list[dict[str, Any]] = []

    def alignment_batches(self, ctx: Context) -> list[dict[str, torch.Tensor]]:
        """The alignment batches, on the parameters' device (built per phase)."""
        ex = list(ctx.safety_calib)
        if not ex:
            raise ValueError("data.safety_calib: empty calibration set (safegrad needs alignment examples)")
        rng = seeds.safegrad_batches(ctx.seed)
        if self.cfg.align_size is not None and len(ex) > self.cfg.align_size:
            ex = rng.sample(ex, self.cfg.align_size)
        feats = encode_dataset(ctx.tokenizer, ex, ctx.max_length)
        rng.shuffle(feats)
        device = trainable_device(ctx.model)
        pad = ctx.tokenizer.pad_token_id
        return [{k: v.to(device) for k, v in collate(feats[s : s + self.cfg.align_batch], pad).items()}
                for s in range(0, len(feats), self.cfg.align_batch)]

    def phase_hooks(self, ctx: Context, phase: str) -> Surgery:
        if phase != "domain":
            return super().phase_hooks(ctx, phase)
        # the cycle through the alignment batches goes on where the previous phase stopped
        return Surgery(self.cfg, self.alignment_batches(ctx), start=self.counters["steps"])

    def end_phase(self, ctx: Context, phase: str, stats: dict[str, Any]) -> None:
        for k in COUNTERS:
            self.counters[k] += int(stats.get(k, 0))
        self.cos_sum += float(stats.get("cos_sum", 0.0))

    def setup(self, ctx: Context) -> None:
        nonzero = [n for n, p in lora_parameters(ctx.model).items() if "lora_B" in n and bool(p.detach().any())]
        if nonzero:  # the reference is still the checkpoint, but θ no longer starts there
            logger.info(f"  [safegrad] note: {len(nonzero)} lora_B tensors are non-zero before domain 1; the KL "
                        "reference (adapter off) is the checkpoint, not the starting model")

    # ---- reporting / persistence -----------------------------------------------------
    def after_domain(self, ctx: Context) -> dict[str, Any]:
        d = {k: self.counters[k] - self.reported[k] for k in COUNTERS}
        rec = {"domain": ctx.domain, **d, "conflict_rate": d["conflicts"] / d["steps"] if d["steps"] else 0.0,
               "total_steps": self.counters["steps"], "total_conflicts": self.counters["conflicts"],
               "mean_cos_total": self.cos_sum / self.counters["steps"] if self.counters["steps"] else 0.0}
        self.reported = dict(self.counters)
        self.domain_log.append(rec)
        logger.info(f"  [safegrad] {d['conflicts']}/{d['steps']} steps had a conflicting gradient (projected)"
                    + (f", {d['skipped']} skipped (g_a = 0)" if d["skipped"] else ""))
        return rec

    def state_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "cos_sum": self.cos_sum, "reported": dict(self.reported),
                "domains": [dict(r) for r in self.domain_log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "counters" in state:
            self.counters = {k: int(state["counters"][k]) for k in COUNTERS}
        if "cos_sum" in state:
            self.cos_sum = float(state["cos_sum"])
        if "reported" in state:
            self.reported = {k: int(state["reported"][k]) for k in COUNTERS}
        if "domains" in state:
            self.domain_log = [dict(r) for r in state["domains"]]

    def summary(self) -> dict[str, Any]:
        s = self.counters["steps"]
        return {**self.counters, "conflict_rate": self.counters["conflicts"] / s if s else 0.0,
                "mean_cos": self.cos_sum / s if s else 0.0, "domains": self.domain_log}


class Surgery:
    """A domain phase's hooks: after backward, the task gradient is projected off the
    alignment gradient where they conflict. Counts its steps, conflicts, skips and Σ cos over
    the phase (saved in Train checkpoints; `stats()` goes to `SafeGrad.end_phase`)."""

    def __init__(self, cfg: SafeGradConfig, batches: list[dict[str, torch.Tensor]], start: int = 0) -> None:
        self.cfg, self.batches, self.start = cfg, batches, start
        self.counters = {k: 0 for k in COUNTERS}
        self.cos_sum = 0.0

    def loss(self, model, batch, task_loss):
        return task_loss

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.batches[(self.start + self.counters["steps"]) % len(self.batches)]

    def alignment_gradient(self, model, batch: dict[str, torch.Tensor],
                           params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
        """g_a per tensor via autograd.grad (p.grad untouched); eval mode, restored after."""
        was_training = model.training
        model.eval()
        try:
            loss = alignment_loss(model, batch, self.cfg.kl_weight)
            return list(torch.autograd.grad(loss, params, allow_unused=True))
        finally:
            model.train(was_training)

    def after_backward(self, model, batch, grads: FullGrads | None = None) -> None:
        """The surgery on the full reduced gradient (`grads`; default: p.grad in one process)."""
        grads = grads if grads is not None else FullGrads.of(model)
        ga = self.alignment_gradient(model, self.next_batch(), grads.params)
        new, facts = project_conflict(grads.get(), ga, self.cfg.eps)
        if facts["conflict"]:
            with torch.no_grad():
                grads.set(new)
        self.counters["steps"] += 1
        self.counters["conflicts"] += int(facts["conflict"])
        self.counters["skipped"] += int(facts["skipped"])
        self.cos_sum += facts["cos"]

    def state_dict(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "cos_sum": self.cos_sum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = {k: int(state["counters"][k]) for k in COUNTERS}
        self.cos_sum = float(state["cos_sum"])

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "cos_sum": self.cos_sum}
