"""Safe LoRA (Hsu et al., 2024, "Safe LoRA: the Silver Lining of Reducing Safety Risks when
Finetuning Large Language Models", arXiv 2405.16833). ALGORITHMS.md §6.4.

After each domain, for every LoRA-targeted module (weight W: (out, in), LoRA B: (out, r), A: (r, in)):

    V = W_aligned − W_base         the alignment direction of that module (aligned model minus its
                                   unaligned base; W_aligned is the live model's frozen base weight)
    C = V Vᵀ / ‖V‖_F               (out, out)
    cos = cos(vec(C·B·A), vec(B·A))
    if cos ≤ threshold:  B ← C·B   ("threshold" mode), or project the num_proj_layers modules with
                                   the lowest cosine ("num_layers" mode).

The LoRA scale (alpha / r) multiplies both vectors, so it does not change the cosine.

Cost choices (a 7B model has 224 targeted modules; C of an MLP up-projection is 11008²):
- C is never formed: C·B = V (Vᵀ B) / ‖V‖_F, O(out·in·r).
- The cosine uses r×r Gram matrices: with G = A Aᵀ, <X·A, Y·A> = Σ (XᵀY ∘ G), so neither B·A
  nor C·B·A (out×in) is built.
- V is the cached object (one per module, the size of the module's weight, kept in CPU memory;
  `cache: false` re-reads it each domain). It depends only on the two checkpoints, so a fresh process recomputes it and
  nothing goes into `state_dict()`.
- W_base is read tensor by tensor from the base checkpoint's safetensors (no second model in
  memory); a hub id that is not a local directory falls back to loading the model.

Differences from the authors' code (peft's `utils/safelora.py`): their default selection is
"number" with 10 layers; here the default is the threshold rule of ALGORITHMS.md (both offered).
In "num_layers" mode they project every module whose cosine is ≤ the k-th lowest (ties may add
more); here exactly the k lowest are projected. A module with B·A = 0 has no cosine and is left
alone (C·0 = 0 either way).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from safeanchor.config import ConfigError, check
from safeanchor.methods.base import Context, Method, register_method
from safeanchor.models import TRAINABLE, lora_layers

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


@dataclass
class SafeLoraConfig:
    """Safe LoRA's options (the unaligned base model is `model.base`)."""

    mode: str = field(default="threshold", metadata={"doc": "'threshold': project every module with cos <= threshold; 'num_layers': project the num_proj_layers modules with the lowest cos"})
    threshold: float = field(default=0.5, metadata={"doc": "cosine threshold of the 'threshold' mode (paper / peft 0.5)"})
    num_proj_layers: int = field(default=10, metadata={"doc": "modules projected in 'num_layers' mode (peft default 10)"})
    cache: bool = field(default=True, metadata={"doc": "keep V = W_aligned - W_base per module in CPU memory between domains (float32: 4 bytes per targeted weight, ~26 GB at 7B with all 7 projections); false re-reads the base checkpoint each domain"})

    def __post_init__(self) -> None:
        check(self.mode in ("threshold", "num_layers"), "mode", f"must be 'threshold' or 'num_layers', got {self.mode!r}")
        check(-1.0 <= self.threshold <= 1.0, "threshold", "must be in [-1, 1] (a cosine)")
        check(self.num_proj_layers >= 1, "num_proj_layers", "must be >= 1")


def hf_key(module_name: str) -> str:
    """peft module name -> the HF checkpoint key of its weight."""
    name = module_name[len(PEFT_PREFIX):] if module_name.startswith(PEFT_PREFIX) else module_name
    return f"{name}.weight"


