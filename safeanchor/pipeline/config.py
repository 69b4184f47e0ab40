"""The run's resolved configuration: the components' own configs nested into one tree.

Loaded from a YAML preset (workflows/configs/*.yaml, `base:` inheritance) plus dotted
`--set key=value` overrides; unknown keys, wrong types and out-of-range values are rejected
with an error naming the dotted key (see `safeanchor.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safeanchor.alignment import AlignConfig
from safeanchor.benchmarks import BENCH_PREFIX, HubDataset
from safeanchor.config import ConfigError, apply_overrides, check, from_dict, load_yaml
from safeanchor.distributed.config import ClusterConfig
from safeanchor.evaluation import EvalConfig
from safeanchor.models import LoraConfig, ModelConfig
from safeanchor.toyworld.build import ToyWorldConfig
from safeanchor.tracking import TrackingConfig
from safeanchor.train.loop import TrainConfig


@dataclass
class DomainSource:
    """Where one domain's data comes from (toyworld:<domain>, a local file, or hf:<id>)."""

    train: str = field(metadata={"doc": "training examples (prompt, response)"})
    test: str = field(metadata={"doc": "held-out examples with an `answer` key (domain score, test split)"})
    val: str | None = field(default=None, metadata={"doc": "held-out examples with an `answer` key for tuning (eval.split=val), disjoint from test"})


def _rows_of(src: HubDataset) -> tuple:
    """What identifies the rows a benchmark source reads, before its partition."""
    return (src.kind, src.resolved_id(), src.resolved_config(), src.resolved_split(), src.revision,
            tuple(src.data_files))


def _toy_domains() -> dict[str, DomainSource]:
    names = ("medical", "legal", "code", "finance", "chemistry")
    return {n: DomainSource(f"toyworld:{n}/train", f"toyworld:{n}/test", f"toyworld:{n}/val") for n in names}


@dataclass
class ValSources:
    """The validation split (what tuning reads, `eval.split: val`): disjoint from the test
    sets (data.eval_harmful, data.eval_benign, data.general, data.domains.<d>.test)."""

    eval_harmful: str | None = field(default="toyworld:safety/val_harmful", metadata={"doc": "harmful prompts for tuning (toy world: held-out validation topics)"})
    eval_benign: str | None = field(default="toyworld:safety/val_benign", metadata={"doc": "benign prompts with answers for tuning; kind=lookalike rows count toward over_refusal"})
    general: str | None = field(default="toyworld:general/val", metadata={"doc": "general-knowledge questions for tuning"})


@dataclass
class BenchmarkSet:
    """An extra evaluation set scored every step as bench/<name> (TruthfulQA, BBQ, MMLU, ...)."""

    test: str = field(metadata={"doc": "the set scored on the test split (a data reference, usually bench:<name>)"})
    val: str | None = field(default=None, metadata={"doc": "the set scored on the validation split (eval.split=val), disjoint from test"})


