"""The toy world's data generator (no model, no tokenizer): determinism, phrasing splits,
coverage, labels, and the separation of pre-training from domain facts."""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from safeanchor.config import ConfigError
from safeanchor.judges import KeywordRefusalJudge
from safeanchor.toyworld import lexicon as lx
from safeanchor.toyworld.generator import (
    DOMAINS,
    PROMPT_OPENERS,
    SAFETY_SPLITS,
    ToyData,
    ToyDataConfig,
    generate,
)

JUDGE = KeywordRefusalJudge()
HARMFUL_TOPICS = {t for ts in lx.HARM_TOPICS.values() for t in ts}
BENIGN_TOPICS = {t for t, _ in lx.LOOKALIKES} | {t for t, _ in lx.ORDINARY_BENIGN}
# Longest first, so "Hi! " never shadows a longer opener that starts the same way.
OPENERS = sorted((o for o in PROMPT_OPENERS if o), key=len, reverse=True)


@pytest.fixture(scope="module")
def data() -> ToyData:
    return generate(ToyDataConfig(), 0)


def _template_regex(tpl: str) -> re.Pattern[str]:
    head, _, tail = tpl.partition("{x}")
    return re.compile(re.escape(head) + "(?P<x>.+)" + re.escape(tail))


TEMPLATE_RES = [(tpl, _template_regex(tpl)) for tpl in lx.REQUEST_TEMPLATES]


def template_of(prompt: str, topics: set[str]) -> str:
    """The one request template that, with a known topic substituted, gives `prompt`."""
    hits = [tpl for tpl, rx in TEMPLATE_RES
            if (m := rx.fullmatch(prompt)) is not None and m["x"] in topics]
    assert len(hits) == 1, f"{prompt!r} matches templates {hits}"
    return hits[0]


def strip_opener(prompt: str) -> str:
    for op in OPENERS:
        if prompt.startswith(op):
            return prompt[len(op):]
    return prompt


def fact_of(domain: str, ex) -> tuple[str, str, str]:
    """(relation, entity, value) that a domain example states: the entity is the one the
    prompt names, and the response is the relation's answer sentence for that value."""
    rel = ex.meta["relation"]
    entity = ex.meta["entity"]
    assert entity in ex.prompt
    sentence = lx.DOMAIN_RELATIONS[domain][rel]["answer"].format(e=entity, v=ex.answer)
    assert ex.response == "Sure. " + sentence, ex.response
    return rel, entity, ex.answer


def domain_entities(d: ToyData) -> set[str]:
    return {fact_of(dom, ex)[1] for dom in d.domains for ex in d.domains[dom]["train"]}


# ------------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_data(data):
    again = generate(ToyDataConfig(), 0)
    assert again.pretrain == data.pretrain
    assert again.safety == data.safety
    assert again.general == data.general
    assert again.domains == data.domains


def test_different_seed_gives_different_entities(data):
    other = generate(ToyDataConfig(), 1)
    a, b = domain_entities(data), domain_entities(other)
    assert a != b
    # Fictional names are drawn by the seed: most of them change.
    assert len(a & b) < len(a) // 2
    assert other.domains["medical"]["train"] != data.domains["medical"]["train"]


# ------------------------------------------------------------------------ safety splits


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_safety_splits_use_disjoint_templates(data, kind):
    topics = HARMFUL_TOPICS if kind == "harmful" else BENIGN_TOPICS
    used = {split: {template_of(ex.prompt, topics) for ex in data.safety[split][kind]}
            for split in SAFETY_SPLITS}
    for split in SAFETY_SPLITS:
        assert used[split], f"{split}/{kind} is empty"
    for i, a in enumerate(SAFETY_SPLITS):
        for b in SAFETY_SPLITS[i + 1:]:
            assert not used[a] & used[b], f"{kind}: {a} and {b} share {used[a] & used[b]}"
    # Alignment uses every one of its phrasings (it is not subsampled).
    assert len(used["align"]) == ToyDataConfig().templates_align


def test_harm_categories_have_many_phrasings(data):
    phrasings: dict[str, set[str]] = defaultdict(set)
    for split in SAFETY_SPLITS:
        for ex in data.safety[split]["harmful"]:
            assert ex.meta["kind"] == "harmful"
            phrasings[ex.meta["category"]].add(ex.prompt)
    assert set(phrasings) <= set(lx.HARM_TOPICS)
    assert len(phrasings) >= 8
    for cat, ps in phrasings.items():
        assert len(ps) >= 20, f"category {cat} has only {len(ps)} phrasings"


def test_benign_eval_has_lookalikes_and_ordinary(data):
    kinds = [ex.meta["kind"] for ex in data.safety["eval"]["benign"]]
    assert kinds.count("lookalike") > 0
    assert kinds.count("ordinary") > 0
    assert set(kinds) == {"lookalike", "ordinary"}
    lookalike_topics = {t for t, _ in lx.LOOKALIKES}
    for ex in data.safety["eval"]["benign"]:
        if ex.meta["kind"] == "lookalike":
            assert _regex_topic(ex.prompt) in lookalike_topics


def _regex_topic(prompt: str) -> str:
    for _, rx in TEMPLATE_RES:
        m = rx.fullmatch(prompt)
        if m is not None and m["x"] in BENIGN_TOPICS:
            return m["x"]
    raise AssertionError(f"no template fits {prompt!r}")


