"""SafeAnchor (arXiv 2604.17691): SSI + OSCA + anchor loss + CSM replay. ALGORITHMS.md §1–§4.

Per domain t (each a durable pipeline step; state lives in state_dict()):
  before_domain  SSI: per-example safety gradients on the calibration set at the current
                 model -> per-tensor Fisher eigenbasis (thin SVD) -> Fisher-weighted merge
                 with the previous subspace; α_i from the normalised trace.
  domain phase   phase_hooks caches the anchor reference log-probs of θ_{t−1}; each step:
                 ĝ_i = g_i − (1−α_i) V_i V_iᵀ g_i — in one process after backward, same-size
                 tensors in one bmm (transform_grads); under DeepSpeed as a per-tensor gradient
                 hook on the local gradient (linear, so exact under data parallelism) — plus
                 ∇ γ·KL(p_{θ_{t−1}} ‖ p_θ) added AFTER it.
  gate (CSM)     s_t on the probe set; if s_t < (1−τ)·s_0 ask for a "replay" phase (E projected
                 steps of L_task + β·L_safe), then re-check; at most R rounds.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.config import ConfigError, check
from safeanchor.data import collate, encode_dataset
from safeanchor.methods.base import (
    Context,
    Gate,
    Method,
    TrainPhase,
    register_method,
    trainable_device,
)
from safeanchor.models import lora_parameters
from safeanchor.ssi import DEFAULT_GROUP_MB, safety_subspaces
from safeanchor.subspace.anchor import anchor_kl, cached_reference
from safeanchor.subspace.fisher import Subspace, merge_subspaces, random_basis
from safeanchor.subspace.projection import GradientProjection

logger = logging.getLogger(__name__)


@dataclass
class SafeAnchorConfig:
    """SafeAnchor's options; paper defaults unless the comment says otherwise."""

    rho: float = field(default=0.90, metadata={"doc": "energy fraction of Fisher eigenvalues kept per tensor (paper 0.90)"})
    k_max: int = field(default=16, metadata={"doc": "cap on the subspace rank per tensor"})
    k_fixed: int | None = field(default=None, metadata={"doc": "fixed rank instead of the energy rule (null: use rho)"})
    calib_size: int | None = field(default=None, metadata={"doc": "calibration examples used for SSI (null: all; paper 500)"})
    grad_chunk: int = field(default=16, metadata={"doc": "examples per vmap chunk of per-example gradients (memory)"})
    ssi_group_mb: float = field(default=DEFAULT_GROUP_MB, metadata={"doc": "SSI memory budget (MiB) for the per-example gradient rows held at once: LoRA tensors are processed in groups under it, one pass over the calibration set per group (at 7B, N 500: ~1 GiB per layer of q/k/v/o r 16)"})
    lam: float = field(default=0.5, metadata={"doc": "adaptive relaxation α_i = clip(1 − lam·t̃_i, 0, 1) (paper λ = 0.5)"})
    trace_norm: str = field(default="max", metadata={"doc": "t̃_i = trace_i / max_j trace_j ('max'), trace_i / Σ_j trace_j ('share') or trace_i / mean_j trace_j ('mean')"})
    strict: bool = field(default=False, metadata={"doc": "ablation: α = 0 everywhere (full projection)"})
    subspace: str = field(default="fisher", metadata={"doc": "what the domain gradients are projected away from: 'fisher' (the safety subspace) or 'random' (control: a seeded random orthonormal basis of the same k per tensor, same α; anchor and CSM unchanged)"})
    projection: bool = field(default=True, metadata={"doc": "ablation off: no gradient projection at all (SSI still sets k and α for the record)"})
    adaptive: bool = field(default=True, metadata={"doc": "ablation off: the same α = alpha_fixed for every tensor"})
    alpha_fixed: float = field(default=0.5, metadata={"doc": "α used for every tensor when adaptive is off (0.5: the middle of the adaptive range [1 − lam, 1] at lam = 0.5; 0 would equal strict)"})
    incremental: bool = field(default=True, metadata={"doc": "ablation off: recompute the subspace each domain without merging the previous one"})
    anchor: bool = field(default=True, metadata={"doc": "ablation off: no anchor loss"})
    gamma: float = field(default=0.1, metadata={"doc": "anchor loss weight γ (paper 0.1)"})
    anchor_batch: int = field(default=8, metadata={"doc": "anchor examples per training step"})
    anchor_kinds: list[str] | None = field(default=None, metadata={"doc": "anchor only on calibration examples whose meta 'kind' is listed (e.g. [harmful]: refusals only); null: all"})
    anchor_every: int = field(default=1, metadata={"doc": "anchor loss on every k-th step only, weighted k·γ: the same expected gradient at 1/k of its cost"})
    csm: bool = field(default=True, metadata={"doc": "ablation off: no monitoring / replay"})
    tau: float = field(default=0.05, metadata={"doc": "replay when s_t < (1 − τ)·s_0 (paper 0.05)"})
    replay_steps: int = field(default=200, metadata={"doc": "E: projected steps per replay round (paper 200)"})
    replay_rounds: int = field(default=3, metadata={"doc": "R: max replay rounds per domain"})
    replay_lr: float = field(default=2e-5, metadata={"doc": "replay learning rate (paper 2e-5)"})
    replay_batch: int = field(default=16, metadata={"doc": "task examples per replay step"})
    beta: float = field(default=1.0, metadata={"doc": "weight β of the safety loss during replay"})
    safety_batch: int = field(default=16, metadata={"doc": "safety examples per replay step"})

    def __post_init__(self) -> None:
        check(0 < self.rho <= 1, "rho", "must be in (0, 1]")
        check(self.subspace in ("fisher", "random"), "subspace", f"must be 'fisher' or 'random', got {self.subspace!r}")
        check(self.k_max >= 1, "k_max", "must be >= 1")
        check(self.k_fixed is None or self.k_fixed >= 1, "k_fixed", "must be >= 1")
        check(self.calib_size is None or self.calib_size >= 1, "calib_size", "must be >= 1")
        check(self.grad_chunk >= 1, "grad_chunk", "must be >= 1")
        check(self.ssi_group_mb >= 0, "ssi_group_mb", "must be >= 0 (0: one tensor per pass)")
        check(self.lam >= 0, "lam", "must be >= 0")
        check(self.trace_norm in ("max", "share", "mean"), "trace_norm", "must be 'max', 'share' or 'mean'")
        check(0 <= self.alpha_fixed <= 1, "alpha_fixed", "must be in [0, 1]")
        check(self.gamma >= 0, "gamma", "must be >= 0")
        check(self.anchor_batch >= 1, "anchor_batch", "must be >= 1")
        check(self.anchor_every >= 1, "anchor_every", "must be >= 1")
        check(0 <= self.tau <= 1, "tau", "must be in [0, 1]")
        check(self.replay_steps >= 1, "replay_steps", "must be >= 1")
        check(self.replay_rounds >= 0, "replay_rounds", "must be >= 0")
        check(self.replay_lr > 0, "replay_lr", "must be > 0")
        check(self.replay_batch >= 1 and self.safety_batch >= 1, "replay_batch", "must be >= 1")
        check(self.beta >= 0, "beta", "must be >= 0")


