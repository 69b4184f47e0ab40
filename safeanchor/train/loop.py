"""The training step loop shared by pre-training, alignment, domain adaptation and replay.

One loop, with the method's hooks at fixed points (`safeanchor.methods.base` documents them):

    extra = hooks.unprojected_loss(model, batch)   # its gradient bypasses the transform
    loss  = hooks.loss(model, batch, task NLL on response tokens)
    loss.backward()        # g <- transform(g) + ∇extra, per tensor
    hooks.after_backward(model, batch)             # global transformation (full gradient)
    clip ; optimizer.step() ; scheduler.step()

The transform is `hooks.transform_grad(name, g)`, run as a gradient hook on each trainable
tensor, i.e. on the local gradient before any data-parallel reduction (the DeepSpeed engine
needs that). This single-process loop prefers `hooks.transform_grads(grads)` when the hooks
have it: the same transform on every gradient at once after backward (SafeAnchor batches
same-size tensors into one matmul there), then ∇extra is added. The loop never knows which
method runs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from safeanchor.config import check
from safeanchor.data import ExampleBatches, encode_dataset


@dataclass
class TrainConfig:
    """Optimisation of one training phase (a domain, replay, or a toy-world stage)."""

    lr: float = field(default=1e-3, metadata={"doc": "peak learning rate (AdamW)"})
    epochs: float = field(default=1.0, metadata={"doc": "passes over the phase's data (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"doc": "cap on optimizer steps (overrides epochs when smaller)"})
    batch_size: int = field(default=32, metadata={"doc": "examples per optimizer step"})
    max_length: int = field(default=96, metadata={"doc": "tokens per example (prompt + response), truncated on the right"})
    weight_decay: float = field(default=0.0, metadata={"doc": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"doc": "fraction of steps of linear warm-up"})
    schedule: str = field(default="cosine", metadata={"doc": "lr schedule after warm-up: cosine | linear | constant"})
    grad_clip: float = field(default=1.0, metadata={"doc": "global grad-norm clip (0 = off)"})
    log_every: int = field(default=25, metadata={"doc": "steps between progress lines"})

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", "must be > 0")
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.max_length >= 8, "max_length", "must be >= 8")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.schedule in ("cosine", "linear", "constant"), "schedule",
              f"must be one of cosine, linear, constant, got {self.schedule!r}")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(self.log_every >= 1, "log_every", "must be >= 1")

    def num_steps(self, batches_per_epoch: int) -> int:
        steps = max(1, math.ceil(self.epochs * batches_per_epoch))
        return steps if self.max_steps is None else min(steps, self.max_steps)


class StepHooks(Protocol):
    """What the loop calls around each step (a `Method` satisfies it; see methods/base.py)."""

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task_loss: torch.Tensor) -> torch.Tensor: ...

    def unprojected_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    def transform_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor | None: ...

    def after_backward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None: ...


class GradHooks:
    """Installs `hooks.transform_grad` (+ the unprojected gradient) as per-tensor gradient hooks.

    Use as a context manager around a phase; `prepare(model, batch)` before each backward
    computes the unprojected loss's gradient (with the transform off) for the next backward,
    `finish()` after it. With `batched=True` and hooks that have `transform_grads`, no
    per-tensor hook is installed: `finish()` transforms all gradients at once, then adds the
    unprojected gradient (single process only: p.grad must be the whole local gradient).
    """

    def __init__(self, model: torch.nn.Module, hooks: Any, batched: bool = False) -> None:
        self.hooks = hooks
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.extra: dict[str, torch.Tensor] | None = None
        self.active = True
        self.handles: list[Any] = []
        self.batched = getattr(hooks, "transform_grads", None) if batched and hooks is not None else None

    def __enter__(self) -> GradHooks:
        if self.hooks is not None and self.batched is None:
            for name, p in self.named:
                self.handles.append(p.register_hook(self._fn(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _fn(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(grad: torch.Tensor) -> torch.Tensor:
            if not self.active:
                return grad
            tf = getattr(self.hooks, "transform_grad", None)
            out = tf(name, grad) if tf is not None else None
            out = grad if out is None else out
            if self.extra is not None and name in self.extra:
                out = out + self.extra.pop(name)
            return out

        return fn

    def prepare(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Gradient of hooks.unprojected_loss (transform off), added in the next backward."""
        self.extra = None
        fn = getattr(self.hooks, "unprojected_loss", None) if self.hooks is not None else None
        extra = fn(model, batch) if fn is not None else None
        if extra is None:
            return None
        if not torch.isfinite(extra):
            raise NonFiniteLoss(f"non-finite unprojected loss {extra.item()}")
        self.active = False
        try:
            grads = torch.autograd.grad(extra, [p for _, p in self.named], allow_unused=True)
        finally:
            self.active = True
        self.extra = {n: g for (n, _), g in zip(self.named, grads, strict=True) if g is not None}
        return extra.detach()

    def finish(self) -> None:
        """After backward: the batched transform (if any), then the unprojected gradients not
        yet added (all of them when batched; else those of tensors the task loss did not reach)."""
        if self.batched is not None:
            self.batched({n: p.grad for n, p in self.named if p.grad is not None})
        if self.extra:
            params = dict(self.named)
            for name, g in self.extra.items():
                p = params[name]
                p.grad = g.clone() if p.grad is None else p.grad + g
        self.extra = None


