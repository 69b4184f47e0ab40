"""`workflows/sequential.py --dry-run` (safeanchor/dryrun.py): every shipped preset plans offline
with no network and no weights; the architecture table and the memory formula are checked
against what transformers, peft and autograd actually do on the same shapes."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import pytest
import torch

from safeanchor.dryrun import KNOWN_ARCHS, Arch, activation_bytes_per_token, find_arch, train_memory
from safeanchor.pipeline.config import load_run_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "workflows" / "configs").glob("*.yaml"))
PRESETS_7B = ["llama2-7b-chat.yaml", "mistral-7b-instruct.yaml", "llama3.1-8b-instruct.yaml"]


def _cli():
    spec = importlib.util.spec_from_file_location("sequential_cli", ROOT / "workflows" / "sequential.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def offline(monkeypatch):
    """No network (any socket connect fails), HF offline, no weights loadable, repo root as cwd."""
    def no_connect(*a, **k):
        raise AssertionError("--dry-run opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("--dry-run loaded model weights")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    monkeypatch.chdir(ROOT)
    return _cli()


@pytest.mark.parametrize("preset", [p.name for p in CONFIGS])
def test_every_preset_plans_offline(offline, capsys, preset):
    rc = offline.main(["--config", f"workflows/configs/{preset}", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    for section in ("[model]", "[method]", "[data]", "[judge]", "[compute]", "[memory per training GPU]", "[storage]"):
        assert section in out
    total = [ln for ln in out.splitlines() if ln.startswith("total")]
    assert len(total) == 1, out  # the shape is known for every shipped preset: a figure, not "unknown"


def _total_gib(out: str) -> float:
    line = next(ln for ln in out.splitlines() if ln.startswith("total"))
    return float(line.split()[1])


@pytest.mark.parametrize("preset", PRESETS_7B)
def test_7b_presets_plan(offline, capsys, preset):
    """The paper's LoRA on q/k/v/o, bf16 through DeepSpeed ZeRO-2 on GPU workers, a LlamaGuard
    judge by hub id, the base model for Safe LoRA, and the downloads listed."""
    rc = offline.main(["--config", f"workflows/configs/{preset}", "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "LoRA: r 16, alpha 32 (scale 2), dropout 0.05, targets q_proj, k_proj, v_proj, o_proj" in out
    assert "DeepSpeed: ZeRO stage 2 (from cluster/deepspeed/zero2.json)" in out
    assert "precision: bf16" in out and "backend NCCL" in out
    assert "eval.judge.kind: llamaguard, model meta-llama/Llama" in out
    assert out.count("DOWNLOAD at run time: hub repository") == 3  # model, base, judge
    assert "DOWNLOAD at run time: beavertails: hub PKU-Alignment/BeaverTails split 30k_train" in out
    assert "bench:legal_test: DOWNLOAD at run time: legalbench: hub nguha/legalbench [contract_nli" in out
    assert 25 < _total_gib(out) < 46, out  # fits a 48 GiB GPU by the estimate


def test_7b_plan_numbers(offline, capsys):
    """Llama-2-7B, r 16 on q/k/v/o: 6.74 B parameters, 16.78 M LoRA; ZeRO-3 halves the weights over
    2 workers; the offload preset takes weights and optimizer off the GPU."""
    cfg = load_run_config(str(ROOT / "workflows/configs/llama2-7b-chat.yaml"))
    arch = find_arch(cfg.model.name, cfg)
    assert arch.base_params() == 6_738_415_616
    assert arch.lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj"]) == (16_777_216, [])
    z2 = train_memory(arch, cfg, 2)
    z3 = train_memory(arch, load_run_config(str(ROOT / "workflows/configs/llama2-7b-chat.yaml"),
                                            ["cluster.deepspeed.config_file=cluster/deepspeed/zero3.json"]), 2)
    off = train_memory(arch, load_run_config(str(ROOT / "workflows/configs/llama2-7b-chat.yaml"),
                                             ["cluster.deepspeed.config_file=cluster/deepspeed/zero3_offload.json"]), 2)
    assert z2.weights == arch.base_params() * 2 and z3.weights == z2.weights / 2
    assert z2.optimizer == 16_777_216 * 12 / 2 and z2.gradients == 16_777_216 * 2 / 2
    assert off.weights == 0 and off.optimizer == 0 and off.activations == z2.activations


def test_known_archs_match_transformers():
    """Each table entry has exactly the parameter count transformers builds from that config
    (on the meta device: no memory), and the LoRA count of peft on a tiny model of each kind."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    for arch in {a.source: a for a in KNOWN_ARCHS.values()}.values():
        hf = LlamaConfig(hidden_size=arch.hidden, num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                         num_key_value_heads=arch.kv_heads, vocab_size=arch.vocab, intermediate_size=arch.intermediate,
                         tie_word_embeddings=arch.tied)
        with torch.device("meta"):
            n = sum(p.numel() for p in LlamaForCausalLM(hf).parameters())
        assert n == arch.base_params(), arch.source
    tiny = Arch(hidden=64, layers=2, heads=4, kv_heads=2, vocab=97, intermediate=80)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=97, intermediate_size=80))
    assert sum(p.numel() for p in model.parameters()) == tiny.base_params()
    peft_model = get_peft_model(model, LoraConfig(r=3, target_modules=targets))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert tiny.lora_params(3, targets) == (trainable, [])


