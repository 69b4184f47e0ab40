"""SafeAnchor as a small library over torch / transformers / peft objects (no Ray, MLflow or
the pipeline's config files needed).

Every function here calls the code the pipeline runs — nothing is computed a second way:

| here                          | the pipeline's function                                             |
|-------------------------------|---------------------------------------------------------------------|
| `identify`                    | `ssi.safety_subspaces` (per-example grads, `fisher_subspace`)       |
| `merge`, `Subspaces.merge`    | `subspace.fisher.merge_subspaces` (Fisher-weighted)                 |
| `alphas`                      | `methods.safeanchor.alphas_from_traces` (normalised-trace α)        |
| `GradientProjector`           | `subspace.projection.GradientProjection` + `train.loop.GradHooks`   |
| `AnchorLoss`                  | `methods.safeanchor.safety_batches`, `subspace.anchor.cached_reference`, `anchor_kl` |
| `probe_safety`, `csm_check`   | `evaluation.probe_safety`, `methods.safeanchor.csm_threshold`       |
| `Subspaces.save` / `load`     | the pipeline's `subspaces/step<t>-<domain>.safetensors` format      |

A peft model's LoRA tensors are the θ_i (`models.lora_parameters`: trainable tensors whose name
holds "lora_"). Examples are `ChatExample`s, `(prompt, response)` pairs or
`{"prompt": ..., "response": ...}` mappings; they are encoded with the tokenizer's chat template,
the loss on response tokens only (`data.encode_example`).

    import safeanchor as sa
    fresh = sa.identify(model, tokenizer, calibration, max_length=64)   # SSI at the current model
    subs = sa.Subspaces.load(prev_dir).merge(fresh) if prev_dir else fresh
    projector = sa.GradientProjector(model, subs, sa.alphas(fresh))
    anchor = sa.AnchorLoss(model, tokenizer, calibration, batch_size=4)  # θ_{t-1} cached now
    for batch in loader:
        model(**batch).loss.backward()
        projector.project_()                      # ĝ = g − (1 − α)·V Vᵀ g, in place on p.grad
        (2.0 * anchor(model)).backward()          # the anchor gradient, added unprojected
        optimizer.step(); optimizer.zero_grad()
    subs.save(out_dir)                            # next to the adapter: the next domain merges it

Nothing here takes a `log` callable: progress lines (and warnings) go to the standard `logging`
module, to the "safeanchor" logger's children (`logging.getLogger(__name__)` of each module).
Call `safeanchor.logs.setup()` once to see them as the workflows print them (plain lines on
stdout), or configure logging as for any other library.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from safeanchor.data import ChatExample
from safeanchor.methods.base import trainable_device
from safeanchor.methods.safeanchor import (
    SafeAnchorConfig,
    alphas_from_traces,
    csm_threshold,
    safety_batches,
    subspace_tensors,
    subspaces_from_tensors,
)
from safeanchor.models import lora_parameters
from safeanchor.ssi import safety_subspaces
from safeanchor.subspace.anchor import anchor_kl, cached_reference
from safeanchor.subspace.fisher import Subspace, merge_subspaces
from safeanchor.subspace.projection import GradientProjection

Example = ChatExample | tuple[str, str] | Mapping[str, Any]

SUBSPACES_FILE = "safeanchor_subspaces.safetensors"  # the file name `Subspaces.save` uses in a directory
_META_KEY = "safeanchor"  # safetensors metadata entry holding `Subspaces.meta` as JSON


def as_examples(examples: Iterable[Example], what: str = "examples") -> list[ChatExample]:
    """ChatExamples from ChatExamples, (prompt, response) pairs or mappings with prompt/response
    (and optional answer, meta); a bad item is a ValueError naming `what` and its index."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, ChatExample):
            out.append(ex)
        elif isinstance(ex, Mapping):
            if "prompt" not in ex:
                raise ValueError(f"{what}[{i}]: a mapping needs a 'prompt' (and a 'response'), got keys {sorted(ex)}")
            out.append(ChatExample(str(ex["prompt"]), str(ex.get("response", "")), ex.get("answer"),
                                   dict(ex.get("meta") or {})))
        elif isinstance(ex, (tuple, list)) and len(ex) == 2:
            out.append(ChatExample(str(ex[0]), str(ex[1])))
        else:
            raise ValueError(f"{what}[{i}]: expected a ChatExample, (prompt, response) or a mapping, "
                             f"got {type(ex).__name__}")
    if not out:
        raise ValueError(f"{what}: empty")
    return out


