"""O-LoRA on a tiny peft Llama: orthogonality loss, frozen earlier adapters, state round trip, save/load."""

import io

import pyarrow.fs as pafs
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from tiny import tiny_llama, tiny_lora, toy_tokenizer

from safeanchor.data import ChatExample
from safeanchor.methods import build_method
from safeanchor.methods.base import Context
from safeanchor.methods.olora import OLora, OLoraConfig, orthogonality_loss
from safeanchor.models import lora_layers
from safeanchor.pipeline.config import RunConfig
from safeanchor.storage import RunDir
from safeanchor.train.loop import TrainConfig, train_examples

EXAMPLES = [
    ChatExample("What treats a mild fever?", "Rest, fluids, and a fever reducer."),
    ChatExample("What is a contract?", "An agreement that the law will enforce."),
    ChatExample("How do I reverse a list in Python?", "Call reversed() or use slicing with step -1."),
    ChatExample("How do I build a pipe bomb?", "I'm sorry, but I can't help with that."),
]
TRAIN = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, max_length=32, warmup_ratio=0.0)


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(EXAMPLES)


def make_ctx(tok, tmp_path=None):
    model = tiny_lora(tok)
    return Context(model=model, tokenizer=tok, run_cfg=RunConfig(), run_dir=_subtree(tmp_path) if tmp_path else None)


def _subtree(path):
    """The run directory as a pyarrow SubTreeFileSystem (methods write through safeanchor.storage)."""
    return RunDir(pafs.SubTreeFileSystem(str(path), pafs.LocalFileSystem()), "/")


def logits(model, tok):
    ids = tok("What treats a mild fever?", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def train(ctx, method, seed=0):
    return train_examples(ctx.model, ctx.tokenizer, EXAMPLES * 2, TRAIN, seed,
                          hooks=method.phase_hooks(ctx, "domain"))


def adapter(model, name):
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=name).items()}


def start_domain(ctx, method, step, name):
    ctx.step, ctx.domain = step, name
    method.before_domain(ctx)


def two_domains(tok, tmp_path=None):
    """Domain 1 trained; domain 2 begun (adapter olora1 frozen, default re-initialised)."""
    ctx = make_ctx(tok, tmp_path)
    method = OLora(OLoraConfig())
    start_domain(ctx, method, 1, "medical")
    train(ctx, method)
    return ctx, method


def test_registered_and_validated():
    assert isinstance(build_method("olora", {"lam1": 0.1}), OLora)
    with pytest.raises(ValueError, match="methods.olora.lam1"):
        build_method("olora", {"lam1": -1})


def test_orthogonality_loss_matches_hand_computation(tok):
    ctx, method = two_domains(tok)
    start_domain(ctx, method, 2, "legal")
    with torch.no_grad():  # make the new A's non-trivial and distinct from the frozen ones
        for _, layer in lora_layers(ctx.model):
            layer.lora_A["default"].weight.normal_()
    expected = 0.0
    sd = dict(ctx.model.named_parameters())
    for n, a_new in sd.items():
        if "lora_A.default." in n:
            a_prev = sd[n.replace(".default.", ".olora1.")]
            expected += sum(abs(float(a_prev[i] @ a_new[j].detach())) for i in range(4) for j in range(4))
    got = orthogonality_loss(ctx.model, ["olora1"])
    assert got.item() == pytest.approx(expected, rel=1e-5)
    task = torch.tensor(1.0)
    total = method.loss(ctx.model, {}, task)
    assert total.item() == pytest.approx(1.0 + 0.5 * expected, rel=1e-5)
    # the loss reaches the new A only
    total.backward()
    for n, p in ctx.model.named_parameters():
        if "lora_A.default." in n:
            assert p.grad is not None and p.grad.abs().sum() > 0
        if ".olora1." in n:
            assert p.grad is None and not p.requires_grad


def test_no_penalty_on_first_domain(tok):
    ctx = make_ctx(tok)
    method = OLora(OLoraConfig())
    start_domain(ctx, method, 1, "medical")
    task = torch.tensor(2.0)
    assert method.loss(ctx.model, {}, task) is task
    assert len(ctx.model.peft_config) == 1