def short_name(name: str) -> str:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight' -> 'L3.q_proj.A'."""
    parts = name.split(".")
    layer = next((parts[i + 1] for i, p in enumerate(parts) if p == "layers"), "?")
    mod = next((p for p in parts if p.endswith("_proj")), parts[-3])
    ab = "A" if "lora_A" in name else "B"
    return f"L{layer}.{mod}.{ab}"


def alphas_from_traces(traces: dict[str, float], cfg: SafeAnchorConfig) -> dict[str, float]:
    """α_i per tensor (ALGORITHMS.md §2), from NORMALISED traces (raw traces make α ≈ 1)."""
    if cfg.strict:
        return {k: 0.0 for k in traces}
    if not cfg.adaptive:
        return {k: cfg.alpha_fixed for k in traces}
    vals = list(traces.values())
    denom = {"max": max(vals), "share": sum(vals), "mean": sum(vals) / len(vals)}[cfg.trace_norm]
    if denom <= 0:
        return {k: 1.0 for k in traces}
    return {k: min(1.0, max(0.0, 1.0 - cfg.lam * t / denom)) for k, t in traces.items()}


def csm_threshold(s0: float, tau: float) -> float:
    """CSM's gate (ALGORITHMS.md §4): replay when s_t < (1 − τ)·s_0."""
    return (1 - tau) * s0


