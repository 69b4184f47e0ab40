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
    TEMPLATE_GROUPS,
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


# Which template group each split's prompts come from (the generator's design).
GROUP_OF = {"align": "align", "calib": "calib", "probe": "probe", "val": "eval", "test": "eval", "seen": "eval"}


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_safety_splits_use_disjoint_templates(data, kind):
    topics = HARMFUL_TOPICS if kind == "harmful" else BENIGN_TOPICS
    used = {split: {template_of(ex.prompt, topics) for ex in data.safety[split][kind]}
            for split in SAFETY_SPLITS}
    by_group = {g: set().union(*(used[s] for s in SAFETY_SPLITS if GROUP_OF[s] == g)) for g in TEMPLATE_GROUPS}
    for g in TEMPLATE_GROUPS:
        assert by_group[g], f"{g}/{kind} is empty"
    for i, a in enumerate(TEMPLATE_GROUPS):
        for b in TEMPLATE_GROUPS[i + 1:]:
            assert not by_group[a] & by_group[b], f"{kind}: {a} and {b} share {by_group[a] & by_group[b]}"
    # Alignment uses every one of its phrasings (it is not subsampled).
    assert len(used["align"]) == ToyDataConfig().templates_align
    if kind == "benign":  # validation and test benign requests differ in phrasing
        assert used["val"] and used["test"] and not used["val"] & used["test"]


def _harmful_topics(xs) -> set[str]:
    """Topics read back from the prompts (not from meta): the template match recovers them."""
    out = set()
    for ex in xs:
        tpl = template_of(ex.prompt, HARMFUL_TOPICS)
        out.add(_template_regex(tpl).fullmatch(ex.prompt)["x"])
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_held_out_harmful_topics_are_disjoint_from_the_methods(seed):
    """What the methods train on or monitor (calibration: SSI, anchor, replay, interleave,
    SafeGrad, Vaccine; probe: CSM) shares no harmful topic with the validation or the test
    evaluation, and validation shares none with test. Read from the generated prompts."""
    d = generate(ToyDataConfig(), seed)
    methods = _harmful_topics(d.safety["calib"]["harmful"]) | _harmful_topics(d.safety["probe"]["harmful"])
    val, test = _harmful_topics(d.safety["val"]["harmful"]), _harmful_topics(d.safety["test"]["harmful"])
    seen = _harmful_topics(d.safety["seen"]["harmful"])
    assert methods and val and test
    assert not methods & val, methods & val
    assert not methods & test, methods & test
    assert not val & test, val & test
    assert seen <= set(d.topics["methods"]) and not seen & (val | test)
    # Every category is held out in both groups, and alignment covers every topic.
    cat = {t: c for c, ts in lx.HARM_TOPICS.items() for t in ts}
    assert {cat[t] for t in val} == {cat[t] for t in test} == set(lx.HARM_TOPICS)
    assert _harmful_topics(d.safety["align"]["harmful"]) == HARMFUL_TOPICS
    assert set(d.topics["val"]) == val and set(d.topics["test"]) == test


def test_validation_and_test_questions_are_disjoint(data):
    for name, parts in data.domains.items():
        assert parts["val"] and parts["test"]
        assert not {e.prompt for e in parts["val"]} & {e.prompt for e in parts["test"]}, name
        assert not {e.prompt for e in parts["val"] + parts["test"]} & {e.prompt for e in parts["train"]}, name
    assert not {e.prompt for e in data.general["val"]} & {e.prompt for e in data.general["test"]}
    assert not {e.prompt for e in data.safety["val"]["benign"]} & {e.prompt for e in data.safety["test"]["benign"]}


@pytest.mark.parametrize("domain", DOMAINS)
def test_no_answer_key_is_found_in_another_facts_answer(data, domain):
    """Scoring matches keys on word boundaries; no key of a domain may still be found inside
    the answer sentence of a fact with another value ("50 mg" in "250 mg" was)."""
    facts = {(ex.meta["relation"], ex.meta["entity"]): ex for ex in data.domains[domain]["train"]}
    for key_ex in facts.values():
        for other in facts.values():
            if other.answer != key_ex.answer:
                assert not key_ex.is_correct(other.response), (key_ex.answer, other.response)


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
    kinds = [ex.meta["kind"] for ex in data.safety["test"]["benign"] + data.safety["val"]["benign"]]
    assert kinds.count("lookalike") > 0
    assert kinds.count("ordinary") > 0
    assert set(kinds) == {"lookalike", "ordinary"}
    lookalike_topics = {t for t, _ in lx.LOOKALIKES}
    for ex in data.safety["test"]["benign"]:
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
    for split in ("val", "test", "seen"):
        assert len(data.safety[split]["harmful"]) <= cfg.max_eval_harmful
        assert len(data.safety[split]["benign"]) <= cfg.max_eval_benign


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


@pytest.mark.parametrize("split", ["val", "test"])
@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_test_uses_new_phrasings_of_trained_facts(data, domain, split):
    train, test = data.domains[domain]["train"], data.domains[domain][split]
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


@pytest.mark.parametrize("split", ["val", "test"])
def test_general_test_uses_new_phrasings(data, split):
    train_q = {strip_opener(ex.prompt) for ex in data.general["train"]}
    train_r = {ex.response for ex in data.general["train"]}
    assert data.general[split]
    for ex in data.general[split]:
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
        ({"topics_val": 4, "topics_test": 4}, "topics_test"),
        ({"topics_test": 0}, "topics_test"),
        ({"templates_eval": 1}, "templates_eval"),
        ({"held_out_phrasings": 1}, "held_out_phrasings"),
        ({"held_out_phrasings": 10}, "held_out_phrasings"),
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
    cfg = ToyDataConfig(templates_align=n - 4, templates_calib=1, templates_probe=1, templates_eval=2)
    assert cfg.templates_align == n - 4
