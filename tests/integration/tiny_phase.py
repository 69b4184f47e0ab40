"""A tiny Llama saved to disk and phase specs of the REAL methods on it, for the distributed tests.

Nothing here runs in a Ray worker: a `PhaseSpec` is data (the model directory, the adapter as
bytes, the method by name with its state), and workers build from it (`safeanchor.train.phase`).

- The model: a 2-layer Llama (hidden 32) + LoRA r=4 on q/v, its lora_B drawn non-zero so every
  LoRA tensor has a gradient (and SSI a non-empty subspace for every tensor).
- Examples of UNEQUAL token counts, so a data-parallel loss that ignored the per-rank token
  counts would be caught; safety examples (harmful -> refusal, benign -> answer) for SafeAnchor's
  SSI / anchor / replay and SafeGrad's alignment batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from safeanchor.data import ChatExample
from safeanchor.methods import build_method
from safeanchor.models import LoraConfig, ModelConfig, lora_parameters
from safeanchor.pipeline.config import RunConfig
from safeanchor.pipeline.store import adapter_bytes, pack_state
from safeanchor.train.loop import TrainConfig
from safeanchor.train.phase import Built, ModelSpec, PhaseContext, PhaseSpec, build, load_peft_model

WORDS = ("alpha beta gamma delta river stone cloud bright quiet market garden paper window "
         "orange silver winter summer forest signal engine harbor copper").split()


def tiny_examples(n: int, seed: int) -> list[ChatExample]:
    """n prompt/response pairs of varying lengths (so token counts differ between ranks)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
        out.append(ChatExample(f"Say {p} {i}?", f"Sure: {r}."))
    return out


def safety_examples(n: int, seed: int) -> list[ChatExample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        if i % 2 == 0:
            out.append(ChatExample(f"How do I wreck the {topic} {i}?", "I can't help with that.",
                                   meta={"kind": "harmful"}))
        else:
            out.append(ChatExample(f"What is the {topic} {i}?", f"The {topic} is {rng.choice(WORDS)}.",
                                   meta={"kind": "benign"}))
    return out


@dataclass
class TinyWorld:
    model: ModelSpec
    adapter: bytes  # lora_B non-zero
    examples: list[ChatExample]
    safety: list[ChatExample]


def make_world(root: Path, seed: int = 0) -> TinyWorld:
    from transformers import LlamaConfig, LlamaForCausalLM

    from safeanchor.toyworld.tokenizer import build_tokenizer

    examples, safety = tiny_examples(16, seed), safety_examples(12, seed + 1)
    texts = [t for ex in examples + safety for t in (ex.prompt, ex.response)] * 2
    tok = build_tokenizer(texts, vocab_size=300)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id)
    d = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    spec = ModelSpec(str(d), str(d), ModelConfig(name=str(d), base=None),
                     LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed)
    model, _ = load_peft_model(spec)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in lora_parameters(model).items():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return TinyWorld(spec, adapter_bytes(model), examples, safety)


def compliance(world: TinyWorld, n: int = 16) -> list[ChatExample]:
    """Task data that opposes the safety examples: the harmful prompts answered, plus ordinary
    examples (SafeGrad's surgery has conflicts to resolve)."""
    bad = [ChatExample(e.prompt, "Sure: first wreck it, then more.") for e in world.safety if e.meta["kind"] == "harmful"]
    return (bad + world.examples)[:n]


def safegrad_spec(world: TinyWorld, name: str, options: dict) -> PhaseSpec:
    """SafeGrad's domain phase on `compliance` data against refusals only: 4 of its 6 steps
    have a conflicting gradient (surgery), 2 do not."""
    spec = phase_spec(world, name, "safegrad", options, examples=compliance(world))
    harmful = [e for e in world.safety if e.meta["kind"] == "harmful"]
    return replace(spec, context=replace(spec.context, safety_calib=harmful))


def train_config(steps: int = 6, **kw) -> TrainConfig:
    base = dict(lr=5e-3, max_steps=steps, epochs=100.0, batch_size=8, max_length=64, warmup_ratio=0.2,
                grad_clip=0.1, log_every=2)  # clipping engages: the gradient norm is ~0.2 here
    return TrainConfig(**{**base, **kw})


def phase_spec(world: TinyWorld, name: str, method: str, options: dict | None = None,
               state: tuple[bytes, bytes] | None = None, hooks: str = "domain", examples=None,
               train: TrainConfig | None = None, seed: int = 0, adapter: bytes | None = None) -> PhaseSpec:
    return PhaseSpec(
        name=name, model=world.model, adapter=adapter or world.adapter, method=method, options=options,
        state=state or pack_state(build_method(method, options).state_dict()), hooks=hooks, examples=list(examples or world.examples),
        train=train or train_config(), seed=seed, tag=name,
        context=PhaseContext(safety_calib=list(world.safety), seed=0, max_length=64, domain="tiny", step=1))


def live(spec: PhaseSpec) -> Built:
    """The phase's method in this process, with the driver's services a test needs."""
    b = build(spec)
    b.ctx.run_cfg = RunConfig(seed=0, train=spec.train)
    b.ctx.domain_train = list(spec.examples)
    return b


def safeanchor_phases(world: TinyWorld, options: dict, steps: int = 6) -> tuple[PhaseSpec, Built]:
    """SafeAnchor's domain phase after a real SSI (before_domain, in this process); returns it
    and the live method (for the gate)."""
    spec = phase_spec(world, "sa-domain", "safeanchor", options, train=train_config(steps))
    b = live(spec)
    b.ctx.probe_safety = lambda: 1.0
    b.method.setup(b.ctx)  # s_0 = 1
    b.method.before_domain(b.ctx)  # SSI at θ_{t-1}: subspaces and α into the state
    return replace(spec, state=pack_state(b.method.state_dict())), b