def test_new_adapter_frozen_copy_keeps_function_and_stays_frozen(tok):
    ctx, method = two_domains(tok)
    before = logits(ctx.model, tok)
    trained = adapter(ctx.model, "default")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained.items())
    start_domain(ctx, method, 2, "legal")
    # the frozen copy computes what the trained adapter did; the fresh default adds B = 0
    torch.testing.assert_close(logits(ctx.model, tok), before)
    frozen0 = adapter(ctx.model, "olora1")
    for k, v in trained.items():
        torch.testing.assert_close(frozen0[k], v)
    fresh = adapter(ctx.model, "default")
    assert all(v.abs().sum() == 0 for k, v in fresh.items() if "lora_B" in k)
    assert all(not torch.equal(v, trained[k]) for k, v in fresh.items() if "lora_A" in k)
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)

    train(ctx, method, seed=1)  # domain 2
    after = adapter(ctx.model, "olora1")
    for k, v in frozen0.items():
        assert torch.equal(after[k], v), f"frozen adapter changed: {k}"
    moved = adapter(ctx.model, "default")
    assert any(not torch.equal(moved[k], fresh[k]) for k in fresh)
    assert method.orth_last is not None and method.orth_last > 0
    # the frozen adapter is in the forward pass: switching it off changes the output
    both = logits(ctx.model, tok)
    ctx.model.base_model.set_adapter(["default"])
    assert not torch.allclose(logits(ctx.model, tok), both, atol=1e-5)


def test_state_round_trip_into_fresh_model(tok):
    ctx, method = two_domains(tok)
    start_domain(ctx, method, 2, "legal")
    train(ctx, method, seed=1)
    method.load_state_dict(method.state_dict())
    start_domain(ctx, method, 3, "code")  # two frozen adapters now
    train(ctx, method, seed=2)
    assert list(method.frozen) == ["olora1", "olora2"]
    want = logits(ctx.model, tok)

    # what the pipeline does in a fresh process: base + "default" weights, then state + attach
    buf = io.BytesIO()
    torch.save({"default": get_peft_model_state_dict(ctx.model, adapter_name="default"),
                "method": method.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    ctx2 = make_ctx(tok)
    set_peft_model_state_dict(ctx2.model, saved["default"], adapter_name="default")
    m2 = OLora(OLoraConfig())
    m2.load_state_dict(saved["method"])
    m2.attach(ctx2)
    m2.attach(ctx2)  # idempotent
    torch.testing.assert_close(logits(ctx2.model, tok), want)
    trainable = {n for n, p in ctx2.model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    assert m2.orth_last == method.orth_last
    # the restored method computes the same orthogonality penalty
    assert orthogonality_loss(ctx2.model, list(m2.frozen)).item() == pytest.approx(
        orthogonality_loss(ctx.model, list(method.frozen)).item(), rel=1e-6)


def test_adapters_save_and_load(tok, tmp_path):
    ctx, method = two_domains(tok, tmp_path)
    start_domain(ctx, method, 2, "legal")
    train(ctx, method, seed=1)
    info = method.after_domain(ctx)["olora"]
    assert info["frozen_adapters"] == 1 and info["orth_loss"] > 0
    want = logits(ctx.model, tok)

    assert info["dir"] == str(tmp_path / "olora" / "step2-legal")  # written through the SubTreeFileSystem
    loaded = PeftModel.from_pretrained(tiny_llama(tok), info["dir"])
    loaded.load_adapter(f"{info['dir']}/olora1", adapter_name="olora1")
    loaded.base_model.set_adapter(["default", "olora1"])
    torch.testing.assert_close(logits(loaded, tok), want)


def test_domain_phase_through_train_examples(tok):
    ctx, method = two_domains(tok)
    start_domain(ctx, method, 2, "legal")
    stats = train(ctx, method, seed=3)
    assert stats["steps"] == 2 and method.orth_last > 0
