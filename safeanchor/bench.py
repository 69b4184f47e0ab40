"""Benchmarks at the shape of a real model, on random weights (nothing downloaded):

- `ssi_layer`: streaming SSI (safeanchor.ssi.safety_subspaces) on Llama-2-7B-shaped decoder
  layers (hidden 4096, MLP 11008, 32 heads, vocab 32000), LoRA r 16 on q/k/v/o, N calibration
  examples of a fixed token length: whole-process peak RSS (model included), wall time, and per
  tensor n, path (Gram N×N or moment n×n), k, trace, and per pass the gradient rows held.
- `shape_run`: one process, one device, the DeepSpeed engine the Train workers use
  (safeanchor.distributed.engine), a randomly initialised Llama of a given shape (7B: built
  directly in bf16 on the GPU), LoRA r 16 on q/k/v/o: a plain LoRA step, + the OSCA projection,
  a full SafeAnchor step (projection + anchor loss), and SSI on the calibration examples; times
  are medians of interleaved rounds.

Calibration / training examples are synthetic chat pairs of words, tokenised by a byte-level BPE
trained on those words (one token per word, so every example is exactly `seq_len` tokens after
truncation); the model's vocabulary is larger than the tokenizer's, which only leaves embedding
rows unused. Random weights give gradients of the same shapes and costs as trained ones; their
spectra (hence k) are not those of a trained model.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from safeanchor import logs
from safeanchor.data import ChatExample

logger = logging.getLogger(__name__)

LLAMA2_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 1024}
SHAPES = {"7b": LLAMA2_7B, "tiny": TINY}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
_WORDS = [f"w{i}" for i in range(200)]


def peak_rss_gb() -> float:
    """The process's peak resident set size so far (Linux: ru_maxrss in KiB), in GiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def synthetic_examples(n: int, seq_len: int, seed: int) -> list[ChatExample]:
    """n chat pairs of random words, long enough that truncation at `seq_len` tokens cuts every
    example to exactly seq_len tokens: a prompt of seq_len/3 words (2 tokens each, plus the chat
    template) and response tokens with a loss for the rest (18 of 64, 82 of 256)."""
    rng = random.Random(seed)
    p_words = max(2, seq_len // 3)
    return [ChatExample(" ".join(rng.choices(_WORDS, k=p_words)), " ".join(rng.choices(_WORDS, k=seq_len)))
            for _ in range(n)]


def synthetic_tokenizer():
    """Byte-level BPE over the word list: each `w<i>` (with its leading space) one token."""
    from safeanchor.toyworld.tokenizer import build_tokenizer

    text = " ".join(_WORDS)
    return build_tokenizer([text] * 4, vocab_size=1024)


def random_llama(shape: dict[str, int], device: torch.device, dtype: torch.dtype, seed: int = 0,
                 max_positions: int = 4096):
    """LlamaForCausalLM of `shape`, random init, built directly on `device` in `dtype` (no float32
    copy of a 7B model on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**shape, max_position_embeddings=max_positions, pad_token_id=0)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


def with_lora(model, r: int = 16, seed: int = 0, b_std: float = 0.01):
    """The pipeline's adapter (peft, r, α = 2r) on q/k/v/o, with lora_B drawn non-zero (seeded) so
    that every tensor has a gradient, as after a first domain (at B = 0, ∂L/∂A = 0)."""
    from safeanchor.models import LoraConfig, add_lora, lora_parameters

    model = add_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=LORA_TARGETS), seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lora_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
    return model


# ---- SSI on 7B-shaped layers (CPU) ---------------------------------------------------------
def ssi_layer(n_examples: int = 500, seq_len: int = 64, layers: int = 1, r: int = 16, chunk: int = 8,
              group_mb: float | None = None, rho: float = 0.9, k_max: int = 16,
              shape: dict[str, int] | None = None) -> dict[str, Any]:
    """Streaming SSI on `layers` decoder layers of `shape` (default Llama-2-7B's), float32, CPU."""
    from safeanchor.methods.safeanchor import short_name
    from safeanchor.models import lora_parameters
    from safeanchor.ssi import DEFAULT_GROUP_MB, safety_subspaces

    group_mb = DEFAULT_GROUP_MB if group_mb is None else group_mb
    shape = {**(shape or LLAMA2_7B), "num_hidden_layers": layers}
    t0 = time.perf_counter()
    tok = synthetic_tokenizer()
    model = with_lora(random_llama(shape, torch.device("cpu"), torch.float32, max_positions=max(64, seq_len)), r)
    examples = synthetic_examples(n_examples, seq_len, seed=1)
    build_s = time.perf_counter() - t0
    model_rss = rss_gb()
    params = lora_parameters(model)
    passes: list[dict[str, Any]] = []
    t_last = [time.perf_counter()]

    def on_group(names, acc):
        now = time.perf_counter()
        rows = sum(a.rows.numel() * 4 if a.gram_path else a.C.numel() * 8 for a in acc.values())
        passes.append({"tensors": len(names), "rows_gb": rows / 2**30, "s": now - t_last[0]})
        logger.info(f"  [ssi] pass {len(passes)}: {len(names)} tensors, {rows / 2**30:.2f} GiB of rows, "
                    f"{now - t_last[0]:.0f}s")
        t_last[0] = now

    t1, c1 = time.perf_counter(), time.process_time()
    subs = safety_subspaces(model, tok, examples, seq_len, rho, k_max, chunk=chunk, group_mb=group_mb,
                            on_group=on_group)
    ssi_s, ssi_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    n_total = sum(p.numel() for p in params.values())
    return {
        "ssi_peak_gb": peak_rss_gb(),
        "ssi_s": ssi_s,
        "ssi_cpu_s": ssi_cpu_s,  # CPU seconds of the process (on a shared machine, wall time lies)
        "model_rss_gb": model_rss,
        "build_s": build_s,
        "n_examples": n_examples, "seq_len": seq_len, "layers": layers, "lora_r": r, "chunk": chunk,
        "group_mb": group_mb, "rho": rho, "k_max": k_max, "threads": torch.get_num_threads(),
        "shape": shape,
        "lora_params": n_total,
        # what the whole-matrix path would hold at once (float32), for comparison
        "all_gradients_gb": n_examples * n_total * 4 / 2**30,
        "passes": passes,
        "tensors": {short_name(n): {"n": params[n].numel(), "path": "gram" if params[n].numel() > n_examples else "moment",
                                    "k": s.k, "trace": s.trace, "lam_top": float(s.lam[0]) if s.k else 0.0}
                    for n, s in subs.items()},
    }


# ---- one-device step / SSI benchmark through DeepSpeed -------------------------------------
@dataclass
class ShapeRun:
    shape: str = "tiny"  # "7b" | "tiny"
    device: str = "auto"  # auto (cuda if available) | cuda | cpu
    dtype: str = "auto"  # auto (bf16 on cuda, float32 on cpu) | bfloat16 | float32
    batch_size: int = 8
    seq_len: int = 256
    steps: int = 10  # timed steps per variant per round
    rounds: int = 3
    calib: int = 256  # SSI calibration examples
    zero_stage: int = 2
    lora_r: int = 16
    seed: int = 0


def _init_single_process(use_gpu: bool) -> None:
    """A one-rank process group for DeepSpeed without a launcher (reused if one exists: a
    process can hold only one, ENVIRONMENT.md)."""
    import torch.distributed as dist

    from safeanchor.distributed.engine import prepare_deepspeed

    deepspeed = prepare_deepspeed(use_gpu)
    if dist.is_initialized():
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def shape_run(cfg: ShapeRun) -> dict[str, Any]:
    """Plain LoRA / + projection / SafeAnchor step times and SSI time on one device (see module doc)."""
    from safeanchor.data import ExampleBatches, encode_dataset
    from safeanchor.distributed.config import DeepSpeedConfig, engine_config
    from safeanchor.distributed.engine import DeepSpeedStepEngine
    from safeanchor.methods import build_method
    from safeanchor.methods.base import Context
    from safeanchor.train.loop import TrainConfig, batches_from, run_loop

    if cfg.shape not in SHAPES:
        raise ValueError(f"shape: must be one of {sorted(SHAPES)}, got {cfg.shape!r}")
    use_gpu = torch.cuda.is_available() if cfg.device == "auto" else cfg.device == "cuda"
    if use_gpu and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no GPU is visible")
    device = torch.device("cuda" if use_gpu else "cpu")
    dtype_name = ("bfloat16" if use_gpu else "float32") if cfg.dtype == "auto" else cfg.dtype
    if dtype_name not in ("bfloat16", "float32"):
        raise ValueError(f"dtype: must be auto, bfloat16 or float32, got {cfg.dtype!r}")
    bf16 = dtype_name == "bfloat16"
    t0 = time.perf_counter()
    tok = synthetic_tokenizer()
    model = with_lora(random_llama(SHAPES[cfg.shape], device, getattr(torch, dtype_name), cfg.seed,
                                   max(64, cfg.seq_len)), cfg.lora_r, cfg.seed)
    build_s = time.perf_counter() - t0
    logger.info(f"[bench] {cfg.shape} Llama on {device} ({dtype_name}) built in {build_s:.0f}s")
    calib = synthetic_examples(cfg.calib, cfg.seq_len, seed=cfg.seed + 1)
    train = synthetic_examples(cfg.batch_size * 4, cfg.seq_len, seed=cfg.seed + 2)

    # SSI as the pipeline's in-process path runs it (the method's own before_domain), at θ_{t-1}
    full = build_method("safeanchor", {"csm": False})
    ctx = Context(model=model, tokenizer=tok, run_cfg=None, domain="bench", step=1, safety_calib=calib,
                  seed=cfg.seed, max_length=cfg.seq_len)
    if use_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t1 = time.perf_counter()
    with logs.quiet("safeanchor.methods"):  # its "[ssi]" line: this benchmark prints its own
        full.before_domain(ctx)
    if use_gpu:
        torch.cuda.synchronize()
    ssi_s = time.perf_counter() - t1
    ssi_gpu_peak = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None
    logger.info(f"[bench] SSI on {cfg.calib} examples: {ssi_s:.1f}s, k mean {full.ssi_log[-1]['k_mean']:.1f}")
    proj = build_method("safeanchor", {"csm": False, "anchor": False})
    proj.load_state_dict(full.state_dict())

    _init_single_process(use_gpu)
    tcfg = TrainConfig(lr=1e-4, batch_size=cfg.batch_size, max_length=cfg.seq_len, warmup_ratio=0.0,
                       schedule="constant", grad_clip=1.0, log_every=10**9)
    total_steps = 2 + 3 * cfg.rounds * cfg.steps
    ds = engine_config(DeepSpeedConfig(zero_stage=cfg.zero_stage).resolved(), cfg.batch_size, 1, tcfg.grad_clip, bf16)
    engine = DeepSpeedStepEngine(model, tcfg, total_steps, ds, use_gpu)
    ctx.model = engine.module  # hooks after the engine: caches on its device / dtype
    hooks = {"lora": None, "projection": proj.phase_hooks(ctx, "domain"), "safeanchor": full.phase_hooks(ctx, "domain")}
    feats = encode_dataset(tok, train, cfg.seq_len)
    batcher = ExampleBatches(feats, cfg.batch_size, cfg.seed, tok.pad_token_id)
    batches = batches_from(batcher.epoch, len(batcher), 0)

    def timed(h, steps: int) -> float:
        with logs.quiet("safeanchor.train.loop"):  # no progress lines
            return run_loop(engine, batches, steps, tcfg, h, tag="bench")["step_s"]

    timed(None, 2)  # warm-up (allocator, kernels)
    if use_gpu:
        torch.cuda.reset_peak_memory_stats()
    t = {k: [] for k in hooks}
    for _ in range(cfg.rounds):
        for k, h in hooks.items():
            t[k].append(timed(h, cfg.steps))
    med = {k: statistics.median(v) for k, v in t.items()}
    logger.info("[bench] step s: " + " ".join(f"{k} {v:.3f}" for k, v in med.items()))
    return {
        "shape": cfg.shape, "device": torch.cuda.get_device_name() if use_gpu else "cpu", "dtype": dtype_name,
        "zero_stage": cfg.zero_stage, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lora_r": cfg.lora_r,
        "steps": cfg.steps, "rounds": cfg.rounds, "calib_examples": cfg.calib,
        "lora_step_s": med["lora"], "projection_step_s": med["projection"], "safeanchor_step_s": med["safeanchor"],
        "ratio_projection": med["projection"] / med["lora"], "ratio_safeanchor": med["safeanchor"] / med["lora"],
        "step_runs_s": t,
        "ssi_s": ssi_s, "ssi_k_mean": full.ssi_log[-1]["k_mean"], "ssi_group_mb": full.cfg.ssi_group_mb,
        "projected_tensors": sum(1 for a in full.alpha.values() if a < 1.0),
        "ssi_gpu_peak_gb": ssi_gpu_peak,
        "train_gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None,
        "peak_rss_gb": peak_rss_gb(), "build_s": build_s, "wall_s": time.perf_counter() - t0,
    }
