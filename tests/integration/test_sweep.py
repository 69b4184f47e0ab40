"""workflows/sweep.py end to end on the tiny preset (Ray Tune driving the real pipeline).

One Ray instance for the module (2 CPUs): the in-process sweep uses it, and so do the
subprocess sweeps of the resume test (through RAY_ADDRESS), so only one Ray runs at a time.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "workflows"))
import sequential  # noqa: E402  (workflows/sequential.py)
import sweep  # noqa: E402  (workflows/sweep.py)

from safeanchor.pipeline.config import load_run_config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]


def _results(trial_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (trial_dir / "result.json").read_text().splitlines() if x.strip()]


def _mlflow_runs(db: Path) -> list[tuple[str, str, str, str | None]]:
    with sqlite3.connect(db) as con:
        return con.execute("select r.run_uuid, r.name, r.status, t.value from runs r left join tags t "
                           "on t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId'").fetchall()


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b)


def test_sweep_reports_per_domain_and_best_yaml_runs(ray_instance, cache, tmp_path):
    storage = tmp_path / "sweeps"
    argv = ["--method", "safeanchor", "--config", TINY, "--trials", "3", "--order", "medical,legal",
            "--seeds", "100", "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}",
            "--set", "methods.safeanchor.replay_steps=2"]
    assert sweep.main(argv) == 0
    out = storage / "safeanchor-tiny"
    for name in ("trials.csv", "trials.md", "pareto.png", "best.yaml", "sweep.json"):
        assert (out / name).is_file(), name
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    spec = json.loads((out / "sweep.json").read_text())
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].startswith("trial_id,status,reports,train.lr,methods.safeanchor.rho")

    trial_dirs = sorted(out.glob("trial_*"))
    assert len(trial_dirs) == 3
    points = set()
    for td in trial_dirs:
        tid = td.name[len("trial_"):]
        res = _results(td)
        # one report per domain, in order; the last one is the run's final summary
        assert [r["training_iteration"] for r in res] == [1, 2]
        assert [r["domain_step"] for r in res] == [1, 2] and {r["seed"] for r in res} == {100}
        run = out / "runs" / f"{tid}-seed100"
        summary = json.loads((run / "summary.json").read_text())
        assert summary["split"] == "val" and summary["seed"] == 100 and summary["method"] == "safeanchor"
        assert _same(res[-1]["retention"], summary["retention"])
        assert _same(res[-1]["domain_plastic"], summary["domain_plastic"])
        assert res[-1]["safety"] == pytest.approx(summary["safety"][-1])
        # the sampled point is what the run used
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        point = json.loads((td / "params.json").read_text())
        assert cfg["methods"]["safeanchor"]["gamma"] == pytest.approx(point["methods.safeanchor.gamma"])
        assert cfg["train"]["lr"] == pytest.approx(point["train.lr"])
        assert cfg["threads"] == 1 or cfg["threads"] is None
        points.add(point["methods.safeanchor.gamma"])
    assert len(points) == 3  # the search drew three different points

    # MLflow: one sweep run, every trial's pipeline run nested under it, all finished
    runs = _mlflow_runs(out / "mlflow.db")
    sweep_run = [r for r in runs if r[1] == "safeanchor-tiny"]
    assert len(sweep_run) == 1 and sweep_run[0][0] == spec["mlflow_run_id"] and sweep_run[0][2] == "FINISHED"
    trial_runs = [r for r in runs if r[3] == spec["mlflow_run_id"]]
    assert sorted(r[1] for r in trial_runs) == sorted(f"{td.name[6:]}-seed100" for td in trial_dirs)
    assert {r[2] for r in trial_runs} == {"FINISHED"}

    # best.yaml: the best trial's point, a preset sequential.py runs as is (test split, seed 0)
    best = out / "best.yaml"
    best_row = next(r for r in (out / "trials.md").read_text().splitlines() if r.endswith("| yes |"))
    best_id = best_row.split("|")[1].strip()
    point = json.loads((out / f"trial_{best_id}" / "params.json").read_text())
    cfg = load_run_config(best)
    assert cfg.method == "safeanchor" and cfg.eval.split == "test" and cfg.seed == 0
    assert cfg.methods["safeanchor"]["gamma"] == pytest.approx(point["methods.safeanchor.gamma"])
    assert cfg.data.order == ["medical", "legal"]
    assert sequential.main(["--config", str(best), "--storage", str(tmp_path / "best-run")]) == 0
    s = json.loads(next((tmp_path / "best-run").glob("*/summary.json")).read_text())
    assert s["split"] == "test" and s["method"] == "safeanchor" and len(s["safety"]) == 3


def _wait(cond, proc, timeout, what):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"sweep exited ({proc.returncode}) before {what}"
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_instance, cache, tmp_path):
    storage = tmp_path / "sweeps"
    env = dict(os.environ, RAY_ADDRESS=ray_instance, RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    base = [sys.executable, str(ROOT / "workflows" / "sweep.py")]
    argv = [*base, "--method", "lora", "--config", TINY, "--trials", "2", "--order", "medical", "--seeds", "100",
            "--max-concurrent", "1", "--scheduler", "fifo", "--search", "random", "--storage", str(storage),
            "--set", f"toyworld.cache_dir={cache}"]
    out = storage / "lora-tiny"
    runs = out / "runs"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # the first trial finished, the second one started: interrupt (Ctrl-C)
        _wait(lambda: len(list(runs.glob("*/summary.json"))) == 1, proc, 600, "the first trial")
        _wait(lambda: len([p for p in runs.iterdir() if (p / "config.yaml").exists()]) == 2, proc, 300,
              "the second trial")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (tmp_path / "first.log").read_text()
    assert rc == 1, text[-3000:]
    assert "--resume lora-tiny" in text and not (out / "best.yaml").exists()
    first = next(p for p in runs.iterdir() if (p / "summary.json").exists())
    second = next(p for p in runs.iterdir() if p != first)
    before = {f: (first / f).stat().st_mtime_ns for f in ("summary.json", "steps/_executions.jsonl")}

    res = subprocess.run([*base, "--resume", "lora-tiny", "--storage", str(storage)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    # the finished trial was not run again: its run untouched, no second MLflow run of it
    assert {f: (first / f).stat().st_mtime_ns for f in before} == before
    assert (second / "summary.json").is_file()
    names = [r[1] for r in _mlflow_runs(out / "mlflow.db")]
    assert names.count(first.name) == 1
    rows = (out / "trials.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",complete," in r for r in rows)
    # Tune re-reports the finished trial once more if the interrupt came after its summary was
    # written but before Tune recorded it as terminated (a race on a loaded machine): the rows may
    # then be 2, but they are the same finished run's figures, read back, not a new run (its files
    # and its single MLflow run are checked above)
    first_rows = _results(out / f"trial_{first.name.split('-')[0]}")
    assert 1 <= len(first_rows) <= 2
    assert all({k: r[k] for k in ("objective", "domain_plastic", "seed")} ==
               {k: first_rows[0][k] for k in ("objective", "domain_plastic", "seed")} for r in first_rows)
    assert (out / "best.yaml").is_file()


def test_trials_train_on_ray_train_workers(ray_instance, cache, tmp_path):
    """cluster.executor: ray inside a trial: the trial function starts the run's Train workers
    itself (Train inside Tune)."""
    storage = tmp_path / "sweeps"
    argv = ["--method", "lora", "--config", TINY, "--trials", "1", "--order", "medical", "--seeds", "100",
            "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}", "--set", "cluster.executor=ray",
            "--set", "train.max_steps=2", "--set", "tracking.enabled=false"]
    assert sweep.main(argv) == 0
    out = storage / "lora-tiny"
    run = next((out / "runs").iterdir())
    summary = json.loads((run / "summary.json").read_text())
    train = summary["steps"][0]["train"]
    assert train["world_size"] == 1 and train["steps"] == 2
    assert train["zero_stage"] is None  # one CPU worker: deepspeed.enabled auto -> the torch loop
    assert any((run / "ray").iterdir()) and summary["train_runs"] == 1  # the run's Ray Train run
    assert len(_results(next(out.glob("trial_*")))) == 1 and (out / "best.yaml").is_file()


def test_asha_stops_trials_that_lose_safety_on_the_first_domain(ray_instance, cache, tmp_path):
    """4 trials, one at a time, ASHA at its defaults (reduction 3, first rung = the first domain):
    a trial whose first-domain objective falls below the rung's cut is stopped there.

    The tiny preset's own metrics are all 0 (its width-32 model, pre-trained 30 steps, refuses
    nothing), so every trial would tie at the rung and none could be cut. This sweep runs a tiny
    world that learns to refuse (pre-training 800 steps, alignment 120, width 64: validation
    safety 0.29 at step 0, seed 100) and a learning rate that either keeps it (1e-4: retention 1.0
    after the first domain, objective 0) or erodes it (3e-3: safety 0 after the first domain,
    objective -9; measured). Random search with seed 1 draws 1e-4, 3e-3, 3e-3, 3e-3; ASHA's cut
    for a trial reaching the rung is the 67th percentile of the objectives recorded there before
    it, so each 3e-3 trial (-9 against a cut above -9) is stopped after one report."""
    space = tmp_path / "space.yaml"
    space.write_text("method: lora\nparams:\n  train.lr: {type: choice, values: [1.0e-4, 3.0e-3]}\n")
    storage = tmp_path / "sweeps"
    argv = ["--method", "lora", "--config", TINY, "--space", str(space), "--trials", "4", "--order", "medical,legal",
            "--seeds", "100", "--max-concurrent", "1", "--search", "random", "--search-seed", "1",
            "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
            "--set", "toyworld.pretrain.max_steps=800", "--set", "toyworld.align.max_steps=120",
            "--set", "toyworld.model.hidden_size=64"]
    assert sweep.main(argv) == 0
    out = storage / "lora-tiny"
    rows = {}
    for td in out.glob("trial_*"):
        res = _results(td)
        lr = json.loads((td / "params.json").read_text())["train.lr"]
        rows[td.name] = (lr, len(res), res[0]["objective"])
    got = sorted(rows.values(), key=lambda r: (r[0], r[1]))
    assert len(got) == 4
    assert [(lr, n) for lr, n, _ in got] == [(1e-4, 2), (3e-3, 1), (3e-3, 1), (3e-3, 1)], got
    keep = next(obj for lr, _, obj in got if lr == 1e-4)
    assert all(obj < keep - 1.0 for lr, _, obj in got if lr == 3e-3)  # lost safety on the first domain
    table = (out / "trials.csv").read_text().splitlines()
    assert len(table) == 5 and sum(",stopped," in r for r in table) == 3 and sum(",complete," in r for r in table) == 1
    best = load_run_config(out / "best.yaml")
    assert best.train.lr == pytest.approx(1e-4)  # the trial that kept its safety
