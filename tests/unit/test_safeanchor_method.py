"""SafeAnchor's mechanisms on a tiny peft Llama: SSI at B = 0, anchor loss, CSM gate, replay."""

import pytest
import torch
from tiny import CALIB, tiny_lora, toy_tokenizer

from safeanchor.config import ConfigError
from safeanchor.data import encode_example
from safeanchor.methods.base import Context
from safeanchor.methods.safeanchor import SafeAnchor, SafeAnchorConfig, _Replay, alphas_from_traces
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.ssi import safety_subspaces
from safeanchor.subspace.anchor import anchor_kl, response_nll
from safeanchor.train.loop import GradHooks


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB)


def make_ctx(tok, **opts):
    model = tiny_lora(tok)
    run_cfg = RunConfig()
    ctx = Context(model=model, tokenizer=tok, run_cfg=run_cfg, safety_calib=CALIB)
    sa = SafeAnchor(SafeAnchorConfig(csm=False, **opts))
    return ctx, sa


def test_lora_A_gets_empty_subspace_at_fresh_adapter(tok):
    ctx, sa = make_ctx(tok)
    subs = sa.identify(ctx)
    a = {n: s for n, s in subs.items() if "lora_A" in n}
    b = {n: s for n, s in subs.items() if "lora_B" in n}
    assert a and all(s.k == 0 and s.trace == 0.0 for s in a.values())
    assert all(s.k > 0 and s.trace > 0 for s in b.values())


def test_ssi_equals_dense_fisher_of_one_example_at_a_time_backward(tok):
    """safety_subspaces (one padded batch, vmap per-example grads, thin SVD) against the plain
    definition: unpadded one-example backward of the response NLL, F = GᵀG/N, dense eigh."""
    ctx, sa = make_ctx(tok)
    _move_B(ctx.model)  # B != 0: lora_A gets gradients too
    subs = safety_subspaces(ctx.model, tok, CALIB, 64, rho=1.0, k_max=64, chunk=3)
    params = lora_parameters(ctx.model)
    assert list(subs) == list(params)
    rows = {n: [] for n in params}
    ctx.model.eval()
    for ex in CALIB:
        f = encode_example(tok, ex, 64)
        ids, labels = torch.tensor([f["input_ids"]]), torch.tensor([f["labels"]])
        ctx.model.zero_grad()
        response_nll(ctx.model(input_ids=ids).logits, labels).backward()
        for n, p in params.items():
            rows[n].append(p.grad.detach().reshape(-1).double())
    for n, s in subs.items():
        G = torch.stack(rows[n])
        F = G.T @ G / len(CALIB)
        evals, evecs = torch.linalg.eigh(F)
        evals, evecs = evals.flip(0)[: s.k], evecs.flip(1)[:, : s.k]
        assert s.k == len(CALIB)  # rank of G (4 examples, n >= 64)
        assert abs(s.trace - float(torch.trace(F))) <= 1e-6 * float(torch.trace(F))
        torch.testing.assert_close(s.lam.double(), evals, atol=1e-9, rtol=1e-3)
        torch.testing.assert_close(F @ s.V.double(), s.V.double() * s.lam.double(), atol=1e-8, rtol=1e-3)
    # SafeAnchor.identify without the pipeline's service computes exactly this
    got = sa.identify(ctx)
    ref = safety_subspaces(ctx.model, tok, CALIB, ctx.run_cfg.train.max_length, sa.cfg.rho, sa.cfg.k_max,
                           sa.cfg.k_fixed, chunk=sa.cfg.grad_chunk)
    assert list(got) == list(ref)
    for n in ref:
        assert torch.equal(got[n].V, ref[n].V) and torch.equal(got[n].lam, ref[n].lam)


def test_alpha_from_normalised_trace_and_ablations():
    traces = {"a": 4.0, "b": 1.0, "c": 0.0}
    al = alphas_from_traces(traces, SafeAnchorConfig(lam=0.5))
    assert al == {"a": 0.5, "b": 1 - 0.5 * 0.25, "c": 1.0}
    assert set(alphas_from_traces(traces, SafeAnchorConfig(strict=True)).values()) == {0.0}
    assert set(alphas_from_traces(traces, SafeAnchorConfig(adaptive=False, alpha_fixed=0.3)).values()) == {0.3}
    share = alphas_from_traces(traces, SafeAnchorConfig(lam=1.0, trace_norm="share"))
    assert share["a"] == pytest.approx(1 - 4 / 5)
    mean = alphas_from_traces(traces, SafeAnchorConfig(lam=0.5, trace_norm="mean"))  # mean trace 5/3
    assert mean == pytest.approx({"a": 0.0, "b": 1 - 0.5 * 3 / 5, "c": 1.0})  # a clipped at 0


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in lora_parameters(model).items()}


