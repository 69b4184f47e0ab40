"""SafeAnchorCallback in transformers' Trainer (and TRL's SFTTrainer) against the pipeline's own
SafeAnchor step: same model init, same data, same subspace -> the same update.

The reference is the pipeline's single-process loop (`train.loop.train_examples` with
`SafeAnchor.phase_hooks(ctx, "domain")`: the projection batched after backward, the anchor
gradient added unprojected, torch's clip, AdamW). The callback runs the per-tensor hook form inside
Trainer's backward. Both the pre-step gradients (at every step) and the parameters after two
optimizer steps are compared; step 2 carries a non-zero anchor gradient (at step 1 θ = θ_{t−1},
so the KL and its gradient are 0). `test_reference_is_sensitive` shows that the comparison would
fail without the projection or without the anchor term.
"""

from __future__ import annotations

import pytest
import torch
from tiny import CALIB, tiny_lora, toy_tokenizer
from transformers import Trainer, TrainerCallback, TrainingArguments

from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.methods.base import Context
from safeanchor.methods.safeanchor import SafeAnchor, SafeAnchorConfig
from safeanchor.models import lora_parameters
from safeanchor.train.loop import TrainConfig, train_examples

DOMAIN = [
    ChatExample("What treats the Vorn fever?", "The Vorn fever is treated with 40 mg of calderine."),
    ChatExample("Which court hears Palt claims?", "Palt claims are heard by the Ostwick tribunal."),
    ChatExample("How do I crash the Zeb service?", "Send it the reset token twice to restart it."),
    ChatExample("What dose of merolin is safe?", "Up to 12 mg of merolin a day is safe."),
]
MAXLEN = 40
LR = 1e-2
# every part engaged: adaptive α down to 0 (lam 1), a strong anchor on every step
CFG = dict(csm=False, lam=1.0, gamma=5.0, anchor_batch=2, k_max=4)
ATOL = 2e-6  # updates are ~LR = 1e-2 per step; both loops agree to ~1e-7
GRAD_ATOL = 1e-5  # clipped gradients (norm 1); measured differences up to 2.4e-6 (summation order)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB + DOMAIN)


