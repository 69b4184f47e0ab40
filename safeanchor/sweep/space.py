"""Search spaces in YAML (workflows/configs/sweeps/<method>.yaml) -> Ray Tune domains.

    method: safeanchor          # the method these options belong to
    params:                     # dotted RunConfig keys (as `--set` takes them) -> distribution
      methods.safeanchor.rho:   {type: uniform, low: 0.8, high: 0.99}
      methods.safeanchor.gamma: {type: loguniform, low: 0.1, high: 5.0}
      methods.safeanchor.k_max: {type: int, low: 4, high: 32}          # inclusive
      methods.safeanchor.k_fixed: {type: choice, values: [null, 2, 4]}

Every sampled point becomes `--set key=value` overrides of the trial's run config, so a key
that the run config does not know, or a value it refuses, fails before the sweep starts
(`check_space` builds the config at the corners of the space).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from safeanchor.config import ConfigError, load_yaml

KINDS = ("uniform", "loguniform", "int", "choice")


def load_space(path: str | Path) -> tuple[str, dict[str, dict[str, Any]]]:
    """(method, {dotted key: spec}) from a sweep YAML, each spec checked."""
    data = load_yaml(path)
    unknown = set(data) - {"method", "params"}
    if unknown:
        raise ConfigError("", f"{path}: unknown top-level keys {sorted(unknown)} (expected method, params)")
    method, params = data.get("method"), data.get("params")
    if not isinstance(method, str) or not method:
        raise ConfigError("method", f"{path}: must name the method")
    if not isinstance(params, dict) or not params:
        raise ConfigError("params", f"{path}: must map dotted config keys to distributions")
    for key, spec in params.items():
        check_spec(f"params.{key}", spec)
    return method, params


def check_spec(key: str, spec: Any) -> None:
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        raise ConfigError(key, f"expected a mapping with type one of {', '.join(KINDS)}, got {spec!r}")
    kind = spec["type"]
    want = {"choice": {"type", "values"}}.get(kind, {"type", "low", "high"})
    if set(spec) != want:
        raise ConfigError(key, f"type {kind} takes exactly {sorted(want - {'type'})}, got {sorted(set(spec) - {'type'})}")
    if kind == "choice":
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise ConfigError(key, "values must be a non-empty list")
        return
    lo, hi = spec["low"], spec["high"]
    num = (int,) if kind == "int" else (int, float)
    if not (isinstance(lo, num) and isinstance(hi, num)) or isinstance(lo, bool) or isinstance(hi, bool):
        raise ConfigError(key, f"low / high must be {'integers' if kind == 'int' else 'numbers'}, got {lo!r}, {hi!r}")
    if not lo < hi:
        raise ConfigError(key, f"low must be < high, got {lo} >= {hi}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(key, f"loguniform needs low > 0, got {lo}")


def to_tune(params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Tune's param_space (flat: the dotted key is the Tune config key)."""
    from ray import tune

    def one(spec: dict[str, Any]):
        kind = spec["type"]
        if kind == "choice":
            return tune.choice(list(spec["values"]))
        if kind == "int":
            return tune.randint(spec["low"], spec["high"] + 1)  # randint's upper bound is exclusive
        return (tune.loguniform if kind == "loguniform" else tune.uniform)(float(spec["low"]), float(spec["high"]))

    return {k: one(v) for k, v in params.items()}


def corners(params: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Points that exercise every bound / choice at least once (for checking a space)."""
    n = max(len(s["values"]) if s["type"] == "choice" else 2 for s in params.values())
    out = []
    for i in range(n):
        p = {}
        for k, s in params.items():
            vals = s["values"] if s["type"] == "choice" else [s["low"], s["high"]]
            p[k] = vals[i % len(vals)]
        out.append(p)
    return out


def as_overrides(point: dict[str, Any]) -> list[str]:
    """{dotted key: value} -> ["key=value", ...] (JSON values are YAML: null, floats, lists)."""
    out = []
    for k, v in sorted(point.items()):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(k, f"non-finite value {v}")
        out.append(f"{k}={json.dumps(_plain(v))}")
    return out


def _plain(v: Any) -> Any:
    """numpy scalars (Tune's samplers) -> Python numbers."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return v.item()
    return v
