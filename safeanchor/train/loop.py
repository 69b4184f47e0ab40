"""The one training step loop: every phase runs through `run_loop` — the toy world's
pre-training and alignment, the alignment stage, a domain, a replay round, Vaccine's
re-alignment — in one process (`TorchStepEngine`) or on each rank of Ray Train
(`safeanchor.distributed.engine.DeepSpeedStepEngine`). The method's hooks sit at fixed points
(`safeanchor.methods.base` documents them):

    extra = hooks.unprojected_loss(model, batch)   # its gradient bypasses the transform
    loss  = hooks.loss(model, batch, task NLL on response tokens)
    engine.backward(loss)  # g <- transform(g) + ∇extra, per tensor
    hooks.after_backward(model, batch, grads)      # global map of the FULL reduced gradient
    engine.step()          # clip ; optimizer.step() ; scheduler.step() ; zero grads

The transform is `hooks.transform_grad(name, g)`, run as a gradient hook on each trainable
tensor, i.e. on the LOCAL gradient before any data-parallel reduction (DeepSpeed reduces from
post-accumulate hooks, after it); a linear map commutes with the average. With one process and a
plain torch engine (`engine.batched`), the loop prefers `hooks.transform_grads(grads)` when the
hooks have it: the same map on every gradient at once after backward (SafeAnchor batches
same-size tensors into one matmul), then ∇extra is added. `grads` (`FullGrads`) reads and writes
the full, reduced gradient whatever the engine keeps (p.grad in one process; DeepSpeed's
`safe_get_full_grad` / `safe_set_full_grad` under ZeRO, collectives that every rank enters).
The loop never knows which method runs.

With W data-parallel ranks (Ray Train):

- Batches: every rank builds the same `ExampleBatches` and takes its share of each global batch
  (`shard`: rows split as evenly as possible; `train.batch_size % W == 0` is required, so full
  batches split exactly; a short last batch with fewer rows than ranks leaves a rank one
  placeholder row whose task loss is multiplied by 0; batch-dependent hook terms still see it).
- Task loss: the global batch's token-mean NLL is Σ_tokens nll / T (T = response tokens of the
  GLOBAL batch, known on every rank). Rank r uses L_r = W · Σ_{tokens of r} nll / T, so that the
  engine's gradient AVERAGE over ranks, (1/W) Σ_r ∇L_r, is exactly ∇ of the single-process loss
  whatever the token counts per rank (transformers' `num_items_in_batch` = T / W does this).
  `hooks.loss(model, local_batch, L_r)` gets this rank's share; methods add terms to it (affine
  in task_loss), and a per-example mean over the local batch averages to the global one because
  the shares are equal.
- `hooks.unprojected_loss` gradient: taken on the local batch with torch.autograd.grad, then
  added in the gradient hooks (before the reduction). For tensors the task loss does not reach,
  a zero-valued term makes them reached, so the addition still happens before the reduction.
- Clipping: the engine's (DeepSpeed's `gradient_clipping` is torch's clip_grad_norm_ formula over
  all ranks' partitions).
- A non-finite loss on any rank stops every rank at the same step (the flag is all-reduced with
  the loss that is logged), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from safeanchor.config import check
from safeanchor.data import ExampleBatches, encode_dataset

logger = logging.getLogger(__name__)


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

    def after_backward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor],
                       grads: FullGrads | None = None) -> None: ...


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




class FullGrads:
    """`after_backward`'s view of the full, reduced gradient of the trainable tensors.

    `get()` returns one tensor (or None: no gradient) per tensor of `params`, in order;
    `set(values)` writes them back (None entries are skipped). The engine decides where the
    gradient lives: p.grad in one process and under ZeRO-0; under ZeRO-1/2/3 DeepSpeed keeps
    it in per-rank partitions and `get` / `set` are collectives that every rank calls in the
    same order (`deepspeed.utils.safe_get_full_grad` / `safe_set_full_grad`, float32 where
    DeepSpeed accumulates in float32, e.g. bf16 training).
    """

    def __init__(self, params: list[torch.nn.Parameter], engine: Any = None) -> None:
        self.params = params
        self.engine = engine

    @classmethod
    def of(cls, model: torch.nn.Module) -> FullGrads:
        """p.grad of the model's trainable tensors (one process, no engine)."""
        return cls([p for p in model.parameters() if p.requires_grad])

    def get(self) -> list[torch.Tensor | None]:
        if self.engine is None:
            return [p.grad for p in self.params]
        return [self.engine.full_grad(p) for p in self.params]

    def set(self, values: list[torch.Tensor | None]) -> None:
        for p, g in zip(self.params, values, strict=True):
            if g is None:
                continue
            if self.engine is not None:
                self.engine.set_full_grad(p, g)
            elif p.grad is None:
                p.grad = g.detach().clone()
            else:
                p.grad.copy_(g)


