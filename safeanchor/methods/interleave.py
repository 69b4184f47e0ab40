"""Safety interleaving (ALGORITHMS.md §6.7): safety examples mixed into every domain's data.

The training set of domain t is its own n examples plus s safety examples from the calibration
set (harmful prompt → refusal, benign prompt → helpful answer), with s chosen so that the safety
FRACTION of the mixed set is `ratio`:

    s = round(n · ratio / (1 − ratio)),      s / (n + s) ≈ ratio     (exact when n·ratio/(1−ratio) is whole)

The batcher shuffles the mixed set, so every batch holds about `ratio` safety examples (1 in 8
by default, ALGORITHMS.md; the authors' code uses 10%). Sampling: without replacement when the
calibration set has at least s examples; otherwise every calibration example is used
⌊s/N⌋ times and a sample without replacement supplies the rest (the most even use of a small
set). The RNG is seeded from (run seed, domain step), so a rerun or a fresh process picks the
same examples. Because the mixed set is larger than the domain's, a run with `train.epochs`
trains n + s examples per epoch (+14% steps at 1/8); `train.max_steps` caps it as usual.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any

from safeanchor import seeds
from safeanchor.config import check
from safeanchor.data import ChatExample
from safeanchor.methods.base import Context, Method, register_method

logger = logging.getLogger(__name__)


@dataclass
class InterleaveConfig:
    """Safety interleaving: the safety share of each domain's training set."""

    ratio: float = field(default=0.125, metadata={
        "doc": "fraction of safety examples in the mixed training set, s / (n + s) (ALGORITHMS.md: about 1 in 8; "
               "the authors' code 0.10)"})

    def __post_init__(self) -> None:
        check(0 <= self.ratio < 1, "ratio", f"must be in [0, 1), got {self.ratio}")


def safety_count(n_domain: int, ratio: float) -> int:
    """s such that s / (n + s) is closest to `ratio` (rounded to a whole example)."""
    return int(round(n_domain * ratio / (1.0 - ratio)))


def sample_safety(calib: list[ChatExample], k: int, rng: random.Random) -> list[ChatExample]:
    """k examples of `calib`: without replacement if possible, else whole passes plus a sample."""
    full, rest = divmod(k, len(calib))
    return list(calib) * full + rng.sample(calib, rest)


@register_method("interleave", InterleaveConfig)
class Interleave(Method):
    def __init__(self, cfg: InterleaveConfig) -> None:
        self.cfg = cfg
        self.mix_log: list[dict[str, Any]] = []

    def training_examples(self, ctx: Context, examples: list[ChatExample]) -> list[ChatExample]:
        k = safety_count(len(examples), self.cfg.ratio)
        if k == 0:
            return list(examples)
        if not ctx.safety_calib:
            raise ValueError("data.safety_calib: empty calibration set (interleave mixes safety examples from it)")
        # str seeds are hashed with sha512 by `random`: stable across processes and Python runs
        rng = seeds.interleave_sample(ctx.seed, ctx.step)
        safety = sample_safety(ctx.safety_calib, k, rng)
        rec = {"domain": ctx.domain, "step": ctx.step, "domain_examples": len(examples), "safety_examples": k,
               "safety_fraction": k / (len(examples) + k), "with_replacement": k > len(ctx.safety_calib)}
        self.mix_log = [r for r in self.mix_log if r["step"] != ctx.step] + [rec]
        logger.info(f"  [interleave] {k} safety + {len(examples)} domain examples "
                    f"(fraction {rec['safety_fraction']:.3f}{', calib set reused' if rec['with_replacement'] else ''})")
        return list(examples) + safety

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        rec = next((r for r in self.mix_log if r["step"] == ctx.step), None)
        return dict(rec) if rec else {}

    def state_dict(self) -> dict[str, Any]:
        return {"mix": [dict(r) for r in self.mix_log]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mix_log = [dict(r) for r in state.get("mix", [])]

    def summary(self) -> dict[str, Any]:
        return {"ratio": self.cfg.ratio, "mix": self.mix_log}