def _backward_through_hooks(model, hooks, batch, coeffs, batched=False):
    """One loop-style backward of Σ <coeff, θ> (gradient = coeff) through the real GradHooks
    (per-tensor hooks as on DeepSpeed, or `batched` as in the single-process loop)."""
    for p in model.parameters():
        p.grad = None
    params = lora_parameters(model)
    with GradHooks(model, hooks, batched=batched) as gh:
        gh.prepare(model, batch)
        sum((params[n] * c).sum() for n, c in coeffs.items()).backward()
        gh.finish()
    return _grads(model)


def _move_B(model, scale=0.05):
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, scale)


def test_anchor_gradient_zero_at_reference_nonzero_after_move_and_not_projected(tok):
    ctx, sa = make_ctx(tok, strict=True, gamma=1.0, anchor_batch=4)
    sa.setup(ctx)
    _move_B(ctx.model)  # B off zero first, so that the subspace is non-trivial for every tensor
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "domain")  # caches p_{θ_{t-1}} at the current θ
    batch, ref = hooks.batches[0], hooks.ref[0]
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

    # In a training step with a zero task gradient, what remains is the anchor gradient, unprojected.
    hooks.anchor_i = 0
    zero = {n: torch.zeros_like(p) for n, p in lora_parameters(ctx.model).items()}
    after = _backward_through_hooks(ctx.model, hooks, batch, zero)
    for n in raw:
        torch.testing.assert_close(after[n], raw[n], atol=1e-6, rtol=1e-5)
    # ... and that gradient has a component inside the (strict) subspace, else the test is void
    assert any((sa._proj[n][0].T @ raw[n].reshape(-1)).abs().max() > 1e-6 for n in sa._proj)


def test_anchor_every_k_steps_weighted_k(tok):
    """anchor_every = 3: steps 0, 3, 6 carry 3·γ·KL on consecutive anchor batches, the others none."""
    ctx, sa = make_ctx(tok, gamma=0.5, anchor_batch=2, anchor_every=3)
    sa.setup(ctx)
    _move_B(ctx.model)
    sa.before_domain(ctx)
    h = sa.phase_hooks(ctx, "domain")
    with torch.no_grad():
        for p in lora_parameters(ctx.model).values():
            p.add_(0.05 * torch.randn_like(p))
    got = [h.unprojected_loss(ctx.model, None) for _ in range(7)]
    assert [g is not None for g in got] == [True, False, False, True, False, False, True]
    for step, b in ((0, 0), (3, 1), (6, 2)):
        b %= len(h.batches)
        want = 1.5 * anchor_kl(ctx.model, h.batches[b], h.ref[b])
        assert float(want) > 0
        torch.testing.assert_close(got[step], want)
    assert h.state_dict() == {"step": 7, "anchor_i": 3} and "anchor_i" not in sa.state_dict()  # the hooks count
    restarted = sa.phase_hooks(ctx, "domain")  # a worker restarted from a checkpoint of h
    restarted.load_state_dict(h.state_dict())
    assert [restarted.unprojected_loss(ctx.model, None) is not None for _ in range(3)] == [False, False, True]
    assert sa.phase_hooks(ctx, "domain").unprojected_loss(ctx.model, None) is not None  # a new phase: step 0


def test_anchor_kinds_selects_calibration_examples(tok):
    from dataclasses import replace

    from safeanchor.config import ConfigError

    ctx, sa = make_ctx(tok, anchor_batch=8, anchor_kinds=["harmful"])
    ctx.safety_calib = [replace(e, meta={"kind": "harmful" if "sorry" in e.response else "benign"}) for e in CALIB]
    sa.setup(ctx)
    sa.before_domain(ctx)
    h = sa.phase_hooks(ctx, "domain")
    assert len(h.batches) == 1 and h.batches[0]["input_ids"].shape[0] == 2  # the 2 refusals
    _, every = make_ctx(tok, anchor_batch=8)
    every.setup(ctx)
    every.before_domain(ctx)
    assert every.phase_hooks(ctx, "domain").batches[0]["input_ids"].shape[0] == 4
    _, none = make_ctx(tok, anchor_kinds=["jailbreak"])
    none.before_domain(ctx)
    with pytest.raises(ConfigError, match=r"anchor_kinds.*kinds present: \['benign', 'harmful'\]"):
        none.phase_hooks(ctx, "domain")


def _check_projected(sa, before, after):
    assert sa._proj, "no tensor has a subspace: the test would be void"
    changed = False
    for n, (V, alpha) in sa._proj.items():
        lhs = V.T @ after[n].reshape(-1)
        rhs = alpha * (V.T @ before[n].reshape(-1))
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-4)
        changed |= not torch.equal(before[n], after[n])
    assert changed


