"""The step loop of a training phase on one data-parallel rank, over a torch or a DeepSpeed engine.

It mirrors `safeanchor.train.loop.run_steps` step for step (same batches, AdamW, LambdaLR from
`make_scheduler`, clipping, the method's hooks through `GradHooks`); what changes with W ranks:

- Batches: every rank builds the same `ExampleBatches` and takes its share of each global
  batch (rows split as evenly as possible; `train.batch_size % W == 0` is required, so full
  batches split exactly; a short last batch with fewer rows than ranks leaves a rank one
  placeholder row whose task loss is multiplied by 0; batch-dependent hook terms still see it).
- Task loss: the global batch's token-mean NLL is Σ_tokens nll / T (T = response tokens of the
  GLOBAL batch, known on every rank). Rank r uses L_r = W · Σ_{tokens of r} nll / T, so that the
  engine's gradient AVERAGE over ranks, (1/W) Σ_r ∇L_r, is exactly ∇ of the single-process loss
  whatever the token counts per rank (transformers' `num_items_in_batch` = T / W does this).
  `hooks.loss(model, local_batch, L_r)` therefore gets this rank's share; methods add terms to it
  (affine in task_loss), and a term that is a per-example mean over the local batch averages to
  the global one because the shares are equal.
- `hooks.transform_grad` runs as a gradient hook on the LOCAL gradient, before DeepSpeed's
  reduction (which runs from post-accumulate hooks): a linear map commutes with the average.
- `hooks.unprojected_loss` gradient: taken on the local batch with torch.autograd.grad, then added
  in the same hooks (also before the reduction). For tensors the task loss does not reach, a
  zero-valued term makes them reached, so the addition still happens before the reduction
  (`GradHooks.finish`, which writes p.grad after backward, would come too late for DeepSpeed).
- `hooks.after_backward`: under ZeRO-0 DeepSpeed all-reduces p.grad at the end of
  `engine.backward`, so p.grad holds the full averaged gradient there and after_backward sees
  exactly what it sees in one process. ZeRO >= 1 moves gradients into per-rank partitions
  (p.grad is None afterwards): methods with `needs_full_grad = True` are refused.
- ZeRO-3 (partitioned parameters) behaves the same for the hooks: they receive full-shaped
  local gradients. Measured, not in the test suite: 2 workers equal run_steps with every LoRA
  tensor partitioned (stage3_param_persistence_threshold 0), and a worker killed mid-phase
  resumes exactly under the zero3.json preset.
- Clipping: DeepSpeed's `gradient_clipping` (global norm over all ranks' partitions; same
  formula as torch's clip_grad_norm_: g · c / (‖g‖ + 1e-6) when ‖g‖ > c).
- A non-finite loss on any rank stops every rank at the same step (the flag is all-reduced
  with the loss that is logged), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import importlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from safeanchor.config import ConfigError
from safeanchor.train.loop import GradHooks, NonFiniteLoss, TrainConfig, make_scheduler


def prepare_deepspeed(use_gpu: bool) -> Any:
    """Import deepspeed for this process: CPU accelerator without a GPU, no shm-op compilation.

    DS_ACCELERATOR must be set before deepspeed is first imported. Building the shared-memory
    comm helper costs 35-60 s per machine and changes nothing here (ENVIRONMENT.md), so
    `build_shm_op` is replaced by a no-op (the module is fetched with import_module because
    `import deepspeed.comm.torch as m` binds torch instead).
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    return deepspeed


class TorchStepEngine:
    """One process, no DeepSpeed: exactly run_steps' optimiser, schedule and clipping."""

    full_grads = True  # p.grad holds the whole gradient after backward

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, steps: int, device: torch.device) -> None:
        self.module = model.to(device)
        self.device = device
        self.params = [p for p in model.parameters() if p.requires_grad]
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


class DeepSpeedStepEngine:
    """A DeepSpeed engine around the model, with torch's AdamW and the loop's LambdaLR."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, steps: int, ds_config: dict[str, Any],
                 use_gpu: bool) -> None:
        deepspeed = prepare_deepspeed(use_gpu)
        self.stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = make_scheduler(opt, cfg, steps)
        self.engine, self.opt, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
        self.module = self.engine.module
        self.device = self.engine.device
        self.full_grads = self.stage == 0

    def forward(self, **kw: Any) -> Any:
        return self.engine(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clip (gradient_clipping) ; optimizer ; lr scheduler ; zero grads

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]


def refuse_full_grad(hooks: Any, stage: int | None) -> None:
    """Methods whose after_backward needs the full reduced gradient cannot run under ZeRO >= 1."""
    if stage is not None and stage >= 1 and getattr(hooks, "needs_full_grad", False):
        name = getattr(hooks, "name", None) or type(hooks).__name__
        raise ConfigError(
            "cluster.deepspeed.zero_stage",
            f"method {name!r} needs the full reduced gradient in after_backward (needs_full_grad = True), "
            f"but ZeRO stage {stage} partitions gradients across workers and p.grad is not the full "
            "gradient there; use cluster.deepspeed.zero_stage=0 (DeepSpeed all-reduces full gradients) "
            "or cluster.deepspeed.enabled=false")


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


def run_loop(
    engine: TorchStepEngine | DeepSpeedStepEngine,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    cfg: TrainConfig,
    hooks: Any,
    *,
    rank: int = 0,
    world: int = 1,
    start_step: int = 0,
    losses: list[float] | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
    log: Callable[[str], None] | None = print,
    tag: str = "train",
) -> dict[str, Any]:
    """Steps start_step..steps-1 of a phase; `batches` yields the GLOBAL batches from start_step.

    `on_step(done, losses)` runs after each optimizer step (checkpoints). Returns run_steps'
    stats (loss_first / loss_last over all steps of the phase, including resumed ones).
    """
    import torch.distributed as dist

    losses = list(losses or [])
    model = engine.module
    model.train()
    t0 = time.perf_counter()
    with GradHooks(model, hooks) as gh:
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
            if gh.extra and not isinstance(engine, TorchStepEngine):
                # zero-valued use of every tensor with an unprojected gradient: its hook then adds
                # that gradient before the reduction, even where the task loss does not reach it
                named = dict(gh.named)
                loss = loss + sum((named[n] * 0.0).sum() for n in gh.extra)
            engine.backward(loss)
            if isinstance(engine, TorchStepEngine):
                gh.finish()
            elif gh.extra:
                raise RuntimeError(f"{tag}: unprojected gradients of {sorted(gh.extra)} were not applied")
            after = getattr(hooks, "after_backward", None)  # optional, as in run_steps
            if after is not None:
                after(model, batch)
            engine.step()
            losses.append(task_value)
            if log is not None and rank == 0 and ((step + 1) % cfg.log_every == 0 or step + 1 == steps):
                recent = losses[-cfg.log_every:]
                log(f"  [{tag}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
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


def batches_from(make_epoch: Callable[[int], Iterator[dict]], per_epoch: int, start_step: int) -> Iterator[dict]:
    """`cycle_batches` started at global step `start_step` (skipped epochs are not collated)."""
    epoch, skip = divmod(start_step, per_epoch)

    def gen() -> Iterator[dict]:
        e = epoch
        yield from itertools.islice(make_epoch(e), skip, None)
        while True:
            e += 1
            yield from make_epoch(e)

    return gen()


def check_divisible(batch_size: int, world: int) -> None:
    if batch_size % world != 0:
        raise ConfigError("train.batch_size", f"{batch_size} is not divisible by the {world} Train workers "
                          "(cluster.num_workers): every worker needs an equal share of each batch")


