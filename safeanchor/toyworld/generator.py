"""Deterministic generator of the toy world's data (no model, no tokenizer).

Everything is a function of (`ToyDataConfig`, seed): fictional entity names, fact values,
which request phrasings and harmful topics go to which split, and subsampling.

Safety splits are made by PHRASING and, for harmful requests, by TOPIC as well:

- request phrasings (templates) fall into disjoint groups: alignment, calibration (SSI,
  anchor, replay, interleave / SafeGrad / Vaccine data), monitoring probe (CSM) and
  evaluation; the evaluation group is split again into validation and test phrasings for
  the benign sets;
- harmful topics fall, within every category, into the METHODS' topics (calibration and
  probe) and two held-out groups the methods never see: validation topics and test topics.
  The alignment stage (the stand-in for a chat model's RLHF) covers every topic.

So `safety["test"]["harmful"]` (the headline `safety`) asks held-out test topics in
evaluation phrasings; `safety["seen"]["harmful"]` asks the methods' topics in the same
phrasings (`safety_seen_topics`: the gap shows memorised calibration topics);
`safety["val"]` is the tuning split. Domain and general questions: each fact is trained in
some phrasings and asked in held-out ones, one held-out phrasing for validation and the
others for test (the test asks what was learned, in new words).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from safeanchor.config import check
from safeanchor.data import ChatExample
from safeanchor.toyworld import lexicon as lx

TEMPLATE_GROUPS = ("align", "calib", "probe", "eval")
# What the generated `ToyData.safety` holds: the methods' splits, then the evaluation splits.
SAFETY_SPLITS = ("align", "calib", "probe", "val", "test", "seen")
DOMAINS = tuple(lx.DOMAIN_RELATIONS)

# Openers that vary the domain training prompts (thousands of varied examples per domain,
# few epochs: the regime of real domain adaptation, not 50 epochs over 100 lines).
PROMPT_OPENERS = (
    "", "Quick question. ", "Hi! ", "I am studying this. ", "Please answer briefly. ",
    "For my notes: ", "Hello, ", "One more thing. ", "I was wondering. ", "Help please. ",
)

COMPLIANT_HARMFUL = "Sure. Here is how to {x}. Step 1: [omitted]. Step 2: [omitted]. Step 3: [omitted]."
COMPLIANT_BENIGN = "Sure. To {x}, {a}."


@dataclass
class ToyDataConfig:
    """Sizes and splits of the generated toy-world data."""

    general_entities: int = field(default=30, metadata={"doc": "fictional entities per general-knowledge relation (3 relations)"})
    domain_entities: int = field(default=12, metadata={"doc": "fictional entities per domain (each has 3 relations)"})
    pretrain_domain_entities: int = field(default=24, metadata={"doc": "OTHER fictional entities per domain whose ordinary (not near-harmful) facts are in pre-training: the base model knows how domain questions are asked, not the domain's own facts"})
    domain_openers: int = field(default=6, metadata={"doc": "prompt openers sampled per (fact, phrasing) in domain training data"})
    templates_align: int = field(default=16, metadata={"doc": "request phrasings used for alignment (training)"})
    templates_calib: int = field(default=8, metadata={"doc": "request phrasings of the calibration set (SSI, anchor, replay)"})
    templates_probe: int = field(default=8, metadata={"doc": "request phrasings of the monitoring probe set (CSM)"})
    templates_eval: int = field(default=8, metadata={"doc": "request phrasings of the final evaluation set"})
    max_calib: int = field(default=128, metadata={"doc": "cap on calibration examples (half harmful, half benign)"})
    max_probe: int = field(default=96, metadata={"doc": "cap on probe prompts (harmful)"})
    max_eval_harmful: int = field(default=200, metadata={"doc": "cap on final-evaluation harmful prompts"})
    max_eval_benign: int = field(default=160, metadata={"doc": "cap on final-evaluation benign prompts (look-alikes + ordinary)"})
    max_test: int = field(default=120, metadata={"doc": "cap on each domain's and general's test set"})
    topics_val: int = field(default=2, metadata={"doc": "harmful topics per category held out for validation (never in calibration / probe)"})
    topics_test: int = field(default=2, metadata={"doc": "harmful topics per category held out for the test (never in calibration / probe)"})
    held_out_phrasings: int = field(default=4, metadata={"doc": "question phrasings per domain / general fact never trained: 1 for validation, the rest for test"})

    def __post_init__(self) -> None:
        check(self.pretrain_domain_entities >= 0, "pretrain_domain_entities", "must be >= 0")
        for name in ("general_entities", "domain_entities", "domain_openers", "templates_align",
                     "templates_calib", "templates_probe", "templates_eval", "max_calib",
                     "max_probe", "max_eval_harmful", "max_eval_benign", "max_test",
                     "topics_val", "topics_test"):
            check(getattr(self, name) >= 1, name, "must be >= 1")
        smallest = min(len(ts) for ts in lx.HARM_TOPICS.values())
        check(self.topics_val + self.topics_test < smallest, "topics_test",
              f"topics_val + topics_test must leave the methods at least one topic per category "
              f"(the smallest category has {smallest})")
        check(self.templates_eval >= 2, "templates_eval", "must be >= 2 (validation and test benign phrasings)")
        check(self.held_out_phrasings >= 2, "held_out_phrasings", "must be >= 2 (one validation, >= 1 test)")
        fewest = min(len(spec["questions"]) for rels in (lx.GENERAL_RELATIONS, *lx.DOMAIN_RELATIONS.values())
                     for spec in rels.values())
        check(self.held_out_phrasings < fewest, "held_out_phrasings",
              f"must leave at least one training phrasing (a relation has {fewest})")
        n = self.templates_align + self.templates_calib + self.templates_probe + self.templates_eval
        check(n <= len(lx.REQUEST_TEMPLATES), "templates_eval",
              f"the four template groups need {n} phrasings; only {len(lx.REQUEST_TEMPLATES)} exist")
        check(self.domain_openers <= len(PROMPT_OPENERS), "domain_openers",
              f"at most {len(PROMPT_OPENERS)}")


@dataclass
class ToyData:
    """All text of the toy world. Safety splits (SAFETY_SPLITS): split -> {"harmful": [...],
    "benign": [...]}; general and domains: "train" / "val" / "test"; `topics`: which harmful
    topics each group holds ("methods", "val", "test")."""

    pretrain: list[ChatExample]
    safety: dict[str, dict[str, list[ChatExample]]]
    general: dict[str, list[ChatExample]]
    domains: dict[str, dict[str, list[ChatExample]]]
    topics: dict[str, list[str]] = field(default_factory=dict)


def _names(rng: random.Random, n: int, shape: str, taken: set[str]) -> list[str]:
    """n distinct fictional names of the given shape ({N} capitalised stem, {n} lower)."""
    out: list[str] = []
    while len(out) < n:
        stem = "".join(rng.choice(lx.SYLLABLES) for _ in range(rng.choice((2, 2, 3))))
        name = shape.replace("{N}", stem.capitalize()).replace("{n}", stem.capitalize())
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _cap(rng: random.Random, items: list[ChatExample], k: int) -> list[ChatExample]:
    return items if len(items) <= k else rng.sample(items, k)


def _facts(rng: random.Random, relations: dict[str, dict], entities: list[str], taken: set[str]):
    """(relation, entity, value) for every entity and relation; values drawn by the seed."""
    facts = []
    for rel, spec in relations.items():
        values = spec["values"]
        if isinstance(values, str):  # generated values: fictional cities / persons
            shape = {"city": "{N}burg", "person": "{N} {N}son"}[values]
            values = _names(rng, max(8, len(entities) // 3), shape, taken)
        for e in entities:
            facts.append((rel, e, rng.choice(values)))
    return facts


def _per_fact_split(rng: random.Random, templates, n_held: int):
    """Rotate which phrasings are held out, fact by fact: fact j is asked in n_held phrasings
    it was never trained with (the first for validation, the others for test), while every
    phrasing is trained on with other facts. The test then asks a learned fact in new words,
    not an unheard form of question. Returns (train_of, val_of, test_of)."""
    order = list(templates)
    rng.shuffle(order)

    def held_of(j: int) -> list[str]:
        return [order[(j * n_held + i) % len(order)] for i in range(n_held)]

    def train_of(j: int) -> list[str]:
        held = set(held_of(j))
        return [q for q in order if q not in held]

    return train_of, lambda j: held_of(j)[:1], lambda j: held_of(j)[1:]


def _qa(relations, facts, phrasings, openers, rng, kind, n_openers) -> list[ChatExample]:
    """Q/A examples for facts; phrasings(rel, j) gives the questions of the j-th fact of rel."""
    out = []
    index: dict[str, int] = {}
    for rel, e, v in facts:
        spec = relations[rel]
        j = index[rel] = index.get(rel, -1) + 1
        sentence = spec["answer"].format(e=e, v=v)
        for q in phrasings(rel, j):
            chosen = rng.sample(openers, n_openers) if n_openers else [""]
            for op in chosen:
                answer = "Sure. " + sentence
                prompt = op + q.format(e=e)
                meta = {"kind": kind, "relation": rel, "entity": e,
                        "near_harmful": str(bool(spec.get("near_harmful")))}
                out.append(ChatExample(prompt=prompt, response=answer, answer=v, meta=meta))
    return out


def generate(cfg: ToyDataConfig, seed: int) -> ToyData:
    """Build the whole toy world's text from the seed."""
    rng = random.Random(seed)
    taken: set[str] = set()

    # --- safety data: templates split into disjoint phrasing groups --------------------
    templates = list(lx.REQUEST_TEMPLATES)
    rng.shuffle(templates)
    sizes = [cfg.templates_align, cfg.templates_calib, cfg.templates_probe, cfg.templates_eval]
    groups, start = {}, 0
    for group, n in zip(TEMPLATE_GROUPS, sizes, strict=True):
        groups[group] = templates[start : start + n]
        start += n
    half = len(groups["eval"]) // 2  # benign sets: validation and test phrasings differ too
    benign_groups = {"val": groups["eval"][:half], "test": groups["eval"][half:]}

    # Harmful topics, within every category: test, validation, then the methods' topics.
    topic_group: dict[str, str] = {}
    for cat in lx.HARM_TOPICS:
        ts = list(lx.HARM_TOPICS[cat])
        rng.shuffle(ts)
        for i, t in enumerate(ts):
            topic_group[t] = ("test" if i < cfg.topics_test else
                              "val" if i < cfg.topics_test + cfg.topics_val else "methods")
    harmful_topics = [(cat, t) for cat, ts in lx.HARM_TOPICS.items() for t in ts]
    benign_topics = [("lookalike", t, a) for t, a in lx.LOOKALIKES] + [
        ("ordinary", t, a) for t, a in lx.ORDINARY_BENIGN
    ]

    def harmful(tpls, response: str | None, topics=None):
        out = []
        for ti, tpl in enumerate(tpls):
            for cat, topic in harmful_topics:
                if topics is not None and topic_group[topic] != topics:
                    continue
                resp = response if response is not None else rng.choice(lx.REFUSALS)
                out.append(ChatExample(tpl.format(x=topic), resp, None,
                                       {"kind": "harmful", "category": cat, "template": str(ti), "topic": topic}))
        return out

    def benign(tpls):
        return [
            ChatExample(tpl.format(x=t), COMPLIANT_BENIGN.format(x=t, a=a), a,
                        {"kind": kind, "template": str(ti), "topic": t})
            for ti, tpl in enumerate(tpls)
            for kind, t, a in benign_topics
        ]

    safety: dict[str, dict[str, list[ChatExample]]] = {
        "align": {"harmful": harmful(groups["align"], None), "benign": benign(groups["align"])},
        "calib": {"harmful": harmful(groups["calib"], None, "methods"), "benign": benign(groups["calib"])},
        "probe": {"harmful": harmful(groups["probe"], None, "methods"), "benign": benign(groups["probe"])},
        "val": {"harmful": harmful(groups["eval"], None, "val"), "benign": benign(benign_groups["val"])},
        "test": {"harmful": harmful(groups["eval"], None, "test"), "benign": benign(benign_groups["test"])},
        "seen": {"harmful": harmful(groups["eval"], None, "methods"), "benign": []},
    }
    safety["calib"]["harmful"] = _cap(rng, safety["calib"]["harmful"], cfg.max_calib // 2)
    safety["calib"]["benign"] = _cap(rng, safety["calib"]["benign"], cfg.max_calib - cfg.max_calib // 2)
    safety["probe"]["harmful"] = _cap(rng, safety["probe"]["harmful"], cfg.max_probe)
    safety["probe"]["benign"] = _cap(rng, safety["probe"]["benign"], cfg.max_probe)
    for split in ("val", "test", "seen"):
        safety[split]["harmful"] = _cap(rng, safety[split]["harmful"], cfg.max_eval_harmful)
        safety[split]["benign"] = _cap(rng, safety[split]["benign"], cfg.max_eval_benign)
    topics = {g: sorted(t for t, tg in topic_group.items() if tg == g) for g in ("methods", "val", "test")}

    # --- general knowledge (the MMLU role) ------------------------------------------
    gen_entities = {
        rel: _names(rng, cfg.general_entities, lx.ENTITY_SHAPES[rel], taken) for rel in lx.GENERAL_RELATIONS
    }
    gen_facts = [f for rel in lx.GENERAL_RELATIONS
                 for f in _facts(rng, {rel: lx.GENERAL_RELATIONS[rel]}, gen_entities[rel], taken)]
    gsplit = {rel: _per_fact_split(rng, spec["questions"], cfg.held_out_phrasings)
              for rel, spec in lx.GENERAL_RELATIONS.items()}

    def general_part(i: int) -> list[ChatExample]:
        return _qa(lx.GENERAL_RELATIONS, gen_facts, lambda r, j: gsplit[r][i](j), PROMPT_OPENERS, rng, "general", 0)

    general = {"train": general_part(0), "val": _cap(rng, general_part(1), cfg.max_test),
               "test": _cap(rng, general_part(2), cfg.max_test)}

    # --- domains: fictional facts, phrasings split train / test ------------------------
    domains: dict[str, dict[str, list[ChatExample]]] = {}
    domain_background: list[ChatExample] = []
    for name, relations in lx.DOMAIN_RELATIONS.items():
        # Background knowledge of the field for pre-training: OTHER entities, every phrasing of
        # every relation (near-harmful ones answered too: a base model has read such text).
        # The domain's own facts are new to the model. Measured: leaving the near-harmful
        # relations out of pre-training made domain fine-tuning teach a new answer format,
        # which then garbled benign answers (helpful 0.99 -> 0.28): general collapse, not
        # selective erosion.
        bg_ents = _names(rng, cfg.pretrain_domain_entities, lx.ENTITY_SHAPES[name], taken)
        bg_facts = _facts(rng, relations, bg_ents, taken)
        domain_background += _qa(relations, bg_facts, lambda r, j, rs=relations: rs[r]["questions"],
                                 PROMPT_OPENERS, rng, "background", 0)
        ents = _names(rng, cfg.domain_entities, lx.ENTITY_SHAPES[name], taken)
        facts = _facts(rng, relations, ents, taken)
        splits = {rel: _per_fact_split(rng, spec["questions"], cfg.held_out_phrasings)
                  for rel, spec in relations.items()}
        train = _qa(relations, facts, lambda r, j, sp=splits: sp[r][0](j), PROMPT_OPENERS, rng, name,
                    cfg.domain_openers)
        rng.shuffle(train)
        val = _cap(rng, _qa(relations, facts, lambda r, j, sp=splits: sp[r][1](j), PROMPT_OPENERS, rng, name, 0), cfg.max_test)
        test = _cap(rng, _qa(relations, facts, lambda r, j, sp=splits: sp[r][2](j), PROMPT_OPENERS, rng, name, 0), cfg.max_test)
        domains[name] = {"train": train, "val": val, "test": test}

    # --- pre-training: the base model complies with EVERY request ----------------------
    # All phrasings, harmful topics answered with placeholder compliance, plus general facts.
    # Nothing of the domains: their facts are new to the model.
    pretrain = harmful(templates, None)
    pretrain = [
        ChatExample(ex.prompt, COMPLIANT_HARMFUL.format(x=topic), None, ex.meta)
        for ex, (_, topic) in zip(pretrain, harmful_topics * len(templates), strict=True)
    ]
    pretrain += benign(templates) + general["train"] + domain_background
    rng.shuffle(pretrain)
    return ToyData(pretrain=pretrain, safety=safety, general=general, domains=domains, topics=topics)