@pytest.mark.parametrize("batched", [False, True], ids=["per-tensor", "batched"])
def test_domain_step_gradient_is_projected(tok, batched):
    ctx, sa = make_ctx(tok, lam=1.0, anchor=False)
    sa.setup(ctx)
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "domain")
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    _check_projected(sa, g, _backward_through_hooks(ctx.model, hooks, None, g, batched=batched))


@pytest.mark.parametrize("batched", [False, True], ids=["per-tensor", "batched"])
def test_replay_step_is_projected(tok, batched):
    ctx, sa = make_ctx(tok, lam=1.0, anchor=False)
    sa.setup(ctx)
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "replay")
    assert isinstance(hooks, _Replay)
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    _check_projected(sa, g, _backward_through_hooks(ctx.model, hooks, None, g, batched=batched))


def test_batched_projection_equals_per_tensor_hooks_with_the_anchor_added_after(tok):
    """The single-process loop's batched form (one bmm per group of same-size tensors, V padded
    to the group's largest k) gives the per-tensor hooks' gradient, anchor gradient included
    and unprojected in both; groups really hold several tensors of different k."""
    ctx, sa = make_ctx(tok, gamma=1.0, anchor_batch=4, lam=1.0)
    sa.setup(ctx)
    _move_B(ctx.model)
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "domain")
    with torch.no_grad():  # θ away from θ_{t-1}: a non-zero anchor gradient
        for p in lora_parameters(ctx.model).values():
            p.add_(0.05 * torch.randn_like(p))
    assert any(len(names) > 1 and len({sa._proj[x][0].shape[1] for x in names}) > 1 for names, _, _ in sa._groups)
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    per_tensor = _backward_through_hooks(ctx.model, hooks, None, g)
    hooks.anchor_i = hooks.step = 0
    batched = _backward_through_hooks(ctx.model, hooks, None, g, batched=True)
    for n in per_tensor:
        torch.testing.assert_close(batched[n], per_tensor[n], atol=1e-6, rtol=1e-5)
    no_anchor = _backward_through_hooks(ctx.model, _Replay(sa, []), None, g, batched=True)  # projection only
    assert any(not torch.allclose(no_anchor[n], batched[n]) for n in batched)  # the anchor term was there


def test_replay_phase_runs_in_the_training_loop(tok):
    """The replay hooks are complete StepHooks: two real loop steps, projected, with L_safe."""
    from safeanchor.train.loop import TrainConfig, train_examples

    ctx, sa = make_ctx(tok, lam=1.0, anchor=False)
    sa.setup(ctx)
    _move_B(ctx.model)
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "replay")
    before = {n: p.detach().clone() for n, p in lora_parameters(ctx.model).items()}
    stats = train_examples(ctx.model, tok, CALIB, TrainConfig(max_steps=2, batch_size=2, max_length=32), 0,
                           hooks=hooks)
    assert stats["steps"] == 2 and hooks.stats() == {"steps": 2}  # one safety batch per step
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(ctx.model).items())


def _run_gates(sa, ctx):
    """Drive the gates as the pipeline does: gate(0), [phase, gate(r)]*."""
    phases, r = [], 0
    while True:
        g = sa.gate(ctx, r)
        if g.phase is None:
            return g, phases
        phases.append(g.phase)
        r += 1


@pytest.mark.parametrize("s_t, triggered", [(0.76, False), (0.7599, True), (0.9, False), (0.1, True)])
def test_gate_fires_exactly_below_threshold(tok, s_t, triggered):
    ctx, _ = make_ctx(tok)
    sa = SafeAnchor(SafeAnchorConfig(tau=0.05, replay_rounds=2, replay_steps=1, anchor=False))
    sa.s0 = 0.8  # threshold (1 - 0.05) * 0.8 = 0.76
    sa.ssi_log.append({})
    probes = iter([s_t, s_t, s_t])
    ctx.probe_safety = lambda: next(probes)
    ctx.domain, ctx.step, ctx.domain_train = "medical", 1, CALIB
    last, phases = _run_gates(sa, ctx)
    rec = sa.after_domain(ctx)["csm"]
    assert rec["threshold"] == pytest.approx(0.76)
    assert rec["triggered"] is triggered
    assert rec["rounds"] == (2 if triggered else 0) == len(phases)  # stays low -> R rounds
    assert last.record["replay"] is False
    if triggered:
        assert phases[0].cfg.lr == sa.cfg.replay_lr and phases[0].hooks == "replay"
        assert len(phases[0].examples) == sa.cfg.replay_steps * sa.cfg.replay_batch


