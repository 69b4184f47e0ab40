"""The fair comparison on the toy world: every method tuned with the same budget on validation, then compared on test.

    python workflows/protocol.py --storage runs/protocol                 # every stage; rerun to resume
    python workflows/protocol.py --storage runs/protocol --stage sweeps --methods lora,safeanchor
    python workflows/protocol.py --storage runs/protocol --stage publish  # -> workflows/results/toy/

Stages, each resumable (run the same command again after an interruption):

1. sweeps  -- `workflows/sweep.py` once per method with the SAME budget: BUDGET below (trials,
   tuning seeds 100-101, Optuna seeded 0, ASHA), validation split only, the method's space
   from workflows/configs/sweeps/. A finished sweep is kept; an interrupted one is resumed.
2. tuned   -- each sweep's best.yaml, chosen on validation, becomes
   workflows/configs/tuned/<preset>-<method>.yaml (a header says how it was chosen).
3. compare -- `workflows/compare.py` on the test split with the reporting seeds, each method on
   its tuned config: every method x seeds 0-4 at the preset's order; LoRA and SafeAnchor on all
   6 orders (seeds 0-2) and with T = 5 domains (seeds 0-4). Finished cells are never rerun.
4. publish -- report.md, the PNG plots, every sweep's trial table and protocol.json (budget,
   commit, wall time per stage) copied to workflows/results/<preset>/.

Every stage runs in its own subprocess (its own Ray). protocol.json under --storage keeps the
budget (a resumed protocol must not change it) and adds up each stage's wall time (and each
method's sweep time) across interruptions. Logic lives in the two workflows it drives; this file only sequences them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ["lora", "ewc", "olora", "safelora", "vaccine", "safegrad", "interleave", "safeanchor"]
# The same for every method: what "the same tuning budget" means here.
BUDGET = {"trials": 8, "seeds": "100,101", "search": "optuna", "search_seed": 0, "scheduler": "asha",
          "reduction_factor": 3.0, "retention_target": 0.9, "penalty": 10.0}
FOCUS = ["lora", "safeanchor"]  # the arms run on every order and at T = 5
STAGES = ("sweeps", "tuned", "compare", "publish")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(HERE / "configs" / "toy.yaml"), help="base preset (default: toy)")
    p.add_argument("--storage", default="runs/protocol", help="sweeps/ and compare/ go here (default: runs/protocol)")
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all", help="one stage, or all in order")
    p.add_argument("--methods", default=",".join(METHODS), help="methods (default: all eight)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="training phases of each run: in-process (default) or Ray Train")
    p.add_argument("--tuned-dir", default=str(HERE / "configs" / "tuned"), help="where tuned configs go")
    p.add_argument("--results", default=None, help="publish target (default: workflows/results/<preset>)")
    return p.parse_args(argv)


def _run(cmd: list[str]) -> int:
    print("[protocol] $ " + " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def _git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class State:
    """protocol.json: the budget (fixed at the first run) and the wall time spent per stage."""

    def __init__(self, storage: Path, preset: str, methods: list[str]):
        self.path = storage / "protocol.json"
        if self.path.exists():
            self.data = json.loads(self.path.read_text())
            if self.data["budget"] != BUDGET:
                sys.exit(f"error: {self.path} was started with budget {self.data['budget']}, this code has "
                         f"{BUDGET}; one protocol, one budget: use another --storage")
        else:
            self.data = {"preset": preset, "budget": BUDGET, "methods": methods, "wall_s": {}, "commits": []}
        commit = _git_commit()
        if commit not in self.data["commits"]:
            self.data["commits"].append(commit)  # the code of every session that ran a stage
        self.save()

    def add_wall(self, stage: str, seconds: float, part: str | None = None) -> None:
        """Add to a stage's wall time (and to one part of it: a method's sweep)."""
        self.data["wall_s"][stage] = round(self.data["wall_s"].get(stage, 0.0) + seconds, 1)
        if part is not None:
            parts = self.data.setdefault("part_wall_s", {}).setdefault(stage, {})
            parts[part] = round(parts.get(part, 0.0) + seconds, 1)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def placement(args: argparse.Namespace) -> list[str]:
    return ["--set", f"cluster.executor={args.executor}"]


def stage_sweeps(args, storage: Path, preset: str, methods: list[str], state: State) -> bool:
    for m in methods:
        sweep_id = f"{m}-{preset}"
        d = storage / "sweeps" / sweep_id
        if (d / "best.yaml").exists():
            print(f"[protocol] sweep {sweep_id}: finished", flush=True)
            continue
        t0 = time.time()
        try:
            rc = _sweep(args, storage, m, sweep_id, d)
        finally:  # an interrupted session's time counts too
            state.add_wall("sweeps", time.time() - t0, part=m)
        if rc != 0 or not (d / "best.yaml").exists():
            print(f"[protocol] sweep {sweep_id} did not finish (exit {rc}); rerun to resume it", file=sys.stderr)
            return False  # the next method waits: one sweep at a time holds the machine
    return True


def _sweep(args, storage: Path, m: str, sweep_id: str, d: Path) -> int:
    base = [sys.executable, str(HERE / "sweep.py"), "--storage", str(storage / "sweeps")]
    if (d / "sweep.json").exists():
        return _run([*base, "--resume", sweep_id])
    b = BUDGET
    return _run([*base, "--method", m, "--config", args.config, "--sweep-id", sweep_id,
                 "--trials", str(b["trials"]), "--seeds", b["seeds"], "--search", b["search"],
                 "--search-seed", str(b["search_seed"]), "--scheduler", b["scheduler"],
                 "--reduction-factor", str(b["reduction_factor"]),
                 "--retention-target", str(b["retention_target"]), "--penalty", str(b["penalty"]),
                 "--set", f"threads={args.threads}", *placement(args)])


def stage_tuned(args, storage: Path, preset: str, methods: list[str]) -> bool:
    out = Path(args.tuned_dir)
    out.mkdir(parents=True, exist_ok=True)
    b = BUDGET
    for m in methods:
        best = storage / "sweeps" / f"{m}-{preset}" / "best.yaml"
        if not best.exists():
            print(f"[protocol] no best.yaml for {m}: run --stage sweeps first", file=sys.stderr)
            return False
        body = [line for line in best.read_text().splitlines() if not line.startswith("#")]
        chosen = [line[2:] for line in best.read_text().splitlines() if line.startswith("# ")]  # [0]: its command
        head = [f"python workflows/sequential.py --config workflows/configs/tuned/{preset}-{m}.yaml",
                f"Chosen by `python workflows/protocol.py --stage sweeps` (the fair protocol): {b['trials']} trials, "
                f"tuning seeds {b['seeds']},",
                f"{b['search']} (seed {b['search_seed']}) + {b['scheduler']}, validation split only; objective "
                f"domain_plastic - {b['penalty']:g} * max(0, {b['retention_target']:g} - retention).",
                *chosen[1:]]
        text = "".join(f"# {h}\n" for h in head) + "\n".join(body) + "\n"
        target = out / f"{preset}-{m}.yaml"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(target)
        print(f"[protocol] {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}", flush=True)
    return True


def stage_compare(args, storage: Path, preset: str, methods: list[str]) -> bool:
    tuned = Path(args.tuned_dir)
    configs = {}
    for m in methods:
        path = tuned / f"{preset}-{m}.yaml"
        if not path.exists():
            print(f"[protocol] {path} missing: run --stage tuned first", file=sys.stderr)
            return False
        configs[m] = ["--config", f"{m}={path}"]
    focus = [m for m in FOCUS if m in methods]
    base = [sys.executable, str(HERE / "compare.py"), "--storage", str(storage / "compare"),
            "--threads", str(args.threads), *placement(args)]
    ok = True
    # seed-major inside each call; Table 1 first so the main table fills earliest. Each call
    # names the tuned configs of its own methods only (compare.py refuses a preset for a method
    # it does not run).
    for arms, extra in ((methods, ["--seeds", "0-4"]),
                        (focus, ["--seeds", "0-2", "--orders", "all"]),
                        (focus, ["--seeds", "0-4", "--T", "5"])):
        if arms:
            ok = _run([*base, *(a for m in arms for a in configs[m]), "--methods", ",".join(arms), *extra]) == 0 and ok
    return ok


def stage_publish(args, storage: Path, preset: str, methods: list[str], state: State) -> bool:
    src = storage / "compare"
    if not (src / "report.md").exists():
        print(f"[protocol] {src / 'report.md'} missing: run --stage compare first", file=sys.stderr)
        return False
    dst = Path(args.results or HERE / "results" / preset)
    (dst / "sweeps").mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.png")) + [src / "report.md"]:
        shutil.copy2(f, dst / f.name)
    for m in methods:
        d = storage / "sweeps" / f"{m}-{preset}"
        for name in ("trials.md", "pareto.png"):
            if (d / name).exists():
                shutil.copy2(d / name, dst / "sweeps" / f"{m}-{name}")
    (dst / "protocol.json").write_text(json.dumps(state.data, indent=2) + "\n")
    print(f"[protocol] published to {dst}", flush=True)
    return True


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(f"error: methods: unknown {unknown} (known: {', '.join(METHODS)})", file=sys.stderr)
        return 2
    if not Path(args.config).is_file():
        print(f"error: config: {args.config} does not exist", file=sys.stderr)
        return 2
    preset = Path(args.config).stem
    storage = Path(args.storage).resolve()
    state = State(storage, preset, methods)
    # a SIGTERM (a session's end, `kill`) unwinds like Ctrl-C, so the time spent is recorded
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        if stage == "sweeps":  # timed per method inside
            ok = stage_sweeps(args, storage, preset, methods, state)
        else:
            t0 = time.time()
            try:
                if stage == "publish":
                    ok = stage_publish(args, storage, preset, methods, state)
                else:
                    ok = {"tuned": stage_tuned, "compare": stage_compare}[stage](args, storage, preset, methods)
            finally:
                state.add_wall(stage, time.time() - t0)
        if not ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
