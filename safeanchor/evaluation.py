"""Batched greedy generation and the project's metrics (names as in ALGORITHMS.md §5).

- safety:       refusal rate on the final harmful evaluation set (never trained on / monitored;
                toy world: harmful topics the methods never see)
- safety_seen_topics: the same on the methods' own harmful topics / source (when configured)
- over_refusal: refusal rate on benign look-alikes ("how do I kill a stuck process")
- helpful:      benign requests answered correctly (answer-key match)
- general:      general-knowledge questions answered correctly (the MMLU role)
- domain/<d>:   accuracy on each domain's held-out questions (answer-key match)
- <file stem>:  refusal rate on every extra harmful file, answer/refusal on benign files
- judge_parse_errors: how many judged responses got a judge output that did not parse

"Refusal rate" above is the share of the judge's `success` verdicts, which is a refusal for the
keyword / hf-classifier / wildguard judges, "judged safe" for llamaguard and "not an instance of
the behaviour" for harmbench (safeanchor.judges). A parse error (success None) is neither: it is
left out of the rate's denominator and counted in `judge_parse_errors` (the whole step) and in
the per-example record (`refusal: null`, `judge_error`); a set whose every verdict is a parse
error has a NaN rate, which summaries flag.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from safeanchor.config import ConfigError, check
from safeanchor.data import ChatExample, collate_prompts, encode_prompt, load_examples
from safeanchor.judges import Judge, JudgeConfig, Verdict


@dataclass
class EvalConfig:
    """How responses are generated and judged."""

    max_new_tokens: int = field(default=24, metadata={"doc": "greedy tokens per response (refusals show in the first few)"})
    batch_size: int = field(default=64, metadata={"doc": "prompts per generation batch"})
    judge: JudgeConfig = field(default_factory=JudgeConfig, metadata={"doc": "refusal judge"})
    harmful_files: list[str] = field(default_factory=list, metadata={"doc": "extra harmful prompt files (JSONL/CSV/Parquet with a `prompt` field); refusal rate reported under each file's stem"})
    benign_files: list[str] = field(default_factory=list, metadata={"doc": "extra benign prompt files; refusal rate (over-refusal) under each stem, and accuracy where an `answer` field exists"})
    split: str = field(default="test", metadata={"doc": "which evaluation sets are scored: test (reported results) or val (tuning: data.val.*, data.domains.<d>.val)"})

    def __post_init__(self) -> None:
        check(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.split in ("test", "val"), "split", f"must be 'test' or 'val', got {self.split!r}")


@dataclass
class EvalSuite:
    """The prompts scored after every step."""

    harmful: list[ChatExample]
    benign: list[ChatExample]  # meta kind 'lookalike' counts toward over_refusal
    general: list[ChatExample]
    domains: dict[str, list[ChatExample]]
    extra_harmful: dict[str, list[ChatExample]] = field(default_factory=dict)
    extra_benign: dict[str, list[ChatExample]] = field(default_factory=dict)
    harmful_seen: list[ChatExample] = field(default_factory=list)  # the methods' topics / source


def load_extra_files(cfg: EvalConfig) -> tuple[dict[str, list[ChatExample]], dict[str, list[ChatExample]]]:
    """Read `eval.harmful_files` / `eval.benign_files` (errors name the file and line)."""

    def read(files: list[str], key: str) -> dict[str, list[ChatExample]]:
        out: dict[str, list[ChatExample]] = {}
        for f in files:
            stem = Path(f).stem
            if stem in out or stem in taken:
                raise ConfigError(key, f"two evaluation files share the name {stem!r} ({f}); rename one")
            out[stem] = load_examples(f, require_response=False)
        taken.update(out)
        return out

    taken: set[str] = set()
    return read(cfg.harmful_files, "eval.harmful_files"), read(cfg.benign_files, "eval.benign_files")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy responses, batched with left padding; only the generated text is returned."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    # Sort by length so batches pad little; restore the order at the end.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        batch = collate_prompts([encoded[i] for i in idx], pad)
        gen = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        new = gen[:, batch["input_ids"].shape[1] :]
        for i, row in zip(idx, new, strict=True):
            out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def success_rate(flags: list[bool | None]) -> float:
    """Share of True among the parsed verdicts; parse errors (None) are left out of the
    denominator; NaN when nothing parsed."""
    parsed = [f for f in flags if f is not None]
    return sum(parsed) / len(parsed) if parsed else float("nan")


def refusal_rate(judge: Judge, prompts: list[str], responses: list[str]) -> float:
    """The judge's success rate (a refusal rate for refusal judges) over the parsed verdicts."""
    if not prompts:
        return float("nan")
    return success_rate([v.success for v in judge.verdicts(prompts, responses)])


def _judge_record(v: Verdict) -> dict:
    """What a per-example record keeps of a verdict beyond its flag."""
    rec: dict = {}
    if v.raw is not None:
        rec["judge"] = {"output": v.raw, **v.labels}
    if v.error is not None:
        rec["judge_error"] = v.error
    return rec


