"""Continual-adaptation methods behind one interface; importing this package registers them."""

from safeanchor.methods import lora, safeanchor  # noqa: F401  (registration)
from safeanchor.methods.base import METHODS, Context, Method, register_method

__all__ = ["METHODS", "Context", "Method", "register_method", "build_method"]


def build_method(name: str, options: dict | None):
    """Instantiate a registered method with its validated config (errors name `methods.<name>`)."""
    from safeanchor.config import ConfigError, from_dict

    if name not in METHODS:
        raise ConfigError("method", f"unknown method {name!r} (known: {', '.join(sorted(METHODS))})")
    entry = METHODS[name]
    cfg = from_dict(entry.config_cls, options or {}, prefix=f"methods.{name}") if entry.config_cls else None
    return entry.cls(cfg)
