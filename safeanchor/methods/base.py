"""The one small interface every continual-adaptation method satisfies, and the registry.

The pipeline runs, for domains d_1..d_T, a sequence of durable steps (each may run in another
process, e.g. a Ray Train worker, so a method keeps NOTHING between hooks that
`state_dict()` does not carry):

    method.setup(ctx)                         once, before the step-0 evaluation (may train: Vaccine)
    for each domain d_t:
        method.before_domain(ctx)             analysis before training (SSI, a Fisher, new adapter)
        data = method.training_examples(ctx, data)
        train phase "domain"                  (see below)
        loop r = 0, 1, ...:
            gate = method.gate(ctx, r)        a decision (CSM): stop, or train one more phase
            if gate.phase is None: break
            train phase gate.phase            (e.g. "replay")
        info = method.after_domain(ctx)       e.g. Safe LoRA's projection, EWC's Fisher
        evaluation
    method.state_dict() / load_state_dict()   everything a fresh process needs to continue

A train phase, in whatever process runs it (the driver, or every Ray Train worker, built from a
`safeanchor.train.phase.PhaseSpec`):

    method.load_state_dict(state); method.attach(ctx)   (in a fresh process)
    hooks = method.phase_hooks(ctx, phase_name)         a per-phase object, built after the
                                                        engine: its caches (projection groups,
                                                        anchor references, batches) live on the
                                                        parameters' device and dtype
    per step:  loss  = hooks.loss(model, batch, task_loss)        its gradient goes through
                                                                  hooks.transform_grad
               extra = hooks.unprojected_loss(model, batch)       its gradient does NOT
               g_i  <- hooks.transform_grad(name_i, g_i) + ∇extra_i   per LoRA tensor, on the
                       LOCAL gradient before any data-parallel reduction (so it must be LINEAR
                       in g_i: a projection is; it is then exact under DDP / ZeRO-1/2).
                       Optional `hooks.transform_grads(grads)`: the same map on every
                       gradient at once, in place; the single-process loop uses it after
                       backward instead (SafeAnchor batches same-size tensors there)
               hooks.after_backward(model, batch, grads)  a GLOBAL transformation of the full,
                       reduced gradient, through `grads.get()` / `grads.set(...)` (p.grad in
                       one process; DeepSpeed's full-gradient API under ZeRO >= 1)
               clip ; optimizer step
    optional on the hooks: state_dict() / load_state_dict() (their counters: saved in every
    Train checkpoint, put back in a restarted worker), stats() (JSON-able: what the phase did),
    close() (remove what they installed on the model).
    after the phase, in the driver: method.end_phase(ctx, phase_name, stats) with rank 0's
    hooks.stats(). The hooks own their counters; the phase never changes the method itself,
    which keeps only durable cross-domain state (what `end_phase` folds in included).

The pipeline and the training loop never ask which method runs. A method that needs a new
hook adds it here, for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from safeanchor.data import ChatExample
from safeanchor.storage import RunDir


@dataclass
class TrainPhase:
    """One training phase: what a gate or setup() asks the pipeline to train.

    `hooks` names the phase for `Method.phase_hooks` ("domain", "replay", "vaccine", ...).
    `cfg` is a `safeanchor.train.loop.TrainConfig`.
    """

    examples: list[ChatExample]
    cfg: Any
    seed: int
    tag: str
    hooks: str = "domain"


@dataclass
class Gate:
    """A gate's decision after a domain's training: `phase` None means go on to evaluation."""

    record: dict[str, Any] = field(default_factory=dict)  # recorded in summary.json / the step dir
    phase: TrainPhase | None = None


@dataclass
class Context:
    """What a method may use: the live model, data, and the pipeline's services."""

    model: Any  # peft model with the persistent adapter ("default")
    tokenizer: Any
    run_cfg: Any  # the resolved RunConfig (None in a training worker: see `phase_hooks`)
    domain: str = ""
    step: int = 0  # 1-based index of the current domain (0 during setup)
    safety_calib: list[ChatExample] = field(default_factory=list)  # safe responses (SSI, anchor, replay)
    safety_probe: list[ChatExample] = field(default_factory=list)  # monitoring prompts (CSM)
    domain_train: list[ChatExample] = field(default_factory=list)
    previous_domain_train: list[ChatExample] = field(default_factory=list)  # d_{t-1}'s data (EWC)
    base_model_ref: str | None = None  # unaligned base (Safe LoRA)
    run_dir: RunDir | None = None  # where a method may persist artefacts (subspaces, ...), any pyarrow.fs storage
    # services the pipeline provides
    train: Callable[[TrainPhase], dict] | None = None  # train(phase) -> stats (runs phase_hooks)
    probe_safety: Callable[[], float] | None = None  # refusal rate on the probe set, now
    # fisher_subspaces(examples, rho, k_max, k_fixed, chunk, max_length, group_mb=None) -> {tensor: Subspace}
    # at the current model (SSI; on the Train workers under cluster.executor=ray)
    fisher_subspaces: Callable[..., dict] | None = None
    state: dict[str, Any] = field(default_factory=dict)  # pipeline-level facts (e.g. s_0)
    seed: int | None = None  # the run seed (default: run_cfg.seed)
    max_length: int | None = None  # tokens per example (default: run_cfg.train.max_length)
    # the domain phase's TrainConfig, which gated phases derive theirs from (default: run_cfg.train)
    train_cfg: Any = None

    def __post_init__(self) -> None:
        if self.seed is None and self.run_cfg is not None:
            self.seed = self.run_cfg.seed
        if self.max_length is None and self.run_cfg is not None:
            self.max_length = self.run_cfg.train.max_length
        if self.train_cfg is None and self.run_cfg is not None:
            self.train_cfg = self.run_cfg.train