@dataclass
class DataConfig:
    """Domains and safety / evaluation sets. `toyworld:` sources come from the embedded world."""

    domains: dict[str, DomainSource] = field(default_factory=_toy_domains, metadata={"doc": "domain name -> sources"})
    order: list[str] = field(default_factory=lambda: ["medical", "legal", "code"], metadata={"doc": "domains in training order"})
    safety_calib: str = field(default="toyworld:safety/calib", metadata={"doc": "safe responses (harmful->refusal, benign->answer): SSI, anchor, replay"})
    safety_probe: str = field(default="toyworld:safety/probe", metadata={"doc": "harmful prompts monitored after each domain (CSM)"})
    eval_harmful: str = field(default="toyworld:safety/test_harmful", metadata={"doc": "final harmful evaluation prompts, test split (safety): topics / sources the methods never see"})
    eval_harmful_seen: str | None = field(default="toyworld:safety/seen_harmful", metadata={"doc": "harmful prompts on the methods' own topics / source, in the evaluation phrasings (safety_seen_topics; null: not measured)"})
    eval_benign: str = field(default="toyworld:safety/test_benign", metadata={"doc": "benign prompts with answers, test split; meta kind=lookalike counts toward over_refusal"})
    general: str = field(default="toyworld:general/test", metadata={"doc": "general-knowledge questions with answers (the MMLU role), test split"})
    val: ValSources = field(default_factory=ValSources, metadata={"doc": "the validation split's sets (eval.split=val)"})
    max_train_examples: int | None = field(default=None, metadata={"doc": "cap on each domain's training examples (deterministic subsample)"})
    benchmarks: dict[str, HubDataset] = field(default_factory=dict, metadata={"doc": "named hub-dataset sources, used anywhere a data reference goes as bench:<name>; each entry: kind (beavertails, harmbench, medqa, legalbench, codealpaca, humaneval, truthfulqa, bbq, mmlu), id, config, split, revision, data_files (offline, same columns), fields (logical field -> column), max_examples, part (all / val / test), val_fraction, seed, instruction / input_label / choices (legalbench), refusal (beavertails); see safeanchor/benchmarks.py"})
    eval_benchmarks: dict[str, BenchmarkSet] = field(default_factory=dict, metadata={"doc": "extra evaluation sets reported as bench/<name> (e.g. truthfulqa, bbq, mmlu, humaneval)"})

    def __post_init__(self) -> None:
        check(len(self.order) > 0, "order", "must name at least one domain")
        for d in self.order:
            check(d in self.domains, "order", f"unknown domain {d!r} (known: {', '.join(self.domains)})")
        check(len(set(self.order)) == len(self.order), "order", "lists a domain twice")
        check(self.max_train_examples is None or self.max_train_examples >= 1, "max_train_examples", "must be >= 1")
        # A set left at its toy-world default beside a test set of the user's own would score the
        # toy world's prompts against the user's model: refuse the mix, name the key to set.
        toy = lambda ref: ref is not None and ref.startswith("toyworld:")  # noqa: E731
        pairs = [("val.eval_harmful", self.val.eval_harmful, self.eval_harmful),
                 ("val.eval_benign", self.val.eval_benign, self.eval_benign),
                 ("val.general", self.val.general, self.general),
                 ("eval_harmful_seen", self.eval_harmful_seen, self.eval_harmful)]
        pairs += [(f"domains.{d}.val", s.val, s.test) for d, s in self.domains.items()]
        for key, ref, test in pairs:
            check(not (toy(ref) and not toy(test)), key,
                  f"is the toy world's {ref!r} while its test counterpart is {test!r}: set it to your own "
                  "data (or null)")
        for key, ref in self.references():
            if ref is not None and ref.startswith(BENCH_PREFIX):
                check(ref[len(BENCH_PREFIX):] in self.benchmarks, key,
                      f"{ref!r} names no data.benchmarks entry (known: {', '.join(self.benchmarks) or 'none'})")
        # Training, validation and test never share a row: two parts of one hub split must be
        # different parts (train / val / test) under the same seed and fractions (another seed
        # would draw overlapping parts).
        pairs = [(k, v, t) for k, v, t in pairs if k != "eval_harmful_seen"]
        pairs += [(f"domains.{d}.train", s.train, s.test) for d, s in self.domains.items()]
        pairs += [(f"domains.{d}.train", s.train, s.val) for d, s in self.domains.items()]
        pairs += [(f"eval_benchmarks.{b}.val", s.val, s.test) for b, s in self.eval_benchmarks.items()]
        for key, ref, other in pairs:
            if ref is None or other is None:
                continue
            check(ref != other, key, f"is the same set as {other!r}")
            a, b = (self.benchmarks.get(r[len(BENCH_PREFIX):]) if r.startswith(BENCH_PREFIX) else None
                    for r in (ref, other))
            if a is not None and b is not None and _rows_of(a) == _rows_of(b):
                check("all" not in (a.part, b.part) and a.part != b.part
                      and (a.seed, a.train_fraction, a.val_fraction) == (b.seed, b.train_fraction, b.val_fraction), key,
                      f"{ref!r} and {other!r} read the same split ({b.describe()}): use different parts "
                      "(train / val / test) with the same seed and fractions, so they cannot overlap")

    def references(self) -> list[tuple[str, str | None]]:
        """Every data reference of this config: (key relative to `data`, reference)."""
        refs = [("safety_calib", self.safety_calib), ("safety_probe", self.safety_probe),
                ("eval_harmful", self.eval_harmful), ("eval_harmful_seen", self.eval_harmful_seen),
                ("eval_benign", self.eval_benign), ("general", self.general),
                ("val.eval_harmful", self.val.eval_harmful), ("val.eval_benign", self.val.eval_benign),
                ("val.general", self.val.general)]
        for d, s in self.domains.items():
            refs += [(f"domains.{d}.train", s.train), (f"domains.{d}.test", s.test), (f"domains.{d}.val", s.val)]
        for b, s in self.eval_benchmarks.items():
            refs += [(f"eval_benchmarks.{b}.test", s.test), (f"eval_benchmarks.{b}.val", s.val)]
        return refs

    def benchmark_kind(self, ref: str | None) -> str | None:
        """The benchmark kind behind a bench:<name> reference (None for files and the toy world)."""
        if ref and ref.startswith(BENCH_PREFIX) and ref[len(BENCH_PREFIX):] in self.benchmarks:
            return self.benchmarks[ref[len(BENCH_PREFIX):]].kind
        return None

    def eval_sources(self, split: str) -> dict[str, tuple[str, str]]:
        """The evaluated sets of a split: role -> (dotted config key, reference). Roles:
        harmful, harmful_seen (optional), benign, general, domain/<d>. A validation source that
        is not configured is an error naming its key."""
        if split == "test":
            out = {"harmful": ("data.eval_harmful", self.eval_harmful),
                   "benign": ("data.eval_benign", self.eval_benign),
                   "general": ("data.general", self.general),
                   **{f"domain/{d}": (f"data.domains.{d}.test", self.domains[d].test) for d in self.order},
                   **{f"bench/{b}": (f"data.eval_benchmarks.{b}.test", s.test) for b, s in self.eval_benchmarks.items()}}
        else:
            out = {"harmful": ("data.val.eval_harmful", self.val.eval_harmful),
                   "benign": ("data.val.eval_benign", self.val.eval_benign),
                   "general": ("data.val.general", self.val.general),
                   **{f"domain/{d}": (f"data.domains.{d}.val", self.domains[d].val) for d in self.order},
                   **{f"bench/{b}": (f"data.eval_benchmarks.{b}.val", s.val) for b, s in self.eval_benchmarks.items()}}
        for key, ref in out.values():
            check(ref is not None, key, f"eval.split={split} needs this set (null here)")
        if self.eval_harmful_seen is not None:
            out["harmful_seen"] = ("data.eval_harmful_seen", self.eval_harmful_seen)
        return out


