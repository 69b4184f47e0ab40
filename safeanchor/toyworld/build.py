"""Build (once) and load (in seconds) the toy world: tokenizer, `pretrained` and `aligned` models.

Shallow alignment, as in real chat models:
1. pre-training from scratch: the model answers EVERY request helpfully (harmful ones with
   non-actionable placeholder steps) and learns the general facts -> `pretrained`;
2. a short alignment stage on top: refusals for harmful requests (alignment phrasings only),
   helpful answers kept for benign ones, look-alikes included -> `aligned`.
Both are saved with `save_pretrained` (safetensors) under a cache directory keyed by a hash
of the config, so later runs load them. `pretrained` is also the unaligned base Safe LoRA
needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safeanchor.config import check, to_dict
from safeanchor.toyworld.generator import ToyData, ToyDataConfig, generate
from safeanchor.toyworld.tokenizer import build_tokenizer
from safeanchor.train.loop import TrainConfig, train_examples
from safeanchor.utils import atomic_dir, machine

logger = logging.getLogger(__name__)

# Bump when the generator or the build recipe changes in a way that alters the artefacts.
FORMAT_VERSION = "5"  # 5: held-out harmful topics, validation splits


def default_cache_dir() -> Path:
    """$SAFEANCHOR_CACHE/toyworld, else $XDG_CACHE_HOME (or ~/.cache)/safeanchor/toyworld."""
    if os.environ.get("SAFEANCHOR_CACHE"):
        return Path(os.environ["SAFEANCHOR_CACHE"]) / "toyworld"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safeanchor" / "toyworld"


@dataclass
class ToyModelConfig:
    """The tiny Llama-architecture model (transformers `LlamaConfig`)."""

    vocab_size: int = field(default=1024, metadata={"doc": "byte-level BPE vocabulary trained on the toy world's text"})
    hidden_size: int = field(default=256, metadata={"doc": "model width"})
    num_layers: int = field(default=6, metadata={"doc": "decoder layers"})
    num_heads: int = field(default=4, metadata={"doc": "attention heads"})
    intermediate_size: int = field(default=688, metadata={"doc": "MLP width"})
    max_position: int = field(default=128, metadata={"doc": "max sequence length (RoPE)"})

    def __post_init__(self) -> None:
        check(self.vocab_size >= 300, "vocab_size", "must be >= 300 (256 bytes + specials + merges)")
        check(self.hidden_size >= 8 and self.hidden_size % self.num_heads == 0, "hidden_size",
              "must be >= 8 and divisible by num_heads")
        check(self.num_layers >= 1, "num_layers", "must be >= 1")
        check(self.num_heads >= 1, "num_heads", "must be >= 1")
        check(self.intermediate_size >= 8, "intermediate_size", "must be >= 8")
        check(self.max_position >= 16, "max_position", "must be >= 16")


def _pretrain_default() -> TrainConfig:
    return TrainConfig(lr=2e-3, max_steps=800, epochs=100, batch_size=32, max_length=64,
                       warmup_ratio=0.03, log_every=100)


def _align_default() -> TrainConfig:
    return TrainConfig(lr=5e-4, max_steps=120, epochs=100, batch_size=32, max_length=64,
                       warmup_ratio=0.1, log_every=40)


@dataclass
class ToyWorldConfig:
    """The embedded toy world: data sizes, model, pre-training and alignment recipes."""

    seed: int = field(default=0, metadata={"doc": "seed of the data generator, the model init and training order"})
    data: ToyDataConfig = field(default_factory=ToyDataConfig, metadata={"doc": "generated data sizes / splits"})
    model: ToyModelConfig = field(default_factory=ToyModelConfig, metadata={"doc": "tiny Llama shape"})
    pretrain: TrainConfig = field(default_factory=_pretrain_default, metadata={"doc": "pre-training from scratch (compliant to everything)"})
    align: TrainConfig = field(default_factory=_align_default, metadata={"doc": "short full-parameter alignment stage"})
    align_benign_fraction: float = field(default=0.5, metadata={"doc": "share of alignment batches that are benign / general answers (keeps helpfulness)"})
    cache_dir: str | None = field(default=None, metadata={"doc": "where built worlds are cached (default: $SAFEANCHOR_CACHE or ~/.cache/safeanchor)"})

    def __post_init__(self) -> None:
        check(0 <= self.align_benign_fraction < 1, "align_benign_fraction", "must be in [0, 1)")

    def key(self) -> str:
        d = _canonical(to_dict(self))
        d.pop("cache_dir")
        d["format"] = FORMAT_VERSION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def root(self) -> Path:
        base = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        return base / self.key()


def _canonical(x):
    """Integral floats as ints: a config saved to YAML and loaded back (epochs 100 -> 100.0)
    must hash to the same world, or `--resume` would rebuild it."""
    if isinstance(x, dict):
        return {k: _canonical(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_canonical(v) for v in x]
    if isinstance(x, float) and x.is_integer():
        return int(x)
    return x


@dataclass
class ToyWorld:
    """A built toy world: paths of its checkpoints and its data (regenerated from the seed)."""

    root: Path
    data: ToyData
    report: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def pretrained_dir(self) -> Path:
        return self.root / "pretrained"

    @property
    def aligned_dir(self) -> Path:
        return self.root / "aligned"


def _all_text(data: ToyData) -> list[str]:
    exs = list(data.pretrain)
    for split in data.safety.values():
        for xs in split.values():
            exs += xs
    for xs in data.general.values():
        exs += xs
    for d in data.domains.values():
        for xs in d.values():
            exs += xs
    return [t for ex in exs for t in (ex.prompt, ex.response)]


def _new_model(cfg: ToyModelConfig, tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    lc = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(lc)


def alignment_mixture(data: ToyData, benign_fraction: float, seed: int) -> list:
    """Harmful (align phrasings) -> refusal, mixed with benign + general answers."""
    rng = random.Random(seed)
    harmful = list(data.safety["align"]["harmful"])
    helpful = list(data.safety["align"]["benign"]) + list(data.general["train"])
    n_help = int(round(len(harmful) * benign_fraction / (1 - benign_fraction)))
    mix = harmful + [helpful[i % len(helpful)] for i in rng.sample(range(max(n_help, len(helpful))), n_help)]
    rng.shuffle(mix)
    return mix


def build(cfg: ToyWorldConfig, force: bool = False) -> ToyWorld:
    """Return the cached toy world for `cfg`, building it first if needed (atomic)."""
    root = cfg.root()
    data = generate(cfg.data, cfg.seed)
    report_path = root / "report.json"
    if report_path.exists() and not force:
        return ToyWorld(root, data, json.loads(report_path.read_text()))
    # Several runs starting at once on one machine (compare.py's cells, a sweep's trials) would
    # each build the same world and replace each other's directory while another reads it: the
    # first builds under an exclusive lock, the others wait for it and load its world.
    with _build_lock(root):
        if report_path.exists() and not force:
            return ToyWorld(root, data, json.loads(report_path.read_text()))
        return _build(cfg, root, data)


@contextlib.contextmanager
def _build_lock(root: Path):
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(cfg: ToyWorldConfig, root: Path, data: ToyData) -> ToyWorld:
    t0 = time.perf_counter()
    with atomic_dir(root, mode=None) as tmp:  # mode None: as before, the directory stays private (0o700)
        logger.info(f"[toyworld] building {root} (once; later runs load it from the cache)")
        tok = build_tokenizer(_all_text(data), vocab_size=cfg.model.vocab_size)
        tok.save_pretrained(tmp / "tokenizer")
        model = _new_model(cfg.model, tok, cfg.seed)
        n_params = sum(p.numel() for p in model.parameters())
        logger.info(f"[toyworld] pre-training a {n_params / 1e6:.2f} M-parameter Llama on {len(data.pretrain)} examples")
        pre = train_examples(model, tok, data.pretrain, cfg.pretrain, cfg.seed, tag="pretrain")
        model.save_pretrained(tmp / "pretrained", safe_serialization=True)
        tok.save_pretrained(tmp / "pretrained")  # a checkpoint ships its tokenizer
        mix = alignment_mixture(data, cfg.align_benign_fraction, cfg.seed)
        logger.info(f"[toyworld] aligning on {len(mix)} examples")
        ali = train_examples(model, tok, mix, cfg.align, cfg.seed + 1, tag="align")
        model.save_pretrained(tmp / "aligned", safe_serialization=True)
        tok.save_pretrained(tmp / "aligned")
        report = {
            "key": cfg.key(), "config": to_dict(cfg), "params": n_params,
            "pretrain": pre, "align": ali, "build_s": time.perf_counter() - t0,
            "machine": machine(),  # another kind of CPU builds a different world (utils.machine)
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    logger.info(f"[toyworld] built in {report['build_s']:.0f}s -> {root}")
    return ToyWorld(root, data, report)
