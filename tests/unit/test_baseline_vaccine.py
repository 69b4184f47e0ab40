"""Vaccine on a tiny peft Llama: the two-pass perturbation-aware step, and the setup() phase."""

import pytest
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tiny import CALIB, tiny_lora, toy_tokenizer

from safeanchor.data import collate, encode_dataset
from safeanchor.methods import build_method
from safeanchor.methods.base import Context, TrainPhase, hook_stats
from safeanchor.methods.vaccine import Vaccine, VaccineConfig, VaccineStep, perturbed_modules
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.train.loop import TrainConfig, train_examples


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(CALIB)


def make_ctx(tok):
    model = tiny_lora(tok)
    with torch.no_grad():  # B != 0 so that every LoRA tensor gets a gradient
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return Context(model=model, tokenizer=tok, run_cfg=RunConfig(), safety_calib=CALIB)


def batch_of(tok):
    return collate(encode_dataset(tok, CALIB, 32), tok.pad_token_id)


def forward_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def with_added(modules, eps):
    """Manual reference: forward hooks that add eps[i] to module i's output."""
    def hook(i):
        def fn(m, args, out):
            return (out[0] + eps[i], *out[1:]) if isinstance(out, tuple) else out + eps[i]
        return fn
    return [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in lora_parameters(model).items()}


def test_config_validation():
    assert isinstance(build_method("vaccine", {"rho": 1.0, "perturb": "layer"}), Vaccine)
    with pytest.raises(ValueError, match="methods.vaccine.perturb"):
        build_method("vaccine", {"perturb": "mlp"})
    with pytest.raises(ValueError, match="methods.vaccine.rho"):
        build_method("vaccine", {"rho": -1})


@pytest.mark.parametrize("where", ["attention", "layer"])
def test_perturbation_has_global_norm_rho_along_the_gradient(tok, where):
    ctx = make_ctx(tok)
    model, batch = ctx.model, batch_of(tok)
    model.train()
    mods = perturbed_modules(model, where)
    assert len(mods) == 2 and all(type(m).__name__ == ("LlamaAttention" if where == "attention" else "LlamaDecoderLayer")
                                  for m in mods)
    # reference gradient w.r.t. each block output, computed independently of VaccineStep
    outs = []
    handles = [m.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)) for m in mods]
    ref = torch.autograd.grad(forward_loss(model, batch), outs)
    for h in handles:
        h.remove()

    hooks = VaccineStep(model, rho=2.0, where=where)
    hooks.loss(model, batch, forward_loss(model, batch))
    norm = torch.sqrt(sum(e.pow(2).sum() for e in hooks.eps))
    assert norm.item() == pytest.approx(2.0, rel=1e-5)
    # ε_l = ρ e_l / ‖e‖ with ONE norm over all blocks (a per-block norm would give ‖ε_l‖ = ρ each)
    g_norm = torch.sqrt(sum(g.pow(2).sum() for g in ref))
    for e, g in zip(hooks.eps, ref, strict=True):
        torch.testing.assert_close(e, 2.0 * g / g_norm, atol=1e-6, rtol=1e-4)
    assert all(e.norm() < 2.0 - 1e-3 for e in hooks.eps)
    hooks.close()


def test_second_pass_only_is_perturbed_and_its_gradient_updates(tok):
    ctx = make_ctx(tok)
    model, batch = ctx.model, batch_of(tok)
    model.train()
    mods = perturbed_modules(model, "attention")
    clean = forward_loss(model, batch)
    model.zero_grad()
    clean.backward()
    clean_grads = lora_grads(model)
    model.zero_grad()

    hooks = VaccineStep(model, rho=2.0, where="attention")
    first = forward_loss(model, batch)  # the loop's own forward: captured, not perturbed
    assert first.item() == pytest.approx(clean.item(), abs=1e-6)
    assert all(o is not None for o in hooks.outputs)
    perturbed = hooks.loss(model, batch, first)
    assert all(p.grad is None for p in lora_parameters(model).values()), "the first pass must not touch .grad"
    eps = hooks.eps
    assert perturbed.item() > clean.item() + 1e-4  # ε ascends the loss
    perturbed.backward()
    got = lora_grads(model)
    hooks.close()
    assert not any(m._forward_hooks for m in mods)

    # reference: a plain forward with ε added by hand gives the same loss and the same gradients
    model.zero_grad()
    handles = with_added(mods, eps)
    manual = forward_loss(model, batch)
    manual.backward()
    for h in handles:
        h.remove()
    assert perturbed.item() == pytest.approx(manual.item(), abs=1e-6)
    for n, g in lora_grads(model).items():
        torch.testing.assert_close(got[n], g, atol=1e-6, rtol=1e-5)
    assert set(got) == set(clean_grads) and all(g.abs().sum() > 0 for g in got.values())
    assert any(not torch.allclose(got[n], clean_grads[n], atol=1e-6) for n in got)
    # after the step the hooks are back in capture mode: the next forward is clean again
    assert forward_loss(model, batch).item() == pytest.approx(clean.item(), abs=1e-6)