def _domain_train() -> TrainConfig:
    return TrainConfig(lr=1e-3, epochs=1.0, batch_size=32, max_length=64, log_every=25)


@dataclass
class RunConfig:
    """Everything one pipeline run needs."""

    method: str = field(default="lora", metadata={"doc": "continual-adaptation method (registered name)"})
    methods: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"doc": "per-method options: methods.<name>.<option>"})
    seed: int = field(default=0, metadata={"doc": "seed of LoRA init and data order (the toy world has its own: toyworld.seed)"})
    run_id: str | None = field(default=None, metadata={"doc": "run directory name (default: <method>-seed<seed>-<order>)"})
    storage: str = field(default="runs", metadata={"doc": "where run directories go: a local path or a pyarrow.fs URI (file:///abs, s3://bucket/prefix, gs://..., hdfs://...)"})
    threads: int | None = field(default=None, metadata={"doc": "torch CPU threads (default: torch's choice)"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "model to adapt"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"doc": "the persistent LoRA adapter"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "domains and safety sets"})
    train: TrainConfig = field(default_factory=_domain_train, metadata={"doc": "optimisation per domain"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "generation and judging"})
    toyworld: ToyWorldConfig = field(default_factory=ToyWorldConfig, metadata={"doc": "the embedded toy world (used by toyworld: references)"})
    align: AlignConfig = field(default_factory=AlignConfig, metadata={"doc": "safety-align model.name first (a model that is not aligned yet); the result is the step-0 model, cached"})
    tracking: TrackingConfig = field(default_factory=TrackingConfig, metadata={"doc": "MLflow tracking (parent run + one child run per domain)"})
    cluster: ClusterConfig = field(default_factory=ClusterConfig, metadata={"doc": "where steps run: Ray, Train workers, DeepSpeed"})

    def __post_init__(self) -> None:
        check(self.threads is None or self.threads >= 1, "threads", "must be >= 1")
        try:
            self.data.eval_sources(self.eval.split)
        except ConfigError as e:  # the missing set is named; the switch that asked for it too
            raise ConfigError(e.key, f"{e.msg} (asked for by eval.split={self.eval.split})") from None
        comp = self.eval.composite
        if comp.enabled:  # the composite's parts are benchmarks of the right kind
            for key, name, kind in (("eval.composite.truthfulqa", comp.truthfulqa, "truthfulqa"),
                                    ("eval.composite.bbq", comp.bbq, "bbq")):
                check(name in self.data.eval_benchmarks, key,
                      f"{name!r} is not a data.eval_benchmarks set (known: {', '.join(self.data.eval_benchmarks) or 'none'})")
                found = self.data.benchmark_kind(self.data.eval_benchmarks[name].test)
                check(found in (None, kind), key, f"data.eval_benchmarks.{name} is a {found} benchmark, not {kind}")
        if self.run_id is not None:
            check(self.run_id.replace("-", "").replace("_", "").replace(".", "").isalnum(), "run_id",
                  "may contain only letters, digits, '-', '_' and '.'")

    def resolved_run_id(self) -> str:
        return self.run_id or f"{self.method}-seed{self.seed}-{'-'.join(self.data.order)}"

    def uses_toyworld(self) -> bool:
        refs = [self.model.name, self.model.base or "", self.model.tokenizer or "",
                self.data.safety_calib, self.data.safety_probe]
        refs += [ref for _, ref in self.data.eval_sources(self.eval.split).values()]
        refs += [self.data.domains[d].train for d in self.data.order]
        return any(r.startswith("toyworld:") for r in refs)


def load_run_config(path: str | Path | dict | None, overrides: list[str] = (), **top: Any) -> RunConfig:
    """Preset YAML (or defaults; or an already-parsed dict such as a run's saved config.yaml)
    + `--set` overrides + explicit top-level values -> RunConfig."""
    if isinstance(path, dict):
        data = dict(path)
    else:
        data = load_yaml(path) if path else {}
    data.pop("base", None)
    data = apply_overrides(data, list(overrides))
    for k, v in top.items():
        if v is not None:
            _set(data, k, v)
    cfg = from_dict(RunConfig, data)
    from safeanchor.methods import METHODS, build_method

    if cfg.method not in METHODS:
        raise ConfigError("method", f"unknown method {cfg.method!r} (known: {', '.join(sorted(METHODS))})")
    for name, opts in cfg.methods.items():
        if name not in METHODS:
            raise ConfigError(f"methods.{name}", f"unknown method (known: {', '.join(sorted(METHODS))})")
        build_method(name, opts)  # validates options now, before any work
    return cfg


def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        data = data.setdefault(k, {})
    data[keys[-1]] = value