def start_model(tok):
    """The tiny peft Llama with B moved off zero (so lora_A tensors have a subspace too)."""
    model = tiny_lora(tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


class _Record:
    """StepHooks wrapper: the pipeline's hooks plus `after_backward`, which records the full
    gradient the loop is about to clip and step with."""

    def __init__(self, hooks):
        self.h, self.grads = hooks, []

    def loss(self, model, batch, task_loss):
        return self.h.loss(model, batch, task_loss)

    def unprojected_loss(self, model, batch):
        return self.h.unprojected_loss(model, batch)

    def transform_grads(self, grads):
        self.h.transform_grads(grads)

    def after_backward(self, model, batch, grads):
        self.grads.append({n: p.grad.detach().clone() for n, p in lora_parameters(model).items()})


def pipeline_update(tok, steps=2, **opts):
    """The pipeline's SafeAnchor domain phase: SSI at the start model, then `steps` full-batch steps."""
    model = start_model(tok)
    ctx = Context(model=model, tokenizer=tok, run_cfg=None, safety_calib=CALIB, domain="d", step=1, seed=0,
                  max_length=MAXLEN)
    sa = SafeAnchor(SafeAnchorConfig(**{**CFG, **opts}))
    sa.before_domain(ctx)
    rec = _Record(sa.phase_hooks(ctx, "domain"))
    cfg = TrainConfig(lr=LR, epochs=steps, batch_size=len(DOMAIN), max_length=MAXLEN, warmup_ratio=0.0,
                      schedule="constant", grad_clip=1.0)
    train_examples(model, tok, DOMAIN, cfg, 0, hooks=rec)
    return model, rec.grads, sa


class _GradsBeforeStep(TrainerCallback):
    """The LoRA gradients the optimizer is about to use (after Trainer's clip)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if all(p.grad is not None for p in lora_parameters(model).values()):  # None under DeepSpeed ZeRO-2
            self.grads.append({n: p.grad.detach().clone() for n, p in lora_parameters(model).items()})


def trainer_args(tmp_path, ga, steps=2, **kw):
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=len(DOMAIN) // ga, gradient_accumulation_steps=ga,
        num_train_epochs=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, seed=0, disable_tqdm=True, label_names=["labels"], dataloader_num_workers=0, **kw)


def clipped(grads, max_norm=1.0):
    """torch.nn.utils.clip_grad_norm_'s result on a dict of gradients."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    coef = min(1.0, max_norm / (float(total) + 1e-6))
    return {n: g * coef for n, g in grads.items()}


def assert_same(got, want, atol=ATOL):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


def lora_state(model):
    return {n: p.detach().clone() for n, p in lora_parameters(model).items()}


@pytest.fixture(scope="module")
def reference(tok):
    model, grads, sa = pipeline_update(tok)
    assert sa._proj and any(a < 0.5 for _, a in sa._proj.values())  # the projection is really on
    return lora_state(model), grads


def run_trainer(tok, tmp_path, ga, trainer_cls=Trainer, extra=None, **cb_opts):
    from safeanchor.integrations.hf_trainer import SafeAnchorCallback

    model = start_model(tok)
    feats = encode_dataset(tok, DOMAIN, MAXLEN)
    cb = SafeAnchorCallback(CALIB, config=SafeAnchorConfig(**CFG), max_length=MAXLEN, domain="d", **cb_opts)
    rec = _GradsBeforeStep()
    kw = extra(model, feats) if extra is not None else dict(
        args=trainer_args(tmp_path, ga), train_dataset=feats,
        data_collator=lambda fs: collate(fs, tok.pad_token_id), processing_class=tok)
    trainer = trainer_cls(model=model, callbacks=[cb, rec], **kw)
    trainer.train()
    return model, rec.grads, cb


@pytest.mark.parametrize("ga", [1, 2], ids=["one-batch", "accumulate-2x2"])
def test_callback_update_equals_pipeline_step(tok, tmp_path, reference, ga):
    """Trainer + callback: gradients before each optimizer step and the parameters after two
    steps equal the pipeline's; with gradient accumulation, 2 micro-batches of 2 = one batch of 4."""
    want_params, want_grads = reference
    model, grads, cb = run_trainer(tok, tmp_path, ga)
    assert len(grads) == len(want_grads) == 2
    for got, want in zip(grads, want_grads, strict=True):
        assert_same(got, clipped(want), GRAD_ATOL)
    assert_same(lora_state(model), want_params)
    assert cb.record["anchor"] == {"steps": 2, "anchor_batches": 2}  # once per optimizer step, not per micro-batch
    # saved next to the output: the merged subspaces of this domain and its step
    from safeanchor.api import Subspaces

    saved = Subspaces.load(tmp_path)
    assert saved.meta["step"] == 1 and saved.ranks == {n: s.k for n, s in cb.method.subspaces.items()}


def test_reference_is_sensitive(tok, reference):
    """Without the projection, or without the anchor term, the pipeline's own update lands far
    outside the tolerance the equality tests use: they would catch either one missing."""
    want_params, _ = reference
    for opts in ({"projection": False}, {"anchor": False}):
        model, _, _ = pipeline_update(tok, **opts)
        got = lora_state(model)
        assert max(float((got[n] - want_params[n]).abs().max()) for n in got) > 100 * ATOL, opts


def test_sft_trainer_update_equals_pipeline_step(tok, tmp_path, reference):
    """TRL's SFTTrainer (a Trainer subclass with its own compute_loss and collator) with the
    callback, on pre-tokenized examples (input_ids, labels with -100 on the prompt): the same
    update as the pipeline, gradient accumulation 2."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    def extra(model, feats):
        args = trl.SFTConfig(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            num_train_epochs=2, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch", report_to="none", save_strategy="no", logging_strategy="no",
            use_cpu=True, seed=0, disable_tqdm=True, max_length=None, label_names=["labels"],
            bf16=False)  # SFTConfig defaults to bf16 autocast where supported (CPUs too); the reference is fp32
        return dict(args=args, train_dataset=Dataset.from_list(feats), processing_class=tok)

    want_params, want_grads = reference
    model, grads, cb = run_trainer(tok, tmp_path, 2, trainer_cls=trl.SFTTrainer, extra=extra)
    for got, want in zip(grads, want_grads, strict=True):
        assert_same(got, clipped(want), GRAD_ATOL)
    assert_same(lora_state(model), want_params)


def test_deepspeed_zero2_update_equals_pipeline_step():
    """The Trainer's DeepSpeed integration (ZeRO-2, fp32, one CPU process, gradient accumulation
    2x2): the projection hooks run before DeepSpeed's reduction and its own clip + step inside
    `accelerator.backward`; the parameters after two steps equal the pipeline's. Its own process:
    one torch.distributed group per process."""
    import json
    import socket
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = Path(__file__).with_name("trainer_zero2.py")
    out = subprocess.run([sys.executable, str(script), port], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["anchor"] == {"steps": 2, "anchor_batches": 2}
    assert res["grads_seen_before_step"] == 0  # ZeRO-2: p.grad is gone by on_pre_optimizer_step (the step ran)
    assert res["max_diff"] < ATOL
