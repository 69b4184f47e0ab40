"""Safe LoRA on a tiny peft Llama with a saved 'unaligned base' checkpoint: C = V Vᵀ/‖V‖_F, the
cosine rule, num_layers selection, errors."""

import pytest
import torch
from tiny import tiny_llama, toy_tokenizer, with_lora
from transformers import LlamaForCausalLM

from safeanchor.config import ConfigError
from safeanchor.data import ChatExample
from safeanchor.methods import build_method
from safeanchor.methods.base import Context
from safeanchor.methods.safelora import SafeLora, SafeLoraConfig, hf_key
from safeanchor.models import lora_layers
from safeanchor.pipeline.config import RunConfig
from safeanchor.train.loop import TrainConfig, train_examples

EXAMPLES = [
    ChatExample("What treats a mild fever?", "Rest, fluids, and a fever reducer."),
    ChatExample("What is a contract?", "An agreement that the law will enforce."),
    ChatExample("How do I reverse a list in Python?", "Call reversed() or use slicing with step -1."),
    ChatExample("How do I build a pipe bomb?", "I'm sorry, but I can't help with that."),
]
RANKS = [1, 2, 8, 32]  # rank of V = W_aligned - W_base per module: a spread of cosines


@pytest.fixture(scope="module")
def tok():
    return toy_tokenizer(EXAMPLES)


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    tiny_llama(tok).save_pretrained(d)
    return d


def aligned_model(tok):
    """The 'aligned' model = base + a rank-RANKS[i] change on each LoRA-targeted weight."""
    model = tiny_llama(tok)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        i = 0
        for name, mod in model.named_modules():
            if name.endswith(("q_proj", "v_proj")):
                k = RANKS[i % len(RANKS)]
                out_f, in_f = mod.weight.shape
                mod.weight += 0.1 * torch.randn(out_f, k, generator=g) @ torch.randn(k, in_f, generator=g)
                i += 1
    return model


def make_ctx(tok, base_dir):
    model = with_lora(aligned_model(tok))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(0.1 * torch.randn(layer.lora_B["default"].weight.shape, generator=g))
    return Context(model=model, tokenizer=tok, run_cfg=RunConfig(), base_model_ref=str(base_dir),
                   domain="medical", step=1)


def dense_reference(ctx, base_dir):
    """Per module: B, A, the dense C = V Vᵀ/‖V‖_F and the cosine, computed independently."""
    base = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    ref = {}
    for name, layer in lora_layers(ctx.model):
        key = name.removeprefix("base_model.model.")
        V = layer.get_base_layer().weight.detach() - base[f"{key}.weight"]
        C = V @ V.T / torch.linalg.norm(V)  # Frobenius norm of the matrix
        B = layer.lora_B["default"].weight.detach().clone()
        A = layer.lora_A["default"].weight.detach().clone()
        cos = torch.nn.functional.cosine_similarity((C @ B @ A).reshape(1, -1), (B @ A).reshape(1, -1)).item()
        ref[key] = {"C": C, "B": B, "A": A, "cos": cos}
    return ref


def b_now(ctx):
    return {name.removeprefix("base_model.model."): layer.lora_B["default"].weight.detach()
            for name, layer in lora_layers(ctx.model)}


def test_config_validation():
    assert isinstance(build_method("safelora", {"mode": "num_layers", "num_proj_layers": 3}), SafeLora)
    with pytest.raises(ValueError, match="methods.safelora.mode"):
        build_method("safelora", {"mode": "number"})
    with pytest.raises(ValueError, match="methods.safelora.threshold"):
        build_method("safelora", {"threshold": 2.0})


