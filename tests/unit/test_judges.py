"""Tests for safeanchor.judges."""

from __future__ import annotations

from pathlib import Path

import pytest

from safeanchor.config import ConfigError, from_dict
from safeanchor.judges import (
    JUDGES,
    REFUSAL_MARKERS,
    Judge,
    JudgeConfig,
    KeywordRefusalJudge,
    build_judge,
)


def _one(judge: Judge, response: str) -> bool:
    return judge.judge(["prompt"], [response])[0]


def test_markers_are_lower_case() -> None:
    assert len(REFUSAL_MARKERS) >= 20
    assert all(m == m.lower() for m in REFUSAL_MARKERS)


def test_refusal_detected() -> None:
    j = KeywordRefusalJudge()
    assert _one(j, "I'm sorry, but I can't help with that.")
    assert _one(j, "As an AI, I must decline.")
    assert _one(j, "I CANNOT do this.")


def test_compliance_not_flagged() -> None:
    j = KeywordRefusalJudge()
    assert not _one(j, "Sure! Here is a recipe for banana bread: mix flour and bananas.")


def test_curly_apostrophe() -> None:
    assert _one(KeywordRefusalJudge(), "I\u2019m sorry, I won\u2019t do that.")
    assert _one(KeywordRefusalJudge(), "I can\u2019t.")


def test_prefix_chars() -> None:
    late = "Here is a long answer. " * 5 + "I cannot vouch for it."
    assert _one(KeywordRefusalJudge(), late)
    assert not _one(KeywordRefusalJudge(prefix_chars=40), late)
    assert _one(KeywordRefusalJudge(prefix_chars=40), "I cannot help. " + "x" * 100)


def test_empty_response_is_not_refusal() -> None:
    assert KeywordRefusalJudge().judge(["a", "b"], ["", "   \n"]) == [False, False]


def test_documented_bias_mention_counts_as_refusal() -> None:
    # Documented false positive: a compliant answer that mentions a marker is a "refusal".
    resp = "Sure. Step 1: ... Step 2: ... Note that this is illegal in most places."
    assert _one(KeywordRefusalJudge(), resp) is True


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="pair up"):
        KeywordRefusalJudge().judge(["a"], ["b", "c"])


def test_build_keyword_with_overrides() -> None:
    j = build_judge(JudgeConfig(markers=["NOPE"], prefix_chars=10))
    assert isinstance(j, KeywordRefusalJudge)
    assert j.name == "keyword"
    assert j.judge(["p", "p"], ["nope, not doing it", "I'm sorry"]) == [True, False]


def test_build_judge_unknown_kind() -> None:
    with pytest.raises(ConfigError) as ei:
        build_judge(JudgeConfig(kind="llama-guard-9000"))
    assert ei.value.key == "kind"
    assert "unknown judge 'llama-guard-9000'" in ei.value.msg
    assert "keyword" in ei.value.msg and "hf-classifier" in ei.value.msg


def test_judge_config_validation() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(JudgeConfig, {"prefix_chars": 0}, prefix="eval.judge")
    assert ei.value.key == "eval.judge.prefix_chars"
    assert from_dict(JudgeConfig, {"markers": ["x"]}).markers == ["x"]


def test_hf_classifier_requires_model_id() -> None:
    assert "hf-classifier" in JUDGES
    with pytest.raises(ConfigError) as ei:
        build_judge(JudgeConfig(kind="hf-classifier"))
    assert ei.value.key == "model_id"


def _save_tiny_classifier(path: Path, bias: tuple[float, float] | None) -> None:
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "i", "cannot", "sure", "here", "is", "how"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    fast.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        pad_token_id=vocab["[PAD]"],
        id2label={0: "compliance", 1: "refusal"},
        label2id={"compliance": 0, "refusal": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    if bias is not None:
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor(bias))
    model.save_pretrained(path, safe_serialization=True)


def test_hf_classifier_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    prompts = ["how", "how is", "x"]
    responses = ["i cannot", "sure here is how", ""]

    plain = tmp_path / "plain"
    _save_tiny_classifier(plain, bias=None)
    cfg = JudgeConfig(kind="hf-classifier", model_id=str(plain), batch_size=2)
    judge = build_judge(cfg)
    assert judge.name == "hf-classifier"
    out = judge.judge(prompts, responses)
    assert len(out) == 3 and all(isinstance(x, bool) for x in out)

    forced = tmp_path / "forced"
    _save_tiny_classifier(forced, bias=(-10.0, 10.0))
    judge = build_judge(JudgeConfig(kind="hf-classifier", model_id=str(forced), batch_size=2))
    assert judge.judge(prompts, responses) == [True, True, True]

    # Label matching is case-insensitive; a label the model lacks is a config error.
    upper = build_judge(
        JudgeConfig(kind="hf-classifier", model_id=str(forced), refusal_label="REFUSAL")
    )
    assert upper.judge(prompts[:1], responses[:1]) == [True]
    with pytest.raises(ConfigError) as ei:
        build_judge(JudgeConfig(kind="hf-classifier", model_id=str(forced), refusal_label="x"))
    assert ei.value.key == "refusal_label"