class StepEngine(Protocol):
    """What the loop and the Train worker need from an engine (`TorchStepEngine` here,
    `safeanchor.distributed.engine.DeepSpeedStepEngine` on Ray Train workers)."""

    module: torch.nn.Module  # the model, on `device`, in the engine's dtype
    device: torch.device
    params: list[torch.nn.Parameter]  # the trainable tensors
    batched: bool  # p.grad is the whole gradient after backward (one process, plain torch)
    stage: int | None  # ZeRO stage (None: no DeepSpeed)

    def forward(self, **kw: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...  # clip ; optimizer ; scheduler ; zero grads
    def lr(self) -> float: ...
    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None: ...
    def set_full_grad(self, p: torch.nn.Parameter, g: torch.Tensor) -> None: ...
    def save_checkpoint(self, d: str, client: dict[str, Any]) -> None: ...
    def load_checkpoint(self, d: str) -> dict[str, Any]: ...
    def final_weights(self) -> contextlib.AbstractContextManager: ...  # trained weights in `module`


class TorchStepEngine:
    """One process, plain torch: AdamW, `make_scheduler`'s LambdaLR, torch's grad-norm clip.

    `batched`: p.grad holds the whole gradient after backward, so the loop may transform every
    gradient at once (`hooks.transform_grads`) instead of per-tensor hooks.
    """

    batched = True
    stage = None

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, steps: int, device: torch.device | None = None) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.device = torch.device(device) if device is not None else self.params[0].device
        self.module = model.to(self.device)
        self.cfg = cfg
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = make_scheduler(self.opt, cfg, steps)

    def forward(self, **kw: Any) -> Any:
        return self.module(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        return p.grad

    def set_full_grad(self, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        if p.grad is None:
            p.grad = g.detach().to(p.dtype).clone()
        else:
            p.grad.copy_(g)

    def save_checkpoint(self, d: str, client: dict[str, Any]) -> None:
        """Trainable tensors, AdamW and LambdaLR state, and `client`, into directory d."""
        trainable = {n: p.detach().cpu() for n, p in self.module.named_parameters() if p.requires_grad}
        torch.save({"module": trainable, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                    "client": client}, f"{d}/torch_state.pt")

    def load_checkpoint(self, d: str) -> dict[str, Any]:
        """Puts a `save_checkpoint` back; returns its `client`."""
        state = torch.load(f"{d}/torch_state.pt", weights_only=False)
        params = dict(self.module.named_parameters())
        with torch.no_grad():
            for n, t in state["module"].items():
                params[n].copy_(t)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        return state["client"]

    def final_weights(self) -> contextlib.AbstractContextManager:
        """The trained weights are the module's own."""
        return contextlib.nullcontext()


def shard(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Rank `rank`'s rows of a global batch (as even as possible); (placeholder row, False) if none."""
    if world == 1:
        return batch, True
    n = batch["input_ids"].shape[0]
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    if hi == lo:  # a short last batch with fewer rows than ranks: one row with zero weight
        return {k: v[:1] for k, v in batch.items()}, False
    return {k: v[lo:hi] for k, v in batch.items()}, True


def response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal-LM loss averages over: labels[:, 1:] != -100 (transformers' shift)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def batches_from(make_epoch: Callable[[int], Iterator[dict]], per_epoch: int, start_step: int) -> Iterator[dict]:
    """Endless batches of a deterministic batcher (epoch 0, 1, ...) from global step `start_step`
    (skipped epochs are not collated)."""
    epoch, skip = divmod(start_step, per_epoch)

    def gen() -> Iterator[dict]:
        e = epoch
        yield from itertools.islice(make_epoch(e), skip, None)
        while True:
            e += 1
            yield from make_epoch(e)

    return gen()


def run_loop(
    engine: StepEngine,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    hooks: StepHooks | None,
    *,
    rank: int = 0,
    world: int = 1,
    start_step: int = 0,
    losses: list[float] | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
    tag: str = "train",
) -> dict[str, Any]:
    """Steps start_step..steps-1 of a phase; `batches` yields the GLOBAL batches from start_step.

    `on_step(done, losses)` runs after each optimizer step (checkpoints). Returns stats: mean
    task loss of the first / last 10% of the phase's steps (resumed ones included), wall time,
    time per step, world size, the step it resumed from.
    """
    import torch.distributed as dist

    losses = list(losses or [])
    model = engine.module
    model.train()
    grads = FullGrads(engine.params, engine)
    batched = engine.batched and world == 1
    t0 = time.perf_counter()
    with GradHooks(model, hooks, batched=batched) as gh:
        for step in range(start_step, steps):
            gbatch = next(batches)
            batch, real = shard(gbatch, rank, world)
            batch = {k: v.to(engine.device) for k, v in batch.items()}
            gh.prepare(model, batch)
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
            if world > 1:  # this rank's share of the global token mean (module docstring)
                kw["num_items_in_batch"] = torch.tensor(response_tokens(gbatch) / world, device=engine.device)
            out = engine.forward(**kw)
            task = out.loss if real else out.loss * 0.0
            loss = hooks.loss(model, batch, task) if hooks is not None else task
            finite = bool(torch.isfinite(loss))
            if world > 1:
                red = torch.tensor([float(task.detach()), 0.0 if finite else 1.0], dtype=torch.float64,
                                   device=engine.device)
                dist.all_reduce(red)
                task_value, finite = float(red[0]) / world, red[1].item() == 0.0
            else:
                task_value = float(task.detach())
            if not finite:
                raise NonFiniteLoss(f"{tag}: non-finite loss at step {step}; stopping")
            if gh.extra and not batched:
                # zero-valued use of every tensor with an unprojected gradient: its hook then adds
                # that gradient before the reduction, even where the task loss does not reach it
                named = dict(gh.named)
                loss = loss + sum((named[n] * 0.0).sum() for n in gh.extra)
            engine.backward(loss)
            if batched:
                gh.finish()
            elif gh.extra:
                raise RuntimeError(f"{tag}: unprojected gradients of {sorted(gh.extra)} were not applied")
            after = getattr(hooks, "after_backward", None)  # optional, like the other hooks
            if after is not None:
                gh.active = False  # its own autograd.grad calls must not run the transform
                try:
                    after(model, batch, grads)
                finally:
                    gh.active = True
            engine.step()
            losses.append(task_value)
            if rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
                recent = losses[-cfg.log_every:]
                logger.info(f"  [{tag}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                            f"lr {engine.lr():.2e} ({time.perf_counter() - t0:.0f}s)")
            if on_step is not None:
                on_step(step + 1, losses)
    model.eval()
    wall = time.perf_counter() - t0
    k = max(1, steps // 10)
    done = max(1, steps - start_step)
    return {
        "steps": steps,
        "loss_first": sum(losses[:k]) / k,
        "loss_last": sum(losses[-k:]) / k,
        "wall_s": wall,
        "step_s": wall / done,
        "world_size": world,
        "resumed_from_step": start_step,
    }


def train_examples(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: list,
    cfg: TrainConfig,
    seed: int,
    hooks: StepHooks | None = None,
    tag: str = "train",
) -> dict[str, Any]:
    """In this process, on the model's device: encode chat examples, batch them in a
    deterministic order from `seed`, and run the loop."""
    feats = encode_dataset(tokenizer, examples, cfg.max_length)
    batcher = ExampleBatches(feats, cfg.batch_size, seed, tokenizer.pad_token_id)
    steps = cfg.num_steps(len(batcher))
    try:
        engine = TorchStepEngine(model, cfg, steps)
    except ValueError as e:
        raise ValueError(f"{tag}: {e}") from None
    return run_loop(engine, batches_from(batcher.epoch, len(batcher), 0), steps, cfg, hooks, tag=tag)
