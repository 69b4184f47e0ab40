"""The cells of a comparison: arms (the table's rows) x seeds x domain orders, and their run ids.

An *arm* is a method run with its own preset (its tuned config, `--config lora=tuned.yaml`) or a
named *variant* (`--variant strict=methods.safeanchor.strict=true`: a method's preset plus
overrides, an ablation row). A *cell* is one pipeline run of an arm on one seed and one domain
order; its run id `<arm>-seed<seed>-<d1>-<d2>-...` names its directory under the comparison's
storage, so a cell that finished (its summary.json exists) is recognised and never run again.

Pure Python (plus the config loader); nothing here imports Ray.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from safeanchor.config import ConfigError, dump_yaml, load_yaml

#: what an arm may be called: it becomes part of run ids (RunConfig.run_id's alphabet)
ARM_NAME = re.compile(r"^[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*$")

#: config sections that decide a cell's result; a finished cell whose saved config differs in
#: one of them from what this comparison would run is a conflict (storage, tracking, threads and
#: cluster only say where and how fast it runs)
RESULT_KEYS = ("method", "methods", "seed", "model", "lora", "data", "train", "eval", "toyworld", "align")


@dataclass
class Arm:
    """One row of the comparison."""

    name: str
    method: str
    config: str  # absolute path of the preset
    overrides: list[str] = field(default_factory=list)  # the arm's own overrides (a variant's)
    variant: bool = False

    def describe(self) -> str:
        sets = ", ".join(f"`{o}`" for o in self.overrides) or "no overrides"
        return f"{self.method}, preset `{Path(self.config).name}`, {sets}"


@dataclass(frozen=True)
class Cell:
    arm: str
    seed: int
    order: tuple[str, ...]

    @property
    def run_id(self) -> str:
        return cell_run_id(self.arm, self.seed, self.order)


def cell_run_id(arm: str, seed: int, order: tuple[str, ...] | list[str]) -> str:
    return f"{arm}-seed{seed}-{'-'.join(order)}"


def arm_of(run_id: str, summary: dict[str, Any]) -> str:
    """The arm of a finished run: its run id without `-seed<s>-<order>`; a run directory named
    otherwise (an earlier compare.py's `<method>-seed<s>`, a run copied in) counts as its method."""
    suffix = cell_run_id("", summary["seed"], summary["order"])  # "-seed<s>-<order>"
    if run_id.endswith(suffix) and len(run_id) > len(suffix):
        return run_id[: -len(suffix)]
    return str(summary["method"])


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces and quotes (an override's value may be a YAML
    list: `eval.harmful_files=[a.jsonl,b.jsonl]`)."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def check_arm_name(name: str, key: str) -> None:
    if not ARM_NAME.match(name) or "-seed" in name:
        raise ConfigError(key, f"{name!r}: an arm name may contain letters, digits, '_', '.' and '-' "
                          "(not '-seed'); it becomes part of the cells' run ids")


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    """`name=key=value,key=value` -> (name, method or None, overrides); `method=NAME` among the
    overrides picks the variant's method (default: safeanchor)."""
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not rest.strip():
        raise ConfigError("variant", f"{text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...], e.g. "
                          "strict=methods.safeanchor.strict=true")
    check_arm_name(name, "variant")
    method, sets = None, []
    for item in split_top(rest):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError("variant", f"{name}: {item!r} is not KEY=VALUE")
        if key.strip() == "method":
            method = value.strip()
        else:
            sets.append(item)
    return name, method, sets


def parse_configs(values: list[str]) -> tuple[str | None, dict[str, str]]:
    """--config values -> (the preset of every method without its own, {method: preset})."""
    base, per = None, {}
    for v in values:
        name, eq, path = v.partition("=")
        if eq and not Path(v).exists():
            if name in per:
                raise ConfigError("config", f"two presets for {name!r}")
            per[name.strip()] = path.strip()
        else:
            if base is not None:
                raise ConfigError("config", f"two presets for every method: {base!r} and {v!r} "
                                  "(a method's own: --config METHOD=PATH)")
            base = v
    return base, per


def preset_method(path: str) -> str | None:
    """The `method:` a preset names (tuned configs and best.yaml do), or None."""
    m = load_yaml(path).get("method")
    return str(m) if m is not None else None


def make_arms(methods: list[str], variants: list[str], base: str, per: dict[str, str], known: set[str],
              variant_default: str = "safeanchor") -> list[Arm]:
    """The arms: one per method (its preset: per[method] else base), then one per variant."""
    unknown = [m for m in [*methods, *per] if m not in known]
    if unknown:
        raise ConfigError("methods", f"unknown {sorted(set(unknown))} (known: {', '.join(sorted(known))})")
    extra = [m for m in per if m not in methods]
    if extra:
        raise ConfigError("config", f"a preset for {extra}, which --methods does not list")
    if len(set(methods)) != len(methods):
        raise ConfigError("methods", f"a method is listed twice: {methods}")
    arms = []
    for m in methods:
        path = str(Path(per.get(m, base)).resolve())
        named = preset_method(path)
        if m in per and named is not None and named != m:
            raise ConfigError("config", f"{per[m]} is a preset for method {named!r}, given for {m!r}")
        arms.append(Arm(m, m, path))
    for text in variants:
        name, method, sets = parse_variant(text)
        method = method or variant_default
        if method not in known:
            raise ConfigError("variant", f"{name}: unknown method {method!r}")
        if name in known or name in {a.name for a in arms}:
            raise ConfigError("variant", f"{name!r} is already a method or an arm: name variants apart")
        arms.append(Arm(name, method, str(Path(per.get(method, base)).resolve()), sets, variant=True))
    return arms


def with_length(order: tuple[str, ...], t: int, domains: list[str]) -> tuple[str, ...]:
    """`order` cut to its first t domains, or extended with the preset's other domains (in the
    order data.domains lists them) up to t."""
    if t < 1:
        raise ConfigError("T", f"must be >= 1, got {t}")
    if t <= len(order):
        return order[:t]
    rest = [d for d in domains if d not in order]
    if len(order) + len(rest) < t:
        raise ConfigError("T", f"T = {t} needs {t} domains; data.domains has {len(domains)} ({', '.join(domains)})")
    return (*order, *rest[: t - len(order)])


def expand_orders(spec: str, preset: list[str], domains: list[str], lengths: list[int] | None) -> list[tuple[str, ...]]:
    """--orders (`preset`, `all` = every permutation of the preset's order, or explicit orders
    `a,b,c;b,c,a`) x --T (each order cut / extended to T domains) -> distinct orders, in order."""
    spec = spec.strip()
    if spec == "preset":
        base = [tuple(preset)]
    elif spec == "all":
        base = list(itertools.permutations(preset))
    else:
        base = [tuple(d.strip() for d in o.split(",") if d.strip()) for o in spec.split(";") if o.strip()]
    if not base:
        raise ConfigError("orders", f"no order in {spec!r}")
    for o in base:
        bad = [d for d in o if d not in domains]
        if bad:
            raise ConfigError("orders", f"unknown domain {bad[0]!r} in {','.join(o)} (known: {', '.join(domains)})")
        if len(set(o)) != len(o):
            raise ConfigError("orders", f"{','.join(o)} lists a domain twice")
    out = [with_length(o, t, domains) for t in lengths for o in base] if lengths else base
    return list(dict.fromkeys(out))


def signature(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The parts of a resolved config that decide a cell's result (see RESULT_KEYS)."""
    sig = {k: cfg_dict.get(k) for k in RESULT_KEYS}
    if isinstance(sig.get("toyworld"), dict):
        sig["toyworld"] = {k: v for k, v in sig["toyworld"].items() if k != "cache_dir"}
    return sig


def config_signature(cfg) -> dict[str, Any]:
    return signature(yaml.safe_load(dump_yaml(cfg)))


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two config trees differ (None: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
            if d is not None:
                return d
        return None
    return None if a == b else (prefix or "<root>")