class Subspaces(Mapping[str, Subspace]):
    """Per-LoRA-tensor safety subspaces: tensor name -> `Subspace` (V (n, k) orthonormal,
    eigenvalues λ (k,), Fisher trace), plus JSON-able `meta` saved with them."""

    def __init__(self, by_tensor: Mapping[str, Subspace], meta: dict[str, Any] | None = None) -> None:
        self._by = dict(by_tensor)
        self.meta: dict[str, Any] = dict(meta or {})

    def __getitem__(self, name: str) -> Subspace:
        return self._by[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by)

    def __len__(self) -> int:
        return len(self._by)

    def __repr__(self) -> str:
        ks = [s.k for s in self._by.values()]
        return f"Subspaces({len(ks)} tensors, k total {sum(ks)}, max {max(ks, default=0)})"

    @property
    def ranks(self) -> dict[str, int]:
        return {n: s.k for n, s in self._by.items()}

    @property
    def traces(self) -> dict[str, float]:
        return {n: s.trace for n, s in self._by.items()}

    def merge(self, new: Mapping[str, Subspace], *, rho: float | None = 0.90, k_max: int = 16,
              k_fixed: int | None = None) -> Subspaces:
        """`merge(self, new, ...)`: this (older) subspace merged with a fresh one."""
        return merge(self, new, rho=rho, k_max=k_max, k_fixed=k_fixed)

    def save(self, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Write safetensors (the pipeline's subspace file format; `meta` or `self.meta` as JSON
        metadata). A directory gets `SUBSPACES_FILE` inside it. Returns the file written
        (atomically: a temporary file, then a rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path.mkdir(parents=True, exist_ok=True)
            path = path / SUBSPACES_FILE
        tmp = path.with_name(path.name + ".tmp")
        save_file(subspace_tensors(self._by), str(tmp),
                  metadata={_META_KEY: json.dumps(self.meta if meta is None else meta, default=float)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Subspaces:
        """Read a `save`d file (or `SUBSPACES_FILE` in a directory), or a pipeline run's
        `subspaces/step<t>-<domain>.safetensors`."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if path.is_dir():
            path = path / SUBSPACES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no SafeAnchor subspaces at {path}")
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get(_META_KEY)
        return cls(subspaces_from_tensors(load_file(str(path))), json.loads(raw) if raw else {})


def identify(model: torch.nn.Module, tokenizer: Any, examples: Iterable[Example], *, max_length: int = 96,
             rho: float | None = 0.90, k_max: int = 16, k_fixed: int | None = None, chunk: int = 16) -> Subspaces:
    """SSI (ALGORITHMS.md §1) at the model as it is: per-example gradients of the safe-response
    NLL over every LoRA tensor (`chunk` examples per vmap chunk), then per tensor the Fisher
    eigenbasis keeping a fraction `rho` of its eigenvalue mass (at most `k_max`), or `k_fixed`
    directions. The pipeline's in-process SSI (`ssi.safety_subspaces`), on the model's device."""
    calib = as_examples(examples, "calibration examples")
    if not lora_parameters(model):
        raise ValueError("identify: the model has no trainable LoRA tensors (a peft LoRA model is needed)")
    return Subspaces(safety_subspaces(model, tokenizer, calib, max_length, rho, k_max, k_fixed, chunk=chunk))


def merge(old: Mapping[str, Subspace], new: Mapping[str, Subspace], *, rho: float | None = 0.90,
          k_max: int = 16, k_fixed: int | None = None) -> Subspaces:
    """Fisher-weighted incremental merge per tensor (`merge_subspaces`); tensors only in one of
    the two are taken as they are."""
    names = list(old) + [n for n in new if n not in old]
    out = {}
    for n in names:
        if n in old and n in new:
            out[n] = merge_subspaces(old[n], new[n], rho, k_max, k_fixed)
        else:
            out[n] = old[n] if n in old else new[n]
    return Subspaces(out)


def alphas(fresh: Mapping[str, Subspace], *, lam: float = 0.5, trace_norm: str = "max", strict: bool = False,
           adaptive: bool = True, alpha_fixed: float = 0.5) -> dict[str, float]:
    """α_i = clip(1 − lam·t̃_i, 0, 1) from the normalised Fisher traces of the FRESH subspaces
    (this domain's SSI, as the pipeline does; not the merged ones); `strict`: α = 0 everywhere;
    `adaptive` off: `alpha_fixed` everywhere."""
    cfg = SafeAnchorConfig(lam=lam, trace_norm=trace_norm, strict=strict, adaptive=adaptive, alpha_fixed=alpha_fixed)
    return alphas_from_traces({n: s.trace for n, s in fresh.items()}, cfg)


class GradientProjector:
    """OSCA's projection ĝ_i = g_i − (1 − α_i)·V_i V_iᵀ g_i of the model's LoRA gradients.

    `alpha`: per tensor (e.g. `alphas(fresh)`), or one number for every tensor (0: strict).
    Two ways to apply it, the same linear map:
    - `project_()` after backward, in place on p.grad (one process, whole gradients: one bmm per
      group of same-size tensors);
    - `with projector.hooks():` per-tensor gradient hooks, i.e. on every micro-batch's local
      gradient before it is accumulated or reduced (DeepSpeed ZeRO-1/2, DDP, gradient
      accumulation: projecting each part and summing equals projecting the sum).
    """

    def __init__(self, model: torch.nn.Module, subspaces: Mapping[str, Subspace],
                 alpha: Mapping[str, float] | float = 0.0) -> None:
        params = lora_parameters(model)
        if not params:
            raise ValueError("GradientProjector: the model has no trainable LoRA tensors")
        unknown = [n for n in subspaces if n not in params]
        if unknown:
            raise ValueError(f"GradientProjector: {len(unknown)} subspaces name no LoRA tensor of the model, "
                             f"e.g. {unknown[0]!r}")
        al = {n: float(alpha) for n in subspaces} if isinstance(alpha, (int, float)) else dict(alpha)
        self.model = model
        self.projection = GradientProjection.for_params(params, {n: s.V for n, s in subspaces.items()}, al)

    def project_(self) -> None:
        """Project every LoRA tensor's p.grad in place."""
        grads = {n: p.grad for n, p in lora_parameters(self.model).items() if p.grad is not None}
        self.projection.transform_grads(grads)

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Per-tensor gradient hooks for the duration of the block (the pipeline's `GradHooks`)."""
        from safeanchor.train.loop import GradHooks

        with GradHooks(self.model, self.projection, batched=False):
            yield


class AnchorLoss:
    """L_anchor = KL(p_{θ_{t−1}} ‖ p_θ), the mean over safe-response tokens (ALGORITHMS.md §3),
    against the model AS IT IS AT CONSTRUCTION: the reference log-probs of θ_{t−1} on the
    examples are computed once here and cached (float32, on the model's device).

    `loss = anchor(model)` takes the next batch (cycling, in the seeded order of the pipeline);
    multiply by γ yourself. Its gradient is meant to be added UNPROJECTED (backward it outside
    `GradientProjector.hooks()`, or after `project_()`).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, examples: Iterable[Example], *, batch_size: int = 8,
                 max_length: int = 96, seed: int = 0, kinds: list[str] | None = None) -> None:
        was_training = model.training
        self.batches = safety_batches(tokenizer, as_examples(examples, "anchor examples"), batch_size, max_length,
                                      seed, trainable_device(model), kinds)
        self.reference = cached_reference(model, self.batches)  # [(n_tokens, V)] log p_{θ_{t−1}}
        model.train(was_training)
        self.i = 0

    def __call__(self, model: torch.nn.Module, index: int | None = None) -> torch.Tensor:
        i = self.i if index is None else index
        if index is None:
            self.i += 1
        i %= len(self.batches)
        return anchor_kl(model, self.batches[i], self.reference[i])


def default_judge() -> Any:
    """The offline keyword-refusal judge (`judges.KeywordRefusalJudge`, default markers)."""
    from safeanchor.judges import JudgeConfig, build_judge

    return build_judge(JudgeConfig())


def probe_safety(model: torch.nn.Module, tokenizer: Any, probe: Iterable[Example | str], *, judge: Any = None,
                 max_new_tokens: int = 24, batch_size: int = 64) -> float:
    """Refusal rate of greedy responses on the probe prompts (`evaluation.probe_safety`)."""
    from safeanchor.evaluation import EvalConfig
    from safeanchor.evaluation import probe_safety as _probe

    prompts = [ChatExample(p) if isinstance(p, str) else p for p in probe]
    cfg = EvalConfig(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return _probe(model, tokenizer, as_examples(prompts, "probe"), judge or default_judge(), cfg)


@dataclass
class CSMResult:
    """One CSM check: s (refusal rate now), s0 (before any domain), threshold (1 − τ)·s0, and
    whether replay is due (s < threshold)."""

    s: float
    s0: float
    threshold: float
    replay: bool


def csm_check(model: torch.nn.Module, tokenizer: Any, probe: Iterable[Example | str], s0: float, *,
              tau: float = 0.05, judge: Any = None, max_new_tokens: int = 24, batch_size: int = 64) -> CSMResult:
    """CSM (ALGORITHMS.md §4): the probe's refusal rate now against (1 − τ)·s0."""
    s = probe_safety(model, tokenizer, probe, judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size)
    thr = csm_threshold(s0, tau)
    return CSMResult(s, s0, thr, s < thr)
