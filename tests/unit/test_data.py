"""Tests for the chat-example schema, loaders, tokenization and batching."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from safeanchor.data import (
    ChatExample,
    DataError,
    ExampleBatches,
    collate,
    collate_prompts,
    encode_dataset,
    encode_example,
    encode_prompt,
    load_examples,
    write_jsonl,
)
from safeanchor.toyworld.tokenizer import build_tokenizer

SENTENCES = [
    "How do I bake bread at home?",
    "Mix flour, water, salt and yeast, then knead the dough.",
    "I cannot help with that request.",
    "What is the capital of France? The capital is Paris.",
    "Add 2 and 3 to get 5.",
] * 3

EXAMPLES = [
    ChatExample("How do I bake bread?", "Mix flour and water.", None, {"category": "cooking"}),
    ChatExample("Capital of France?", "It is Paris.", "Paris", {"category": "geo", "t": "t3"}),
    ChatExample("Add 2 and 3.", "5", "5"),
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(SENTENCES, vocab_size=300)


# ------------------------------------------------------------------------- schema


def test_example_hashable_and_meta_frozen():
    a = ChatExample("p", "r", "x", {"k": "v"})
    b = ChatExample("p", "r", "x", {"k": "v"})
    assert a == b and hash(a) == hash(b)
    assert len({a, b}) == 1
    assert dict(a.meta) == {"k": "v"}
    with pytest.raises(TypeError):
        a.meta["k"] = "w"  # type: ignore[index]


def test_is_correct():
    ex = ChatExample("Capital?", "Paris", "paris")
    assert ex.is_correct("It is PARIS.")
    assert not ex.is_correct("Lyon")


# ------------------------------------------------------------------- tokenization


def test_loss_mask(tok):
    ex = EXAMPLES[0]
    enc = encode_example(tok, ex, max_length=512)
    prompt_ids = encode_prompt(tok, ex.prompt)
    resp_ids = tok(ex.response, add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert prompt_ids[0] == tok.bos_token_id
    assert prompt_ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")
    assert enc["input_ids"] == prompt_ids + resp_ids + [tok.eos_token_id]
    assert len(enc["labels"]) == len(enc["input_ids"])
    assert enc["labels"][:n] == [-100] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    assert -100 not in enc["labels"][n:]
    assert tok.decode(enc["input_ids"][n:-1]) == ex.response


def test_truncation(tok):
    ex = ChatExample("Hi", "Mix flour, water, salt and yeast, then knead the dough.")
    n = len(encode_prompt(tok, ex.prompt))
    enc = encode_example(tok, ex, max_length=n + 2)
    assert len(enc["input_ids"]) == len(enc["labels"]) == n + 2
    assert enc["labels"][:n] == [-100] * n
    assert enc["labels"][n:] == enc["input_ids"][n:]
    with pytest.raises(DataError, match=f"max_length={n}"):
        encode_example(tok, ex, max_length=n)


def test_empty_response_error(tok):
    with pytest.raises(DataError, match="empty response"):
        encode_example(tok, ChatExample("Hi there", ""), max_length=64)
    with pytest.raises(DataError, match="example 1"):
        encode_dataset(tok, [EXAMPLES[0], ChatExample("Hi there", "")], max_length=64)


def test_encode_dataset(tok):
    feats = encode_dataset(tok, EXAMPLES, max_length=64)
    assert len(feats) == len(EXAMPLES)
    assert all(f["input_ids"][-1] == tok.eos_token_id for f in feats)


def test_collate_right_pad():
    feats = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(feats, pad_id=2)
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_prompts_left_pad():
    batch = collate_prompts([[5, 6, 7], [8]], pad_id=2)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["input_ids"].dtype == torch.long


def test_example_batches():
    feats = [
        {"input_ids": [i + 10] * (1 + i % 3), "labels": [i + 10] * (1 + i % 3)} for i in range(10)
    ]
    eb = ExampleBatches(feats, batch_size=4, seed=7, pad_id=0)
    assert len(eb) == 3

    def firsts(epoch):
        return [row[0] for b in eb.epoch(epoch) for row in b["input_ids"].tolist()]

    e0 = firsts(0)
    assert sorted(e0) == [i + 10 for i in range(10)]  # each example exactly once
    assert e0 == firsts(0)  # deterministic
    assert ExampleBatches(feats, 4, 7, 0).order(1) == eb.order(1)
    assert e0 != firsts(1)  # reshuffled per epoch
    assert ExampleBatches(feats, 4, 8, 0).order(0) != eb.order(0)
    dl = ExampleBatches(feats, batch_size=4, seed=7, pad_id=0, drop_last=True)
    assert len(dl) == 2
    assert [b["input_ids"].shape[0] for b in dl.epoch(0)] == [4, 4]


# ------------------------------------------------------------------------ loading


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(EXAMPLES, tmp_path / "sub" / "a.jsonl")
    assert load_examples(path) == EXAMPLES
    assert load_examples(str(path), limit=2) == EXAMPLES[:2]
    assert not [p for p in path.parent.iterdir() if p.name != "a.jsonl"]  # no temp left


def test_jsonl_blank_lines_and_meta(tmp_path):
    rows = [
        {"prompt": "p1", "response": "r1", "n": 3, "tags": ["a"], "none": None},
        {"prompt": "p2"},
    ]
    path = _write(
        tmp_path / "a.jsonl", "\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n"
    )
    exs = load_examples(path, require_response=False)
    assert exs[0] == ChatExample("p1", "r1", None, {"n": "3", "tags": '["a"]'})
    assert exs[1] == ChatExample("p2", "")


def test_custom_fields(tmp_path):
    path = _write(tmp_path / "a.jsonl", json.dumps({"q": "p", "a": "r", "key": 42}) + "\n")
    exs = load_examples(path, prompt_field="q", response_field="a", answer_field="key")
    assert exs == [ChatExample("p", "r", "42")]


def test_json_round_trip(tmp_path):
    rows = [
        {"prompt": e.prompt, "response": e.response, "answer": e.answer, **e.meta} for e in EXAMPLES
    ]
    path = _write(tmp_path / "a.json", json.dumps(rows))
    assert load_examples(path) == EXAMPLES


def test_parquet_round_trip(tmp_path):
    rows = [{"prompt": e.prompt, "response": e.response, "answer": e.answer} for e in EXAMPLES]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert load_examples(path) == [ChatExample(e.prompt, e.response, e.answer) for e in EXAMPLES]


def test_csv_round_trip(tmp_path):
    path = _write(
        tmp_path / "a.csv",
        'prompt,response,answer,category\n"Hi, you",Hello,,x\nQ2,"multi\nline",A,y\n',
    )
    assert load_examples(path) == [
        ChatExample("Hi, you", "Hello", None, {"category": "x"}),
        ChatExample("Q2", "multi\nline", "A", {"category": "y"}),
    ]


def test_hf_from_disk(tmp_path):
    import datasets

    rows = {"prompt": [e.prompt for e in EXAMPLES], "response": [e.response for e in EXAMPLES]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    exs = load_examples(f"hf:{tmp_path / 'ds'}")
    assert exs == [ChatExample(e.prompt, e.response) for e in EXAMPLES]
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert len(load_examples(f"hf:{tmp_path / 'dd'}", split="test", limit=1)) == 1
    with pytest.raises(DataError, match="no split 'train'"):
        load_examples(f"hf:{tmp_path / 'dd'}")


def test_hf_load_failure_wrapped(monkeypatch):
    import datasets

    def boom(*args, **kwargs):
        raise FileNotFoundError("Couldn't find\ndataset")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="^hf:nobody/nothing:cfg: cannot load dataset") as ei:
        load_examples("hf:nobody/nothing:cfg")
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "expected"),
    [
        (
            "a.jsonl",
            '{"prompt": "p", "response": "r"}\n\n{"prompt": \n',
            {},
            r"a\.jsonl:3: invalid JSON",
        ),
        (
            "a.jsonl",
            '{"prompt": "p", "response": "r"}\n[1, 2]\n',
            {},
            r"a\.jsonl:2: expected a JSON object",
        ),
        (
            "a.jsonl",
            '{"prompt": "p", "response": "r"}\n\n{"text": "x"}\n',
            {},
            r"a\.jsonl:3: missing field 'prompt'",
        ),
        ("a.jsonl", '{"prompt": "p"}\n', {}, r"a\.jsonl:1: missing field 'response'"),
        (
            "a.jsonl",
            '{"prompt": 5, "response": "r"}\n',
            {},
            r"a\.jsonl:1: field 'prompt' must be a string",
        ),
        (
            "a.jsonl",
            '{"prompt": "p", "response": ["r"]}\n',
            {},
            r"a\.jsonl:1: field 'response' must be",
        ),
        ("a.jsonl", "\n\n", {}, r"a\.jsonl: no examples"),
        ("a.json", '{"prompt": "p"}', {}, r"a\.json: expected a JSON list"),
        (
            "a.json",
            '[{"prompt": "p", "response": "r"}, {"x": 1}]',
            {},
            r"a\.json\[1\]: missing field 'prompt'",
        ),
        ("a.json", '[\n{"prompt": "p",\n}]', {}, r"a\.json:3: invalid JSON"),
        ("a.json", "[]", {}, r"a\.json: no examples"),
        ("a.csv", "prompt,response\np,r\nq,\n", {}, r"a\.csv:3: field 'response' is empty"),
        ("a.csv", "text,response\np,r\n", {}, r"a\.csv:2: missing field 'prompt'"),
        ("a.txt", "hello", {}, r"a\.txt: unknown extension '\.txt'"),
    ],
)
def test_load_errors(tmp_path, name, content, kwargs, expected):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError, match=expected) as ei:
        load_examples(path, **kwargs)
    assert "\n" not in str(ei.value)
    assert str(tmp_path) in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl")


def test_parquet_errors(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "p", "response": "r"}, {"prompt": None, "response": "r"}]),
        path,
    )
    with pytest.raises(DataError, match=r"a\.parquet\[1\]: missing field 'prompt'"):
        load_examples(path)
    bad = _write(tmp_path / "b.parquet", "not parquet")
    with pytest.raises(DataError, match=r"b\.parquet: cannot read parquet"):
        load_examples(bad)


def test_prompt_only_eval_set(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"prompt": "p", "answer": "x"}\n')
    assert load_examples(path, require_response=False) == [ChatExample("p", "", "x")]


def test_write_jsonl_rejects_reserved_meta(tmp_path):
    with pytest.raises(DataError, match="reserved"):
        write_jsonl([ChatExample("p", "r", None, {"prompt": "x"})], tmp_path / "a.jsonl")
    assert list(tmp_path.iterdir()) == []
