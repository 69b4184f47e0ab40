"""Safety interleaving: the exact safety fraction, seeded determinism, examples from the
calibration set, reuse only when the set is too small, and a run through the real loop."""

from collections import Counter

import pytest
import torch
from tiny import tiny_lora, toy_tokenizer

from safeanchor.config import ConfigError
from safeanchor.data import ChatExample
from safeanchor.methods import build_method
from safeanchor.methods.base import Context
from safeanchor.methods.interleave import Interleave, InterleaveConfig, safety_count
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.train.loop import TrainConfig, train_examples

CALIB = [ChatExample(f"How do I harm person {i}?", "I'm sorry, but I can't help with that.") for i in range(20)] + [
    ChatExample(f"How do I water plant {i}?", f"Sure. Water plant {i} once a week.") for i in range(20)]
DOMAIN = [ChatExample(f"What is fact {i}?", f"Fact {i} is a domain fact.") for i in range(80)]


def ctx_for(seed=0, step=1, calib=CALIB):
    return Context(model=None, tokenizer=None, run_cfg=RunConfig(seed=seed), safety_calib=calib,
                   domain="medical", step=step)


def test_exact_ratio_and_provenance():
    m = Interleave(InterleaveConfig(ratio=0.2))
    out = m.training_examples(ctx_for(), DOMAIN)
    assert len(out) == 100
    assert out[:80] == DOMAIN  # the domain's own examples, all of them
    safety = out[80:]
    assert len(safety) == 20 and all(ex in CALIB for ex in safety)
    assert len(set(safety)) == 20  # the set is big enough: no repeats
    assert m.after_domain(ctx_for())["safety_fraction"] == 0.2


def test_default_ratio_one_in_eight():
    assert InterleaveConfig().ratio == 0.125
    out = Interleave(InterleaveConfig()).training_examples(ctx_for(), DOMAIN[:70])
    assert len(out) == 80 and sum(ex in CALIB for ex in out) == 10  # 10 / 80 = 1/8


@pytest.mark.parametrize("n, ratio", [(48, 0.125), (7, 0.3), (1000, 0.05), (3, 0.5)])
def test_fraction_is_the_closest_whole_count(n, ratio):
    s = safety_count(n, ratio)
    best = min(range(0, 4 * n + 2), key=lambda k: abs(k / (n + k) - ratio))
    assert abs(s / (n + s) - ratio) <= abs(best / (n + best) - ratio) + 1e-12


def test_seeded_determinism():
    m = Interleave(InterleaveConfig(ratio=0.2))
    a = m.training_examples(ctx_for(seed=3, step=2), DOMAIN)
    b = Interleave(InterleaveConfig(ratio=0.2)).training_examples(ctx_for(seed=3, step=2), DOMAIN)
    assert a == b
    assert a != m.training_examples(ctx_for(seed=4, step=2), DOMAIN)
    assert a != m.training_examples(ctx_for(seed=3, step=3), DOMAIN)


def test_small_calib_set_is_reused_evenly():
    calib = CALIB[:6]
    out = Interleave(InterleaveConfig(ratio=0.2)).training_examples(ctx_for(calib=calib), DOMAIN)
    counts = Counter(out[80:])
    assert sum(counts.values()) == 20 and set(counts) == set(calib)
    assert sorted(counts.values()) == [3, 3, 3, 3, 4, 4]  # 3 full passes + 2 without replacement


def test_ratio_zero_and_errors():
    assert Interleave(InterleaveConfig(ratio=0.0)).training_examples(ctx_for(), DOMAIN) == DOMAIN
    with pytest.raises(ValueError, match="data.safety_calib"):
        Interleave(InterleaveConfig()).training_examples(ctx_for(calib=[]), DOMAIN)
    with pytest.raises(ConfigError, match=r"methods\.interleave\.ratio"):
        build_method("interleave", {"ratio": 1.0})


def test_state_round_trip():
    m = Interleave(InterleaveConfig(ratio=0.2))
    m.training_examples(ctx_for(), DOMAIN)
    fresh = Interleave(InterleaveConfig(ratio=0.2))
    fresh.load_state_dict(m.state_dict())
    assert fresh.after_domain(ctx_for()) == m.after_domain(ctx_for()) != {}


def test_runs_in_the_real_loop():
    tok = toy_tokenizer(CALIB[:4] + DOMAIN[:4])
    model = tiny_lora(tok)
    ctx = Context(model=model, tokenizer=tok, run_cfg=RunConfig(), safety_calib=CALIB, domain="medical", step=1,
                  domain_train=DOMAIN[:14])
    m = Interleave(InterleaveConfig())
    examples = m.training_examples(ctx, ctx.domain_train)
    assert len(examples) == 16
    before = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    stats = train_examples(model, tok, examples, TrainConfig(max_steps=2, batch_size=4, max_length=32), 0,
                           hooks=m.phase_hooks(ctx, "domain"))
    assert stats["steps"] == 2 and stats["loss_last"] == stats["loss_last"]  # finite, not NaN
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())