class BaseWeights:
    """Tensors of the unaligned base checkpoint by HF key: from its safetensors files when `ref` is
    a local directory (nothing else loaded), else from the loaded model."""

    def __init__(self, ref: str, model_cfg: Any) -> None:
        self.ref = ref
        self.model_cfg = model_cfg
        self._files: dict[str, str] | None = None
        self._state: dict[str, torch.Tensor] | None = None

    def _index(self) -> dict[str, str] | None:
        d = Path(self.ref)
        if not d.is_dir():
            return None
        index = d / "model.safetensors.index.json"
        if index.exists():
            return {k: str(d / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
        single = d / "model.safetensors"
        if single.exists():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                return {k: str(single) for k in f.keys()}
        raise ConfigError("model.base", f"{self.ref!r} has no model.safetensors(.index.json)")

    def get(self, key: str) -> torch.Tensor:
        if self._files is None and self._state is None:
            self._files = self._index()
            if self._files is None:
                from safeanchor.models import load_model

                self._state = load_model(self.ref, self.model_cfg, key="model.base").state_dict()
        if self._files is not None:
            if key not in self._files:
                raise ConfigError("model.base", f"base checkpoint {self.ref!r} has no tensor {key!r}")
            from safetensors import safe_open

            with safe_open(self._files[key], framework="pt") as f:
                return f.get_tensor(key)
        if key not in self._state:
            raise ConfigError("model.base", f"base model {self.ref!r} has no tensor {key!r}")
        return self._state[key]


def project_b(V: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """C·B with C = V Vᵀ/‖V‖_F, without forming C. V: (out, in), B: (out, r) -> (out, r)."""
    return V @ (V.t() @ B) / torch.linalg.matrix_norm(V)


def lora_cosine(CB: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float | None:
    """cos(vec(CB·A), vec(B·A)) from r×r Gram matrices (None when B·A = 0)."""
    CB, B, A = CB.double(), B.double(), A.double()
    G = A @ A.t()  # (r, r)
    dot = ((CB.t() @ B) * G).sum()
    n_ba = ((B.t() @ B) * G).sum()
    n_cba = ((CB.t() @ CB) * G).sum()
    if n_ba <= 0:
        return None
    if n_cba <= 0:
        return 0.0
    return float(dot / (n_ba.sqrt() * n_cba.sqrt()))


def select(cos: dict[str, float | None], mode: str, threshold: float, k: int) -> list[str]:
    """Modules to project: cos <= threshold, or the k lowest cosines (stable order on ties)."""
    valid = [(c, i, n) for i, (n, c) in enumerate(cos.items()) if c is not None and math.isfinite(c)]
    if mode == "threshold":
        return [n for c, _, n in valid if c <= threshold]
    return [n for _, _, n in sorted(valid)[:k]]


@register_method("safelora", SafeLoraConfig)
class SafeLora(Method):
    def __init__(self, cfg: SafeLoraConfig) -> None:
        self.cfg = cfg
        self._V: dict[str, torch.Tensor] = {}  # per-process cache, recomputed in a fresh process
        self.history: list[dict[str, Any]] = []  # per domain: number projected, min / mean cosine

    def alignment_direction(self, ctx: Context, name: str, layer: Any, base: BaseWeights) -> torch.Tensor:
        """V = W_aligned − W_base of one module, float32, on the module's device."""
        w_aligned = layer.get_base_layer().weight.detach()
        if name in self._V:
            return self._V[name].to(w_aligned.device)
        w_base = base.get(hf_key(name)).to(device=w_aligned.device)
        if w_base.shape != w_aligned.shape:
            raise ConfigError("model.base", f"{hf_key(name)}: base shape {tuple(w_base.shape)} != "
                              f"aligned shape {tuple(w_aligned.shape)}")
        V = w_aligned.float() - w_base.float()
        if not torch.any(V):
            raise ConfigError("model.base", f"{hf_key(name)} is identical in the aligned and the base model: "
                              "is model.base really the unaligned base of model.name?")
        if self.cfg.cache:  # in CPU memory: at most one V at a time on the accelerator
            self._V[name] = V.cpu()
        return V

    @torch.no_grad()
    def project(self, ctx: Context) -> dict[str, Any]:
        if ctx.base_model_ref is None:
            raise ConfigError("model.base", "Safe LoRA needs the unaligned base model of model.name (set model.base)")
        base = BaseWeights(ctx.base_model_ref, ctx.run_cfg.model)
        layers = lora_layers(ctx.model)
        if not layers:
            raise ValueError(f"safelora: the model has no LoRA adapter {TRAINABLE!r}")
        cos: dict[str, float | None] = {}
        proj: dict[str, torch.Tensor] = {}
        for name, layer in layers:
            V = self.alignment_direction(ctx, name, layer, base)
            B = layer.lora_B[TRAINABLE].weight  # (out, r)
            A = layer.lora_A[TRAINABLE].weight  # (r, in)
            CB = project_b(V, B.float())
            key = hf_key(name)[: -len(".weight")]
            cos[key] = lora_cosine(CB, B, A)
            proj[key] = CB
        chosen = select(cos, self.cfg.mode, self.cfg.threshold, self.cfg.num_proj_layers)
        for name, layer in layers:
            key = hf_key(name)[: -len(".weight")]
            if key in chosen:
                B = layer.lora_B[TRAINABLE].weight
                B.copy_(proj[key].to(B.dtype))
        vals = [c for c in cos.values() if c is not None]
        return {
            "cos": cos, "projected": chosen, "num_projected": len(chosen), "num_modules": len(cos),
            "cos_min": min(vals) if vals else float("nan"),
            "cos_mean": sum(vals) / len(vals) if vals else float("nan"),
        }

    def after_domain(self, ctx: Context) -> dict[str, Any]:
        rec = self.project(ctx)
        logger.info(f"  [safelora] projected {rec['num_projected']}/{rec['num_modules']} modules "
                    f"(mode {self.cfg.mode}; cos min {rec['cos_min']:.3f}, mean {rec['cos_mean']:.3f})")
        self.history.append({"domain": ctx.domain, **{k: rec[k] for k in ("num_projected", "cos_min", "cos_mean")}})
        return {"safelora": rec}

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "history" in state:
            self.history = list(state["history"])

    def summary(self) -> dict[str, Any]:
        return {"history": list(self.history)}
