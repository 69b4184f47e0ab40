"""Vaccine + LoRA (Huang et al., 2024, "Vaccine: Perturbation-aware Alignment for Large Language
Models", arXiv 2402.01109). ALGORITHMS.md §6.5.

Once, in setup() (before the step-0 evaluation), the model is re-aligned on the safety
calibration set (safe responses) with perturbation-aware training; every step of that phase is:

  pass 1   the loop's own forward; forward hooks record the output h_l of every perturbed block
           (attention blocks, as the authors' trainer hooks LlamaAttention); e_l = ∂L/∂h_l by
           autograd.grad w.r.t. those outputs only: no parameter gradient, no update.
  ε_l      = ρ · e_l / ‖e‖ with the GLOBAL norm ‖e‖ = sqrt(Σ_l ‖e_l‖²) over all blocks (ρ = 2).
  pass 2   a second forward with h_l + ε_l (ε a constant); its loss is returned to the loop, and
           its backward is the only one that updates the LoRA tensors.

Then the domains are plain LoRA. As in the authors' pipeline (their fine-tuning scripts merge the
Vaccine LoRA into the weights and train a new LoRA on top), the re-aligned adapter is kept as a
frozen adapter "vaccine" that stays in the forward pass (the same function as a merge, but it
survives the pipeline's adapter-only checkpoints via state_dict/attach) and "default" is
re-initialised (`fresh_adapter: false` keeps training the re-aligned "default" instead).

Defaults from the authors' script/alignment/Vaccine.sh and trainer.py: ρ = 2 (README), lr 1e-3,
50 epochs, batch 5, weight decay 0.1, warm-up 0.1, cosine schedule, gradient clip 1.0 (HF
Trainer default). Their alignment data is 2,000 BeaverTails safe pairs; here it is
data.safety_calib (refusals of harmful prompts and answers to benign ones), optionally capped.
Their LoRA (r 8, alpha 4) is the run's `lora.*` here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.config import ConfigError, check
from safeanchor.methods.base import Context, Method, TrainPhase, register_method
from safeanchor.models import adapter_weights, reinit_adapter, restore_frozen

logger = logging.getLogger(__name__)

FROZEN = "vaccine"


@dataclass
class VaccineConfig:
    """Vaccine's perturbation-aware re-alignment (the domains afterwards use the run's `train.*`)."""

    rho: float = field(default=2.0, metadata={"doc": "perturbation intensity ρ: global L2 norm of all ε_l (authors' README: 2)"})
    perturb: str = field(default="attention", metadata={"doc": "where ε is added: 'attention' (each attention block's output, as the authors' trainer) or 'layer' (each decoder layer's output)"})
    lr: float = field(default=1e-3, metadata={"doc": "re-alignment learning rate (authors: 1e-3)"})
    epochs: float = field(default=50.0, metadata={"doc": "passes over the alignment examples (authors: 50)"})
    max_steps: int | None = field(default=None, metadata={"doc": "cap on re-alignment steps (null: epochs decide)"})
    batch_size: int = field(default=5, metadata={"doc": "examples per re-alignment step (authors: 5)"})
    weight_decay: float = field(default=0.1, metadata={"doc": "AdamW weight decay (authors: 0.1)"})
    warmup_ratio: float = field(default=0.1, metadata={"doc": "linear warm-up fraction, then cosine (authors: 0.1)"})
    calib_size: int | None = field(default=None, metadata={"doc": "alignment examples drawn from data.safety_calib (null: all)"})
    fresh_adapter: bool = field(default=True, metadata={"doc": "freeze the re-aligned adapter (kept in the forward pass, like the authors' merge) and train a fresh 'default' on the domains"})

    def __post_init__(self) -> None:
        check(self.rho >= 0, "rho", "must be >= 0")
        check(self.perturb in ("attention", "layer"), "perturb", f"must be 'attention' or 'layer', got {self.perturb!r}")
        check(self.lr > 0, "lr", "must be > 0")
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        check(self.calib_size is None or self.calib_size >= 1, "calib_size", "must be >= 1")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder layers (the ModuleList with num_hidden_layers entries)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n):
            return m
    raise ValueError("vaccine: cannot find the model's decoder layers")


def perturbed_modules(model, where: str) -> list[torch.nn.Module]:
    layers = list(decoder_layers(model))
    if where == "layer":
        return layers
    attn = [getattr(layer, "self_attn", None) or getattr(layer, "attn", None) for layer in layers]
    if any(a is None for a in attn):
        raise ConfigError("methods.vaccine.perturb", "the decoder layers have no self_attn/attn block; use 'layer'")
    return attn


class VaccineStep:
    """The StepHooks of the "vaccine" phase: forward hooks on the perturbed blocks, two passes.

    Modes of the forward hooks: "capture" (record h_l; the loop's forward), "perturb" (return
    h_l + ε_l; the second pass), "off". Hooks act only while the module is in training mode, so a
    forgotten handle cannot touch evaluation; close() removes them.
    """

    def __init__(self, model: torch.nn.Module, rho: float, where: str) -> None:
        self.rho = rho
        self.modules = perturbed_modules(model, where)
        self.mode = "capture"
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.eps: list[torch.Tensor] | None = None  # ε of the last step (kept for inspection)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        self.steps = 0
        self.grad_norm_sum = 0.0  # Σ over steps of ‖e‖ (before scaling to ρ)
        self.loss_gap_sum = 0.0  # Σ over steps of L(perturbed) − L(clean)

    def _hook(self, i: int):
        def fn(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if not module.training or self.mode == "off":
                return None
            h = output[0] if isinstance(output, tuple) else output  # attention returns (out, weights)
            if self.mode == "capture":
                if not h.requires_grad:  # no LoRA upstream: make ∂L/∂h computable, same values
                    h = h.detach().requires_grad_(True)
                self.outputs[i] = h
            else:
                h = h + self.eps[i]
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return fn

    @torch.no_grad()
    def perturbation(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """ε_l = ρ·e_l/‖e‖, ‖e‖ the global norm over all blocks (ε = 0 when e = 0)."""
        norm = torch.sqrt(sum(g.float().pow(2).sum() for g in grads))
        self.grad_norm_sum += float(norm)
        scale = self.rho / norm if norm > 0 else torch.zeros(())
        return [(g * scale.to(g.dtype)).detach() for g in grads]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], task_loss: torch.Tensor) -> torch.Tensor:
        if any(o is None for o in self.outputs):
            raise RuntimeError("vaccine: the first pass did not go through every perturbed block "
                               "(hooks not installed on this model, or the model is in eval mode)")
        outs = [o for o in self.outputs if o is not None]
        self.outputs = [None] * len(self.modules)
        # Gradient w.r.t. the block outputs only; the first pass's graph is released here.
        grads = torch.autograd.grad(task_loss, outs, allow_unused=True)
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads, strict=True)]
        self.eps = self.perturbation(grads)
        self.mode = "perturb"
        try:
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        finally:
            self.mode = "capture"
        self.steps += 1
        self.loss_gap_sum += float(out.loss.detach() - task_loss.detach())
        return out.loss

    def unprojected_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
        return None

    def transform_grad(self, name: str, grad: torch.Tensor) -> None:
        return None

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.mode = "off"
        self.outputs = [None] * len(self.modules)

    def stats(self) -> dict[str, Any]:
        n = max(1, self.steps)
        return {"steps": self.steps, "grad_norm_mean": self.grad_norm_sum / n, "loss_gap_mean": self.loss_gap_sum / n}


@register_method("vaccine", VaccineConfig)
class Vaccine(Method):
    # The "vaccine" phase's first pass differentiates w.r.t. block OUTPUTS (torch.autograd.grad).
    # DeepSpeed 0.19's engine rejects that extra backward in every ZeRO stage (measured: stage 2
    # corrupts its reduction buckets, stage 0 raises "Direct calls to tensor.backward() are not
    # supported"), so that phase trains in the driver process; the domain phases (plain LoRA)
    # run on Ray Train as usual.
    in_process_phases = ("vaccine",)

    def __init__(self, cfg: VaccineConfig) -> None:
        self.cfg = cfg
        self.aligned = False  # the re-alignment phase has run
        self.frozen: dict[str, dict[str, torch.Tensor]] = {}  # {"vaccine": tensors} when fresh_adapter
        self.record: dict[str, Any] = {}

    def _examples(self, ctx: Context) -> list:
        ex = list(ctx.safety_calib)
        if not ex:
            raise ConfigError("data.safety_calib", "Vaccine re-aligns on the safety calibration set, which is empty")
        if self.cfg.calib_size and len(ex) > self.cfg.calib_size:
            ex = seeds.calib_sample(ctx.seed).sample(ex, self.cfg.calib_size)
        return ex

    def train_config(self, ctx: Context):
        from safeanchor.train.loop import TrainConfig

        run = ctx.run_cfg.train
        return TrainConfig(lr=self.cfg.lr, epochs=self.cfg.epochs, max_steps=self.cfg.max_steps,
                           batch_size=self.cfg.batch_size, max_length=run.max_length,
                           weight_decay=self.cfg.weight_decay, warmup_ratio=self.cfg.warmup_ratio,
                           schedule="cosine", grad_clip=1.0, log_every=run.log_every)

    def setup(self, ctx: Context) -> None:
        if self.aligned:
            logger.info("  [vaccine] re-alignment already done")
            return
        if ctx.train is None:
            raise RuntimeError("vaccine: the pipeline provides no ctx.train service")
        examples = self._examples(ctx)
        logger.info(f"  [vaccine] perturbation-aware re-alignment on {len(examples)} examples "
                    f"(rho {self.cfg.rho}, at each {self.cfg.perturb} output)")
        stats = ctx.train(TrainPhase(examples=examples, cfg=self.train_config(ctx), seed=ctx.seed,
                                     tag="vaccine", hooks="vaccine"))
        if self.cfg.fresh_adapter:
            self.frozen = {FROZEN: adapter_weights(ctx.model, "default")}
            restore_frozen(ctx.model, self.frozen)
            reinit_adapter(ctx.model, seed=seeds.adapter_reinit(ctx.seed, 999))
        self.aligned = True
        self.record.update({"examples": len(examples), **{f"train_{k}": v for k, v in (stats or {}).items()
                                                          if isinstance(v, (int, float))}})

    def attach(self, ctx: Context) -> None:
        if self.frozen:
            restore_frozen(ctx.model, self.frozen)

    def phase_hooks(self, ctx: Context, phase: str) -> Any:
        if phase == "vaccine":
            return VaccineStep(ctx.model, self.cfg.rho, self.cfg.perturb)
        return super().phase_hooks(ctx, phase)

    def end_phase(self, ctx: Context, phase: str, stats: dict[str, Any]) -> None:
        """The re-alignment's counters (steps, mean ‖∂L/∂h‖, loss gap of the perturbed pass)."""
        if phase == "vaccine":
            self.record.update(stats)

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        return {"vaccine": {k: v for k, v in self.record.items() if isinstance(v, (int, float))}}

    def state_dict(self) -> dict[str, Any]:
        return {"aligned": self.aligned, "frozen": {n: dict(w) for n, w in self.frozen.items()},
                "record": dict(self.record)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "aligned" in state:
            self.aligned = bool(state["aligned"])
        if "frozen" in state:
            self.frozen = {n: dict(w) for n, w in state["frozen"].items()}
        if "record" in state:
            self.record.update(state["record"])

    def summary(self) -> dict[str, Any]:
        return {"aligned": self.aligned, "fresh_adapter": bool(self.frozen), **self.record}
