"""Resume by name: the driver is SIGKILLed in the middle of a domain's training on Ray Train (2
workers, a Train checkpoint every 4 steps); `--resume` starts the run's Train workers again under the
same Train run name (`<run_id>-train`), Ray Train restores that run's latest checkpoint, and the
workers resume the phase it is named after (`<run_id>-<step>-step_<n>`): no step before that
checkpoint is computed again, and the result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cluster import cluster  # noqa: F401  (a `ray start --head` cluster, token auth on)
from test_resume import assert_resumed_like_reference

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]
STEPS, EVERY = 16, 4


def _argv(storage: Path, cache: Path, run_id: str) -> list[str]:
    return ["--config", TINY, "--storage", str(storage), "--run-id", run_id, "--method", "safeanchor",
            "--order", "medical", "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
            "--set", "cluster.executor=ray", "--set", "cluster.num_workers=2", "--set", "train.epochs=20",
            "--set", f"train.max_steps={STEPS}", "--set", f"cluster.checkpoint_every={EVERY}",
            "--set", "methods.safeanchor.csm=false"]


def test_driver_killed_mid_phase_resumes_from_the_train_checkpoint(cluster, tmp_path):  # noqa: F811
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    env = dict(cluster["env"], RAY_ADDRESS=cluster["gcs"])  # a driver on the head node, with its token
    script = str(ROOT / "workflows" / "sequential.py")

    def job(args: list[str]) -> None:
        p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    job(_argv(storage, cache, "ref"))
    ref = json.loads((storage / "ref" / "summary.json").read_text())
    assert ref["steps"][0]["train"]["steps"] == STEPS and ref["steps"][0]["train"]["resumed_from_step"] == 0

    run = storage / "killed"
    name = "killed-01-medical-02-train"  # <run_id>-<step>
    proc = subprocess.Popen([sys.executable, script, *_argv(storage, cache, "killed")], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # workers go on past a checkpoint only once Ray Train committed it: the second one's
    # directory appearing says that the first one is committed
    first = run / "ray" / "killed-train" / f"{name}-step_{2 * EVERY:08d}"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not first.exists():
        proc.kill()
        pytest.fail(f"no Train checkpoint {first} appeared")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    steps_dir = run / "steps"
    done_before = sorted(str(p.parent.relative_to(steps_dir)) for p in steps_dir.rglob("_COMPLETE"))
    assert "01-medical/02-train" not in done_before, "killed too late: the phase had finished"

    job(["--storage", str(storage), "--resume", "killed"])
    out = json.loads((run / "summary.json").read_text())
    train = out["steps"][0]["train"]
    assert train["steps"] == STEPS and train["world_size"] == 2
    # resumed from a checkpoint of the killed driver's Train run: steps before it not recomputed
    assert train["resumed_from_step"] >= EVERY and train["resumed_from_step"] % EVERY == 0
    assert out["executions"].count("01-medical/02-train") == 2  # started, killed, resumed
    assert_resumed_like_reference(storage, "ref", "killed", done_before, ["medical"], adapter_tol=1e-5)