def test_hooks_idle_in_eval_mode(tok):
    ctx = make_ctx(tok)
    hooks = VaccineStep(ctx.model, rho=2.0, where="attention")
    ctx.model.eval()
    with torch.no_grad():
        forward_loss(ctx.model, batch_of(tok))
    assert all(o is None for o in hooks.outputs)
    hooks.close()


def driver_train(ctx, method, phases):
    """What the pipeline's ctx.train does in one process: phase hooks, train, end_phase with their stats."""
    def train(phase: TrainPhase):
        phases.append(phase)
        hooks = method.phase_hooks(ctx, phase.hooks)
        stats = train_examples(ctx.model, ctx.tokenizer, phase.examples, phase.cfg, phase.seed, hooks=hooks,
                               tag=phase.tag)
        method.end_phase(ctx, phase.hooks, hook_stats(hooks))
        phases.append({k: v.detach().clone() for k, v in
                       get_peft_model_state_dict(ctx.model, adapter_name="default").items()})
        return stats
    return train


def logits(model, tok):
    ids = tok("How do I bake bread?", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_setup_realigns_then_freezes_and_round_trips(tok):
    ctx = make_ctx(tok)
    method = Vaccine(VaccineConfig(max_steps=3, batch_size=2))
    phases: list = []
    ctx.train = driver_train(ctx, method, phases)
    start = logits(ctx.model, tok)
    method.setup(ctx)
    phase, trained = phases
    assert phase.hooks == "vaccine" and phase.tag == "vaccine" and phase.examples == CALIB
    assert phase.cfg.lr == 1e-3 and phase.cfg.batch_size == 2 and phase.cfg.weight_decay == 0.1
    assert method.record["steps"] == 3 and method.record["grad_norm_mean"] > 0
    assert not any(m._forward_hooks for m in ctx.model.modules()), "perturbation hooks left installed"
    realigned = logits(ctx.model, tok)
    assert not torch.allclose(realigned, start, atol=1e-5)  # the phase trained the model
    # the re-aligned adapter is now the frozen "vaccine"; "default" is fresh (B = 0)
    frozen = get_peft_model_state_dict(ctx.model, adapter_name="vaccine")
    for k, v in trained.items():
        torch.testing.assert_close(frozen[k], v)
    fresh = get_peft_model_state_dict(ctx.model, adapter_name="default")
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_B" in k)
    assert all(".default." in n for n, p in ctx.model.named_parameters() if p.requires_grad)
    method.setup(ctx)  # already done: no second phase
    assert len(phases) == 2

    ctx2 = make_ctx(tok)  # fresh process: base + "default" + method state + attach
    set_peft_model_state_dict(ctx2.model, fresh, adapter_name="default")
    m2 = Vaccine(VaccineConfig())
    m2.load_state_dict(method.state_dict())
    m2.attach(ctx2)
    m2.attach(ctx2)
    torch.testing.assert_close(logits(ctx2.model, tok), realigned)
    assert m2.aligned and m2.summary()["fresh_adapter"]


def test_setup_keeps_training_default_without_fresh_adapter(tok):
    ctx = make_ctx(tok)
    method = Vaccine(VaccineConfig(max_steps=2, batch_size=2, fresh_adapter=False))
    phases: list = []
    ctx.train = driver_train(ctx, method, phases)
    method.setup(ctx)
    assert list(ctx.model.peft_config) == ["default"] and method.frozen == {}


def test_phases_through_train_examples(tok):
    ctx = make_ctx(tok)
    method = Vaccine(VaccineConfig())
    cfg = TrainConfig(max_steps=2, batch_size=4, max_length=32)
    hooks = method.phase_hooks(ctx, "vaccine")
    stats = train_examples(ctx.model, ctx.tokenizer, CALIB * 2, cfg, 0, hooks=hooks)
    assert stats["steps"] == 2 and hooks.steps == 2
    assert hooks.stats()["steps"] == 2
    hooks.close()
    assert not hooks.handles
    assert method.phase_hooks(ctx, "domain") is method
    stats = train_examples(ctx.model, ctx.tokenizer, CALIB * 2, cfg, 0, hooks=method.phase_hooks(ctx, "domain"))
    assert stats["steps"] == 2
    with pytest.raises(ValueError, match="replay"):
        method.phase_hooks(ctx, "replay")