def accuracy(examples: list[ChatExample], responses: list[str]) -> float:
    scored = [(ex, r) for ex, r in zip(examples, responses, strict=True) if ex.answer]
    if not scored:
        return float("nan")
    return sum(ex.is_correct(r) for ex, r in scored) / len(scored)


def evaluate(model, tokenizer, suite: EvalSuite, judge: Judge, cfg: EvalConfig,
             records: list[dict] | None = None) -> dict[str, float]:
    """All metrics of one step, from ONE generation pass over every prompt.

    records: if given, one dict per evaluated example is appended — set name, prompt,
    generation, the judge's verdict (`refusal`: its success flag, None on a parse error; for a
    generative judge also `judge`: its raw output and parsed fields, and `judge_error`) and, for
    keyed examples, `correct` — so a score can be read back example by example."""
    sets: dict[str, list[ChatExample]] = {
        "harmful": suite.harmful, "harmful_seen": suite.harmful_seen, "benign": suite.benign,
        "general": suite.general,
        **{f"domain/{d}": xs for d, xs in suite.domains.items()},
        **{f"xh/{k}": xs for k, xs in suite.extra_harmful.items()},
        **{f"xb/{k}": xs for k, xs in suite.extra_benign.items()},
    }
    flat = [ex.prompt for xs in sets.values() for ex in xs]
    responses = generate(model, tokenizer, flat, cfg.max_new_tokens, cfg.batch_size)
    by_set: dict[str, list[str]] = {}
    i = 0
    for name, xs in sets.items():
        by_set[name] = responses[i : i + len(xs)]
        i += len(xs)

    # One judge call over the safety sets (domain / general answers are scored by their keys:
    # a classifier judge at 7B need not read them); sets read their verdicts back by position.
    judged = [n for n in sets if n in ("harmful", "harmful_seen", "benign") or n.startswith(("xh/", "xb/"))]
    j_prompts = [ex.prompt for n in judged for ex in sets[n]]
    j_responses = [r for n in judged for r in by_set[n]]
    verdicts = judge.verdicts(j_prompts, j_responses) if j_prompts else []
    if len(verdicts) != len(j_prompts):
        raise RuntimeError(f"judge {judge.name} returned {len(verdicts)} verdicts for {len(j_prompts)} pairs")
    by_name: dict[str, list[Verdict]] = {}
    flags: dict[str, list[bool | None]] = {}
    i = 0
    for name in judged:
        by_name[name] = verdicts[i : i + len(sets[name])]
        flags[name] = [None if v.success is None else bool(v.success) for v in by_name[name]]
        i += len(sets[name])
    if records is not None:
        for name, xs in sets.items():
            for j, (ex, gen) in enumerate(zip(xs, by_set[name], strict=True)):
                rec: dict = {"set": name, "prompt": ex.prompt, "generation": gen}
                if name in flags:
                    rec["refusal"] = flags[name][j]
                    rec.update(_judge_record(by_name[name][j]))
                if ex.answer:
                    rec.update(answer=ex.answer, correct=ex.is_correct(gen))
                if ex.meta.get("topic"):
                    rec["topic"] = ex.meta["topic"]
                records.append(rec)

    def rate(name: str, keep=lambda ex: True) -> float:
        return success_rate([f for ex, f in zip(sets[name], flags[name], strict=True) if keep(ex)])

    m: dict[str, float] = {
        "safety": rate("harmful"),
        "over_refusal": rate("benign", lambda ex: ex.meta.get("kind") == "lookalike"),
        "helpful": accuracy(suite.benign, by_set["benign"]),
        "general": accuracy(suite.general, by_set["general"]),
        "judge_parse_errors": float(sum(v.success is None for v in verdicts)),
    }
    if suite.harmful_seen:
        m["safety_seen_topics"] = rate("harmful_seen")
    for d in suite.domains:
        m[f"domain/{d}"] = accuracy(suite.domains[d], by_set[f"domain/{d}"])
    for k in suite.extra_harmful:
        m[f"extra/{k}"] = rate(f"xh/{k}")
    for k, xs in suite.extra_benign.items():
        m[f"extra/{k}"] = rate(f"xb/{k}")
        if any(e.answer for e in xs):
            m[f"extra/{k}_accuracy"] = accuracy(xs, by_set[f"xb/{k}"])
    return m


def probe_safety(model, tokenizer, probe: list[ChatExample], judge: Judge, cfg: EvalConfig) -> float:
    """Refusal rate (the judge's success rate) on the monitoring probe set (CSM's s_t). Parse
    errors are left out of the rate; if no verdict parses, the gate would compare NaN and
    silently never fire, so that is an error."""
    prompts = [e.prompt for e in probe]
    s_t = refusal_rate(judge, prompts, generate(model, tokenizer, prompts, cfg.max_new_tokens, cfg.batch_size))
    if prompts and s_t != s_t:
        raise RuntimeError(f"judge {judge.name}: none of the {len(prompts)} probe verdicts parsed, so the "
                           "safety monitor has no s_t (see the judge's warning for an example output)")
    return s_t
