"""SafeAnchor in a plain `transformers.Trainer`: three toy-world domains, with and without the
callback, safety before / after on the pipeline's test split.

    python workflows/examples/trainer_callback.py                       # seed 0, medical -> legal -> code
    python workflows/examples/trainer_callback.py --steps 10 --domains medical   # a quick look

The toy world, its data and the evaluation are the pipeline's (`prepare_run` with the toy preset:
the cached toy world, the same LoRA init, calibration / probe / test sets, keyword judge). The
training is a plain Trainer per domain, one persistent adapter, on the preset's settings: AdamW,
the preset's lr / batch / warm-up + cosine schedule (`train.loop.make_scheduler`, passed to the
Trainer as `optimizers=`), grad clip 1.0, the pipeline's batch order for the same seed (fed in
sequence: `train_sampling_strategy="sequential"`), so the "with callback" run is comparable one
to one with `python workflows/sequential.py --seed S --set cluster.executor=local` and the
"without" run with `--method lora`. The SafeAnchor options are the preset's
`methods.safeanchor`. Each domain's run saves its adapter and the callback's subspaces to
`<out>/<variant>/step<t>-<domain>/`; the next domain's callback merges them (`previous=`).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from safeanchor import logs, seeds
from safeanchor.config import ConfigError, from_dict
from safeanchor.data import ExampleBatches, collate, encode_dataset
from safeanchor.evaluation import evaluate
from safeanchor.integrations.hf_trainer import SafeAnchorCallback
from safeanchor.methods.safeanchor import SafeAnchorConfig
from safeanchor.models import lora_parameters
from safeanchor.pipeline.config import load_run_config
from safeanchor.pipeline.sequential import format_table, prepare_run, summarize
from safeanchor.storage import RunDir
from safeanchor.train.loop import make_scheduler
from safeanchor.train.phase import load_peft_model

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "workflows/configs/toy.yaml"), help="pipeline preset (data, model, settings)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--domains", default=None, help="comma-separated domain order (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="cap on optimizer steps per domain (default: the preset's epochs)")
    ap.add_argument("--variants", default="callback,plain", help="which runs: callback, plain (comma-separated)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="where adapters and subspaces go (default: a temporary directory)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="pipeline config override, as for workflows/sequential.py")
    return ap.parse_args(argv)


def train_domain(model, tok, run, t: int, domain: str, out: Path, steps_cap: int | None,
                 callback: SafeAnchorCallback | None) -> None:
    """One domain with a plain Trainer, in the pipeline's batch order for this seed and step."""
    cfg = run.cfg
    tcfg = cfg.train
    feats = encode_dataset(tok, run.domain_train[domain], tcfg.max_length)
    batcher = ExampleBatches(feats, tcfg.batch_size, seeds.domain_phase(cfg.seed, t), tok.pad_token_id)
    steps = tcfg.num_steps(len(batcher))
    if steps_cap is not None:
        steps = min(steps, steps_cap)
    # the pipeline's batches, epoch after epoch, fed in sequence (exactly its batches when the
    # domain size is a multiple of the batch size, as in the toy world: 1,728 / 32)
    ordered = [feats[i] for e in range(math.ceil(steps / len(batcher))) for i in batcher.order(e)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    sched = make_scheduler(opt, tcfg, steps)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=tcfg.batch_size, max_steps=steps,
        max_grad_norm=tcfg.grad_clip, train_sampling_strategy="sequential", seed=cfg.seed,
        logging_steps=tcfg.log_every, logging_strategy="steps", save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, label_names=["labels"], dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=ordered, processing_class=tok,
                      data_collator=lambda fs: collate(fs, tok.pad_token_id), optimizers=(opt, sched),
                      callbacks=[callback] if callback is not None else [])
    trainer.train()
    model.save_pretrained(str(out))  # the adapter; the callback wrote its subspaces next to it


def run_variant(name: str, run, base_eval: dict, args: argparse.Namespace, out: Path) -> dict:
    cfg = run.cfg
    model, tok = load_peft_model(run.model_spec)  # the pipeline's model + adapter init for this seed
    sa_cfg = from_dict(SafeAnchorConfig, cfg.methods.get("safeanchor"), "methods.safeanchor")
    history, previous = [base_eval], None
    t0 = time.perf_counter()
    for t, d in enumerate(cfg.data.order, start=1):
        step_dir = out / name / f"step{t}-{d}"
        print(f"[{name}] domain {t}/{len(cfg.data.order)}: {d}", flush=True)
        cb = None
        if name == "callback":
            cb = SafeAnchorCallback(
                run.ctx.safety_calib, probe=run.ctx.safety_probe, domain_examples=run.domain_train[d],
                previous=previous, config=sa_cfg, domain=d, max_length=cfg.train.max_length, seed=cfg.seed,
                judge=run.judge, max_new_tokens=cfg.eval.max_new_tokens, eval_batch_size=cfg.eval.batch_size)
        train_domain(model, tok, run, t, d, step_dir, args.steps, cb)
        previous = step_dir
        m = evaluate(model, tok, run.suite, run.judge, cfg.eval)
        print(f"[{name}] after {d}: " + " ".join(f"{k}={v:.3f}" for k, v in m.items()), flush=True)
        history.append(m)
    summary = summarize(cfg, history, run.extras)
    summary["method"] = f"trainer+{name}"
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup()  # the pipeline's and the callback's progress lines on stdout
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in ("callback", "plain")]
    if bad or not variants:
        print(f"error: --variants: unknown {bad or variants} (known: callback, plain)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ["tracking.enabled=false", "cluster.executor=local"]
    if args.domains:
        overrides.append(f"data.order=[{args.domains}]")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="safeanchor-trainer-"))
    try:
        cfg = load_run_config(args.config, overrides, seed=args.seed, method="safeanchor",
                              run_id=f"trainer-callback-seed{args.seed}")
        # the pipeline's loading: toy world (built once, cached), data, judge, model + adapter init
        run = prepare_run(cfg, storage=RunDir.open(str(out / "pipeline")))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[example] {len(lora_parameters(run.ctx.model))} LoRA tensors; outputs under {out}", flush=True)
    base_eval = evaluate(run.ctx.model, run.tokenizer, run.suite, run.judge, cfg.eval)
    print("[example] before any domain: " + " ".join(f"{k}={v:.3f}" for k, v in base_eval.items()), flush=True)
    results = {v: run_variant(v, run, base_eval, args, out) for v in variants}
    for v, s in results.items():
        print(f"\n== plain Trainer {'+ SafeAnchorCallback' if v == 'callback' else '(no callback)'}, seed {cfg.seed}")
        print(format_table(s))
    print(f"\n[example] test split, seed {cfg.seed}, order {' -> '.join(cfg.data.order)}"
          + (f", at most {args.steps} steps per domain" if args.steps else ""))
    for v, s in results.items():
        print(f"  {v:>8}: safety {s['safety'][0]:.3f} -> {s['safety'][-1]:.3f}  retention {s['retention']:.3f}  "
              f"domain_plastic {s['domain_plastic']:.3f}  domain_mean_final {s['domain_mean_final']:.3f}  "
              f"wall {s['wall_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
