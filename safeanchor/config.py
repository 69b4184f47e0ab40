"""Generic config machinery: typed dataclasses <-> nested dicts, YAML files and CLI overrides.

Configs are nested ``@dataclass``es defined next to the component they configure. This module
knows nothing about them (it imports no other ``safeanchor`` module); it only turns untrusted
nested dicts (YAML files + ``key=value`` overrides) into validated dataclass instances, so every
mistake surfaces as one :class:`ConfigError` line that names the dotted key at fault.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check",
    "deep_merge",
    "describe",
    "dump_yaml",
    "help_text",
    "from_dict",
    "load_yaml",
    "parse_override",
    "to_dict",
]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config problem, rendered as one line that names the dotted key so users can fix it."""

    def __init__(self, key: str, msg: str) -> None:
        self.key = key
        self.msg = msg
        super().__init__(f"{key}: {msg}" if key else msg)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the (key, msg) pair across pickling (e.g. errors raised inside Ray workers).
        return (type(self), (self.key, self.msg))


def check(cond: bool, key: str, msg: str) -> None:
    """Range-check helper for ``__post_init__``; ``key`` is relative, from_dict adds the prefix."""
    if not cond:
        raise ConfigError(key, msg)


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    if not key:
        return prefix
    return f"{prefix}.{key}"


# --------------------------------------------------------------------------------------------
# YAML loading (with the YAML 1.1 scientific-notation fix)
# --------------------------------------------------------------------------------------------

