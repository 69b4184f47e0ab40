"""Continual-adaptation methods behind one interface.

Importing this package imports every module in it, so each module's `@register_method`
runs: a new method is one new file here, nothing else to edit.
"""

import importlib
import pkgutil

from safeanchor.methods.base import METHODS, Context, Method, register_method

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base" and not _m.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["METHODS", "Context", "Method", "register_method", "build_method"]


def build_method(name: str, options: dict | None):
    """Instantiate a registered method with its validated config (errors name `methods.<name>`)."""
    from safeanchor.config import ConfigError, from_dict

    if name not in METHODS:
        raise ConfigError("method", f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    entry = METHODS[name]
    cfg = from_dict(entry.config_cls, options or {}, prefix=f"methods.{name}") if entry.config_cls else None
    return entry.cls(cfg)
