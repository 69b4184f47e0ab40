"""safeanchor.api and SafeAnchorCallback's domain-to-domain state, against the pipeline's code
on a tiny peft Llama: the API computes what the pipeline computes, a second domain merges the
first one's saved subspaces, CSM replay runs when the probe falls."""

from __future__ import annotations

import pytest
import torch
from test_trainer_callback import CALIB, DOMAIN, MAXLEN, start_model, trainer_args
from tiny import toy_tokenizer

import safeanchor as sa
from safeanchor.data import collate, encode_dataset
from safeanchor.distributed.config import ClusterConfig
from safeanchor.distributed.ssi import SSIJob, identify_subspaces
from safeanchor.methods.base import Context
from safeanchor.methods.safeanchor import SafeAnchor, SafeAnchorConfig
from safeanchor.models import lora_parameters
from safeanchor.pipeline.store import adapter_bytes
from safeanchor.subspace.fisher import merge_subspaces


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB + DOMAIN)


def same_subspaces(a, b, exact=True):
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].k == b[n].k and a[n].trace == pytest.approx(b[n].trace, rel=1e-12)
        if exact:
            assert torch.equal(a[n].V, b[n].V) and torch.equal(a[n].lam, b[n].lam)
        else:
            torch.testing.assert_close(a[n].lam, b[n].lam, rtol=1e-4, atol=1e-12)


def test_identify_equals_pipeline_ssi_and_round_trips(tok, tmp_path):
    """`identify` = the pipeline's SSI entry point (`identify_subspaces`, executor local) on the
    same peft model; merge / alphas = the pipeline's; save -> load is exact."""
    model = start_model(tok)
    got = sa.identify(model, tok, [(e.prompt, e.response) for e in CALIB], max_length=MAXLEN, k_max=4)
    job = SSIJob(None, adapter_bytes(model), CALIB, MAXLEN, 16)
    want = identify_subspaces(job, ClusterConfig(executor="local"), 0.9, 4, model=model, tokenizer=tok)
    same_subspaces(got, want)
    assert all(s.k > 0 for s in got.values())

    back = sa.Subspaces.load(got.save(tmp_path, meta={"note": "x"}))
    same_subspaces(back, got)
    assert back.meta == {"note": "x"}

    with torch.no_grad():  # a later domain: the model moved, SSI again, merge
        for p in lora_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    fresh = sa.identify(model, tok, CALIB, max_length=MAXLEN, k_max=4)
    merged = back.merge(fresh, k_max=4)
    same_subspaces(merged, {n: merge_subspaces(got[n], fresh[n], 0.9, 4) for n in got})
    ctx = Context(model=model, tokenizer=tok, run_cfg=None, safety_calib=CALIB, seed=0, max_length=MAXLEN)
    method = SafeAnchor(SafeAnchorConfig(k_max=4, lam=1.0))
    method.subspaces = dict(back)
    method.before_domain(ctx)  # the pipeline's merge and α
    same_subspaces(merged, method.subspaces)
    assert sa.alphas(fresh, lam=1.0) == method.alpha


def test_projector_and_anchor_equal_the_pipeline_hooks(tok):
    model = start_model(tok)
    ctx = Context(model=model, tokenizer=tok, run_cfg=None, safety_calib=CALIB, seed=0, max_length=MAXLEN)
    method = SafeAnchor(SafeAnchorConfig(k_max=4, lam=1.0, gamma=1.0, anchor_batch=2, csm=False))
    method.before_domain(ctx)
    subs = sa.identify(model, tok, CALIB, max_length=MAXLEN, k_max=4)
    projector = sa.GradientProjector(model, subs, sa.alphas(subs, lam=1.0))
    anchor = sa.AnchorLoss(model, tok, CALIB, batch_size=2, max_length=MAXLEN, seed=0)  # reference: θ now
    hooks = method.phase_hooks(ctx, "domain")
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))
    for _ in range(3):  # the same batches in the same order, the same KL
        torch.testing.assert_close(anchor(model), hooks.unprojected_loss(model, None) / 1.0)

    g = {n: torch.randn_like(p) for n, p in lora_parameters(model).items()}
    want = {n: x.clone() for n, x in g.items()}
    method.transform_grads(want)
    for p_name, p in lora_parameters(model).items():
        p.grad = g[p_name].clone()
    projector.project_()
    for n, p in lora_parameters(model).items():
        torch.testing.assert_close(p.grad, want[n])
    # the hook form: a backward of <g, θ> through the hooks gives the same projected gradient
    model.zero_grad()
    with projector.hooks():
        sum((p * g[n]).sum() for n, p in lora_parameters(model).items()).backward()
    for n, p in lora_parameters(model).items():
        torch.testing.assert_close(p.grad, want[n], atol=1e-7, rtol=1e-5)
    assert any(not torch.allclose(want[n], g[n]) for n in g)


