"""Models: any Hugging Face causal LM (hub id or local path, safetensors only) plus one
persistent LoRA adapter through peft.

A model reference is a hub id, a local directory, `toyworld:aligned` / `toyworld:pretrained`
(the embedded toy world's checkpoints, built and cached on first use; see
`safeanchor.toyworld`), or `gguf:<package|file.gguf>` (a GGUF checkpoint converted once to a
cached safetensors directory; see `safeanchor.models_gguf`). The same loading code serves all.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safeanchor.config import ConfigError, check

TOYWORLD_PREFIX = "toyworld:"
TRAINABLE = "default"  # the pipeline's persistent adapter: the one that trains and is checkpointed


@dataclass
class ModelConfig:
    """Which model to adapt (and its unaligned base, for methods that need one)."""

    name: str = field(default="toyworld:aligned", metadata={"doc": "HF hub id, local path, or toyworld:aligned"})
    revision: str | None = field(default=None, metadata={"doc": "hub revision (commit sha, tag or branch) of `name` and of its tokenizer when that is `name` too; null: the hub's default branch (unpinned)"})
    base: str | None = field(default="toyworld:pretrained", metadata={"doc": "unaligned base of `name` (Safe LoRA); null if unknown"})
    tokenizer: str | None = field(default=None, metadata={"doc": "tokenizer id/path (default: same as name; toyworld:tokenizer for the toy)"})
    dtype: str = field(default="float32", metadata={"doc": "float32 | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"doc": "device of the driver's copy of the model (evaluation, CSM probe, judge-free generation, in-process training and SSI): auto (cuda if this process sees a GPU, else cpu) | cpu | cuda | cuda:N. On a cluster, give the driver a GPU with `ray job submit --entrypoint-num-gpus 1` (RayJob: entrypointNumGpus)"})
    trust_remote_code: bool = field(default=False, metadata={"doc": "allow custom model code from the hub (off by default)"})

    def __post_init__(self) -> None:
        check(bool(self.name), "name", "must not be empty")
        check(self.dtype in ("float32", "bfloat16", "float16"), "dtype",
              f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        check(self.device == "auto" or self.device == "cpu" or self.device.split(":")[0] == "cuda", "device",
              f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def resolved_device(self) -> torch.device:
        """The driver's device; a GPU asked for where this process sees none is an error."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("model.device", f"{self.device} asked for, but this process sees no GPU "
                                              "(on Ray: ray job submit --entrypoint-num-gpus 1)")
        return dev


