"""A tiny, fully seeded phase builder for the distributed tests (importable by Ray workers).

`build_tiny(TinyArgs(...))` returns a `PhaseSetup`: a 2-layer Llama + LoRA (lora_B drawn
non-zero so that every LoRA tensor has a gradient), a toy tokenizer, examples of UNEQUAL token
counts (so a data-parallel loss that ignored the per-rank token counts would be caught), and
`TinyHooks`:

- transform_grad: g <- g - V Vᵀ g with a fixed random orthonormal V (n, k) per LoRA tensor;
- unprojected_loss: γ · KL(p_θ0 ‖ p_θ) on a fixed anchor batch (θ0 = the initial adapter),
  the shape of SafeAnchor's anchor term; it does not depend on the step's batch;
- optionally (`full_grad=True`, needs_full_grad) after_backward: every tensor's FULL gradient
  scaled to unit norm, a non-linear map that gives a different result on per-rank gradients;
- a step counter `calls` (its phase state), and a one-time failure at a given step on a given
  rank (`os._exit` or an exception) guarded by a marker file, for the restart test.

The test files cannot hold this: Ray workers import the builder by name.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from safeanchor.data import ChatExample, collate, encode_dataset
from safeanchor.distributed.trainer import PhaseSetup
from safeanchor.models import LoraConfig, add_lora, lora_parameters
from safeanchor.subspace.anchor import anchor_kl, cached_reference
from safeanchor.train.loop import TrainConfig

WORDS = ("alpha beta gamma delta river stone cloud bright quiet market garden paper window "
         "orange silver winter summer forest signal engine harbor copper").split()


@dataclass
class TinyArgs:
    seed: int = 0
    n_examples: int = 16
    batch_size: int = 8
    steps: int = 6
    lr: float = 5e-3
    grad_clip: float = 0.1  # engages: the global gradient norm is ~0.2 here
    project_k: int = 2  # columns of V per tensor (0: no transform_grad)
    gamma: float = 5.0  # weight of the unprojected KL (0: none)
    full_grad: bool = False  # after_backward normalisation, needs_full_grad = True
    fail_at_step: int | None = None  # 1-based step at whose loss() the failing rank dies once
    fail_rank: int = 1
    fail_marker: str | None = None  # created when the failure fires; present = do not fail again
    fail_mode: str = "exit"  # exit (os._exit: the worker process dies) | raise
    build_log: str | None = None  # a line is appended per build (counts worker (re)starts)
    lora_dropout: float = 0.0


def tiny_examples(n: int, seed: int) -> list[ChatExample]:
    """n prompt/response pairs of varying lengths (so token counts differ between ranks)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
        out.append(ChatExample(f"Say {p} {i}?", f"Sure: {r}."))
    return out


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class TinyHooks:
    name = "tiny"

    def __init__(self, model, args: TinyArgs, anchor_batch, ref) -> None:
        self.args = args
        self.needs_full_grad = args.full_grad
        self.calls = 0
        self.anchor_batch, self.ref = anchor_batch, ref
        gen = torch.Generator().manual_seed(args.seed + 17)
        self.V: dict[str, torch.Tensor] = {}
        if args.project_k > 0:
            for n, p in lora_parameters(model).items():
                q, _ = torch.linalg.qr(torch.randn(p.numel(), args.project_k, generator=gen))
                self.V[n] = q  # (n, k), orthonormal columns

    def loss(self, model, batch, task_loss):
        self.calls += 1
        a = self.args
        if a.fail_at_step == self.calls and _rank() == a.fail_rank and a.fail_marker \
                and not Path(a.fail_marker).exists():
            Path(a.fail_marker).write_text(f"failed at step {self.calls} on rank {_rank()}\n")
            if a.fail_mode == "exit":
                os._exit(3)
            raise RuntimeError(f"injected failure at step {self.calls}")
        return task_loss

    def unprojected_loss(self, model, batch):
        if self.args.gamma == 0:
            return None
        return self.args.gamma * anchor_kl(model, self.anchor_batch, self.ref)

    def transform_grad(self, name, grad):
        V = self.V.get(name)
        if V is None:
            return None
        g = grad.reshape(-1)
        return (g - V @ (V.T @ g)).view_as(grad)

    def after_backward(self, model, batch):
        if not self.args.full_grad:
            return
        for p in model.parameters():
            if p.requires_grad and p.grad is not None:
                p.grad.div_(p.grad.norm() + 1e-8)


def build_tiny(args: TinyArgs) -> PhaseSetup:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeanchor.toyworld.tokenizer import build_tokenizer

    if args.build_log:
        with open(args.build_log, "a") as fh:
            fh.write(f"build pid {os.getpid()} rank {_rank()}\n")

    examples = tiny_examples(args.n_examples, args.seed)
    tok = build_tokenizer([t for ex in examples for t in (ex.prompt, ex.response)] * 2, vocab_size=300)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    model = add_lora(LlamaForCausalLM(cfg), LoraConfig(r=4, dropout=args.lora_dropout, target_modules=["q_proj", "v_proj"]), seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    anchor = collate(encode_dataset(tok, examples[:3], 64), tok.pad_token_id)
    ref = cached_reference(model, [anchor])[0]
    hooks = TinyHooks(model, args, anchor, ref)
    tcfg = TrainConfig(lr=args.lr, max_steps=args.steps, epochs=100.0, batch_size=args.batch_size, max_length=64,
                       warmup_ratio=0.2, grad_clip=args.grad_clip, log_every=2)

    def save(model, hooks, out_dir):
        from safetensors.torch import save_file

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = str(Path(out_dir) / "lora.safetensors")
        save_file({n: p.detach().cpu().contiguous() for n, p in lora_parameters(model).items()}, path)
        return {"lora": path, "calls": hooks.calls}

    return PhaseSetup(model=model, tokenizer=tok, hooks=hooks, examples=examples, cfg=tcfg, seed=args.seed,
                      tag="tiny", save=save, phase_state=lambda: {"calls": hooks.calls},
                      load_phase_state=lambda s: setattr(hooks, "calls", int(s["calls"])))
