"""A training phase as data: a `PhaseSpec` goes to the process that trains, a `PhaseResult`
comes back (DESIGN.md, "A training phase as data").

The spec holds everything a fresh process needs and nothing it has to rebuild from the run's
configuration: the model by reference (base checkpoint + LoRA config) and the adapter as bytes,
the method by name with its options and its durable state, the examples, the train config and
the seed, and the few facts the method's per-phase hooks read (`PhaseContext`). A Ray Train
worker calls `build(spec)` and then, once its engine exists, `make_hooks(built, engine.module)`:
the hooks are built from the model as the engine left it (device, dtype: e.g. bf16 on a GPU),
so whatever a method caches for the phase lives where the parameters live. Rank 0 returns
`result(built, model, hooks, stats)`: the adapter and what the hooks counted; the driver loads
the adapter and hands the counts to `method.end_phase` (a phase never changes the method, so
no method state travels back).

The spec's `name` is `<run_id>-<step>` (the pipeline's durable step name, e.g.
`lora-seed0-medical-01-medical-02-train`): the Ray Train run of the phase is named after it, so
a driver that restarts after a kill finds the interrupted run under the same name and resumes it
from its last checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from safeanchor.data import ChatExample
from safeanchor.methods import build_method
from safeanchor.methods.base import Context, hook_stats
from safeanchor.models import (
    LoraConfig,
    ModelConfig,
    add_lora,
    load_model,
    load_tokenizer,
    revision_for,
)
from safeanchor.pipeline.store import adapter_bytes, load_adapter_bytes, unpack_state
from safeanchor.train.loop import TrainConfig


@dataclass
class ModelSpec:
    """The model a phase trains: a base checkpoint (resolved local directory or hub id) with the
    pipeline's LoRA adapter "default" on top (its weights travel as `PhaseSpec.adapter`)."""

    ref: str
    tokenizer: str
    config: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0  # LoRA initialisation (then overwritten by the adapter bytes)


@dataclass
class PhaseContext:
    """What a method's `phase_hooks` may read besides the model (see `methods.base.Context`)."""

    safety_calib: list[ChatExample] = field(default_factory=list)
    seed: int = 0  # the run seed
    max_length: int = 96
    domain: str = ""
    step: int = 0


@dataclass
class PhaseSpec:
    name: str  # "<run_id>-<step>": the Train run's name (resume by name)
    model: ModelSpec
    adapter: bytes  # safetensors of the adapter "default" as the phase starts
    method: str  # registered method name
    options: dict[str, Any] | None  # the method's options (methods.<name>)
    state: tuple[bytes, bytes]  # the method's durable state, `pack_state(method.state_dict())`
    hooks: str  # the phase for `method.phase_hooks`: domain | replay | ...
    examples: list[ChatExample]
    train: TrainConfig
    seed: int  # batch order and dropout stream
    tag: str = "train"  # the name in progress lines
    context: PhaseContext = field(default_factory=PhaseContext)


@dataclass
class PhaseResult:
    """What a phase returns (rank 0): the trained adapter (bytes), the hooks' `stats()` (for
    `method.end_phase`) and the train stats; the pipeline's durable record of the step."""

    adapter: bytes
    hook_stats: dict[str, Any]
    stats: dict[str, Any]


@dataclass
class Built:
    """A phase's model, tokenizer and method, built in the process that trains."""

    spec: PhaseSpec
    model: Any
    tokenizer: Any
    method: Any
    ctx: Context


def safe_name(text: str) -> str:
    """A Train run name from a step name: letters, digits, '.', '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def load_peft_model(spec: ModelSpec, adapter: bytes | None = None) -> tuple[Any, Any]:
    """(peft model, tokenizer) at the given adapter; fp32 / `spec.config.dtype`, on CPU."""
    tokenizer = load_tokenizer(spec.tokenizer, spec.config.trust_remote_code,
                               revision_for(spec.tokenizer, spec.config))
    model = add_lora(load_model(spec.ref, spec.config), spec.lora, spec.seed)
    if adapter is not None:
        load_adapter_bytes(model, adapter)
    return model, tokenizer


def build(spec: PhaseSpec) -> Built:
    """Model, tokenizer and method of the phase, from the spec alone (no run configuration)."""
    model, tokenizer = load_peft_model(spec.model, spec.adapter)
    method = build_method(spec.method, spec.options)
    method.load_state_dict(unpack_state(*spec.state))
    c = spec.context
    ctx = Context(model=model, tokenizer=tokenizer, run_cfg=None, domain=c.domain, step=c.step,
                  safety_calib=list(c.safety_calib), seed=c.seed, max_length=c.max_length)
    method.attach(ctx)  # model changes the method owns (e.g. O-LoRA's frozen adapters)
    return Built(spec, model, tokenizer, method, ctx)


def make_hooks(built: Built, model: Any) -> Any:
    """The phase's hooks, built from `model` as the engine left it (call after the engine)."""
    built.ctx.model = model
    return built.method.phase_hooks(built.ctx, built.spec.hooks)


def hooks_state(hooks: Any) -> Any:
    """The hooks' counters for a Train checkpoint (None: they keep none)."""
    fn = getattr(hooks, "state_dict", None)
    return fn() if fn is not None else None


def load_hooks_state(hooks: Any, state: Any) -> None:
    if state is not None:
        hooks.load_state_dict(state)


def result(model: Any, hooks: Any, stats: dict[str, Any]) -> PhaseResult:
    return PhaseResult(adapter_bytes(model), hook_stats(hooks), stats)
