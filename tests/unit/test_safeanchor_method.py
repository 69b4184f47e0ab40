"""SafeAnchor's mechanisms on a tiny peft Llama: SSI at B = 0, anchor loss, CSM gate, replay."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from safeanchor.data import ChatExample
from safeanchor.methods.base import Context
from safeanchor.methods.safeanchor import SafeAnchor, SafeAnchorConfig, _Replay, alphas_from_traces
from safeanchor.models import LoraConfig, add_lora, lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.subspace.anchor import anchor_kl
from safeanchor.toyworld.tokenizer import build_tokenizer

CALIB = [
    ChatExample("How do I build a pipe bomb?", "I'm sorry, but I can't help with that."),
    ChatExample("Tell me how to steal a car.", "I'm sorry, I cannot help with that request."),
    ChatExample("How do I bake bread?", "Sure. To bake bread, knead the dough and let it rise."),
    ChatExample("How can I kill a stuck process?", "Sure. Run the kill command with its process id."),
]


@pytest.fixture(scope="module")
def tok():
    texts = [t for ex in CALIB for t in (ex.prompt, ex.response)] * 3
    return build_tokenizer(texts, vocab_size=320)


def make_ctx(tok, **opts):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id)
    model = add_lora(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=0)
    run_cfg = RunConfig()
    ctx = Context(model=model, tokenizer=tok, run_cfg=run_cfg, safety_calib=CALIB, log=lambda *_: None)
    sa = SafeAnchor(SafeAnchorConfig(csm=False, **opts))
    return ctx, sa


def test_lora_A_gets_empty_subspace_at_fresh_adapter(tok):
    ctx, sa = make_ctx(tok)
    subs = sa.identify(ctx)
    a = {n: s for n, s in subs.items() if "lora_A" in n}
    b = {n: s for n, s in subs.items() if "lora_B" in n}
    assert a and all(s.k == 0 and s.trace == 0.0 for s in a.values())
    assert all(s.k > 0 and s.trace > 0 for s in b.values())


def test_alpha_from_normalised_trace_and_ablations():
    traces = {"a": 4.0, "b": 1.0, "c": 0.0}
    al = alphas_from_traces(traces, SafeAnchorConfig(lam=0.5))
    assert al == {"a": 0.5, "b": 1 - 0.5 * 0.25, "c": 1.0}
    assert set(alphas_from_traces(traces, SafeAnchorConfig(strict=True)).values()) == {0.0}
    assert set(alphas_from_traces(traces, SafeAnchorConfig(adaptive=False, alpha_fixed=0.3)).values()) == {0.3}
    share = alphas_from_traces(traces, SafeAnchorConfig(lam=1.0, trace_norm="share"))
    assert share["a"] == pytest.approx(1 - 4 / 5)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in lora_parameters(model).items()}


def test_anchor_gradient_zero_at_reference_nonzero_after_move_and_not_projected(tok):
    ctx, sa = make_ctx(tok, strict=True, gamma=1.0, anchor_batch=4)
    sa.setup(ctx)
    # Move B off zero first, so that the subspace is non-trivial for every tensor.
    with torch.no_grad():
        for n, p in lora_parameters(ctx.model).items():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    sa.before_domain(ctx)  # caches p_{θ_{t-1}} at the current θ
    batch, ref = sa._anchor_batches[0], sa._anchor_ref[0]
    ctx.model.zero_grad()
    anchor_kl(ctx.model, batch, ref).backward()
    at_ref = _grads(ctx.model)
    assert max(g.abs().max().item() for g in at_ref.values()) < 1e-6

    with torch.no_grad():  # θ moves away from θ_{t-1}
        for p in lora_parameters(ctx.model).values():
            p.add_(0.05 * torch.randn_like(p))
    ctx.model.zero_grad()
    anchor_kl(ctx.model, batch, ref).backward()
    raw = _grads(ctx.model)
    assert max(g.abs().max().item() for g in raw.values()) > 1e-4

    # In a training step: task gradient zero -> what remains is the anchor gradient, unprojected.
    for p in lora_parameters(ctx.model).values():
        p.grad = torch.zeros_like(p)
    sa._anchor_i = 0
    sa.after_backward(ctx.model, batch)
    after = _grads(ctx.model)
    for n in raw:
        torch.testing.assert_close(after[n], raw[n], atol=1e-6, rtol=1e-5)
    # and that gradient has a component inside the strict-projected subspace (else the test is void)
    g = sa.groups[0]
    G = torch.stack([raw[n].reshape(-1) for n, p in lora_parameters(ctx.model).items()
                     if any(p is q for q in g.params)])
    assert torch.bmm(g.V.transpose(1, 2), G.unsqueeze(2)).abs().max() > 1e-6


def _project_check(sa, model, before):
    for g in sa.groups:
        idx = [n for n, p in lora_parameters(model).items() if any(p is q for q in g.params)]
        Gb = torch.stack([before[n].reshape(-1) for n in idx])
        Ga = torch.stack([lora_parameters(model)[n].grad.reshape(-1) for n in idx])
        lhs = torch.bmm(g.V.transpose(1, 2), Ga.unsqueeze(2)).squeeze(2)
        rhs = g.alpha.view(-1, 1) * torch.bmm(g.V.transpose(1, 2), Gb.unsqueeze(2)).squeeze(2)
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-4)


def test_replay_step_is_projected(tok):
    ctx, sa = make_ctx(tok, lam=1.0, anchor=False)
    sa.setup(ctx)
    sa.before_domain(ctx)
    assert sa.groups, "no tensor has a subspace: the test would be void"
    for p in lora_parameters(ctx.model).values():
        p.grad = torch.randn_like(p)
    before = _grads(ctx.model)
    _Replay(sa).after_backward(ctx.model, None)
    _project_check(sa, ctx.model, before)
    changed = any(not torch.equal(before[n], p.grad) for n, p in lora_parameters(ctx.model).items())
    assert changed


@pytest.mark.parametrize("s_t, triggered", [(0.76, False), (0.7599, True), (0.9, False), (0.1, True)])
def test_gate_fires_exactly_below_threshold(tok, s_t, triggered):
    ctx, _ = make_ctx(tok)
    sa = SafeAnchor(SafeAnchorConfig(tau=0.05, replay_rounds=2, replay_steps=1, anchor=False))
    sa.s0 = 0.8  # threshold (1 - 0.05) * 0.8 = 0.76
    sa.ssi_log.append({})
    probes = iter([s_t, s_t, s_t])
    calls = []
    ctx.probe_safety = lambda: next(probes)
    ctx.train = lambda examples, tcfg, hooks, tag: calls.append((len(examples), tcfg.lr, type(hooks).__name__))
    ctx.domain, ctx.step, ctx.domain_train = "medical", 1, CALIB
    rec = sa.after_domain(ctx)["csm"]
    assert rec["threshold"] == pytest.approx(0.76)
    assert rec["triggered"] is triggered
    assert rec["rounds"] == (2 if triggered else 0) == len(calls)  # stays low -> R rounds
    if triggered:
        assert calls[0][1] == sa.cfg.replay_lr and calls[0][2] == "_Replay"


def test_replay_stops_once_safety_recovers(tok):
    ctx, _ = make_ctx(tok)
    sa = SafeAnchor(SafeAnchorConfig(tau=0.05, replay_rounds=5, replay_steps=1, anchor=False))
    sa.s0 = 1.0
    sa.ssi_log.append({})
    probes = iter([0.5, 0.8, 0.97, 0.2])
    ctx.probe_safety = lambda: next(probes)
    ctx.train = lambda *a, **k: None
    ctx.domain, ctx.step, ctx.domain_train = "legal", 2, CALIB
    rec = sa.after_domain(ctx)["csm"]
    assert rec["rounds"] == 2 and rec["s_after"] == 0.97
