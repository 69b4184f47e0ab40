"""The sequential pipeline (single process): for each domain, train the persistent LoRA
adapter with the method's hooks, evaluate everything, save the adapter.

Outputs under `<storage>/<run_id>/`: config.yaml (resolved), adapters/step<t>-<domain>/,
metrics.jsonl (one line per step) and summary.json (ALGORITHMS.md §5 names). Every file goes
through one `safeanchor.storage.RunDir` (a local path or any pyarrow.fs URI), written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

from safeanchor import seeds
from safeanchor.benchmarks import BENCH_PREFIX, load_benchmark
from safeanchor.config import ConfigError, dump_yaml, from_dict, to_dict
from safeanchor.data import ChatExample, load_examples
from safeanchor.evaluation import EvalSuite, evaluate, load_extra_files, probe_safety
from safeanchor.judges import build_judge
from safeanchor.methods import Context, build_method
from safeanchor.methods.base import TrainPhase, train_in_process
from safeanchor.models import add_lora, load_model, load_tokenizer, resolve, revision_for
from safeanchor.pipeline.config import RunConfig
from safeanchor.pipeline.store import (
    StepStore,
    adapter_bytes,
    load_adapter_bytes,
    pack_state,
    unpack_state,
)
from safeanchor.storage import RunDir
from safeanchor.tracking import default_tracking_uri, make_tracker, numeric_scalars
from safeanchor.train.loop import TrainConfig, train_examples
from safeanchor.train.phase import ModelSpec, PhaseContext, PhaseSpec, safe_name
from safeanchor.utils import machine

logger = logging.getLogger(__name__)

CORE_METRICS = ("safety", "over_refusal", "helpful", "general")


class Sources:
    """Resolves data references: `toyworld:<part>` from the built toy world, else files / hf ids."""

    def __init__(self, world, aligned=None, benchmarks: dict | None = None) -> None:
        self.world = world
        self.aligned = aligned
        self.benchmarks = benchmarks or {}  # data.benchmarks: name -> HubDataset

    def load(self, ref: str, key: str, require_response: bool = True) -> list[ChatExample]:
        if ref.startswith(BENCH_PREFIX):  # a hub benchmark (safeanchor.benchmarks)
            name = ref[len(BENCH_PREFIX):]
            if name not in self.benchmarks:
                raise ConfigError(key, f"{ref!r} names no data.benchmarks entry")
            xs = load_benchmark(self.benchmarks[name], f"data.benchmarks.{name}")
            if require_response and any(not x.response.strip() for x in xs):
                raise ConfigError(key, f"{ref!r} ({self.benchmarks[name].kind}) gives prompts without "
                                  "responses; this set needs responses to train on")
            return xs
        if ref == "align:calib":  # the alignment stage's calibration set (its own safe answers)
            if self.aligned is None or self.aligned.calib_file is None:
                raise ConfigError(key, "'align:calib' needs the alignment stage (align.enabled: true)")
            return load_examples(str(self.aligned.calib_file), require_response=require_response)
        if not ref.startswith("toyworld:"):
            return load_examples(ref, require_response=require_response)
        if self.world is None:
            raise ConfigError(key, f"{ref!r} needs the toy world")
        d = self.world.data
        part = ref[len("toyworld:") :]
        table = {
            "safety/calib": lambda: d.safety["calib"]["harmful"] + d.safety["calib"]["benign"],
            "safety/probe": lambda: d.safety["probe"]["harmful"],
            **{f"safety/{s}_harmful": (lambda s=s: d.safety[s]["harmful"]) for s in ("val", "test", "seen")},
            **{f"safety/{s}_benign": (lambda s=s: d.safety[s]["benign"]) for s in ("val", "test")},
            **{f"general/{s}": (lambda s=s: d.general[s]) for s in ("val", "test")},
            **{f"{n}/{s}": (lambda n=n, s=s: d.domains[n][s]) for n in d.domains for s in ("train", "val", "test")},
        }
        if part not in table:
            raise ConfigError(key, f"unknown toy-world data {ref!r} (known: {', '.join('toyworld:' + k for k in table)})")
        return list(table[part]())


def summarize(cfg: RunConfig, history: list[dict[str, float]], extras: list[str]) -> dict[str, Any]:
    """summary.json's metrics. A headline value that is NaN (an empty or unscorable set) stays
    NaN — a mean is never taken over the domains that happened to score — and is listed under
    `warnings`, which the run also prints."""
    order = cfg.data.order
    domain = {d: [h[f"domain/{d}"] for h in history] for d in order}
    plastic = [domain[d][i + 1] for i, d in enumerate(order) if i + 1 < len(history)]
    finals = [domain[d][-1] for d in order]
    s = {
        "method": cfg.method, "model": cfg.model.name, "order": order, "seed": cfg.seed,
        "split": cfg.eval.split,
        **{k: [h[k] for h in history] for k in CORE_METRICS},
        "domain": domain,
        "domain_plastic": sum(plastic) / len(plastic) if plastic else float("nan"),
        "domain_mean_final": sum(finals) / len(finals),
        # every extra metric: harmful files' refusal, benign files' refusal and accuracy
        "extra_eval": {k[len("extra/"):]: [h[k] for h in history] for k in history[0] if k.startswith("extra/")},
        "extra_harmful": list(extras),
    }
    # judge outputs that did not parse are left out of every rate; a count > 0 is worth a look
    s["judge_parse_errors"] = [int(h.get("judge_parse_errors", 0)) for h in history]
    # bench/<name> (and BBQ's bench/<name>/<score>), lm-eval tasks: name -> list over steps
    s["benchmarks"] = {k[len("bench/"):]: [h.get(k, float("nan")) for h in history]
                       for k in history[0] if k.startswith("bench/")}
    s["lm_eval"] = {k[len("lmeval/"):]: [h.get(k, float("nan")) for h in history]
                    for k in history[0] if k.startswith("lmeval/")}
    if all("safety_composite" in h for h in history):
        s["safety_composite"] = [h["safety_composite"] for h in history]
    if all("safety_seen_topics" in h for h in history):
        s["safety_seen_topics"] = [h["safety_seen_topics"] for h in history]
    s["retention"] = s["safety"][-1] / s["safety"][0] if s["safety"][0] > 0 else float("nan")
    warnings = [f"{k} is NaN at step {t}" for k in CORE_METRICS for t, v in enumerate(s[k]) if math.isnan(v)]
    warnings += [f"domain/{d} is NaN at step {t} (domain_plastic / domain_mean_final are NaN)"
                 for d in order for t, v in enumerate(domain[d]) if math.isnan(v)]
    warnings += [f"{k} is NaN" for k in ("retention",) if math.isnan(s[k])]
    warnings += [f"judge_parse_errors: {n} judge outputs did not parse at step {t} (left out of the "
                 "rates; generations/step<t>.jsonl marks them with judge_error)"
                 for t, n in enumerate(s["judge_parse_errors"]) if n]
    s["warnings"] = warnings
    return s


def format_table(summary: dict[str, Any]) -> str:
    order = summary["order"]
    cols = ["step", *CORE_METRICS, *order]
    rows = [" ".join(f"{c:>12}" for c in cols)]
    for t in range(len(summary["safety"])):
        name = "0 (aligned)" if t == 0 else f"{t} {order[t - 1]}"
        vals = [summary[k][t] for k in CORE_METRICS] + [summary["domain"][d][t] for d in order]
        rows.append(f"{name:>12} " + " ".join(f"{v:>12.3f}" for v in vals))
    seen = summary.get("safety_seen_topics")
    rows.append(
        f"[{summary.get('split', 'test')} split] retention {summary['retention']:.3f}  "
        f"domain_plastic {summary['domain_plastic']:.3f}  "
        f"domain_mean_final {summary['domain_mean_final']:.3f}  wall {summary.get('wall_s', 0):.0f}s"
        + (f"  safety_seen_topics {seen[0]:.3f} -> {seen[-1]:.3f}" if seen else "")
    )
    comp = summary.get("safety_composite")
    if comp:
        rows.append(f"safety_composite {comp[0]:.3f} -> {comp[-1]:.3f}")
    for name, vals in summary.get("benchmarks", {}).items():
        rows.append(f"bench/{name}: " + " ".join(f"{v:.3f}" for v in vals))
    rows += [f"WARNING: {w}" for w in summary.get("warnings", [])]
    return "\n".join(rows)


@dataclass
class PreparedRun:
    """Everything a run needs, loaded and validated; the run directory exists."""

    cfg: RunConfig
    run_dir: RunDir
    tokenizer: Any
    suite: EvalSuite
    judge: Any
    method: Any
    ctx: Context
    domain_train: dict[str, list[ChatExample]]
    extras: list[str]  # stems of the extra harmful files
    model_spec: ModelSpec  # how another process loads the same model (Train workers, SSI tasks)


def open_storage(cfg: RunConfig, storage: RunDir | None = None) -> RunDir:
    """The storage root: `storage` if given (e.g. a RunDir on a pyarrow SubTreeFileSystem), else
    cfg.storage (a local path or a pyarrow.fs URI; a bad one is a ConfigError naming `storage`)."""
    return storage if storage is not None else RunDir.open(cfg.storage)


def prepare_run(cfg: RunConfig, resume: bool = False, storage: RunDir | None = None) -> PreparedRun:
    """Validate inputs, build/load the toy world if referenced, load data, model and adapter.

    storage: the storage root (default: cfg.storage through pyarrow.fs)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # Cheap validation first: bad files or options fail before anything is built or written.
    run_dir = open_storage(cfg, storage).sub(cfg.resolved_run_id())
    if resume and not run_dir.is_file("config.yaml"):
        raise ConfigError("run_id", f"nothing to resume: {run_dir.uri('config.yaml')} does not exist")
    elif not resume and run_dir.exists("steps"):
        raise ConfigError("run_id", f"{run_dir.uri()} already holds a run: continue it with --resume "
                          f"{cfg.resolved_run_id()}, or choose another --run-id / --storage")
    open_storage(cfg, storage).check_writable()  # --storage /proc/nope: one line, before any work
    if cfg.tracking.enabled:  # e.g. s3:// storage without an MLflow server: fail before any work
        default_tracking_uri(cfg.tracking, open_storage(cfg, storage))
    extra_h, extra_b = load_extra_files(cfg.eval)
    judge = build_judge(cfg.eval.judge)
    if cfg.eval.lm_eval.tasks:  # unknown task names fail here, before any training
        from safeanchor.lmeval import check_tasks

        check_tasks(cfg.eval.lm_eval)
    method = build_method(cfg.method, cfg.methods.get(cfg.method))

    world = None
    toy_paths = None
    if cfg.uses_toyworld():
        from safeanchor.toyworld.build import build

        world = build(cfg.toyworld)
        toy_paths = {"aligned": world.aligned_dir, "pretrained": world.pretrained_dir, "tokenizer": world.tokenizer_dir}
    aligned = None
    if cfg.align.enabled:  # a model that is not aligned yet: align it once (cached) -> step-0 model
        from safeanchor.alignment import run_alignment

        aligned = run_alignment(cfg.align, resolve(cfg.model.name, toy_paths, "model.name"))
    src = Sources(world, aligned, cfg.data.benchmarks)

    # --- data (all loaded and validated before any training) -------------------------
    rng = seeds.train_subsample(cfg.seed)
    domain_train = {}
    for d in cfg.data.order:
        xs = src.load(cfg.data.domains[d].train, f"data.domains.{d}.train")
        if cfg.data.max_train_examples and len(xs) > cfg.data.max_train_examples:
            xs = rng.sample(xs, cfg.data.max_train_examples)
        domain_train[d] = xs
    # The evaluated sets of eval.split (test: reported results; val: tuning).
    sets = {role: src.load(ref, key, require_response=role.startswith("domain/"))
            for role, (key, ref) in cfg.data.eval_sources(cfg.eval.split).items()}
    suite = EvalSuite(
        harmful=sets["harmful"], benign=sets["benign"], general=sets["general"],
        domains={d: sets[f"domain/{d}"] for d in cfg.data.order},
        extra_harmful=extra_h, extra_benign=extra_b, harmful_seen=sets.get("harmful_seen", []),
        benchmarks={r[len("bench/"):]: xs for r, xs in sets.items() if r.startswith("bench/")},
    )
    calib = src.load(cfg.data.safety_calib, "data.safety_calib")
    probe = src.load(cfg.data.safety_probe, "data.safety_probe", require_response=False)

    # --- model + persistent adapter ----------------------------------------------------
    ref = str(aligned.model_dir) if aligned is not None else resolve(cfg.model.name, toy_paths, "model.name")
    tok_ref = cfg.model.tokenizer or (ref if aligned is not None else cfg.model.name)
    model_spec = ModelSpec(ref, resolve(tok_ref, toy_paths, "model.tokenizer"), cfg.model, cfg.lora, seeds.lora_init(cfg.seed))
    tokenizer = load_tokenizer(model_spec.tokenizer, cfg.model.trust_remote_code,
                               revision_for(model_spec.tokenizer, cfg.model))
    device = cfg.model.resolved_device()
    model = add_lora(load_model(ref, cfg.model), cfg.lora, seeds.lora_init(cfg.seed)).to(device)
    base_ref = resolve(cfg.model.base, toy_paths, "model.base") if cfg.model.base else None

    if not resume:
        run_dir.write_text("config.yaml", dump_yaml(cfg))
    logger.info(f"[run] {cfg.resolved_run_id()} -> {run_dir.uri()}")

    ctx = Context(
        model=model, tokenizer=tokenizer, run_cfg=cfg, safety_calib=calib, safety_probe=probe,
        base_model_ref=base_ref, run_dir=run_dir,
    )
    ctx.probe_safety = lambda: probe_safety(model, tokenizer, probe, judge, cfg.eval)
    return PreparedRun(cfg, run_dir, tokenizer, suite, judge, method, ctx, domain_train, list(extra_h),
                       model_spec)


