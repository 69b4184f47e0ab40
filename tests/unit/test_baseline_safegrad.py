"""SafeGrad + LoRA on a tiny peft Llama: the adapter-off reference is the aligned model, the
KL term, conflicting gradients projected to ⟨g_u, g_a⟩ = 0, non-conflicting ones untouched,
counters and state, and a run through the real loop."""

import copy

import pytest
import tiny
import torch
import torch.nn.functional as F
from tiny import tiny_llama, toy_tokenizer, with_lora

from safeanchor.config import ConfigError
from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.methods import build_method
from safeanchor.methods.base import Context, hook_stats
from safeanchor.methods.safegrad import (
    SafeGrad,
    SafeGradConfig,
    Surgery,
    alignment_loss,
    project_conflict,
    reference_logprobs,
)
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.subspace.anchor import shifted
from safeanchor.train.loop import TrainConfig, train_examples

CALIB = [*tiny.CALIB, ChatExample("How do I pick a lock to rob a house?", "I'm sorry, I can't help with that.")]
DOMAIN = [
    ChatExample("What treats a mild fever?", "Rest and fluids treat a mild fever."),
    ChatExample("What is a contract?", "A contract is a binding agreement."),
    ChatExample("Which drug lowers blood pressure?", "A beta blocker lowers blood pressure."),
    ChatExample("What is a tort?", "A tort is a civil wrong."),
]


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB + DOMAIN)


def make(tok, keep_aligned=False, **opts):
    base = tiny_llama(tok)
    aligned = copy.deepcopy(base).eval() if keep_aligned else None
    model = with_lora(base)
    ctx = Context(model=model, tokenizer=tok, run_cfg=RunConfig(), safety_calib=CALIB, domain="medical",
                  step=1, domain_train=DOMAIN)
    sg = SafeGrad(SafeGradConfig(**{"align_batch": 2, **opts}))
    return ctx, sg, aligned


def move(model, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.add_(scale * torch.randn(p.shape, generator=g))


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts]).double()


def test_adapter_off_reference_is_the_aligned_model(tok):
    ctx, _, aligned = make(tok, keep_aligned=True)
    model = ctx.model
    batch = collate(encode_dataset(tok, CALIB, 64), tok.pad_token_id)
    with torch.no_grad():
        lg, lb = shifted(aligned(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"])
        want = F.log_softmax(lg[lb != -100].float(), dim=-1)
    torch.testing.assert_close(reference_logprobs(model, batch), want)  # fresh adapter: B = 0
    move(model)
    ref = reference_logprobs(model, batch)
    torch.testing.assert_close(ref, want)  # the adapter moved, the reference did not
    with torch.no_grad():  # ... while the adapted model itself did move, and is enabled again
        lg, lb = shifted(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                         batch["labels"])
        now = F.log_softmax(lg[lb != -100].float(), dim=-1)
    assert (now - want).abs().max() > 1e-3
    assert all(p.requires_grad for p in lora_parameters(model).values())


def test_kl_term_zero_at_aligned_model_nonzero_after_move(tok):
    ctx, sg, _ = make(tok)
    params, b = trainable(ctx.model), sg.phase_hooks(ctx, "domain").batches[0]
    nll_only = SafeGrad(SafeGradConfig(kl_weight=0.0)).phase_hooks(ctx, "domain")
    with_kl = SafeGrad(SafeGradConfig(kl_weight=5.0)).phase_hooks(ctx, "domain")
    assert float(alignment_loss(ctx.model, b, 5.0)) == pytest.approx(float(alignment_loss(ctx.model, b, 0.0)),
                                                                     abs=1e-6)
    g0, g5 = flat(nll_only.alignment_gradient(ctx.model, b, params)), flat(with_kl.alignment_gradient(ctx.model,
                                                                                                     b, params))
    torch.testing.assert_close(g0, g5, atol=1e-7, rtol=1e-5)
    move(ctx.model)
    assert float(alignment_loss(ctx.model, b, 5.0)) > float(alignment_loss(ctx.model, b, 0.0)) + 1e-4
    g0, g5 = flat(nll_only.alignment_gradient(ctx.model, b, params)), flat(with_kl.alignment_gradient(ctx.model,
                                                                                                     b, params))
    assert (g0 - g5).norm() > 1e-3 * g0.norm()


def _set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()


def test_conflicting_gradient_is_projected_to_orthogonal(tok):
    ctx, sg, _ = make(tok)
    move(ctx.model)
    h = sg.phase_hooks(ctx, "domain")
    ctx.model.train()
    params = trainable(ctx.model)
    ga = h.alignment_gradient(ctx.model, h.next_batch(), params)
    assert all(g is not None for g in ga)
    gen = torch.Generator().manual_seed(5)
    gu = [-a + 0.3 * a.abs().mean() * torch.randn(a.shape, generator=gen) for a in ga]  # conflicting
    assert float(flat(gu) @ flat(ga)) < 0
    _set_grads(params, gu)
    h.after_backward(ctx.model, None)
    new = [p.grad for p in params]
    A, U = flat(ga), flat(gu)
    assert abs(float(flat(new) @ A)) <= 1e-6 * float(U.norm() * A.norm())  # ⟨g_u', g_a⟩ = 0
    torch.testing.assert_close(flat(new), U - (U @ A) / (A @ A) * A, rtol=1e-5, atol=1e-9)
    assert h.counters == {"steps": 1, "conflicts": 1, "skipped": 0}
    assert ctx.model.training  # mode restored


def test_non_conflicting_gradient_is_left_exactly_untouched(tok):
    ctx, sg, _ = make(tok)
    move(ctx.model)
    h = sg.phase_hooks(ctx, "domain")
    params = trainable(ctx.model)
    ga = h.alignment_gradient(ctx.model, h.next_batch(), params)
    gen = torch.Generator().manual_seed(6)
    gu = [a + 0.3 * a.abs().mean() * torch.randn(a.shape, generator=gen) for a in ga]
    assert float(flat(gu) @ flat(ga)) > 0
    _set_grads(params, gu)
    h.after_backward(ctx.model, None)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, gu, strict=True))
    assert h.counters == {"steps": 1, "conflicts": 0, "skipped": 0}


