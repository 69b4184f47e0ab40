"""Every seed of a run, derived from the run seed in this one place.

A run is reproducible from `seed` (the toy world has its own, `toyworld.seed`): each random
choice below draws from a stream named by its purpose, so changing one choice does not shift
another. The integer formulas are the ones earlier versions used (results stay comparable);
string-keyed streams are hashed by `random.Random` with sha512, stable across processes.
"""

from __future__ import annotations

import random
import zlib


def lora_init(seed: int) -> int:
    """The persistent adapter's initialisation (lora_A)."""
    return seed


def train_subsample(seed: int) -> random.Random:
    """`data.max_train_examples`: which training examples of each domain are kept."""
    return random.Random(seed)


def domain_phase(seed: int, step: int) -> int:
    """Batch order and dropout of domain `step`'s training phase."""
    return seed * 1000 + step


def replay_phase(seed: int, step: int, round: int) -> int:
    """Batch order and dropout of SafeAnchor's replay round `round` after domain `step`."""
    return seed * 1000 + step * 10 + round


def replay_sample(seed: int, step: int, round: int) -> random.Random:
    """Which domain examples a replay round trains on (seed 0 draws what earlier versions drew,
    when this ignored the run seed)."""
    return random.Random(seed * 1_000_003 + step * 7919 + round)


def rank_stream(phase_seed: int, rank: int) -> int:
    """torch's RNG (dropout) on data-parallel rank `rank` of a phase."""
    return phase_seed * 1_000_003 + rank


def adapter_reinit(seed: int, step: int) -> int:
    """A fresh adapter before domain `step` (O-LoRA; Vaccine's after its re-alignment: step 999)."""
    return seed * 1000 + step


def random_subspace(seed: int, step: int, tensor: str) -> int:
    """SafeAnchor's random-subspace control: the basis of `tensor` at domain `step`."""
    return seed * 1_000_003 + step * 10_007 + zlib.crc32(tensor.encode())


def calib_sample(seed: int) -> random.Random:
    """The calibration subset a method uses (`calib_size`: SafeAnchor's SSI, Vaccine)."""
    return random.Random(seed)


def safety_batch_order(seed: int) -> random.Random:
    """The order of SafeAnchor's anchor and replay safety batches."""
    return random.Random(seed)


def safegrad_batches(seed: int) -> random.Random:
    """SafeGrad's alignment subset (`align_size`) and batch order."""
    return random.Random(f"safegrad:{seed}")


def ewc_sample(seed: int, source: str, step: int) -> random.Random:
    """The examples of an EWC Fisher estimate (`fisher_samples`)."""
    return random.Random(f"ewc:{source}:{seed}:{step}")


def interleave_sample(seed: int, step: int) -> random.Random:
    """The safety examples mixed into domain `step` (interleave baseline)."""
    return random.Random(f"interleave:{seed}:{step}")


def parse_seeds(text: str) -> list[int]:
    """Seeds as a command line gives them: "0-4" (a range, both ends in), "100,101", "0-2,7"."""
    out: list[int] = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        lo, dash, hi = part.strip().partition("-")
        out += list(range(int(lo), int(hi) + 1)) if dash else [int(lo)]
    return out
