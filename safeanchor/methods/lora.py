"""Plain sequential LoRA: one adapter, trained on each domain in turn (the erosion baseline)."""

from __future__ import annotations

from dataclasses import dataclass

from safeanchor.methods.base import Method, register_method


@dataclass
class LoraMethodConfig:
    """Plain LoRA has no options of its own (rank, targets: `lora.*`; optimiser: `train.*`)."""


@register_method("lora", LoraMethodConfig)
class PlainLora(Method):
    def __init__(self, cfg: LoraMethodConfig) -> None:
        self.cfg = cfg