class NonFiniteLoss(RuntimeError):
    """Raised when a step's loss is NaN/inf: training stops before the state is corrupted."""


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    warm = int(cfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - warm) / max(1, steps - warm)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cycle_batches(make_epoch: Callable[[int], Iterator[dict]]) -> Iterator[dict]:
    """Endless batches: epoch 0, 1, 2, ... of a deterministic batcher."""
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def run_steps(
    model: torch.nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    hooks: StepHooks | None = None,
    log: Callable[[str], None] | None = print,
    tag: str = "train",
) -> dict[str, Any]:
    """Run `steps` optimizer steps over `batches` on the trainable parameters of `model`.

    Returns stats: mean loss of the first / last 10% of steps, wall time, time per step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{tag}: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, cfg, steps)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    with GradHooks(model, hooks, batched=True) as gh:
        for step in range(steps):
            batch = next(batches)
            gh.prepare(model, batch)
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            loss = out.loss
            if hooks is not None:
                loss = hooks.loss(model, batch, loss)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"{tag}: non-finite loss {loss.item()} at step {step}; stopping")
            loss.backward()
            gh.finish()
            after = getattr(hooks, "after_backward", None)  # optional, like the other hooks
            if after is not None:
                after(model, batch)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(out.loss.detach()))
            _progress(log, cfg, tag, step, steps, losses, sched, t0)
    model.eval()
    wall = time.perf_counter() - t0
    k = max(1, steps // 10)
    return {
        "steps": steps,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "wall_s": wall,
        "step_s": wall / steps,
    }


def _progress(log, cfg: TrainConfig, tag: str, step: int, steps: int, losses: list[float], sched, t0: float) -> None:
    if log is not None and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
        recent = losses[-cfg.log_every :]
        log(f"  [{tag}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
            f"lr {sched.get_last_lr()[0]:.2e} ({time.perf_counter() - t0:.0f}s)")


def train_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list,
    cfg: TrainConfig,
    seed: int,
    hooks: StepHooks | None = None,
    tag: str = "train",
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Encode chat examples, batch them in a deterministic order from `seed`, and train."""
    feats = encode_dataset(tokenizer, examples, cfg.max_length)
    batcher = ExampleBatches(feats, cfg.batch_size, seed, tokenizer.pad_token_id)
    steps = cfg.num_steps(len(batcher))
    return run_steps(model, cycle_batches(batcher.epoch), steps, cfg, hooks=hooks, log=log, tag=tag)
