"""SSI at a model (ALGORITHMS.md §1): per-example gradients of the safety loss of a peft model's
LoRA tensors on chat examples, and the per-tensor Fisher subspaces they give, in this process.

The math (`FisherRows`, `rows_subspace`, `per_example_grads`, `response_nll`) is the pure-torch
core in `safeanchor.subspace`; this module holds the parts that know the model and the data (peft's
LoRA tensors, the tokenizer, encoding and collation). `safeanchor.distributed.ssi.identify_subspaces`
is the one place that chooses where SSI runs (here, or sharded on Ray tasks).

Streaming (what makes SSI fit a 7B model). Holding every per-example gradient at once costs
N · Σ_i n_i · 4 bytes (N = 500 at Llama-2-7B, LoRA r 16 on q/k/v/o: 500 · 16.8 M · 4 = 34 GB).
Instead the LoRA tensors are split into groups of consecutive tensors whose gradient rows fit a
memory budget (`plan_groups`), and each group gets its own pass over the calibration set, `chunk`
examples at a time, differentiating only that group's tensors (torch.func.grad over the group;
the rest of the model is a constant, so the backward stops at the group's first layer). A
tensor's rows go into its `FisherRows` (float32 rows when n > N, an n×n float64 moment when
n ≤ N), which gives its subspace as soon as the pass ends; then the group's memory is freed.
Peak: one group's rows (≥ N · n_max · 4 bytes) + one chunk's activations + the model; cost: one
forward / backward pass over the calibration set per group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from safeanchor.data import collate, encode_dataset
from safeanchor.models import lora_parameters
from safeanchor.subspace.anchor import response_nll
from safeanchor.subspace.fisher import FisherRows, Subspace, per_example_grads, plan_groups

#: default memory budget (MiB) for the gradient rows of one group of tensors (`plan_groups`)
DEFAULT_GROUP_MB = 4096


@contextmanager
def _per_example_mode(model) -> Iterator[None]:
    """Eval mode (no dropout) and eager attention for the duration: sdpa has no vmap batching rule
    on CPU (slow per-example fallback) and with a mask breaks vmap (ENVIRONMENT.md)."""
    was_training = model.training
    model.eval()
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
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)
        hf_cfg._attn_implementation = prev_attn
        model.train(was_training)


def _loss_fn(model):
    from torch.func import functional_call

    def loss_fn(p, ex):
        # Right padding + causal attention: real tokens never attend to pads, so no mask is
        # needed (and sdpa with a mask breaks vmap). Pads carry label -100.
        logits = functional_call(model, p, args=(), kwargs={"input_ids": ex["input_ids"]}).logits
        return response_nll(logits, ex["labels"])

    return loss_fn


def safety_gradients(model, batch: dict[str, torch.Tensor], chunk: int = 16) -> dict[str, torch.Tensor]:
    """Per-example gradients of the response NLL over ALL the model's LoRA tensors at once.

    `batch` is a right-padded collated batch (input_ids, labels with -100 on prompt and pad).
    Returns name -> (N, *shape): N · Σ n_i numbers (EWC's diagonal Fisher on small batches, and
    the reference the streaming path is tested against; SSI streams, `stream_fisher_rows`).
    """
    params = lora_parameters(model)
    with _per_example_mode(model):
        return per_example_grads(_loss_fn(model), params, {"input_ids": batch["input_ids"], "labels": batch["labels"]},
                                 chunk=chunk)


def lora_sizes(model) -> list[tuple[str, int]]:
    """(name, numel) of every LoRA tensor, in the model's parameter order."""
    return [(n, p.numel()) for n, p in lora_parameters(model).items()]


def stream_fisher_rows(model, batch: dict[str, torch.Tensor], groups: list[list[str]],
                       chunk: int = 16) -> Iterator[dict[str, FisherRows]]:
    """For each group of LoRA tensors: one pass over the batch's examples, `chunk` at a time,
    with per-example gradients of that group's tensors only; yields name -> `FisherRows` (on the
    model's device) after the pass. The caller finishes them (subspace / factor) and drops them
    before asking for the next group: that is what bounds the memory.

    Each chunk is cut to its own longest example (right padding: the trailing pad columns change
    nothing, causal attention, label -100), so short chunks cost less than the batch's width.
    """
    params = lora_parameters(model)
    N = batch["input_ids"].shape[0]
    device = next(iter(params.values())).device
    widths = batch["attention_mask"].sum(1) if "attention_mask" in batch else None
    loss_fn = _loss_fn(model)
    with _per_example_mode(model), torch.no_grad():
        # torch.no_grad: torch.func.grad ignores an outer no_grad, and the LoRA tensors outside
        # the group (requires_grad, not differentiated here) must not record an autograd graph
        for names in groups:
            sub = {n: params[n] for n in names}
            acc = {n: FisherRows(params[n].numel(), N, device) for n in names}
            for lo in range(0, N, chunk):
                hi = min(N, lo + chunk)
                T = int(widths[lo:hi].max()) if widths is not None else batch["input_ids"].shape[1]
                ex = {"input_ids": batch["input_ids"][lo:hi, :T].to(device),
                      "labels": batch["labels"][lo:hi, :T].to(device)}
                g = per_example_grads(loss_fn, sub, ex, chunk=hi - lo)  # name -> (c, *shape)
                for n in names:
                    acc[n].add(g[n])
                del g
            yield acc
            del acc


def safety_subspaces(
    model, tokenizer, examples: list, max_length: int, rho: float | None, k_max: int, k_fixed: int | None = None,
    chunk: int = 16, eps: float = 0.0, group_mb: float = DEFAULT_GROUP_MB, on_group=None,
) -> dict[str, Subspace]:
    """In-process, streaming SSI: name -> Subspace of every LoRA tensor at the current model
    (the eigenpairs `fisher_subspace` would give for the whole gradient matrix), on CPU.

    `examples` (safe responses) are encoded with `max_length` and right-padded into one batch;
    tensors are grouped under `group_mb` MiB of gradient rows (`plan_groups`), one pass each over
    the examples on the model's device, `chunk` examples per vmap call. `on_group(names, rows)`,
    if given, sees each group's `FisherRows` before they are dropped (benchmarks, tests).
    """
    batch = collate(encode_dataset(tokenizer, examples, max_length), tokenizer.pad_token_id)
    N = len(examples)
    groups = plan_groups(lora_sizes(model), N, group_mb * 2**20)
    out: dict[str, Subspace] = {}
    for acc in stream_fisher_rows(model, batch, groups, chunk):
        if on_group is not None:
            on_group(list(acc), acc)
        for name, rows in acc.items():
            s = rows.subspace(rho, k_max, k_fixed, eps)
            out[name] = Subspace(s.V.cpu(), s.lam.cpu(), s.trace)
        del acc, rows  # before the next group's pass: one group's rows alive at a time
    return out