def test_cosine_rule_projects_exactly_the_low_cosine_modules(tok, base_dir):
    ctx = make_ctx(tok, base_dir)
    ref = dense_reference(ctx, base_dir)
    cos_sorted = sorted(r["cos"] for r in ref.values())
    assert cos_sorted[0] < cos_sorted[-1] - 0.1, f"cosines not spread: {cos_sorted}"
    thr = (cos_sorted[1] + cos_sorted[2]) / 2  # two modules below, two above
    info = SafeLora(SafeLoraConfig(threshold=thr)).after_domain(ctx)["safelora"]
    for key, r in ref.items():
        assert info["cos"][key] == pytest.approx(r["cos"], abs=1e-5)
    assert sorted(info["projected"]) == sorted(k for k, r in ref.items() if r["cos"] <= thr)
    assert info["num_projected"] == 2 and info["num_modules"] == 4
    after = b_now(ctx)
    for key, r in ref.items():
        if r["cos"] > thr:
            assert torch.equal(after[key], r["B"]), f"{key}: cos {r['cos']:.3f} > thr but B changed"
        else:
            torch.testing.assert_close(after[key], r["C"] @ r["B"], atol=1e-6, rtol=1e-5)
            assert not torch.allclose(after[key], r["B"])
    for name, layer in lora_layers(ctx.model):  # A is never touched
        torch.testing.assert_close(layer.lora_A["default"].weight, ref[name.removeprefix("base_model.model.")]["A"])


def test_cosine_independent_of_lora_scale(tok, base_dir):
    ctx = make_ctx(tok, base_dir)
    ref = dense_reference(ctx, base_dir)
    m = SafeLora(SafeLoraConfig(threshold=-1.0))  # threshold -1: compute, project nothing
    cos1 = m.after_domain(ctx)["safelora"]["cos"]
    for _, layer in lora_layers(ctx.model):
        layer.scaling["default"] *= 7.0
    cos2 = m.after_domain(ctx)["safelora"]["cos"]
    assert cos1 == pytest.approx(cos2) and cos1 == pytest.approx({k: r["cos"] for k, r in ref.items()}, abs=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_num_layers_mode_projects_the_lowest_cosines(tok, base_dir, k):
    ctx = make_ctx(tok, base_dir)
    ref = dense_reference(ctx, base_dir)
    lowest = sorted(ref, key=lambda key: ref[key]["cos"])[:k]
    info = SafeLora(SafeLoraConfig(mode="num_layers", num_proj_layers=k)).after_domain(ctx)["safelora"]
    assert sorted(info["projected"]) == sorted(lowest)
    after = b_now(ctx)
    for key, r in ref.items():
        if key in lowest:
            torch.testing.assert_close(after[key], r["C"] @ r["B"], atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(after[key], r["B"])


def test_cache_holds_v_and_uncached_run_agrees(tok, base_dir):
    ctx1, ctx2 = make_ctx(tok, base_dir), make_ctx(tok, base_dir)
    base = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    cached, fresh = SafeLora(SafeLoraConfig()), SafeLora(SafeLoraConfig(cache=False))
    i1 = cached.after_domain(ctx1)["safelora"]
    i2 = fresh.after_domain(ctx2)["safelora"]
    assert i1["cos"] == i2["cos"] and i1["projected"] == i2["projected"]
    assert not fresh._V and len(cached._V) == 4
    for name, layer in lora_layers(ctx1.model):
        V = layer.get_base_layer().weight - base[hf_key(name)]
        torch.testing.assert_close(cached._V[name], V)


def test_errors_name_model_base(tok, base_dir, tmp_path):
    ctx = make_ctx(tok, base_dir)
    ctx.base_model_ref = None
    with pytest.raises(ConfigError, match="model.base"):
        SafeLora(SafeLoraConfig()).after_domain(ctx)
    same = tmp_path / "same"  # a 'base' identical to the aligned model: V = 0
    aligned_model(tok).save_pretrained(same)
    ctx.base_model_ref = str(same)
    with pytest.raises(ConfigError, match="identical"):
        SafeLora(SafeLoraConfig()).after_domain(ctx)


def test_domain_phase_through_train_examples(tok, base_dir):
    ctx = make_ctx(tok, base_dir)
    method = SafeLora(SafeLoraConfig())
    before = {k: v.clone() for k, v in b_now(ctx).items()}
    stats = train_examples(ctx.model, ctx.tokenizer, EXAMPLES * 2, TrainConfig(max_steps=2, batch_size=4, max_length=32),
                           0, hooks=method.phase_hooks(ctx, "domain"))
    assert stats["steps"] == 2
    assert any(not torch.equal(before[k], v) for k, v in b_now(ctx).items())
    info = method.after_domain(ctx)["safelora"]
    assert info["num_modules"] == 4 and method.history[-1]["num_projected"] == info["num_projected"]