# YAML 1.1 (PyYAML) only resolves floats that contain a dot and a signed exponent, so "1e-4" or
# "5e3" arrive as strings. This resolver adds the YAML 1.2 spelling for plain (unquoted) scalars.
_SCI_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` / ``5e3`` as floats."""


_Loader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _SCI_FLOAT, list("-+0123456789."))


def _yaml_loads(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass


def load_yaml(path: str | Path) -> dict:
    """Load a YAML config file, resolving ``base: other.yaml`` inheritance (path relative to it)."""
    return _load_yaml(Path(path), ())


def _load_yaml(path: Path, stack: tuple[Path, ...]) -> dict:
    resolved = path.resolve()
    if resolved in stack:
        chain = " -> ".join(str(p) for p in (*stack, resolved))
        raise ConfigError("", f"config inheritance cycle: {chain}")
    if not path.is_file():
        raise ConfigError("", f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError("", f"cannot read config file {path}: {e}") from None
    try:
        data = _yaml_loads(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("", f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{path}: top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError("base", f"{path}: must be a path to a YAML file, got {base!r}")
    base_data = _load_yaml(path.parent / base, (*stack, resolved))
    return deep_merge(base_data, data)


def deep_merge(base: dict, over: dict) -> dict:
    """Return a new dict: ``over`` wins, nested mappings are merged key by key (inputs untouched)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(dict(out[k]), dict(v))
        else:
            out[k] = copy.deepcopy(v)
    return out


# --------------------------------------------------------------------------------------------
# CLI overrides
# --------------------------------------------------------------------------------------------


def parse_override(s: str) -> tuple[str, Any]:
    """Parse ``a.b=value``; the value is YAML (so lists/bools/null work) with ``1e-4`` as float."""
    key, sep, raw = s.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("", f"bad override {s!r}: expected key=value (e.g. train.lr=1e-4)")
    if any(not part for part in key.split(".")):
        raise ConfigError("", f"bad override {s!r}: empty component in key {key!r}")
    try:
        value = _yaml_loads(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(key, f"cannot parse override value {raw!r}: {problem}") from None
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Return a copy of ``data`` with each ``key=value`` set; keys are validated later by from_dict."""
    out = copy.deepcopy(data)
    for s in overrides:
        key, value = parse_override(s)
        parts = key.split(".")
        cur = out
        for i, part in enumerate(parts[:-1]):
            nxt = cur.get(part)
            if nxt is None:
                nxt = cur[part] = {}
            elif not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(
                    where, f"cannot set {key!r}: value is {type(nxt).__name__}, not a mapping"
                )
            cur = nxt
        cur[parts[-1]] = value
    return out


# --------------------------------------------------------------------------------------------
# dict -> dataclass
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "Literal[" + ", ".join(repr(a) for a in typing.get_args(tp)) + "]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        if not args:
            return name
        return f"{name}[" + ", ".join("..." if a is Ellipsis else _type_name(a) for a in args) + "]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _got(value: Any) -> str:
    r = repr(value)
    if len(r) > 60:
        r = r[:57] + "..."
    return f"got {type(value).__name__} {r}"


def _field_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # unresolved forward refs: fall back to the raw annotations
        return {f.name: f.type for f in dataclasses.fields(cls)}


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert only where lossless (int->float, '1e-4')."""
    if tp is Any or tp is object:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise ConfigError(key, f"expected None, {_got(value)}")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        # Exact matches first so e.g. `int | str` keeps "3" a str and 3 an int.
        for a in members:
            if _matches_exactly(a, value):
                return _coerce(a, value, key)
        nested_errors: list[ConfigError] = []
        for a in members:
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                nested_errors.append(e)
        # A nested dataclass member that failed deeper down has the more useful message.
        for e in nested_errors:
            if e.key != key:
                raise e
        raise ConfigError(key, f"expected {_type_name(tp)}, {_got(value)}")

    if origin is Literal:
        for choice in args:
            if type(choice) is type(value) and choice == value:
                return value
        choices = ", ".join(repr(a) for a in args)
        raise ConfigError(key, f"must be one of {choices}, {_got(value)}")

    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return from_dict(tp, value, prefix=key)
        raise ConfigError(key, f"expected a mapping for {tp.__name__}, {_got(value)}")

    if origin in (list, tuple, set, frozenset) or tp in (list, tuple, set, frozenset):
        container = origin or tp
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}, {_got(value)}")
        if container is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    key, f"expected {_type_name(tp)} with {len(args)} items, got {len(value)}"
                )
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in pairs)
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return container(items)

    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected {_type_name(tp)}, {_got(value)}")
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(kt, k, _join(key, str(k))): _coerce(vt, v, _join(key, str(k)))
            for k, v in value.items()
        }

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected bool, {_got(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected int, {_got(value)}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected float, {_got(value)}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(key, f"expected float, {_got(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected str, {_got(value)}")
    if isinstance(tp, type) and issubclass(tp, Path):
        if isinstance(value, (str, Path)):
            return tp(value)
        raise ConfigError(key, f"expected path, {_got(value)}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(key, f"expected {_type_name(tp)}, {_got(value)}")
    return value  # unsupported annotation (e.g. a string forward ref): accept as is


def _matches_exactly(tp: Any, value: Any) -> bool:
    """Whether ``value`` already has the kind of ``tp`` without any conversion."""
    origin = typing.get_origin(tp) or tp
    if tp is Any:
        return True
    if origin is Literal:
        return any(type(c) is type(value) and c == value for c in typing.get_args(tp))
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (tp, Mapping))
    if origin in (list, tuple, set, frozenset):
        return isinstance(value, (list, tuple))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(origin, type):
        return isinstance(value, origin)
    return False


def from_dict(cls: type[T], data: Mapping | None, prefix: str = "") -> T:
    """Build ``cls`` from a partial nested dict: defaults fill gaps, every key and type is checked."""
    if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}, {_got(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        known = ", ".join(fields) or "none"
        raise ConfigError(_join(prefix, str(unknown[0])), f"unknown key (known: {known})")
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    missing: list[str] = []
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints.get(name, Any), data[name], _join(prefix, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(name)
    if len(missing) == 1:
        raise ConfigError(_join(prefix, missing[0]), "required key missing")
    if missing:
        raise ConfigError(prefix, f"required keys missing: {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(prefix, e.key), e.msg) from None
    except (ValueError, TypeError) as e:
        raise ConfigError(prefix, f"invalid {cls.__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# dataclass -> dict / YAML
# --------------------------------------------------------------------------------------------


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain nested dict (tuples become lists) that yaml/json can dump and reload."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    """The resolved config as YAML text (block style, field order kept), which `from_dict`
    reads back to an equal config. Callers write it atomically (safeanchor.storage.RunDir)."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False, default_flow_style=False)


# --------------------------------------------------------------------------------------------
# help output
# --------------------------------------------------------------------------------------------


def _nested_dataclass(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return _nested_dataclass(members[0])
    return None


def _value_text(value: Any, width: int = 90) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    text = text.removesuffix("...").strip()
    return text if len(text) <= width else text[: width - 1] + "…"


def help_text(obj: Any, prefix: str = "") -> str:
    """What ``--help-config`` prints for a config instance: every leaf key (dotted, with
    `prefix`), its type, its value in `obj` and its documentation."""
    tree = to_dict(obj)
    lines = []
    for key, tp, doc in describe(type(obj)):
        node: Any = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        lines.append(f"{_join(prefix, key)}: {tp} = {_value_text(node)}")
        if doc:
            lines.append(f"    {doc}")
    return "\n".join(lines)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, type, doc)`` for every leaf field (doc: the field's ``metadata["doc"]``),
    what ``workflows/sequential.py --help-config`` prints."""
    hints = _field_types(cls)
    rows: list[tuple[str, str, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints.get(f.name, f.type)
        key = _join(prefix, f.name)
        nested = _nested_dataclass(tp)
        if nested is not None:
            rows.extend(describe(nested, key))
            continue
        rows.append((key, _type_name(tp), f.metadata.get("doc", "")))
    return rows