def trainable_device(model: torch.nn.Module) -> torch.device:
    """Where the trainable tensors live: the device a method's per-phase caches go to."""
    return next(p for p in model.parameters() if p.requires_grad).device


def train_in_process(method: Method, ctx: Context, phase: TrainPhase,
                     train: Callable[..., dict] | None = None) -> dict[str, Any]:
    """Train `phase` on ctx.model in this process with the method's hooks for it (the pipeline's
    executor `local`, and the transformers callback's replay): torch seeded with the phase seed
    (dropout: a resumed phase replays identically), `method.end_phase` fed the hooks' stats.
    `train`: the loop (default `safeanchor.train.loop.train_examples`). Returns the loop's stats."""
    if train is None:
        from safeanchor.train.loop import train_examples as train

    torch.manual_seed(phase.seed)
    hooks = method.phase_hooks(ctx, phase.hooks)
    stats = train(ctx.model, ctx.tokenizer, phase.examples, phase.cfg, phase.seed, hooks, phase.tag)
    method.end_phase(ctx, phase.hooks, hook_stats(hooks))
    return stats


def hook_stats(hooks: Any) -> dict[str, Any]:
    """`hooks.stats()` if the hooks report anything (after `hooks.close()` if they have it)."""
    close = getattr(hooks, "close", None)
    if close is not None:
        close()
    fn = getattr(hooks, "stats", None)
    return dict(fn()) if fn is not None else {}


class Method:
    """No-op defaults: plain sequential LoRA is a Method with nothing overridden.

    A Method is also the StepHooks of its "domain" phase unless `phase_hooks` says otherwise.
    """

    name = "base"
    in_process_phases: tuple[str, ...] = ()  # phases that cannot run on a DeepSpeed engine

    # ---- run and domain level (driver) ---------------------------------------------------
    def setup(self, ctx: Context) -> dict[str, Any] | None:
        """Once, before the step-0 evaluation (e.g. Vaccine's re-alignment via ctx.train);
        may return JSON-able facts (recorded in the setup step and summary.json)."""

    def before_domain(self, ctx: Context) -> dict[str, Any] | None:
        """Before training on ctx.domain; may return JSON-able facts (recorded in the step)."""

    def training_examples(self, ctx: Context, examples: list[ChatExample]) -> list[ChatExample]:
        """The examples the domain is trained on (default: the domain's own)."""
        return examples

    def gate(self, ctx: Context, round: int) -> Gate:
        """After the domain's training (round 0) and after each gated phase (round r)."""
        return Gate()

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        """After training and gates on ctx.domain; returns facts for summary.json / tracking."""
        return {}

    # ---- in the process that trains ------------------------------------------------------
    def attach(self, ctx: Context) -> None:
        """Re-apply model changes the method owns (e.g. O-LoRA's frozen adapters) after a fresh
        process loaded the model and called load_state_dict. Idempotent."""

    def phase_hooks(self, ctx: Context, phase: str) -> Any:
        """The StepHooks of a named phase; build per-process caches here. Default: self."""
        if phase != "domain":
            raise ValueError(f"method {self.name!r} has no training phase {phase!r}")
        return self

    def end_phase(self, ctx: Context, phase: str, stats: dict[str, Any]) -> None:
        """In the driver after a phase: fold the hooks' `stats()` (rank 0's) into durable state."""

    # ---- StepHooks (the "domain" phase) ---------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task_loss: torch.Tensor) -> torch.Tensor:
        """Total loss whose gradient passes through transform_grad (default: the task loss)."""
        return task_loss

    def unprojected_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """A loss whose gradient is added AFTER transform_grad (SafeAnchor's anchor). None: none."""
        return None

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """Linear per-tensor map of a trainable tensor's local gradient (None: unchanged)."""
        return None

    def after_backward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], grads: Any = None) -> None:
        """Global transformation of the full reduced gradient, read and written through `grads`
        (`safeanchor.train.loop.FullGrads`; None: p.grad of the model, one process)."""

    # ---- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able values and torch tensors (nested dicts/lists allowed)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for summary.json['method_state'] (default: none)."""
        return {}


@dataclass
class MethodEntry:
    cls: type[Method]
    config_cls: type | None


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, config_cls: type | None = None):
    """Class decorator: `@register_method("lora")`; the method is built as cls(config)."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = MethodEntry(cls, config_cls)
        return cls

    return deco
