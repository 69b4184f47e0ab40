"""SSI at a model (ALGORITHMS.md §1): per-example gradients of the safety loss of a peft model's
LoRA tensors on chat examples, and the per-tensor Fisher subspaces they give, in this process.

The math (`fisher_subspace`, `per_example_grads`, `response_nll`) is the pure-torch core in
`safeanchor.subspace`; this module holds the parts that know the model and the data (peft's LoRA
tensors, the tokenizer, encoding and collation). `safeanchor.distributed.ssi.identify_subspaces`
is the one place that chooses where SSI runs (here, or sharded on Ray tasks).
"""

from __future__ import annotations

import torch

from safeanchor.data import collate, encode_dataset
from safeanchor.models import lora_parameters
from safeanchor.subspace.anchor import response_nll
from safeanchor.subspace.fisher import Subspace, fisher_subspace, per_example_grads


def safety_gradients(model, batch: dict[str, torch.Tensor], chunk: int = 16) -> dict[str, torch.Tensor]:
    """Per-example gradients of the response NLL over the model's LoRA tensors.

    `batch` is a right-padded collated batch (input_ids, labels with -100 on prompt and pad).
    Returns name -> (N, *shape). The model is put in eval mode (no dropout) and back.
    """
    from torch.func import functional_call

    params = lora_parameters(model)
    was_training = model.training
    model.eval()

    def loss_fn(p, ex):
        # Right padding + causal attention: real tokens never attend to pads, so no mask is
        # needed (and sdpa with a mask breaks vmap). Pads carry label -100.
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ex["input_ids"]}).logits
        return response_nll(logits, ex["labels"])

    # Eager attention under vmap: sdpa has no batching rule on CPU (slow per-example fallback).
    hf_cfg = model.get_base_model().config
    prev_attn = hf_cfg._attn_implementation
    hf_cfg._attn_implementation = "eager"
    # transformers' / peft's `enable_input_require_grads` (Trainer and TRL's SFTTrainer turn it on
    # with gradient checkpointing) puts a forward hook on the input embeddings that calls
    # requires_grad_(), which vmap refuses; the LoRA gradients do not need it: those hooks (only
    # them) are taken off for SSI and put back as they were.
    saved = []
    for m in model.modules():
        drop = [k for k, fn in m._forward_hooks.items() if "make_inputs_require_grad" in getattr(fn, "__qualname__", "")]
        if drop:
            saved.append((m, dict(m._forward_hooks)))
            for k in drop:
                del m._forward_hooks[k]
    try:
        return per_example_grads(loss_fn, params, {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                                 chunk=chunk)
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
        hf_cfg._attn_implementation = prev_attn
        model.train(was_training)


def safety_subspaces(
    model, tokenizer, examples: list, max_length: int, rho: float | None, k_max: int, k_fixed: int | None = None,
    chunk: int = 16, eps: float = 0.0,
) -> dict[str, Subspace]:
    """In-process SSI: name -> `fisher_subspace` of every LoRA tensor at the current model.

    `examples` (safe responses) are encoded with `max_length`, right-padded into ONE batch
    (on the CPU, where the in-process model lives), and their per-example gradients
    (`safety_gradients`, `chunk` examples per vmap chunk) give each tensor's G (N, n).
    """
    batch = collate(encode_dataset(tokenizer, examples, max_length), tokenizer.pad_token_id)
    grads = safety_gradients(model, batch, chunk=chunk)  # name -> (N, *shape)
    N = len(examples)
    return {name: fisher_subspace(g.reshape(N, -1), rho, k_max, k_fixed, eps) for name, g in grads.items()}
