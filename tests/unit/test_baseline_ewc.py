"""EWC + LoRA on a tiny peft Llama: penalty value and gradient, per-example Fisher, online
accumulation, the safety source at B = 0, state round trip, and a run through the real loop."""

import io

import pytest
import torch
from tiny import CALIB, tiny_lora, toy_tokenizer

from safeanchor.config import ConfigError
from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.methods import build_method
from safeanchor.methods.base import Context, hook_stats
from safeanchor.methods.ewc import Ewc, EwcConfig, diagonal_fisher
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.subspace.anchor import response_nll
from safeanchor.train.loop import TrainConfig, train_examples

DOMAIN = [
    ChatExample("What treats a mild fever?", "Rest and fluids treat a mild fever."),
    ChatExample("What is a contract?", "A contract is a binding agreement."),
    ChatExample("Which drug lowers blood pressure?", "A beta blocker lowers blood pressure."),
    ChatExample("What is a tort?", "A tort is a civil wrong."),
    ChatExample("What does a loop do?", "A loop repeats a block of code."),
]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB + DOMAIN)


def make_ctx(tok, **opts):
    model = tiny_lora(tok)
    ctx = Context(model=model, tokenizer=tok, run_cfg=RunConfig(), safety_calib=CALIB, domain="medical",
                  step=1, domain_train=DOMAIN)
    return ctx, Ewc(EwcConfig(**opts))