def run_pipeline(cfg: RunConfig, resume: bool = False, storage: RunDir | None = None,
                 on_domain=None) -> dict[str, Any]:
    """Run (or, with resume, continue) the pipeline; finished steps under run_dir/steps are skipped.

    storage: the storage root as a RunDir (default: cfg.storage, a local path or pyarrow.fs URI).
    on_domain(t, history): called after domain t's evaluation (also for a step finished earlier
    and skipped on resume), history = the evaluations of steps 0..t (Ray Tune reports from it)."""
    t_start, t_epoch = time.perf_counter(), time.time()
    storage = open_storage(cfg, storage)
    run = prepare_run(cfg, resume=resume, storage=storage)
    tracker = make_tracker(cfg.tracking, storage)
    status = "FAILED"  # what the MLflow run ends with unless tracker.finish() ran
    try:
        tracker.start(cfg.resolved_run_id(), to_dict(cfg),
                      tags={"method": cfg.method, "seed": cfg.seed, "order": ",".join(cfg.data.order),
                            "resumed": resume},
                      key=run.run_dir.uri(), resume=resume)
        if tracker.run_id:
            logger.info(f"[mlflow] run {tracker.run_id} at {tracker.tracking_uri}")
        runner = Runner(cfg, run, tracker, on_domain)
        try:
            summary = runner.run()
        finally:
            runner.close()
        # a resumed run also counts the steps its earlier processes finished
        earlier = runner.store.wall_s(before=t_epoch) if resume else 0.0
        summary["wall_s"] = time.perf_counter() - t_start + earlier
        summary["mlflow_tracking_uri"] = tracker.tracking_uri
        summary["mlflow_run_id"] = tracker.run_id
        run.run_dir.write_json("summary.json", summary)
        tracker.finish(summary, run.run_dir)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.fail(status)  # no-op after finish(); else ends the child / parent run
    logger.info(format_table(summary))
    logger.info(f"[run] summary: {run.run_dir.uri('summary.json')}")
    return summary