@dataclass
class LoraConfig:
    """The LoRA adapter (peft) that persists across all domains."""

    r: int = field(default=8, metadata={"doc": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"doc": "LoRA scaling numerator (scale = alpha / r)"})
    dropout: float = field(default=0.0, metadata={"doc": "dropout on the LoRA input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"doc": "module names that get LoRA"},
    )

    def __post_init__(self) -> None:
        check(self.r >= 1, "r", "must be >= 1")
        check(self.alpha > 0, "alpha", "must be > 0")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")
        check(len(self.target_modules) > 0, "target_modules", "must list at least one module")


def resolve(ref: str, toy_paths: dict[str, Path] | None, key: str) -> str:
    """Map `toyworld:<name>` to the built toy world's directory and `gguf:<package|file>` to its
    cached safetensors conversion (see safeanchor.models_gguf); other refs pass through."""
    if ref.startswith("gguf:"):
        from safeanchor.models_gguf import resolve_gguf

        return str(resolve_gguf(ref, key=key))
    if ref.startswith(TOYWORLD_PREFIX):
        name = ref[len(TOYWORLD_PREFIX) :]
        if toy_paths is None or name not in toy_paths:
            known = ", ".join(sorted(toy_paths or {}))
            raise ConfigError(key, f"unknown toy-world checkpoint {ref!r} (known: {known})")
        return str(toy_paths[name])
    return ref


def revision_for(ref: str, cfg: ModelConfig) -> str | None:
    """`cfg.revision` where `ref` is the model's own hub id (`model.name`), else None: the pin
    names a commit of that repository only (not of `model.base` or another tokenizer)."""
    return cfg.revision if ref == cfg.name else None


def load_tokenizer(ref: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError("model.tokenizer", f"cannot load tokenizer {ref!r}: {str(e).splitlines()[0]}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        raise ConfigError("model.tokenizer", f"tokenizer {ref!r} has no chat template")
    return tok


def load_model(ref: str, cfg: ModelConfig, key: str = "model.name"):
    """A causal LM from safetensors weights only (no pickle), eval mode."""
    from transformers import AutoModelForCausalLM

    if not Path(ref).exists() and "/" not in ref:
        raise ConfigError(key, f"model {ref!r} is neither a local directory nor a hub id (org/name)")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=getattr(torch, cfg.dtype), use_safetensors=True,
            trust_remote_code=cfg.trust_remote_code, revision=revision_for(ref, cfg),
        )
    except (OSError, ValueError) as e:
        raise ConfigError(key, f"cannot load model {ref!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    return model


def add_lora(model, cfg: LoraConfig, seed: int):
    """Wrap `model` with one trainable LoRA adapter ("default"); base weights frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA A init is random: seed it
    pcfg = PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, pcfg)
    except ValueError as e:
        raise ConfigError("lora.target_modules", str(e).splitlines()[0]) from e


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA tensors by name (the θ_i of ALGORITHMS.md)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}


# ---- adapter helpers (peft multi-adapter LoRA) ----------------------------------------------
def lora_layers(model, adapter: str = TRAINABLE) -> list[tuple[str, Any]]:
    """(module name, peft LoraLayer) of every LoRA-targeted module that holds `adapter`."""
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]


def adapter_weights(model, name: str) -> dict[str, torch.Tensor]:
    """A detached CPU copy of one adapter's tensors (peft's adapter-name-free keys)."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def set_active(model, frozen: list[str], trainable: str = TRAINABLE) -> None:
    """Make `trainable` + `frozen` the active adapters (all in the forward pass); only `trainable`
    keeps requires_grad. peft's set_adapter marks every active adapter trainable, hence the reset."""
    model.base_model.set_adapter([trainable, *frozen])
    for _, layer in lora_layers(model, trainable):
        for name in frozen:
            for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters()):
                p.requires_grad_(False)


def restore_frozen(model, weights: dict[str, dict[str, torch.Tensor]], trainable: str = TRAINABLE) -> None:
    """(Re-)create each frozen adapter from its tensors and activate it. Idempotent."""
    from peft import set_peft_model_state_dict

    for name, sd in weights.items():
        if name not in model.peft_config:
            model.add_adapter(name, copy.deepcopy(model.peft_config[trainable]))
        res = set_peft_model_state_dict(model, sd, adapter_name=name)
        missing = [k for k in res.missing_keys if f".{name}." in k]
        if missing or res.unexpected_keys:
            raise RuntimeError(f"frozen adapter {name!r} does not fit the model: missing {missing[:3]}, "
                               f"unexpected {list(res.unexpected_keys)[:3]}")
    set_active(model, list(weights), trainable)


def freeze_copy(model, name: str, trainable: str = TRAINABLE) -> dict[str, torch.Tensor]:
    """Copy `trainable`'s current tensors into a new adapter `name` (same LoraConfig); returns them."""
    if name in model.peft_config:
        raise ValueError(f"adapter {name!r} already exists")
    weights = adapter_weights(model, trainable)
    restore_frozen(model, {name: weights}, trainable)
    return weights


@torch.no_grad()
def reinit_adapter(model, seed: int, adapter: str = TRAINABLE) -> None:
    """Fresh LoRA init as peft does it (kaiming-uniform A, B = 0), from `seed`, without touching
    the global RNG stream of the caller."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for _, layer in lora_layers(model, adapter):
            layer.reset_lora_parameters(adapter, True)
