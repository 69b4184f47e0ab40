"""`SafeAnchorCallback`: SafeAnchor in a plain `transformers.Trainer` (and TRL's `SFTTrainer`,
a Trainer subclass) on a peft LoRA model, one Trainer run per domain.

It drives the pipeline's own `SafeAnchor` method object for one domain, so every number comes
from the same code (SSI, merge, α, projection, anchor, CSM gate, replay):

    on_train_begin  s_0 on the probe set (first domain only; later domains read it from the
                    previous run's file), SSI on the calibration set at the model as training
                    starts, Fisher-weighted merge with the subspaces saved by the previous
                    domain's run (`previous=`), α per tensor; the anchor reference log-probs of
                    θ_{t−1} cached; per-tensor gradient hooks installed (`train.loop.GradHooks`).
    on_step_begin   once per OPTIMIZER step (not per micro-batch): the anchor gradient
                    ∇ γ·KL(p_{θ_{t−1}} ‖ p_θ) on the next anchor batch, by torch.autograd.grad with
                    the hooks off; it is added, unprojected, by the hooks in the next backward.
    backward        each LoRA tensor's gradient hook: ĝ = g − (1 − α)·V Vᵀ g (+ the anchor gradient
                    once per step).
    on_step_end     checks the anchor gradient was added (every LoRA tensor reached by the loss).
    on_train_end    hooks removed; CSM: s_t on the probe set, and while s_t < (1 − τ)·s_0 (at most
                    R rounds) a projected replay round of L_task + β·L_safe in this process (the
                    pipeline's `train.loop.train_examples` with the method's replay hooks); then
                    the merged subspaces, s_0 and the logs are saved next to the adapter
                    (`<output_dir>/safeanchor_subspaces.safetensors`): pass that directory as
                    `previous=` to the next domain's callback.

Where the projection sits, and why not `on_pre_optimizer_step` (transformers 5.24,
`Trainer._run_epoch`): that event fires AFTER `_clip_grad_norm`, so the clip would be computed on
the unprojected gradient (the pipeline clips the projected one), and under DeepSpeed the
optimizer step already ran inside `accelerator.backward` (accelerate's `DeepSpeedEngineWrapper`
calls `engine.step()` there; the Trainer's `optimizer.step()` is a no-op), so the event comes
after the update. An optimizer wrapper has the same two problems (Trainer clips before it;
DeepSpeed owns the optimizer). A gradient hook on each LoRA tensor runs inside backward, before
the Trainer's clip, before DeepSpeed's ZeRO-1/2 reduction (which runs from post-accumulate hooks;
ENVIRONMENT.md) and before gradient accumulation adds the micro-batch into p.grad: it is the one
point that comes before all three, and the same hook the pipeline's DeepSpeed engine uses.

Gradient accumulation: the hook projects each micro-batch's gradient; the map is linear, so
p.grad = Σ_m P(g_m) = P(Σ_m g_m), the projection of the accumulated gradient. With the Trainer's
`num_items_in_batch` (models that take loss kwargs, e.g. every HF causal LM and peft's wrapper),
Σ_m g_m is the gradient of the token mean over the whole accumulated batch, i.e. the pipeline's
task gradient for one batch of the same examples. The anchor term is computed once per optimizer
step and added once (in the first micro-batch's backward), as the pipeline adds it once per step.

The anchor term needs no `compute_loss` change: the paper's anchor gradient is NOT projected, so
the pipeline never puts it into the projected loss — it computes it apart and adds it to the
projected gradient — and the callback does exactly that through the same hooks. The Trainer's
logged loss is the task loss, as in the pipeline.

Data-parallel ranks (DDP / DeepSpeed): every rank computes the same SSI (same model, same
examples; the Fisher is not sharded here, unlike the pipeline's SSI on Ray), projects its
local gradient (exact: linear), adds the same anchor gradient (the anchor batch is not split
across ranks, so the average over ranks is that gradient), and runs the same CSM and replay in
process; only the world's process zero writes the file.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from safeanchor.api import SUBSPACES_FILE, Example, Subspaces, as_examples, default_judge
from safeanchor.evaluation import EvalConfig, probe_safety
from safeanchor.methods.base import Context, hook_stats, train_in_process
from safeanchor.methods.safeanchor import SafeAnchor, SafeAnchorConfig
from safeanchor.models import lora_parameters
from safeanchor.train.loop import GradHooks, TrainConfig

logger = logging.getLogger(__name__)

FORMAT = 1  # version of the metadata saved with the subspaces


class SafeAnchorCallback(TrainerCallback):
    """SafeAnchor for one domain's `Trainer.train()`; see the module docstring for what runs when.

    calibration: safe responses for SSI, the anchor and replay (refusals for harmful prompts,
        helpful answers for benign ones); `ChatExample`s, (prompt, response) pairs or mappings.
    probe: CSM's monitoring prompts (required when `config.csm`).
    domain_examples: the domain's own (prompt, response) examples, which replay rounds mix with
        the safety loss (required when `config.csm` and `config.replay_rounds` > 0).
    previous: the directory (or file) where the previous domain's callback saved its state; its
        subspaces are merged with this domain's (`config.incremental`), its s_0 is reused.
    config: SafeAnchor's options (`SafeAnchorConfig`: ρ, k_max, λ, γ, anchor batch, τ, replay...;
        the paper's defaults unless set).
    domain: a name for the logs and the file. max_length: tokens per calibration / probe
        example. seed: seeds the calibration sample, anchor / replay batch order and replay
        data (default: `TrainingArguments.seed`). tokenizer: default the Trainer's
        processing_class. judge: a `safeanchor.judges.Judge` (name, verdicts()) for CSM (default: the keyword judge).
        max_new_tokens / eval_batch_size: CSM's greedy generation. save_dir: where the state is
        written after training (default: `TrainingArguments.output_dir`; None there: not saved).
        replay_log_every: steps between progress lines of the replay loop. Progress goes to the
        "safeanchor" loggers (`safeanchor.logs.setup()` prints it, as the workflows do).

    After training: `record` holds what happened (SSI ranks and α, anchor steps, CSM decisions).
    """

    def __init__(
        self,
        calibration: Iterable[Example],
        *,
        probe: Iterable[Example | str] | None = None,
        domain_examples: Iterable[Example] | None = None,
        previous: str | Path | None = None,
        config: SafeAnchorConfig | None = None,
        domain: str = "domain",
        max_length: int = 96,
        seed: int | None = None,
        tokenizer: Any = None,
        judge: Any = None,
        max_new_tokens: int = 24,
        eval_batch_size: int = 64,
        save_dir: str | Path | None = None,
        replay_log_every: int = 25,
    ) -> None:
        self.config = config or SafeAnchorConfig()
        self.calibration = as_examples(calibration, "calibration")
        self.probe = [] if probe is None else as_examples(
            [{"prompt": p} if isinstance(p, str) else p for p in probe], "probe")
        self.domain_examples = [] if domain_examples is None else as_examples(domain_examples, "domain_examples")
        if self.config.csm and not self.probe:
            raise ValueError("probe: CSM is on (config.csm) and needs probe prompts; pass probe=... "
                             "or SafeAnchorConfig(csm=False)")
        if self.config.csm and self.config.replay_rounds > 0 and not self.domain_examples:
            raise ValueError("domain_examples: CSM replay (config.replay_rounds > 0) trains on the domain's "
                             "examples too; pass domain_examples=... or SafeAnchorConfig(replay_rounds=0)")
        if max_length < 8:
            raise ValueError(f"max_length: must be >= 8, got {max_length}")
        self.domain, self.max_length, self.seed = domain, max_length, seed
        self.tokenizer, self.judge = tokenizer, judge
        self.eval_cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=eval_batch_size)
        self.save_dir = save_dir
        self.replay_log_every = replay_log_every

        self.method = SafeAnchor(self.config)
        self.step = 1  # 1-based index of this domain in the sequence
        if previous is not None:
            prev = Subspaces.load(previous)
            meta = prev.meta
            if meta.get("format") != FORMAT:
                raise ValueError(f"previous: {previous} was not written by SafeAnchorCallback (format "
                                 f"{meta.get('format')!r}, expected {FORMAT})")
            self.method.subspaces = dict(prev)
            self.method.s0 = meta.get("s0")
            self.method.csm_log = [dict(r) for r in meta.get("csm", [])]
            self.method.ssi_log = [dict(r) for r in meta.get("ssi", [])]
            self.step = int(meta["step"]) + 1
        self.ctx: Context | None = None
        self.hooks: Any = None
        self.grad_hooks: GradHooks | None = None
        self.record: dict[str, Any] = {}

    # ---- Trainer events ------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, processing_class: Any = None, **kwargs: Any) -> None:
        tok = self.tokenizer or processing_class
        if tok is None or not hasattr(tok, "apply_chat_template"):
            raise ValueError("tokenizer: SafeAnchorCallback needs the chat tokenizer (tokenizer=... or the "
                             "Trainer's processing_class)")
        if model is None or not lora_parameters(model):
            raise ValueError("SafeAnchorCallback: the Trainer's model has no trainable LoRA tensors "
                             "(a peft LoRA model is needed)")
        grad_clip = float(args.max_grad_norm or 0.0)
        # the replay rounds' TrainConfig derives from this one (lr, batch, steps: SafeAnchorConfig)
        train_cfg = TrainConfig(max_length=self.max_length, weight_decay=args.weight_decay, grad_clip=grad_clip,
                                log_every=self.replay_log_every)
        ctx = Context(model=model, tokenizer=tok, run_cfg=None, domain=self.domain, step=self.step,
                      safety_calib=self.calibration, safety_probe=self.probe, domain_train=self.domain_examples,
                      seed=args.seed if self.seed is None else self.seed, max_length=self.max_length,
                      train_cfg=train_cfg)
        judge = self.judge if self.judge is not None else (default_judge() if self.probe else None)
        ctx.probe_safety = lambda: probe_safety(model, tok, self.probe, judge, self.eval_cfg)
        self.ctx = ctx
        if self.config.csm and self.method.s0 is None:
            self.method.setup(ctx)  # s_0: the model before this (first) domain
        self.method.before_domain(ctx)  # SSI, merge with `previous`, α
        self.hooks = self.method.phase_hooks(ctx, "domain")  # projection + anchor reference of θ_{t−1}
        self.grad_hooks = GradHooks(model, self.hooks, batched=False).__enter__()

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: Any = None, **kwargs: Any) -> None:
        if self.grad_hooks is None:
            raise RuntimeError("SafeAnchorCallback: a training step began before on_train_begin")
        model.train()  # as the pipeline's loop: the anchor forward in training mode
        self.grad_hooks.prepare(model, None)  # the anchor gradient of this step, added in backward

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        left = self.grad_hooks.extra if self.grad_hooks is not None else None
        if left:
            raise RuntimeError(f"SafeAnchorCallback: the anchor gradient of {len(left)} LoRA tensors (e.g. "
                               f"{next(iter(left))!r}) was never added: the training loss does not reach them")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.grad_hooks is None:
            return
        self.grad_hooks.__exit__(None, None, None)
        self.grad_hooks = None
        ctx, method = self.ctx, self.method
        stats = hook_stats(self.hooks)
        method.end_phase(ctx, "domain", stats)
        gates, r = [], 0
        while True:  # CSM: round 0 after the domain, round r after replay round r
            gate = method.gate(ctx, r)
            gates.append(gate.record)
            if gate.phase is None:
                break
            train_in_process(method, ctx, gate.phase)
            r += 1
        self.record = {"domain": self.domain, "step": self.step, "anchor": stats, "gates": gates,
                       **method.after_domain(ctx)}
        out = self.save_dir if self.save_dir is not None else args.output_dir
        if out is not None and state.is_world_process_zero:
            path = self.save(out)
            logger.info(f"  [safeanchor] subspaces and CSM state -> {path}")

    # ---- persistence ---------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the merged subspaces with s_0, this domain's step and the SSI / CSM logs into
        `directory/safeanchor_subspaces.safetensors` (next to the adapter)."""
        meta = {"format": FORMAT, "domain": self.domain, "step": self.step, "s0": self.method.s0,
                "csm": self.method.csm_log, "ssi": self.method.ssi_log}
        return Subspaces(self.method.subspaces, meta).save(Path(directory) / SUBSPACES_FILE)