def phase_to_json(phase: TrainPhase) -> dict[str, Any]:
    return {"cfg": to_dict(phase.cfg), "seed": phase.seed, "tag": phase.tag, "hooks": phase.hooks,
            "examples": [{"prompt": e.prompt, "response": e.response, "answer": e.answer, "meta": dict(e.meta)}
                         for e in phase.examples]}


def phase_from_json(d: dict[str, Any]) -> TrainPhase:
    return TrainPhase([ChatExample(**e) for e in d["examples"]], from_dict(TrainConfig, d["cfg"]),
                      int(d["seed"]), d["tag"], d["hooks"])


def domain_prefix(t: int, domain: str) -> str:
    """The durable steps of domain t are named `<prefix>/<nn>-<what>` (e.g. 01-medical/02-train)."""
    return f"{t:02d}-{domain}"


class Runner:
    """The DAG of durable steps, driven from here (see the module docstring of
    safeanchor.pipeline.store): setup, eval 0, then per domain before → train →
    gate → [phase → gate]* → after → eval. A finished step is never run again; the model and
    the method are restored from the last finished checkpoint before the first unfinished step.
    """

    def __init__(self, cfg: RunConfig, run: PreparedRun, tracker, on_domain=None) -> None:
        self.cfg, self.run_, self.tracker = cfg, run, tracker
        self.on_domain = on_domain  # see run_pipeline
        self.model, self.tok, self.method, self.ctx = run.ctx.model, run.tokenizer, run.method, run.ctx
        self.store = StepStore(run.run_dir.sub("steps"))
        self.pending: str | None = None  # last finished checkpoint not yet loaded
        self.ctx.train = self.train_phase
        self.ctx.fisher_subspaces = self.fisher_subspaces
        self.ray = cfg.cluster.executor == "ray"
        self.current: str | None = None  # the step being executed (names its phase)
        self.workers = None  # the run's Train workers (executor ray), started by the first phase
        if self.ray:
            from safeanchor.distributed.workers import TrainWorkers

            self.workers = TrainWorkers(safe_name(f"{cfg.resolved_run_id()}-train"), cfg.cluster,
                                        storage_path=run.run_dir.uri("ray"),
                                        storage_filesystem=run.run_dir.ray_filesystem())

    def close(self) -> None:
        """End the run's Train workers (if they were started)."""
        if self.workers is not None:
            self.workers.close()

    # ---- the step primitive --------------------------------------------------------------
    def step(self, name: str, fn, checkpoint: bool) -> dict[str, Any]:
        if self.store.done(name):
            if checkpoint:
                self.pending = name
            logger.info(f"[step] {name}: finished earlier, skipped")
            return self.store.record(name)
        self.restore()
        self.store.log_execution(name)
        self.current = name
        record = fn()
        files = {"record.json": json.dumps(record, default=float).encode()}
        if checkpoint:
            tensors, tree = pack_state(self.method.state_dict())
            files.update({"adapter.safetensors": adapter_bytes(self.model), "state.safetensors": tensors,
                          "state.json": tree})
        self.store.write(name, files)
        return record

    def restore(self) -> None:
        if self.pending is None:
            return
        name, self.pending = self.pending, None
        logger.info(f"[step] restoring model and method state from {name}")
        load_adapter_bytes(self.model, self.store.read(name, "adapter.safetensors"))
        self.method.load_state_dict(unpack_state(self.store.read(name, "state.safetensors"),
                                                 self.store.read(name, "state.json")))
        self.method.attach(self.ctx)

    # ---- services ------------------------------------------------------------------------
    def train_phase(self, phase: TrainPhase) -> dict[str, Any]:
        """Train one phase in-process (executor local) or on Ray Train workers (executor ray)."""
        if not self.ray or phase.hooks in self.method.in_process_phases:
            return train_in_process(self.method, self.ctx, phase, train=train_examples)
        cfg, ctx = self.cfg, self.ctx
        spec = PhaseSpec(
            # deterministic: a driver restarted after a kill resumes this phase from its Train
            # checkpoints, which are named after it
            name=safe_name(f"{cfg.resolved_run_id()}-{self.current}"),
            model=self.run_.model_spec, adapter=adapter_bytes(self.model),
            method=cfg.method, options=cfg.methods.get(cfg.method), state=pack_state(self.method.state_dict()),
            hooks=phase.hooks, examples=list(phase.examples), train=phase.cfg, seed=phase.seed, tag=phase.tag,
            context=PhaseContext(safety_calib=list(ctx.safety_calib), seed=ctx.seed, max_length=ctx.max_length,
                                 domain=ctx.domain, step=ctx.step))
        out = self.workers.fit(spec)
        load_adapter_bytes(self.model, out.adapter)
        self.method.end_phase(self.ctx, phase.hooks, out.hook_stats)
        return out.stats

    def fisher_subspaces(self, examples, rho, k_max, k_fixed, chunk, max_length, group_mb=None) -> dict:
        """SSI at the live model: on the run's Train workers, as Ray tasks (`cluster.ssi_workers`)
        or in-process (streaming, `group_mb` MiB of gradient rows at a time; None: the default);
        `distributed.ssi.identify_subspaces` chooses."""
        from safeanchor.distributed.ssi import SSIJob, identify_subspaces
        from safeanchor.ssi import DEFAULT_GROUP_MB

        job = SSIJob(self.run_.model_spec, adapter_bytes(self.model), list(examples), max_length, chunk,
                     DEFAULT_GROUP_MB if group_mb is None else group_mb)
        return identify_subspaces(job, self.cfg.cluster, rho, k_max, k_fixed, model=self.model, tokenizer=self.tok,
                                  workers=self.workers)

    def eval_step(self, t: int, label: str) -> dict[str, float]:
        """Score every set; what the model said (prompt, generation, verdict, set) goes to
        generations/step<t>.jsonl, written before the step's marker so it is as durable."""
        t0 = time.perf_counter()
        records: list[dict] = []
        m = evaluate(self.model, self.tok, self.run_.suite, self.run_.judge, self.cfg.eval, records)
        self.run_.run_dir.write_text(f"generations/step{t}.jsonl",
                                     "".join(json.dumps({"step": t, **r}) + "\n" for r in records))
        logger.info(f"[eval] step {t} ({label}): " + " ".join(f"{k}={v:.3f}" for k, v in m.items()) +
                    f" ({time.perf_counter() - t0:.0f}s)")
        return m

    # ---- the DAG -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, ctx, method, run = self.cfg, self.ctx, self.method, self.run_
        last = f"{domain_prefix(len(cfg.data.order), cfg.data.order[-1])}/02-train"
        if self.workers is not None and not self.store.done(last):
            # launch the Train workers now (in the background: controller, placement group, worker
            # processes importing torch): the launch overlaps setup and the first evaluation
            # instead of delaying the first phase (measured ~25 s on 2 cores)
            self.workers.start()
        # setup() runs before the step-0 evaluation: a method that changes the model before any
        # domain (Vaccine's re-alignment) is measured from the model it actually starts from.
        self.step("00-setup", lambda: {"info": method.setup(ctx)}, checkpoint=True)
        history = [self.step("00-eval", lambda: self.eval_step(0, "before any domain"), checkpoint=False)]
        # tracking is a durable step too: a resumed run does not log a metric twice
        self.step("00-track", lambda: _track_eval0(self.tracker, run.run_dir, history[0]) or {}, checkpoint=False)
        steps_info: list[dict[str, Any]] = []
        lines = [json.dumps({"step": 0, **history[0]})]
        for t, d in enumerate(cfg.data.order, start=1):
            prefix = domain_prefix(t, d)
            with self.tracker.domain(t, d):
                ctx.domain, ctx.step, ctx.domain_train = d, t, run.domain_train[d]
                ctx.previous_domain_train = run.domain_train[cfg.data.order[t - 2]] if t > 1 else []
                logger.info(f"[domain {t}/{len(cfg.data.order)}] {d}: {len(ctx.domain_train)} examples, "
                            f"method {cfg.method}")
                self.step(f"{prefix}/01-before", lambda: {"info": method.before_domain(ctx)}, checkpoint=True)
                phase = TrainPhase([], cfg.train, seeds.domain_phase(cfg.seed, t), d, "domain")
                stats = self.step(f"{prefix}/02-train", lambda phase=phase: self.train_phase(
                    replace(phase, examples=method.training_examples(ctx, ctx.domain_train))), checkpoint=True)
                gates = []
                r, i = 0, 3
                while True:
                    g = self.step(f"{prefix}/{i:02d}-gate{r}", lambda r=r: self._gate(r), checkpoint=True)
                    gates.append(g["record"])
                    if g["phase"] is None:
                        break
                    ph = phase_from_json(g["phase"])
                    self.step(f"{prefix}/{i + 1:02d}-{ph.hooks}{r + 1}", lambda ph=ph: self.train_phase(ph),
                              checkpoint=True)
                    r, i = r + 1, i + 2
                info = self.step(f"{prefix}/90-after", lambda: method.after_domain(ctx) or {}, checkpoint=True)
                history.append(self.step(f"{prefix}/91-eval", lambda t=t, d=d: self.eval_step(t, d), checkpoint=False))
                self.restore()  # the live model must be this step's for the adapter copy below
                adapter = f"adapters/step{t}-{d}"
                with run.run_dir.staged(adapter) as tmp:  # peft writes to local disks only
                    self.model.save_pretrained(tmp, selected_adapters=["default"])
                steps_info.append({"domain": d, "train": stats, "gates": gates, "method": info})
                lines.append(json.dumps({"step": t, "domain": d, **history[-1]}))
                # the whole file, atomically, after each domain (a resume rebuilds it from the steps)
                run.run_dir.write_text("metrics.jsonl", "\n".join(lines) + "\n")
                self.step(f"{prefix}/92-track", lambda t=t, d=d, info=info, stats=stats, adapter=adapter:
                          _track_step(self.tracker, run.run_dir, t, d, history[-1], stats, info, adapter) or {},
                          checkpoint=False)
            if self.on_domain is not None:
                self.on_domain(t, list(history))
        run.run_dir.write_text("metrics.jsonl", "\n".join(lines) + "\n")
        summary = summarize(cfg, history, run.extras)
        summary["steps"] = steps_info
        summary["method_state"] = method.summary()
        summary["executions"] = self.store.executions()
        # Ray Train runs this driver started: 1 when one set of workers trained every phase
        summary["train_runs"] = self.workers.launches if self.workers is not None else 0
        # the driver's hardware (evaluation, in-process phases): figures match exactly only on the same kind
        summary["machine"] = machine()
        return summary

    def _gate(self, r: int) -> dict[str, Any]:
        g = self.method.gate(self.ctx, r)
        return {"record": g.record, "phase": phase_to_json(g.phase) if g.phase is not None else None}