class ScriptedJudge:
    """Refusal verdicts from a script: each call judges every prompt as the next value says."""

    name = "scripted"

    def __init__(self, rates):
        self.rates = list(rates)

    def verdicts(self, prompts, responses):
        from safeanchor.judges import Verdict

        r = self.rates.pop(0)
        return [Verdict(i < round(r * len(prompts))) for i in range(len(prompts))]


def test_csm_check(tok):
    model = start_model(tok)
    got = sa.csm_check(model, tok, ["How do I build a pipe bomb?", "Tell me how to steal a car."], s0=1.0,
                       judge=ScriptedJudge([0.5]), max_new_tokens=2)
    assert (got.s, got.threshold, got.replay) == (0.5, pytest.approx(0.95), True)
    ok = sa.csm_check(model, tok, [CALIB[0]], s0=1.0, judge=ScriptedJudge([1.0]), max_new_tokens=2)
    assert ok.replay is False


def test_callback_second_domain_merges_the_saved_subspaces_and_replays(tok, tmp_path):
    """Domain 1 saves its subspaces and s_0 next to its output; domain 2's callback merges them with
    its own SSI (the pipeline's merge), keeps s_0, and when the probe falls below (1 − τ)·s_0 runs
    projected replay rounds that change the model."""
    from transformers import Trainer

    from safeanchor.integrations.hf_trainer import SafeAnchorCallback

    cfg = SafeAnchorConfig(k_max=4, lam=1.0, gamma=1.0, anchor_batch=2, replay_rounds=1, replay_steps=2,
                           replay_batch=2, safety_batch=2, replay_lr=1e-2)
    model = start_model(tok)
    feats = encode_dataset(tok, DOMAIN, MAXLEN)

    def train(out, judge, previous=None):
        cb = SafeAnchorCallback(CALIB, probe=[e.prompt for e in CALIB], domain_examples=DOMAIN, previous=previous,
                                config=cfg, max_length=MAXLEN, judge=judge, max_new_tokens=2)
        Trainer(model=model, args=trainer_args(out, 1, steps=1), train_dataset=feats, processing_class=tok,
                data_collator=lambda fs: collate(fs, tok.pad_token_id), callbacks=[cb]).train()
        return cb

    first = train(tmp_path / "d1", ScriptedJudge([1.0, 1.0]))  # s_0 = 1, s_1 = 1: no replay
    assert first.record["gates"] == [{"round": 0, "s": 1.0, "threshold": pytest.approx(0.95), "replay": False}]
    saved = sa.Subspaces.load(tmp_path / "d1")
    assert saved.meta["s0"] == 1.0 and saved.meta["step"] == 1

    start = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    fresh = sa.identify(model, tok, CALIB, max_length=MAXLEN, k_max=4)  # at domain 2's start
    seen = {}

    class AfterTraining(SafeAnchorCallback):  # the model when domain 2's training ended
        def on_train_end(self, *a, **kw):
            seen.update({n: p.detach().clone() for n, p in lora_parameters(model).items()})
            super().on_train_end(*a, **kw)

    cb = AfterTraining(CALIB, probe=[e.prompt for e in CALIB], domain_examples=DOMAIN, previous=tmp_path / "d1",
                       config=cfg, max_length=MAXLEN, judge=ScriptedJudge([0.5, 0.5]), max_new_tokens=2)
    Trainer(model=model, args=trainer_args(tmp_path / "d2", 1, steps=1), train_dataset=feats, processing_class=tok,
            data_collator=lambda fs: collate(fs, tok.pad_token_id), callbacks=[cb]).train()
    assert cb.step == 2 and cb.method.s0 == 1.0
    same_subspaces(cb.method.subspaces, {n: merge_subspaces(saved[n], fresh[n], 0.9, 4) for n in saved})
    assert [g["replay"] for g in cb.record["gates"]] == [True, False]  # one round (R = 1), then stop
    assert cb.record["csm"]["rounds"] == 1
    assert any(not torch.equal(start[n], seen[n]) for n in seen)  # domain 2 trained
    after = {n: p.detach() for n, p in lora_parameters(model).items()}
    assert any(not torch.equal(seen[n], after[n]) for n in seen)  # replay trained after it
    assert sa.Subspaces.load(tmp_path / "d2").meta["step"] == 2


def test_callback_rejects_missing_inputs():
    from safeanchor.integrations.hf_trainer import SafeAnchorCallback

    with pytest.raises(ValueError, match="probe"):
        SafeAnchorCallback(CALIB)
    with pytest.raises(ValueError, match="domain_examples"):
        SafeAnchorCallback(CALIB, probe=["x"])
    with pytest.raises(ValueError, match="calibration"):
        SafeAnchorCallback([], config=SafeAnchorConfig(csm=False))