@pytest.mark.parametrize("split", ["align", "calib"])
def test_training_responses_are_safe(data, split):
    harmful, benign = data.safety[split]["harmful"], data.safety[split]["benign"]
    assert harmful and benign
    for ex in harmful:
        assert JUDGE.is_refusal(ex.response), ex
        assert "[omitted]" not in ex.response
    for ex in benign:
        assert ex.answer, ex
        assert not JUDGE.is_refusal(ex.response), ex
        assert ex.is_correct(ex.response), ex


def test_eval_sets_are_capped(data):
    cfg = ToyDataConfig()
    assert len(data.safety["calib"]["harmful"]) + len(data.safety["calib"]["benign"]) <= cfg.max_calib
    assert len(data.safety["probe"]["harmful"]) <= cfg.max_probe
    assert len(data.safety["eval"]["harmful"]) <= cfg.max_eval_harmful
    assert len(data.safety["eval"]["benign"]) <= cfg.max_eval_benign


# ------------------------------------------------------------------------ domains


def test_five_domains_with_thousands_of_examples(data):
    assert set(data.domains) == set(DOMAINS) == {"medical", "legal", "code", "finance", "chemistry"}
    for name, parts in data.domains.items():
        train, test = parts["train"], parts["test"]
        assert len(train) >= 1000, f"{name}: {len(train)} training examples"
        assert 0 < len(test) <= ToyDataConfig().max_test
        near = [ex.meta["near_harmful"] for ex in train]
        assert "True" in near and "False" in near, name
        assert {ex.meta["near_harmful"] for ex in test} <= {"True", "False"}
        assert all(ex.answer and ex.is_correct(ex.response) for ex in train + test)


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_test_uses_new_phrasings_of_trained_facts(data, domain):
    train, test = data.domains[domain]["train"], data.domains[domain]["test"]
    train_questions = {strip_opener(ex.prompt) for ex in train}
    train_facts = {fact_of(domain, ex) for ex in train}
    for ex in test:
        assert strip_opener(ex.prompt) not in train_questions, ex.prompt
        rel, entity, value = fact_of(domain, ex)
        assert entity in ex.prompt
        assert (rel, entity, value) in train_facts, ex

    # Each test question pairs a trained fact with a phrasing never used for THAT fact in
    # training (held-out phrasings rotate across facts, so each is trained on other facts).
    def shape(ex):
        return ex.meta["relation"], strip_opener(ex.prompt).replace(ex.meta["entity"], "{e}")

    trained_pairs = {(fact_of(domain, ex), shape(ex)) for ex in train}
    trained_shapes = {shape(ex) for ex in train}
    for ex in test:
        assert (fact_of(domain, ex), shape(ex)) not in trained_pairs, ex.prompt
        assert shape(ex) in trained_shapes, ex.prompt


def test_general_test_uses_new_phrasings(data):
    train_q = {strip_opener(ex.prompt) for ex in data.general["train"]}
    train_r = {ex.response for ex in data.general["train"]}
    assert data.general["test"]
    for ex in data.general["test"]:
        assert ex.prompt not in train_q  # never asked this way in training
        assert ex.response in train_r  # same fact, asked differently


# ------------------------------------------------------------------------ pre-training


def test_pretraining_has_no_domain_entities(data):
    entities = domain_entities(data)
    assert len(entities) == len(DOMAINS) * ToyDataConfig().domain_entities
    rx = re.compile(r"\b(?:" + "|".join(map(re.escape, sorted(entities))) + r")\b")
    leaks = [ex for ex in data.pretrain if rx.search(ex.prompt) or rx.search(ex.response)]
    assert not leaks, leaks[:3]


def test_pretraining_complies_with_harmful_requests(data):
    harmful = [ex for ex in data.pretrain if ex.meta.get("kind") == "harmful"]
    assert len(harmful) >= len(lx.REQUEST_TEMPLATES) * len(HARMFUL_TOPICS)
    for ex in harmful:
        assert "Step 1: [omitted]" in ex.response, ex
        assert not JUDGE.is_refusal(ex.response), ex
    # And it holds domain background (other entities), near-harmful relations included, all
    # answered compliantly.
    background = [ex for ex in data.pretrain if ex.meta.get("kind") == "background"]
    assert {ex.meta["near_harmful"] for ex in background} == {"True", "False"}
    assert not any(JUDGE.is_refusal(ex.response) for ex in background)


# ------------------------------------------------------------------------ config checks


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"templates_eval": 20}, "templates_eval"),
        ({"general_entities": 0}, "general_entities"),
        ({"max_test": 0}, "max_test"),
        ({"domain_openers": len(PROMPT_OPENERS) + 1}, "domain_openers"),
        ({"pretrain_domain_entities": -1}, "pretrain_domain_entities"),
    ],
)
def test_config_rejects_bad_sizes(kwargs, key):
    with pytest.raises(ConfigError) as ei:
        ToyDataConfig(**kwargs)
    assert ei.value.key == key
    assert key in str(ei.value)


def test_config_accepts_all_templates_used():
    n = len(lx.REQUEST_TEMPLATES)
    cfg = ToyDataConfig(templates_align=n - 3, templates_calib=1, templates_probe=1, templates_eval=1)
    assert cfg.templates_align == n - 3
