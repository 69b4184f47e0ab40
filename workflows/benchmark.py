"""Overhead benchmark of SafeAnchor, measured side by side in one process.

    python workflows/benchmark.py --out runs/benchmark.json          # toy preset
    python workflows/benchmark.py --config workflows/configs/tiny.yaml --steps 5
    python workflows/benchmark.py --executors --out runs/executors.json   # Ray vs in-process
    python workflows/benchmark.py --ssi-7b-layer --out runs/ssi-7b-layer.json   # SSI memory, CPU
    python workflows/benchmark.py --preset gpu-7b-shape --out runs/gpu-7b.json   # one GPU, DeepSpeed

Step times of: a plain LoRA step, a LoRA step + OSCA projection (batched after backward, as
in-process; and as per-tensor gradient hooks, as on DeepSpeed), a full SafeAnchor step
(projection + anchor loss); SSI wall time against one domain's training wall time; peak
resident memory added during SSI. Ratios, not absolute seconds, are the figures to read: the
machine is shared and noisy. How the ratios are made stable: in each round every variant runs
the SAME `--steps` batches (drawn afresh per round), in an order rotated from round to round;
a ratio is the median over rounds of that round's variant / LoRA time (paired, so a slow
minute of the machine slows both), for wall time and for this process's CPU time; its
stability is printed beside it (`*_halves`: the same median over the odd and over the even
rounds). `--threads 1,2` repeats everything at each torch thread count. The full SafeAnchor
step is compared with its floor, 1 + anchor_batch / (batch_size · anchor_every): the anchor's
extra forward / backward, the part of its cost no implementation can avoid, IF a pass cost in
proportion to its examples. It does not on a small model (fixed costs per operator): so the
benchmark also times that floor (`extra_pass`: a LoRA step plus, every anchor_every-th step, a
separate forward / backward of anchor_batch of the step's own examples, gradient added
unprojected: `anchor_floor_measured`), and `safeanchor_over_measured_floor` is what SafeAnchor's
step costs beyond it (the projection, the anchor set's own lengths, the KL).

`--executors`: the whole default run (`workflows/sequential.py` with the preset, method and seed
given) with `cluster.executor=local` and with `cluster.executor=ray`, in alternating subprocesses
(`--rounds` pairs, median wall time), each in a fresh storage directory; writes
`ratio_ray_local` (median ray / median local wall time), the wall times of every run, and
whether the two executors gave the same scores (`scores_equal`, `max_score_diff` over every
per-step metric of summary.json). Beside the wall times it writes where the CPU time went: every
process of a run's tree (the run itself, and under executor ray the Ray processes it starts:
GCS, raylet, dashboard, agents, Train controller and workers) sampled every half second, as
`cpu` per run (`total_s`, `by_group_s`: driver / ray_workers / ray_services, `by_process_s`)
with `ratio_cpu_ray_local`, and the whole machine's busy CPU seconds over the same interval
(`machine_busy_s`, the run's own included: well above its `total_s` means other work shared
the cores), so a slow run can be told apart from a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "toy.yaml"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from safeanchor import logs

    logs.setup()  # progress lines on stdout
    if "--ssi-7b-layer" in argv or any(a == "--preset" or a.startswith("--preset=") for a in argv):
        return shape_main(argv)  # the model-shape benchmarks (safeanchor.bench), their own options
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round (the same batches)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds, median taken (default 15; --executors: 1 pair)")
    p.add_argument("--threads", default=None,
                   help="torch thread counts to time the steps at, e.g. 1,2 (default: torch's current)")
    p.add_argument("--ssi-repeats", type=int, default=3, help="SSI runs (median taken; RSS from the first)")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--executors", action="store_true",
                   help="time the whole run under executor local and ray (subprocesses) instead of steps")
    p.add_argument("--method", default=None, help="--executors: the run's method (default: the preset's)")
    p.add_argument("--seed", type=int, default=0, help="--executors: the run's seed")
    p.add_argument("--idle-ray", action="store_true",
                   help="--executors: also time the in-process run beside an idle Ray and an idle Train run "
                        "(what Ray's own processes cost a run that does not use them)")
    p.add_argument("--logs", help="--executors: write each run's console (seconds since its start on each line), "
                                  "summary.json and CPU timeline (cumulative CPU seconds per process, every half "
                                  "second) to DIR/<executor><round>.log / -summary.json / -cpu.jsonl")
    args = p.parse_args(argv)
    if args.executors:
        return executors(args)
    args.rounds = args.rounds or 15

    import psutil
    import torch

    from safeanchor.config import ConfigError
    from safeanchor.methods import build_method
    from safeanchor.pipeline.config import load_run_config
    from safeanchor.pipeline.sequential import prepare_run

    try:
        cfg = load_run_config(args.config, args.overrides, method="safeanchor", run_id="benchmark")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = prepare_run(cfg)
    ctx, model = run.ctx, run.ctx.model
    domain = cfg.data.order[0]
    ctx.domain, ctx.step, ctx.domain_train = domain, 1, run.domain_train[domain]
    opts = dict(cfg.methods.get("safeanchor", {}))

    full = build_method("safeanchor", {**opts, "csm": False})
    proj = build_method("safeanchor", {**opts, "csm": False, "anchor": False})
    for m in (full, proj):
        m.setup(ctx)

    # SSI: wall time and peak RSS added while it runs (sampled every 5 ms).
    proc = psutil.Process()
    base_rss, peak = proc.memory_info().rss, [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    full.before_domain(ctx)
    ssi_runs = [time.perf_counter() - t0]
    stop.set()
    th.join()
    for _ in range(args.ssi_repeats - 1):  # the same SSI again (fresh subspaces at the same θ)
        t0 = time.perf_counter()
        full.identify(ctx)
        ssi_runs.append(time.perf_counter() - t0)
    ssi_s = statistics.median(ssi_runs)
    proj.before_domain(ctx)
    full_hooks = full.phase_hooks(ctx, "domain")  # projection groups + anchor reference of θ_{t-1}
    proj_hooks = proj.phase_hooks(ctx, "domain")

    import itertools

    from safeanchor.data import ExampleBatches, encode_dataset
    from safeanchor.train.loop import TorchStepEngine, batches_from, run_loop, train_examples

    feats = encode_dataset(run.tokenizer, ctx.domain_train, cfg.train.max_length)
    batcher = ExampleBatches(feats, cfg.train.batch_size, cfg.seed, run.tokenizer.pad_token_id)
    batches = batches_from(batcher.epoch, len(batcher), 0)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def timed(hooks, round_batches: list) -> tuple[float, float]:
        """(wall s, CPU s of this process) per step over the round's batches."""
        engine = TorchStepEngine(model, cfg.train, args.steps)  # what train_examples runs on
        c0 = time.process_time()
        with logs.quiet("safeanchor.train.loop"):  # no progress lines in the timed steps
            stats = run_loop(engine, iter(round_batches), args.steps, cfg.train, hooks, tag="bench")
        cpu = (time.process_time() - c0) / args.steps
        with torch.no_grad():  # same starting point for every variant
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        return stats["step_s"], cpu

    sub = ExtraPass(full.cfg.anchor_batch, full.cfg.anchor_every)  # the measured floor (module doc)
    variants = {"lora": None, "projection": proj_hooks, "projection_hooks": PerTensor(proj_hooks),
                "safeanchor": full_hooks, "extra_pass": sub}
    threads = [int(x) for x in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    by_threads = {}
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        timed(None, list(itertools.islice(batches, args.steps)))  # warm-up
        wall = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.rounds):
            round_batches = list(itertools.islice(batches, args.steps))  # every variant: these batches
            for k in names[r % len(names):] + names[:r % len(names)]:  # order rotated per round
                w, c = timed(variants[k], round_batches)
                wall[k].append(w)
                cpu[k].append(c)
        by_threads[str(n_threads)] = step_figures(wall, cpu)
    med = by_threads[str(threads[0])]
    floor = 1 + full.cfg.anchor_batch / (cfg.train.batch_size * full.cfg.anchor_every)

    # One domain's training wall time (the pipeline's own call), for the SSI share.
    t0 = time.perf_counter()
    with logs.quiet("safeanchor.train.loop"):
        train_examples(model, run.tokenizer, ctx.domain_train, cfg.train, cfg.seed, full_hooks, "domain")
    domain_s = time.perf_counter() - t0
    out = {
        # the first thread count's figures at the top (the rest under by_threads)
        **{k: v for k, v in med.items() if not k.startswith("rounds_")},
        "anchor_floor": floor,
        "safeanchor_over_floor": med["ratio_safeanchor"] - floor,
        "anchor_floor_measured": med["ratio_extra_pass"],
        "safeanchor_over_measured_floor": med["ratio_safeanchor"] - med["ratio_extra_pass"],
        "by_threads": {t: {**f, "safeanchor_over_floor": f["ratio_safeanchor"] - floor,
                           "safeanchor_over_measured_floor": f["ratio_safeanchor"] - f["ratio_extra_pass"]}
                       for t, f in by_threads.items()},
        "ssi_s": ssi_s,
        "ssi_runs_s": ssi_runs,
        "domain_train_s": domain_s,
        "ssi_share_of_domain": ssi_s / domain_s,
        "ssi_peak_rss_added_mb": max(0, peak[0] - base_rss) / 2**20,
        "steps": args.steps, "rounds": args.rounds, "batch_size": cfg.train.batch_size,
        "calib_examples": min(len(ctx.safety_calib), full.cfg.calib_size or len(ctx.safety_calib)),
        "anchor_batch": full.cfg.anchor_batch, "anchor_every": full.cfg.anchor_every, "threads": threads[0],
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


class _IdleRay:
    """A local Ray with a Train run of one worker waiting for work, as a Ray run holds them
    between phases (`--executors --idle-ray`), started in this process and ended by `close`."""

    def __init__(self, storage: Path) -> None:
        from safeanchor.distributed import ClusterConfig
        from safeanchor.distributed.workers import TrainWorkers

        self.address = os.environ.get("RAY_ADDRESS")
        self.workers = TrainWorkers("idle-ray", ClusterConfig(), str(storage))  # the default run's cluster
        self.workers.wait_ready()  # launched: the run beside it then meets Ray idle, not Ray starting

    def close(self) -> None:
        import ray

        self.workers.close()
        ray.shutdown()
        # ensure_ray pointed RAY_ADDRESS at this instance, which is gone: back to what it was
        if self.address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = self.address


def step_figures(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict:
    """Per-variant median step seconds (wall, CPU) and each variant's ratio to LoRA: the median
    over rounds of the round's own ratio, for wall and CPU time, with `*_halves` (the same
    median over the odd and the even rounds: how far apart two half-length runs land)."""
    out: dict = {}
    for k in wall:
        out[f"{k}_step_s"] = statistics.median(wall[k])
        out[f"{k}_cpu_s"] = statistics.median(cpu[k])
        out[f"rounds_{k}_s"] = wall[k]
        if k == "lora":
            continue
        for kind, t in (("", wall), ("_cpu", cpu)):
            per_round = [a / b for a, b in zip(t[k], t["lora"], strict=True)]
            out[f"ratio_{k}{kind}"] = statistics.median(per_round)
            if len(per_round) >= 2:
                out[f"ratio_{k}{kind}_halves"] = [statistics.median(per_round[0::2]),
                                                   statistics.median(per_round[1::2])]
    return out


#: titles of a Ray worker process that say nothing of its role (starting, or idle in the pool)
_GENERIC = ("ray::IDLE", "setup_worker.py", "default_worker.py")


class CpuMeter:
    """CPU seconds (user + system) of a process and all its descendants, sampled every `period`
    seconds from a thread until `stop`; a process's last sample counts (one that ends between two
    samples loses at most `period` of its time). Processes are grouped by role: `driver` (the
    root), `ray_workers` (Ray's worker processes: tasks and actors, titled `ray::...`) and
    `ray_services` (everything else under it: GCS, raylet, dashboard, agents, log monitor).
    `timeline`: (seconds since the start, {label: cumulative CPU seconds}) at every sample, to
    line up with a console's timestamps (which process burnt CPU while which step ran)."""

    def __init__(self, pid: int, period: float = 0.5) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.period = period
        self.seen: dict[int, tuple[str, float]] = {}  # pid -> (label, cpu seconds)
        self.timeline: list[tuple[float, dict[str, float]]] = []
        self.t0 = time.perf_counter()
        self.busy0 = self._busy()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def _label(proc) -> str:
        cmd = proc.cmdline()
        head = cmd[0] if cmd else proc.name()
        if head.startswith("ray::"):
            return head.split()[0].split(".")[0][:60]  # ray::Mailbox.post -> ray::Mailbox: the actor, not its call
        script = next((Path(a).name for a in cmd[1:] if a.endswith(".py")), None)
        return script or Path(head).name

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return  # the root has ended
        for proc in procs:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    cpu = t.user + t.system
                    label = self._label(proc)
                    if label in _GENERIC and proc.pid in self.seen:  # a worker back in Ray's pool keeps its role
                        label = self.seen[proc.pid][0]
            except psutil.Error:
                continue  # ended between the listing and the reading
            self.seen[proc.pid] = (label, cpu)
        by_label: dict[str, float] = {}
        for label, cpu in self.seen.values():
            by_label[label] = round(by_label.get(label, 0.0) + cpu, 2)
        self.timeline.append((round(time.perf_counter() - self.t0, 2), by_label))

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def stop(self) -> dict:
        self._sample()
        self._stop.set()
        self._thread.join()
        by_process: dict[str, float] = {}
        groups = {"driver": 0.0, "ray_workers": 0.0, "ray_services": 0.0}
        for pid, (label, cpu) in self.seen.items():
            by_process[label] = by_process.get(label, 0.0) + cpu
            worker = label.startswith("ray::") or label in _GENERIC
            group = "driver" if pid == self.root.pid else "ray_workers" if worker else "ray_services"
            groups[group] += cpu
        return {"total_s": round(sum(groups.values()), 2), "by_group_s": {k: round(v, 2) for k, v in groups.items()},
                "by_process_s": {k: round(v, 2) for k, v in sorted(by_process.items(), key=lambda kv: -kv[1])},
                "machine_busy_s": round(self._busy() - self.busy0, 2)}


def executors(args: argparse.Namespace) -> int:
    """The same run under both executors, side by side in one script; see the module doc."""
    import subprocess
    import tempfile

    seq = Path(__file__).resolve().parent / "sequential.py"
    rounds = max(1, args.rounds or 1)
    kinds = ("local", "ray", "local_idle_ray") if args.idle_ray else ("local", "ray")
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    cpus: dict[str, list[dict]] = {k: [] for k in kinds}
    summaries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="sa-executors-") as tmp:
        for r in range(rounds):
            for kind in kinds:
                executor = "ray" if kind == "ray" else "local"
                idle = _IdleRay(Path(tmp) / f"idle{r}") if kind == "local_idle_ray" else None
                storage = Path(tmp) / f"{kind}{r}"
                cmd = [sys.executable, str(seq), "--config", args.config, "--seed", str(args.seed),
                       "--storage", str(storage), "--run-id", "run", "--set", f"cluster.executor={executor}"]
                if args.method:
                    cmd += ["--method", args.method]
                for o in args.overrides:
                    cmd += ["--set", o]
                print(f"[executors] round {r + 1}/{rounds}: {kind}", flush=True)
                t0 = time.perf_counter()
                # the console, each line stamped with the seconds since the start (where the time goes)
                proc = subprocess.Popen(cmd, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
                meter = CpuMeter(proc.pid)
                lines = [f"{time.perf_counter() - t0:8.1f}  {line}" for line in proc.stdout]
                cpu = meter.stop()  # before the wait: the tree's last sample while the root still exists
                rc = proc.wait()
                wall = time.perf_counter() - t0
                if idle is not None:
                    idle.close()
                if args.logs:
                    Path(args.logs).mkdir(parents=True, exist_ok=True)
                    (Path(args.logs) / f"{kind}{r}.log").write_text("".join(lines))
                if rc != 0:
                    print("".join(lines[-60:]), file=sys.stderr)
                    print(f"error: the {kind} run exited with {rc}: {' '.join(cmd)}", file=sys.stderr)
                    return 1
                walls[kind].append(wall)
                cpus[kind].append(cpu)
                summary = (storage / "run" / "summary.json").read_text()
                if args.logs:  # its per-phase timing (steps[].train.timing) and CPU timeline beside the console
                    (Path(args.logs) / f"{kind}{r}-summary.json").write_text(summary)
                    (Path(args.logs) / f"{kind}{r}-cpu.jsonl").write_text(
                        "".join(json.dumps({"t": t, "cpu_s": c}) + "\n" for t, c in meter.timeline))
                summaries.setdefault(kind, json.loads(summary))
                print(f"[executors]   {wall:.1f} s wall, {cpu['total_s']:.1f} s CPU "
                      f"({', '.join(f'{k} {v:.1f}' for k, v in cpu['by_group_s'].items())}); "
                      f"the machine was busy {cpu['machine_busy_s']:.1f} CPU-s", flush=True)
    diffs = score_diffs(summaries["local"], summaries["ray"])
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu_med = {k: statistics.median(c["total_s"] for c in v) for k, v in cpus.items()}
    out = {
        "ratio_ray_local": med["ray"] / med["local"],
        "ratio_cpu_ray_local": cpu_med["ray"] / cpu_med["local"],
        "cpu": cpus,
        "local_wall_s": med["local"], "ray_wall_s": med["ray"],
        "local_runs_s": walls["local"], "ray_runs_s": walls["ray"],
        **({"ratio_local_idle_ray_local": med["local_idle_ray"] / med["local"],
            "local_idle_ray_wall_s": med["local_idle_ray"], "local_idle_ray_runs_s": walls["local_idle_ray"],
            "idle_ray_scores_equal": not any(score_diffs(summaries["local"], summaries["local_idle_ray"]).values())}
           if args.idle_ray else {}),
        "scores_equal": all(d == 0 for d in diffs.values()),
        "max_score_diff": max(diffs.values(), default=0.0),
        "score_diffs": {k: v for k, v in diffs.items() if v},
        "config": args.config, "method": summaries["local"].get("method"), "seed": args.seed,
        "overrides": args.overrides, "rounds": rounds, "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


PRESETS = {
    # one GPU, Llama-2-7B shape in bf16, ZeRO-2: ≤ 8 minutes on one H200 (designed, not yet run)
    "gpu-7b-shape": {"shape": "7b", "batch_size": 8, "seq_len": 256, "steps": 10, "rounds": 3, "calib": 256},
}


def shape_main(argv: list[str]) -> int:
    """--ssi-7b-layer: streaming SSI on 7B-shaped layers (CPU). --preset gpu-7b-shape: LoRA /
    projection / SafeAnchor steps and SSI on a random 7B-shaped Llama through DeepSpeed on one
    device (`--shape tiny` runs the same at hidden 64, 2 layers, e.g. on a CPU)."""
    import torch

    from safeanchor import bench

    p = argparse.ArgumentParser(description=shape_main.__doc__.splitlines()[0])
    p.add_argument("--ssi-7b-layer", action="store_true", help="SSI memory / time on 7B-shaped layers (CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="one-device step + SSI benchmark")
    p.add_argument("--shape", choices=sorted(bench.SHAPES), default=None, help="model shape (preset default: 7b)")
    p.add_argument("--n-examples", type=int, default=500, help="--ssi-7b-layer: calibration examples N")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per example (ssi-7b-layer 64; preset 256)")
    p.add_argument("--layers", type=int, default=1, help="--ssi-7b-layer: decoder layers")
    p.add_argument("--chunk", type=int, default=8, help="--ssi-7b-layer: examples per vmap call")
    p.add_argument("--group-mb", type=float, default=None, help="--ssi-7b-layer: MiB of gradient rows per pass")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="preset: auto | cuda | cpu")
    p.add_argument("--dtype", default="auto", help="preset: auto (bf16 on GPU) | bfloat16 | float32")
    for k in ("batch_size", "steps", "rounds", "calib", "zero_stage"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=None, help="preset override")
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)
    if args.ssi_7b_layer == bool(args.preset):
        p.error("give exactly one of --ssi-7b-layer and --preset")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.ssi_7b_layer:
            shape = bench.SHAPES[args.shape or "7b"]
            out = bench.ssi_layer(args.n_examples, args.seq_len or 64, args.layers, chunk=args.chunk,
                                  group_mb=args.group_mb, shape=shape)
        else:
            opts = {**PRESETS[args.preset], "device": args.device, "dtype": args.dtype}
            opts.update({k: v for k, v in (("shape", args.shape), ("seq_len", args.seq_len),
                                           ("batch_size", args.batch_size), ("steps", args.steps),
                                           ("rounds", args.rounds), ("calib", args.calib),
                                           ("zero_stage", args.zero_stage)) if v is not None})
            out = bench.shape_run(bench.ShapeRun(**opts))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out["command"] = "python workflows/benchmark.py " + " ".join(argv)
    out["date"] = time.strftime("%Y-%m-%d")
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
    return 0


def score_diffs(a: dict, b: dict) -> dict[str, float]:
    """|a - b| for every numeric metric the two summaries share (per-step lists and per-domain
    tables flattened as key[i] / key.domain[i]); wall times, ids and how the work was placed
    (`train_runs`: 0 in-process) and the hardware (`machine`) are not scores."""
    skip = {"wall_s", "seed", "mlflow_run_id", "mlflow_tracking_uri", "executions", "steps", "method_state",
            "warnings", "train_runs", "machine"}

    def flat(d: dict, prefix: str = "") -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in d.items():
            if not prefix and k in skip:
                continue
            key = f"{prefix}{k}"
            if isinstance(v, bool):
                continue
            if isinstance(v, (int, float)):
                out[key] = float(v)
            elif isinstance(v, list):
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)) and not isinstance(x, bool):
                        out[f"{key}[{i}]"] = float(x)
            elif isinstance(v, dict):
                out.update(flat(v, key + "."))
        return out

    fa, fb = flat(a), flat(b)
    diffs = {}
    for k in sorted(fa.keys() & fb.keys()):
        x, y = fa[k], fb[k]
        diffs[k] = 0.0 if (x == y or (x != x and y != y)) else abs(x - y)
    for k in sorted(fa.keys() ^ fb.keys()):
        diffs[k] = float("inf")  # a metric only one executor reported
    return diffs