def _saved_activation_bytes(dtype, dropout, b=4, s=48):
    """Bytes autograd saves for backward in one forward of a tiny Llama + LoRA (q/k/v/o), the
    module cast to `dtype` as DeepSpeed's bf16 engine does; parameters excluded."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model = model.to(dtype).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 300, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, attention_mask=torch.ones(b, s, dtype=torch.long))
    arch = Arch(hidden=64, layers=2, heads=4, kv_heads=2, vocab=300, intermediate=160)
    e = torch.tensor([], dtype=dtype).element_size()
    est = b * s * activation_bytes_per_token(arch, e, ["q_proj", "k_proj", "v_proj", "o_proj"], dropout)
    return sum(saved.values()), est


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_formula_matches_autograd(dtype, dropout):
    torch.set_num_threads(1)
    measured, est = _saved_activation_bytes(dtype, dropout)
    assert abs(est - measured) / measured < 0.15, (measured, est)


def test_local_and_cached_configs_take_precedence(tmp_path, monkeypatch):
    """A model directory's config.json, or the HF cache's, is read instead of the table."""
    cfg = load_run_config(str(ROOT / "workflows/configs/llama2-7b-chat.yaml"))
    shape = {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
             "vocab_size": 128, "intermediate_size": 96, "tie_word_embeddings": True}
    local = tmp_path / "my-model"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(shape))
    arch = find_arch(str(local), cfg)
    assert (arch.hidden, arch.layers, arch.vocab, arch.tied) == (48, 3, 128, True) and "my-model" in arch.source

    # the hub cache layout: models--org--name/{refs/main, snapshots/<sha>/config.json}
    import huggingface_hub.constants as hc

    repo = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-chat-hf"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text(json.dumps(shape))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_arch("meta-llama/Llama-2-7b-chat-hf", cfg).hidden == 48  # the cache, not the table
    assert find_arch("meta-llama/Llama-2-7b-chat-hf", cfg, revision="other").hidden == 4096  # not cached


@pytest.mark.parametrize("override, key", [
    ("data.safety_probe=workflows/data/nope.jsonl", "error: data.safety_probe: workflows/data/nope.jsonl: no such file"),
    ("train.batch_size=15", "error: train.batch_size: 15 is not divisible by the 2 Train workers"),
    ("storage=ftp://host/x", "error: storage: 'ftp://host/x': unsupported scheme"),
    ("storage=s3://bucket/runs", "error: tracking.tracking_uri:"),
    ("model.name=llama7b", "error: model.name: model 'llama7b' is neither a local directory nor a hub id"),
])
def test_dry_run_refuses_what_a_run_would(offline, capsys, monkeypatch, override, key):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = offline.main(["--config", "workflows/configs/llama2-7b-chat.yaml", "--dry-run", "--set", override])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().startswith(key), err


def test_revision_applies_to_the_model_repository_only(monkeypatch):
    """model.revision reaches from_pretrained for model.name, not for another reference (model.base)."""
    import transformers

    from safeanchor.models import ModelConfig, load_model

    calls = []

    def fake(ref, **kw):
        calls.append((ref, kw.get("revision")))
        raise OSError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    cfg = ModelConfig(name="org/chat", base="org/base", revision="0123abc")
    for ref, key in (("org/chat", "model.name"), ("org/base", "model.base")):
        with pytest.raises(Exception, match="stop here"):
            load_model(ref, cfg, key=key)
    assert calls == [("org/chat", "0123abc"), ("org/base", None)]
