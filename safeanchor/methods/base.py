"""The one small interface every continual-adaptation method satisfies, and the registry.

The pipeline calls, for a run over domains d_1..d_T:

    method.setup(ctx)                                   once, before the step-0 evaluation
    for each domain:
        method.before_domain(ctx)                       e.g. compute a safety subspace
        data = method.training_examples(ctx, data)      e.g. mix safety examples in
        per step:  loss = method.loss(model, batch, task_loss)
                   backward
                   method.after_backward(model, batch)  gradient transformation
        method.after_domain(ctx) -> dict                e.g. monitor + replay, project weights
    method.state_dict() / load_state_dict()            what a resume needs

The pipeline and the training loop never ask which method runs. A method that needs a new
hook adds it here, for every method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from safeanchor.data import ChatExample


@dataclass
class Context:
    """What a method may use: the live model, data, and the pipeline's services."""

    model: Any  # peft model with the persistent adapter
    tokenizer: Any
    run_cfg: Any  # the resolved RunConfig
    domain: str = ""
    step: int = 0  # 1-based index of the current domain
    safety_calib: list[ChatExample] = field(default_factory=list)  # safe responses (SSI, anchor, replay)
    safety_probe: list[ChatExample] = field(default_factory=list)  # monitoring prompts (CSM)
    domain_train: list[ChatExample] = field(default_factory=list)
    base_model_ref: str | None = None  # unaligned base (Safe LoRA)
    run_dir: str | None = None  # where a method may persist artefacts (subspaces, ...)
    # services the pipeline provides
    train: Callable[..., dict] | None = None  # train(examples, train_cfg, hooks, tag) -> stats
    probe_safety: Callable[[], float] | None = None  # refusal rate on the probe set, now
    log: Callable[[str], None] = print
    state: dict[str, Any] = field(default_factory=dict)  # pipeline-level facts (e.g. s_0)


class Method:
    """No-op defaults: plain sequential LoRA is a Method with nothing overridden."""

    name = "base"

    def setup(self, ctx: Context) -> None:
        """Once, before the first domain (e.g. Vaccine's re-alignment)."""

    def before_domain(self, ctx: Context) -> None:
        """Before training on ctx.domain."""

    def training_examples(self, ctx: Context, examples: list[ChatExample]) -> list[ChatExample]:
        """The examples the domain is trained on (default: the domain's own)."""
        return examples

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task_loss: torch.Tensor) -> torch.Tensor:
        """Total loss to backpropagate (default: the task loss)."""
        return task_loss

    def after_backward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        """Transform gradients between backward and the optimizer step."""

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        """After training on ctx.domain; returns facts for summary.json / tracking."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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