def move(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def loop_fisher(model, tok, examples, max_length=64):
    """The definition: one backward per example, squared gradients averaged."""
    params = lora_parameters(model)
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for f in encode_dataset(tok, examples, max_length):
        b = collate([f], tok.pad_token_id)
        model.zero_grad()
        response_nll(model(input_ids=b["input_ids"]).logits, b["labels"]).backward()
        for n, p in params.items():
            acc[n] += p.grad.detach() ** 2
    model.zero_grad()
    return {n: a / len(examples) for n, a in acc.items()}


def test_penalty_value_and_gradient_by_hand(tok):
    ctx, ewc = make_ctx(tok, lam=7.0)
    params = lora_parameters(ctx.model)
    g = torch.Generator().manual_seed(3)
    ewc.fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    ewc.anchor = {n: p.detach().clone() + 0.1 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    expected = 0.0
    for n, p in params.items():  # explicit element sum, float64
        d = (p.detach().double() - ewc.anchor[n].double()).reshape(-1)
        expected += float((ewc.fisher[n].double().reshape(-1) * d * d).sum())
    expected *= 7.0
    task = torch.tensor(1.5)
    total = ewc.loss(ctx.model, None, task)
    assert float(total.detach()) - 1.5 == pytest.approx(expected, rel=1e-5)
    ctx.model.zero_grad()
    total.backward()
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 2 * 7.0 * ewc.fisher[n] * (p.detach() - ewc.anchor[n]),
                                   rtol=1e-5, atol=1e-7)
    # at θ = θ*: no penalty, no gradient
    ewc.anchor = {n: p.detach().clone() for n, p in params.items()}
    ctx.model.zero_grad()
    total = ewc.loss(ctx.model, None, torch.zeros((), requires_grad=True))
    assert float(total) == 0.0
    total.backward()
    assert all(float(p.grad.abs().max()) == 0.0 for p in params.values())


def test_no_penalty_before_any_fisher(tok):
    ctx, ewc = make_ctx(tok)
    task = torch.tensor(2.0)
    assert ewc.loss(ctx.model, None, task) is task


def test_fisher_is_mean_of_squared_per_example_grads(tok):
    ctx, _ = make_ctx(tok)
    # at the fresh adapter (B = 0) every lora_A gradient is exactly 0 ...
    fresh = diagonal_fisher(ctx.model, tok, DOMAIN, 64, chunk=3)
    assert all(float(f.abs().max()) == 0.0 for n, f in fresh.items() if "lora_A" in n)
    assert all(float(f.sum()) > 0 for n, f in fresh.items() if "lora_B" in n)
    # ... once B moves, A has a Fisher too; chunk 3 over 5 examples (padding, two blocks) = the loop
    move(ctx.model)
    got = diagonal_fisher(ctx.model, tok, DOMAIN, 64, chunk=3)
    want = loop_fisher(ctx.model, tok, DOMAIN)
    assert all(float(want[n].sum()) > 0 for n in want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-10)
    # and it is NOT the squared batch gradient (what the authors' code computes)
    b = collate(encode_dataset(tok, DOMAIN, 64), tok.pad_token_id)
    ctx.model.zero_grad()
    response_nll(ctx.model(input_ids=b["input_ids"]).logits, b["labels"]).backward()
    n0 = next(iter(want))
    assert not torch.allclose(lora_parameters(ctx.model)[n0].grad ** 2, want[n0], rtol=1e-2)


@pytest.mark.parametrize("gamma", [0.5, 0.0])
def test_previous_domain_online_accumulation(tok, gamma):
    ctx, ewc = make_ctx(tok, online_gamma=gamma, fisher_samples=None)
    move(ctx.model, seed=1)  # "after domain 1"
    ewc.before_domain(ctx)
    assert not ewc.fisher  # previous_domain: nothing before the first domain ends
    info = ewc.after_domain(ctx)
    F1 = loop_fisher(ctx.model, tok, DOMAIN)
    for n in F1:
        torch.testing.assert_close(ewc.fisher[n], F1[n], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(ewc.anchor[n], lora_parameters(ctx.model)[n].detach())
    assert info["fisher_trace"] == pytest.approx(sum(float(f.sum()) for f in F1.values()), rel=1e-4)
    assert info["fisher_zero_tensors"] == 0 and info["examples"] == len(DOMAIN)

    move(ctx.model, seed=2)  # "after domain 2", on other data
    ctx.step, ctx.domain, ctx.domain_train = 2, "legal", CALIB
    ewc.after_domain(ctx)
    F2 = loop_fisher(ctx.model, tok, CALIB)
    for n in F1:
        torch.testing.assert_close(ewc.fisher[n], gamma * F1[n] + F2[n], rtol=1e-4, atol=1e-10)
        torch.testing.assert_close(ewc.anchor[n], lora_parameters(ctx.model)[n].detach())
    assert len(ewc.log) == 2


def test_safety_source_anchors_the_aligned_model(tok):
    ctx, ewc = make_ctx(tok, fisher_source="safety", fisher_samples=None)
    ewc.before_domain(ctx)  # aligned model: fresh adapter, B = 0
    rec = ewc.log[-1]
    n_a = sum("lora_A" in n for n in ewc.fisher)
    assert rec["source"] == "safety" and rec["fisher_zero_tensors"] == n_a > 0
    assert rec["fisher_trace_A"] == 0.0 and rec["fisher_trace_B"] > 0
    assert all(float(a.abs().max()) == 0.0 for n, a in ewc.anchor.items() if "lora_B" in n)
    F0 = {n: f.clone() for n, f in ewc.fisher.items()}
    move(ctx.model)
    ewc.after_domain(ctx)  # not refreshed: θ* stays the aligned model
    ctx.step = 2
    ewc.before_domain(ctx)
    assert all(torch.equal(F0[n], ewc.fisher[n]) for n in F0)
    assert all(float(a.abs().max()) == 0.0 for n, a in ewc.anchor.items() if "lora_B" in n)
    assert float(ewc.loss(ctx.model, None, torch.zeros(()))) > 0

    ctx2, ewc2 = make_ctx(tok, fisher_source="safety", refresh_safety=True, fisher_samples=None)
    ewc2.before_domain(ctx2)
    move(ctx2.model)
    ewc2.after_domain(ctx2)  # refreshed and re-anchored at the moved model
    assert len(ewc2.log) == 2
    assert float(ewc2.loss(ctx2.model, None, torch.zeros(()))) == 0.0


def test_fisher_samples_are_capped_and_seeded(tok):
    ctx, ewc = make_ctx(tok, fisher_samples=2)
    move(ctx.model)
    ewc.after_domain(ctx)
    _, ewc_b = make_ctx(tok, fisher_samples=2)
    ewc_b.after_domain(ctx)
    assert ewc.log[-1]["examples"] == 2
    assert all(torch.equal(ewc.fisher[n], ewc_b.fisher[n]) for n in ewc.fisher)


def test_state_round_trip_continues_identically(tok):
    ctx, ewc = make_ctx(tok, online_gamma=0.7)
    move(ctx.model, seed=1)
    ewc.after_domain(ctx)
    buf = io.BytesIO()
    torch.save(ewc.state_dict(), buf)  # what a fresh process receives
    buf.seek(0)
    fresh = Ewc(EwcConfig(online_gamma=0.7))
    fresh.load_state_dict(torch.load(buf))
    move(ctx.model, seed=2)
    p1, p2 = ewc.loss(ctx.model, None, torch.zeros(())), fresh.loss(ctx.model, None, torch.zeros(()))
    assert float(p1) > 0 and float(p1) == float(p2)
    ctx.step, ctx.domain_train = 2, CALIB
    ewc.after_domain(ctx)
    fresh.after_domain(ctx)
    assert set(ewc.fisher) == set(fresh.fisher)
    for n in ewc.fisher:
        assert torch.equal(ewc.fisher[n], fresh.fisher[n]) and torch.equal(ewc.anchor[n], fresh.anchor[n])
    def drop_time(log):
        return [{k: v for k, v in r.items() if k != "fisher_s"} for r in log]

    assert drop_time(fresh.log) == drop_time(ewc.log) and len(ewc.log) == 2


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"methods\.ewc\.fisher_source"):
        build_method("ewc", {"fisher_source": "tasks"})
    with pytest.raises(ConfigError, match=r"methods\.ewc\.online_gamma"):
        build_method("ewc", {"online_gamma": 1.5})
    with pytest.raises(ConfigError, match=r"methods\.ewc\.refresh_safety"):
        build_method("ewc", {"refresh_safety": True})
    assert isinstance(build_method("ewc", {"lam": 3}), Ewc)


def test_runs_in_the_real_loop(tok):
    ctx, ewc = make_ctx(tok, fisher_samples=None)
    ewc.after_domain(ctx)  # Fisher of "domain 1" at the current model: θ* = θ
    ctx.step, ctx.domain = 2, "legal"
    before = {n: p.detach().clone() for n, p in lora_parameters(ctx.model).items()}
    hooks = ewc.phase_hooks(ctx, "domain")
    stats = train_examples(ctx.model, tok, CALIB + DOMAIN, TrainConfig(max_steps=2, batch_size=4, max_length=32),
                           0, hooks=hooks)
    assert stats["steps"] == 2 and ewc.state_dict()["penalty"]["n"] == 0  # the hooks count ...
    ewc.end_phase(ctx, "domain", hook_stats(hooks))  # ... the driver folds it in
    st = ewc.state_dict()["penalty"]
    assert st["n"] == 2 and st["last"] > 0  # step 1 at θ* (0), step 2 after one update (> 0)
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(ctx.model).items())
    info = ewc.after_domain(ctx)
    assert info["penalty_steps"] == 2 and info["penalty_last"] > 0
