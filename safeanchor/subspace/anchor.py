"""Losses over safe responses used by SafeAnchor (pure torch).

- `response_nll`: token NLL on response positions (labels != -100), mean over tokens.
- `cached_reference`: log-probs of the frozen model θ_{t−1} on the anchor set's response
  positions, computed ONCE at the start of a domain (ALGORITHMS.md §3).
- `anchor_kl`: forward KL(p_{θ_{t−1}} ‖ p_θ), mean over response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token alignment: logits (B, T, V) for positions predicting labels[:, 1:]."""
    return logits[:, :-1, :], labels[:, 1:]


def response_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Masked mean written without boolean indexing or data-dependent branches, so that it
    # runs under torch.func.vmap (per-example gradients).
    lg, lb = shifted(logits, labels)
    mask = (lb != -100).to(lg.dtype)
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), lb.clamp(min=0).reshape(-1), reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def cached_reference(model, batches: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """For each batch: log p_{θ_{t−1}}(·) at its response positions, (n_tokens, V), float32."""
    model.eval()
    out = []
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        lg, lb = shifted(logits, b["labels"])
        out.append(F.log_softmax(lg[lb != -100].float(), dim=-1))
    return out


def anchor_kl(model, batch: dict[str, torch.Tensor], ref_logp: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ p_θ) averaged over the batch's response tokens; gradient flows into θ only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lg, lb = shifted(logits, batch["labels"])
    logp = F.log_softmax(lg[lb != -100].float(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean()