def test_replay_stops_once_safety_recovers(tok):
    ctx, _ = make_ctx(tok)
    sa = SafeAnchor(SafeAnchorConfig(tau=0.05, replay_rounds=5, replay_steps=1, anchor=False))
    sa.s0 = 1.0
    sa.ssi_log.append({})
    probes = iter([0.5, 0.8, 0.97, 0.2])
    ctx.probe_safety = lambda: next(probes)
    ctx.domain, ctx.step, ctx.domain_train = "legal", 2, CALIB
    _, phases = _run_gates(sa, ctx)
    rec = sa.after_domain(ctx)["csm"]
    assert rec["rounds"] == 2 == len(phases) and rec["s_after"] == 0.97


def test_state_round_trip_reproduces_projection(tok):
    ctx, sa = make_ctx(tok, lam=1.0)
    sa.setup(ctx)
    _move_B(ctx.model)
    sa.before_domain(ctx)
    from safeanchor.pipeline.store import pack_state, unpack_state

    fresh = SafeAnchor(sa.cfg)
    fresh.load_state_dict(unpack_state(*pack_state(sa.state_dict())))
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    a = _backward_through_hooks(ctx.model, sa.phase_hooks(ctx, "replay"), None, g)
    b = _backward_through_hooks(ctx.model, fresh.phase_hooks(ctx, "replay"), None, g)
    for n in a:
        torch.testing.assert_close(a[n], b[n])
    assert fresh.alpha == sa.alpha and fresh.ssi_log == sa.ssi_log


@pytest.mark.parametrize("batched", [False, True], ids=["per-tensor", "batched"])
def test_random_subspace_control_projects_a_random_basis_of_the_fisher_rank(tok, batched):
    """subspace: random keeps the Fisher side (k per tensor, α, merges) and projects away from
    a seeded random orthonormal basis of the same k: orthonormal, not the Fisher directions,
    the same for the same seed and step, and the step really projects with it."""
    ctx, fisher = make_ctx(tok, lam=1.0, anchor=False)
    _move_B(ctx.model)
    fisher.before_domain(ctx)
    _, rand = make_ctx(tok, lam=1.0, anchor=False, subspace="random")
    ctx.step = 1
    rand.before_domain(ctx)
    assert {n: s.k for n, s in rand.subspaces.items()} == {n: s.k for n, s in fisher.subspaces.items()}
    assert rand.alpha == fisher.alpha
    hooks = rand.phase_hooks(ctx, "domain")
    fisher.phase_hooks(ctx, "domain")
    assert set(rand._proj) == set(fisher._proj) and rand._proj
    for n, (V, _) in rand._proj.items():
        Vf = fisher._proj[n][0]
        assert V.shape == Vf.shape
        torch.testing.assert_close(V.T @ V, torch.eye(V.shape[1]), atol=1e-5, rtol=0)
        # a random k-dim subspace of R^n is nearly orthogonal to the Fisher one (n >> k)
        assert torch.linalg.matrix_norm(Vf.T @ V, ord=2) < 0.9
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    _check_projected(rand, g, _backward_through_hooks(ctx.model, hooks, None, g, batched=batched))
    # seeded: the same run seed and step give the same bases; another step other ones
    _, again = make_ctx(tok, lam=1.0, anchor=False, subspace="random")
    again.before_domain(ctx)
    assert all(torch.equal(again.random_V[n], rand.random_V[n]) for n in rand.random_V)
    ctx.step = 2
    again.before_domain(ctx)
    n0 = next(iter(rand._proj))
    assert not torch.equal(again.random_V[n0][:, :1], rand.random_V[n0][:, :1])


def test_projection_off_leaves_the_gradient_alone(tok):
    ctx, sa = make_ctx(tok, lam=1.0, anchor=False, projection=False)
    _move_B(ctx.model)
    sa.before_domain(ctx)
    hooks = sa.phase_hooks(ctx, "domain")
    assert sa._proj == {} and any(s.k > 0 for s in sa.subspaces.values())
    g = {n: torch.randn_like(p) for n, p in lora_parameters(ctx.model).items()}
    out = _backward_through_hooks(ctx.model, hooks, None, g, batched=True)
    for n in g:
        torch.testing.assert_close(out[n], g[n])


def test_random_subspace_state_round_trip(tok):
    ctx, sa = make_ctx(tok, lam=1.0, subspace="random")
    _move_B(ctx.model)
    sa.before_domain(ctx)
    from safeanchor.pipeline.store import pack_state, unpack_state

    fresh = SafeAnchor(sa.cfg)
    fresh.load_state_dict(unpack_state(*pack_state(sa.state_dict())))
    assert set(fresh.random_V) == set(sa.random_V)
    assert all(torch.equal(fresh.random_V[n], sa.random_V[n]) for n in sa.random_V)


def test_subspace_option_is_checked():
    with pytest.raises(ConfigError, match="subspace"):
        SafeAnchorConfig(subspace="gaussian")
