"""The DeepSpeed engine behind `safeanchor.train.loop.run_loop` on a Ray Train worker.

The loop (one for every phase, see its module docstring) asks an engine for forward, backward,
step, the learning rate, and the full gradient of a tensor; this engine answers through a
DeepSpeed engine built around the model with torch's AdamW and the loop's LambdaLR:

- ZeRO 0: DeepSpeed all-reduces p.grad at the end of `engine.backward`.
- ZeRO 1/2: gradients are reduced into per-rank partitions (p.grad is None after backward);
  `full_grad` / `set_full_grad` go through `deepspeed.utils.safe_get_full_grad` /
  `safe_set_full_grad`, collectives that every rank calls in the same order, after backward and
  before step (SafeGrad's surgery needs them). Gradient hooks (the linear projection) still see
  the local gradient before the reduction.
- ZeRO 3 (partitioned parameters): the hooks receive full-shaped local gradients. Measured, not
  in the test suite: 2 workers equal the one-process loop with every LoRA tensor partitioned
  (stage3_param_persistence_threshold 0), and a worker killed mid-phase resumes exactly under
  the zero3.json preset.
- bf16 (`cluster.deepspeed.bf16`): DeepSpeed casts the module to bf16 (fp32 master weights
  in the optimizer); the method's hooks are built after this engine, from `engine.module`, so
  what they cache lives on its device and dtype (`safeanchor.train.phase`). On a CPU,
  DeepSpeed's CPU accelerator runs bf16 too (how the tests check it).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

from safeanchor.config import ConfigError
from safeanchor.train.loop import TrainConfig, make_scheduler

CKPT_TAG = "phase"  # the DeepSpeed checkpoint tag inside a Train checkpoint directory


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


class DeepSpeedStepEngine:
    """A DeepSpeed engine around the model, with torch's AdamW and the loop's LambdaLR."""

    batched = False  # gradients must be transformed per tensor, before DeepSpeed reduces them

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

    def forward(self, **kw: Any) -> Any:
        return self.engine(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()  # clip (gradient_clipping) ; optimizer ; lr scheduler ; zero grads

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def full_grad(self, p: torch.nn.Parameter) -> torch.Tensor | None:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(p)

    def set_full_grad(self, p: torch.nn.Parameter, g: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_grad

        safe_set_full_grad(p, g)

    def save_checkpoint(self, d: str, client: dict[str, Any]) -> None:
        """This rank's part: trainable tensors, its ZeRO optimizer partition, the LambdaLR, `client`."""
        self.engine.save_checkpoint(d, tag=CKPT_TAG, client_state=client, exclude_frozen_parameters=True)

    def load_checkpoint(self, d: str) -> dict[str, Any]:
        path, client = self.engine.load_checkpoint(d, tag=CKPT_TAG, load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None or client is None:
            raise RuntimeError(f"checkpoint {d} holds no DeepSpeed state under tag {CKPT_TAG!r}")
        return client

    @contextmanager
    def final_weights(self) -> Iterator[None]:
        """The trained weights in the module, full and float32, for the adapter to be read:
        ZeRO-3 gathers the partitioned tensors; under bf16 the module holds bf16 copies and the
        trained weights are DeepSpeed's fp32 master weights, written into the module here.
        Collectives: every rank enters."""
        ctx = nullcontext()
        if self.stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
        with ctx:
            if self.engine.bfloat16_enabled():
                from deepspeed.utils import safe_get_full_fp32_param

                for p in self.params:
                    full = safe_get_full_fp32_param(p)
                    if full is not None:
                        p.data = full.detach().to(p.device).reshape(p.shape).clone()
            yield


def check_divisible(batch_size: int, world: int) -> None:
    if batch_size % world != 0:
        raise ConfigError("train.batch_size", f"{batch_size} is not divisible by the {world} Train workers "
                          "(cluster.num_workers): every worker needs an equal share of each batch")