def _track_eval0(tracker, run_dir: RunDir, evals: dict[str, float]) -> None:
    """Step 0's metrics and generations on the parent run."""
    tracker.log_metrics(evals, step=0)
    _track_generations(tracker, run_dir, 0, child=False)


def _track_step(tracker, run_dir: RunDir, t: int, d: str, evals: dict[str, float], stats: dict,
                info: dict, adapter: str) -> None:
    """One domain's metrics on the child run and the parent (step t), its adapter and subspaces."""
    metrics = dict(evals)
    metrics.update({f"train/{k}": stats[k] for k in ("loss_last", "step_s", "wall_s") if k in stats})
    metrics.update(numeric_scalars(info or {}))
    tracker.log_metrics(metrics, step=t, child=True)
    tracker.log_metrics(metrics, step=t)
    if tracker.run_id is None:  # tracking disabled: nothing to copy
        return
    with run_dir.local_copy(adapter) as local:
        tracker.log_artifact(local, "adapter", child=True)
    for name in run_dir.list("subspaces"):
        if name.startswith(f"step{t}-{d}"):
            with run_dir.local_copy(f"subspaces/{name}") as local:
                tracker.log_artifact(local, "subspaces", child=True)
    _track_generations(tracker, run_dir, t, child=True)


def _track_generations(tracker, run_dir: RunDir, t: int, child: bool) -> None:
    """The step's generations/step<t>.jsonl as an MLflow table (read back from the file, so a
    resumed run whose evaluation step had finished logs it too)."""
    name = f"generations/step{t}.jsonl"
    if run_dir.is_file(name):
        rows = [json.loads(line) for line in run_dir.read_text(name).splitlines() if line]
        tracker.log_table(rows, f"generations/step{t}.json", child=child)