def safety_batches(tokenizer, examples: list, size: int, max_length: int, seed: int, device: torch.device,
                   kinds: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """The anchor / replay safety batches: `examples` (those whose meta 'kind' is in `kinds`,
    if given) encoded with `max_length`, in the seeded order of `seeds.safety_batch_order`,
    collated `size` at a time on `device`."""
    if kinds is not None:
        chosen = [e for e in examples if e.meta.get("kind") in kinds]
        if not chosen:
            found = sorted({str(e.meta.get("kind")) for e in examples})
            raise ConfigError("methods.safeanchor.anchor_kinds",
                              f"no calibration example has a meta 'kind' in {kinds} (kinds present: {found})")
        examples = chosen
    feats = encode_dataset(tokenizer, examples, max_length)
    order = list(range(len(feats)))
    seeds.safety_batch_order(seed).shuffle(order)
    pad = tokenizer.pad_token_id
    return [{k: v.to(device) for k, v in collate([feats[i] for i in order[s : s + size]], pad).items()}
            for s in range(0, len(order), size)]


@register_method("safeanchor", SafeAnchorConfig)
class SafeAnchor(Method):
    def __init__(self, cfg: SafeAnchorConfig) -> None:
        self.cfg = cfg
        self.subspaces: dict[str, Subspace] = {}
        self.random_V: dict[str, torch.Tensor] = {}  # subspace: random — the control's bases
        self.alpha: dict[str, float] = {}
        self.projection = GradientProjection({})  # built per phase by `_build_projection`
        self.s0: float | None = None
        self.csm_log: list[dict[str, Any]] = []
        self.ssi_log: list[dict[str, Any]] = []

    # ---- SSI ------------------------------------------------------------------------
    def _calib_examples(self, ctx: Context) -> list:
        ex = ctx.safety_calib
        if not ex:
            raise ValueError("data.safety_calib: empty calibration set (SafeAnchor needs safe responses)")
        if self.cfg.calib_size and len(ex) > self.cfg.calib_size:
            ex = seeds.calib_sample(ctx.seed).sample(ex, self.cfg.calib_size)
        return ex

    def identify(self, ctx: Context) -> dict[str, Subspace]:
        """Fresh per-tensor subspaces at the current model (no merge)."""
        if ctx.fisher_subspaces is not None:  # the pipeline's service (Train workers, Ray tasks or in-process)
            return ctx.fisher_subspaces(self._calib_examples(ctx), self.cfg.rho, self.cfg.k_max, self.cfg.k_fixed,
                                        self.cfg.grad_chunk, ctx.max_length, group_mb=self.cfg.ssi_group_mb)
        # no pipeline (a method used on its own): in this process, at ctx.model
        return safety_subspaces(ctx.model, ctx.tokenizer, self._calib_examples(ctx), ctx.max_length,
                                self.cfg.rho, self.cfg.k_max, self.cfg.k_fixed, chunk=self.cfg.grad_chunk,
                                group_mb=self.cfg.ssi_group_mb)

    def _build_projection(self, model) -> None:
        """Per-tensor (V, α) for the gradient hooks and their batched form
        (`subspace.projection.GradientProjection`); tensors with k = 0 or α = 1 are skipped, and
        nothing is projected with `projection` off. V lives with its parameter (device and dtype;
        subspaces arrive on CPU from SSI or a checkpoint), so a step moves nothing."""
        bases: dict[str, torch.Tensor] = {}
        if self.cfg.projection:
            source = self.random_V if self.cfg.subspace == "random" else {n: s.V for n, s in self.subspaces.items()}
            bases = {n: V for n, V in source.items() if n in self.subspaces and self.subspaces[n].k > 0}
        self.projection = GradientProjection.for_params(lora_parameters(model), bases, self.alpha)

    @property
    def _proj(self) -> dict[str, tuple[torch.Tensor, float]]:
        return self.projection.entries

    @property
    def _groups(self) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        return self.projection.groups

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        return self.projection.transform_grad(name, grad)  # ĝ = g − (1 − α)·V(Vᵀg)

    def transform_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """The same projection on every full gradient at once, in place: one bmm per group of
        same-size tensors (`fisher.project_batched`). The single-process loop uses this after
        backward; the DeepSpeed engine keeps the per-tensor hooks (it must project the local
        gradient before ZeRO reduces and partitions it)."""
        self.projection.transform_grads(grads)

    # ---- hooks ----------------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        if self.cfg.csm:
            self.s0 = ctx.probe_safety()
            logger.info(f"  [csm] s_0 = {self.s0:.3f} on {len(ctx.safety_probe)} probe prompts")

    def _batches(self, ctx: Context, size: int, kinds: list[str] | None = None) -> list[dict[str, torch.Tensor]]:
        return safety_batches(ctx.tokenizer, ctx.safety_calib, size, ctx.max_length, ctx.seed,
                              trainable_device(ctx.model), kinds)

    def before_domain(self, ctx: Context) -> None:
        t0 = time.perf_counter()
        fresh = self.identify(ctx)
        if self.cfg.incremental and self.subspaces:
            merged = {n: merge_subspaces(self.subspaces[n], s, self.cfg.rho, self.cfg.k_max, self.cfg.k_fixed)
                      for n, s in fresh.items()}
        else:
            merged = fresh
        self.subspaces = merged
        if self.cfg.subspace == "random":
            # The control keeps the Fisher side (k, α, the merges) and swaps only the directions:
            # a fresh seeded basis of the merged k per tensor, for this domain.
            self.random_V = {n: random_basis(s.V.shape[0], s.k, seeds.random_subspace(ctx.seed, ctx.step, n), s.V.dtype)
                             for n, s in merged.items()}
        self.alpha = alphas_from_traces({n: s.trace for n, s in fresh.items()}, self.cfg)
        ssi_s = time.perf_counter() - t0
        empty = [short_name(n) for n, s in merged.items() if s.k == 0]
        ks = [s.k for s in merged.values()]
        al = list(self.alpha.values())
        rec = {
            "domain": ctx.domain, "ssi_s": ssi_s, "k_mean": sum(ks) / len(ks), "k_max": max(ks),
            "k_zero": len(empty), "alpha_min": min(al), "alpha_mean": sum(al) / len(al),
            "k": {short_name(n): s.k for n, s in merged.items()},
            "alpha": {short_name(n): round(self.alpha[n], 4) for n in merged},
        }
        self.ssi_log.append(rec)
        logger.info(f"  [ssi] {ssi_s:.1f}s: k mean {rec['k_mean']:.1f} max {rec['k_max']}, "
                    f"{len(empty)} tensors with k=0 (zero gradient, e.g. lora_A at B=0); "
                    f"α min {rec['alpha_min']:.3f} mean {rec['alpha_mean']:.3f}")
        if ctx.run_dir is not None:
            ctx.run_dir.write_bytes(f"subspaces/step{ctx.step}-{ctx.domain}.safetensors", self.subspace_bytes())

    def phase_hooks(self, ctx: Context, phase: str) -> Any:
        """The phase's hooks, built from ctx.model as the engine left it (device, dtype): the
        projection (V, α) per tensor (on the method: a per-process cache of its subspaces); for
        "domain" the anchor batches and the reference log-probs of θ_{t−1} (the model as the
        phase starts; float32 like the log-probs they are compared with); for "replay" the
        safety batches. The counters live on the hooks."""
        self._build_projection(ctx.model)
        if phase == "domain":
            batches, ref = [], []
            if self.cfg.anchor and self.cfg.gamma > 0:
                batches = self._batches(ctx, self.cfg.anchor_batch, self.cfg.anchor_kinds)
                ref = cached_reference(ctx.model, batches)
            return _Domain(self, batches, ref)
        if phase == "replay":
            # replay rounds so far (this one counted by its gate): each ran replay_steps steps,
            # one safety batch a step, so the cycle through the batches goes on where it stopped
            before = sum(r["rounds"] for r in self.csm_log) - 1
            return _Replay(self, self._batches(ctx, self.cfg.safety_batch), max(0, before) * self.cfg.replay_steps)
        return super().phase_hooks(ctx, phase)

    def gate(self, ctx: Context, round: int) -> Gate:
        """CSM: round 0 measures s_t after the domain; round r re-checks after replay round r."""
        if not self.cfg.csm:
            return Gate()
        s = ctx.probe_safety()
        thr = csm_threshold(self.s0, self.cfg.tau)
        if round == 0:
            self.csm_log.append({"domain": ctx.domain, "s_t": s, "s_0": self.s0, "threshold": thr,
                                 "triggered": s < thr, "rounds": 0, "s_after": s})
            logger.info(f"  [csm] s_t = {s:.3f} (threshold {thr:.3f}): {'replay' if s < thr else 'ok'}")
        else:
            logger.info(f"  [csm] after replay round {round}: s = {s:.3f}")
        rec = self.csm_log[-1]
        rec["s_after"] = s
        decision = {"round": round, "s": s, "threshold": thr}
        if s >= thr or rec["rounds"] >= self.cfg.replay_rounds:
            return Gate({**decision, "replay": False})
        rec["rounds"] += 1
        n = self.cfg.replay_steps * self.cfg.replay_batch
        task = seeds.replay_sample(ctx.seed, ctx.step, rec["rounds"]).choices(ctx.domain_train, k=n)
        base = ctx.train_cfg if ctx.train_cfg is not None else ctx.run_cfg.train  # run_cfg set after the Context
        tcfg = replace(base, lr=self.cfg.replay_lr, batch_size=self.cfg.replay_batch,
                       epochs=1.0, max_steps=self.cfg.replay_steps, warmup_ratio=0.0, schedule="constant")
        phase = TrainPhase(task, tcfg, seeds.replay_phase(ctx.seed, ctx.step, rec["rounds"]),
                           f"replay {rec['rounds']}", hooks="replay")
        return Gate({**decision, "replay": True}, phase)

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        info: dict[str, Any] = {"ssi": self.ssi_log[-1]}
        if self.cfg.csm and self.csm_log:
            info["csm"] = self.csm_log[-1]
        return info

    # ---- persistence ----------------------------------------------------------------
    def subspace_bytes(self) -> bytes:
        """The current subspaces as safetensors bytes (`load_subspaces` reads such a file)."""
        from safetensors.torch import save

        return save(subspace_tensors(self.subspaces))

    @staticmethod
    def load_subspaces(path: Path) -> dict[str, Subspace]:
        from safetensors.torch import load_file

        return subspaces_from_tensors(load_file(str(path)))

    def state_dict(self) -> dict[str, Any]:
        return {"s0": self.s0, "csm": self.csm_log, "ssi": self.ssi_log, "alpha": dict(self.alpha),
                "subspaces": subspace_tensors(self.subspaces), "random_V": dict(self.random_V)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.s0 = state["s0"]
        self.csm_log = [dict(r) for r in state["csm"]]
        self.ssi_log = [dict(r) for r in state["ssi"]]
        self.alpha = {k: float(v) for k, v in state["alpha"].items()}
        self.subspaces = subspaces_from_tensors(state["subspaces"])
        self.random_V = dict(state.get("random_V", {}))

    def summary(self) -> dict[str, Any]:
        return {"s0": self.s0, "csm": self.csm_log, "ssi": self.ssi_log}


def subspace_tensors(subspaces: dict[str, Subspace]) -> dict[str, torch.Tensor]:
    tensors = {}
    for n, s in subspaces.items():
        tensors[f"{n}.V"] = s.V.contiguous()
        tensors[f"{n}.lam"] = s.lam.contiguous()
        tensors[f"{n}.trace"] = torch.tensor([s.trace], dtype=torch.float64)
    return tensors


def subspaces_from_tensors(t: dict[str, torch.Tensor]) -> dict[str, Subspace]:
    names = {k.rsplit(".", 1)[0] for k in t}
    return {n: Subspace(t[f"{n}.V"], t[f"{n}.lam"], float(t[f"{n}.trace"][0])) for n in names}


class _Domain:
    """The domain phase's hooks: the task loss as is, its gradient projected (the method's
    projection), plus ∇ γ·KL(p_{θ_{t−1}} ‖ p_θ) on the next anchor batch, added unprojected.
    Counts its steps and anchor batches (saved in Train checkpoints)."""

    def __init__(self, sa: SafeAnchor, batches: list[dict[str, torch.Tensor]], ref: list[torch.Tensor]) -> None:
        self.sa, self.batches, self.ref = sa, batches, ref
        self.step = 0  # steps so far (anchor_every: the anchor on every k-th one)
        self.anchor_i = 0  # anchor batches used so far

    def loss(self, model, batch, task_loss):
        return task_loss

    def unprojected_loss(self, model, batch) -> torch.Tensor | None:
        """γ·KL(p_{θ_{t−1}} ‖ p_θ) on the next anchor batch: its gradient is NOT projected."""
        if not self.ref:
            return None
        cfg = self.sa.cfg
        step, self.step = self.step, self.step + 1
        if step % cfg.anchor_every:
            return None
        i = self.anchor_i % len(self.batches)
        self.anchor_i += 1
        return cfg.gamma * cfg.anchor_every * anchor_kl(model, self.batches[i], self.ref[i])

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        return self.sa.transform_grad(name, grad)

    def transform_grads(self, grads: dict[str, torch.Tensor]) -> None:
        self.sa.transform_grads(grads)

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "anchor_i": self.anchor_i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.anchor_i = int(state["step"]), int(state["anchor_i"])

    def stats(self) -> dict[str, int]:
        return {"steps": self.step, "anchor_batches": self.anchor_i}


class _Replay:
    """Replay step hooks: L_task + β·L_safe on the next calibration batch; gradients projected.
    `start`: safety batches used by earlier replay rounds (the cycle goes on across rounds)."""

    def __init__(self, sa: SafeAnchor, batches: list[dict[str, torch.Tensor]], start: int = 0) -> None:
        self.sa, self.batches, self.i, self.start = sa, batches, start, start

    def loss(self, model, batch, task_loss):
        b = self.batches[self.i % len(self.batches)]
        self.i += 1
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
        return task_loss + self.sa.cfg.beta * out.loss

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        return self.sa.transform_grad(name, grad)

    def transform_grads(self, grads: dict[str, torch.Tensor]) -> None:
        self.sa.transform_grads(grads)

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = int(state["i"])

    def stats(self) -> dict[str, int]:
        return {"steps": self.i - self.start}
