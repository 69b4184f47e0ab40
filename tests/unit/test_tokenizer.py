"""Tests for the in-process byte-level BPE chat tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from safeanchor.toyworld.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I bake bread at home?",
    "Mix flour, water, salt and yeast, then knead the dough.",
    "I cannot help with that request.",
    "What is the capital of France? Paris is the capital.",
    "Numbers: 1, 2, 3, 42, 1000.",
] * 3


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(TEXTS, vocab_size=300)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "  leading and trailing spaces \n\tand tabs  ",
        "héllo wörld — naïve café",
        "日本語のテキストと emoji 🙂🚀",
        "",
    ],
)
def test_round_trip(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id not in ids


def test_deterministic(tok):
    other = build_tokenizer(TEXTS, vocab_size=300)
    assert other.get_vocab() == tok.get_vocab()
    for text in TEXTS[:6] + ["unseen wordings ünïcode"]:
        assert other(text)["input_ids"] == tok(text)["input_ids"]


def test_special_tokens_registered(tok):
    assert tok.bos_token == SPECIAL_TOKENS["bos"]
    assert tok.eos_token == SPECIAL_TOKENS["eos"]
    assert tok.pad_token == SPECIAL_TOKENS["pad"]
    assert tok.unk_token == SPECIAL_TOKENS["unk"]
    ids = {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS.values()}
    assert len(ids) == len(SPECIAL_TOKENS)
    assert tok.padding_side == "right"
    assert tok.model_max_length >= 100_000


def test_no_special_tokens_without_template(tok):
    special = set(tok.all_special_ids)
    for add in (False, True):
        ids = tok("How do I bake bread?", add_special_tokens=add)["input_ids"]
        assert not special.intersection(ids)


def test_chat_template(tok):
    msgs = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|>Be nice.\n<|user|>Hi<|end|><|assistant|>Hello<|end|><|user|>Bye<|end|><|assistant|>"
    )
    assert text.endswith(SPECIAL_TOKENS["assistant"])
    plain = tok.apply_chat_template(msgs[1:2], add_generation_prompt=False, tokenize=False)
    assert plain == "<|bos|><|user|>Hi<|end|>"


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(loaded, f"{name}_token_id") == getattr(tok, f"{name}_token_id")
    for t in SPECIAL_TOKENS.values():
        assert loaded.convert_tokens_to_ids(t) == tok.convert_tokens_to_ids(t)
    msgs = [{"role": "user", "content": "How do I bake bread?"}]
    assert loaded.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    ) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    text = "Mix flour and water — ñ"
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    assert loaded.padding_side == "right"


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        build_tokenizer(TEXTS, vocab_size=100)