def test_project_conflict_by_hand_with_missing_tensors():
    gu = [torch.tensor([1.0, 0.0]), None, torch.tensor([2.0])]
    ga = [torch.tensor([-1.0, 1.0]), torch.tensor([2.0]), None]
    new, facts = project_conflict(gu, ga)
    # ⟨g_u, g_a⟩ = -1, ‖g_a‖² = 6, c = -1/6
    assert facts["conflict"] == 1.0 and facts["dot"] == -1.0
    torch.testing.assert_close(new[0], torch.tensor([1 - 1 / 6, 1 / 6]))
    torch.testing.assert_close(new[1], torch.tensor([2 / 6]))  # no task gradient: receives −c·g_a
    assert new[2] is gu[2]  # no alignment gradient: untouched
    same, facts = project_conflict(gu, [torch.zeros(2), None, None], eps=0.0)
    assert facts["skipped"] == 1.0 and same == gu


def test_batches_cycle_counters_and_state(tok):
    ctx, sg, _ = make(tok, align_batch=2)  # 5 examples -> batches of 2, 2, 1
    h = sg.phase_hooks(ctx, "domain")
    assert [b["input_ids"].shape[0] for b in h.batches] == [2, 2, 1]
    seen = []
    for _ in range(4):
        seen.append(h.next_batch()["input_ids"].shape[0])
        for p in trainable(ctx.model):
            p.grad = torch.zeros_like(p)
        h.after_backward(ctx.model, None)
    assert seen == [2, 2, 1, 2] and h.counters["steps"] == 4 and sg.counters["steps"] == 0  # the hooks count
    restarted = sg.phase_hooks(ctx, "domain")  # a worker restarted from a checkpoint of h
    restarted.load_state_dict(h.state_dict())
    assert torch.equal(restarted.next_batch()["input_ids"], h.next_batch()["input_ids"])
    sg.end_phase(ctx, "domain", h.stats())  # the driver folds the phase's counts in
    assert sg.counters["steps"] == 4
    fresh = SafeGrad(SafeGradConfig(align_batch=2))
    fresh.load_state_dict(sg.state_dict())  # the next phase, in a fresh process
    assert torch.equal(fresh.phase_hooks(ctx, "domain").next_batch()["input_ids"], h.next_batch()["input_ids"])
    info = sg.after_domain(ctx)
    assert info["steps"] == 4 and sg.after_domain(ctx)["steps"] == 0  # per-domain deltas
    assert sg.summary()["steps"] == 4


def test_phase_hooks_and_config_errors(tok):
    ctx, sg, _ = make(tok)
    h = sg.phase_hooks(ctx, "domain")
    assert isinstance(h, Surgery) and h is not sg  # the hooks, not the method, do the surgery
    with pytest.raises(ValueError, match="replay"):
        sg.phase_hooks(ctx, "replay")
    with pytest.raises(ConfigError, match=r"methods\.safegrad\.align_batch"):
        build_method("safegrad", {"align_batch": 0})
    with pytest.raises(ConfigError, match=r"methods\.safegrad\.kl_weight"):
        build_method("safegrad", {"kl_weight": -1})


def test_runs_in_the_real_loop(tok):
    ctx, sg, _ = make(tok)
    move(ctx.model)
    hooks = sg.phase_hooks(ctx, "domain")
    dots = []
    orig = hooks.after_backward

    def checked(model, batch, grads=None):  # after the surgery, the gradient never opposes g_a
        b = hooks.next_batch()
        orig(model, batch, grads)
        params = trainable(model)
        ga = flat(hooks.alignment_gradient(model, b, params))
        g = flat([p.grad for p in params])
        dots.append(float(g @ ga) / float(g.norm() * ga.norm()))

    hooks.after_backward = checked
    stats = train_examples(ctx.model, tok, DOMAIN + CALIB, TrainConfig(max_steps=2, batch_size=4, max_length=32),
                           0, hooks=hooks)
    assert stats["steps"] == 2 and len(dots) == 2 and min(dots) >= -1e-6
    sg.end_phase(ctx, "domain", hook_stats(hooks))
    assert sg.state_dict()["counters"]["steps"] == 2