class ExtraPass:
    """Step hooks of the measured anchor floor: on every `every`-th step, a separate forward /
    backward of the batch's first `n` examples (the task loss, its gradient added unprojected, as
    the anchor's is), and nothing else: what a separate anchor pass of `n` examples costs this
    model on this machine, whatever the anchor computes on it."""

    def __init__(self, n: int, every: int) -> None:
        self.n, self.every, self.step = n, every, 0

    def loss(self, model, batch, task_loss):
        return task_loss

    def unprojected_loss(self, model, batch):
        step, self.step = self.step, self.step + 1
        if step % self.every:
            return None
        head = {k: v[: self.n] for k, v in batch.items()}
        return model(input_ids=head["input_ids"], attention_mask=head["attention_mask"], labels=head["labels"]).loss

    def transform_grads(self, grads) -> None:
        """Identity, so the loop takes SafeAnchor's batched path (the extra gradient added after backward)."""


class PerTensor:
    """The same step hooks without `transform_grads`: the loop then projects each tensor in a
    gradient hook during backward (the DeepSpeed engine's form) instead of one batched pass."""

    def __init__(self, hooks) -> None:
        self._hooks = hooks

    def __getattr__(self, name: str):
        if name == "transform_grads":
            raise AttributeError(name)
        return getattr(self._hooks, name)


if __name__ == "__main__":
    sys.exit(main())
