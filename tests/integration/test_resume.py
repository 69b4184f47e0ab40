"""Durable steps: `--resume` skips finished steps, never reads a half-written one, and a run
killed after its first domain completes with the same results as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))
import sequential  # noqa: E402  (workflows/sequential.py)

TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
# SafeAnchor on two domains; CSM on (a gate step per domain, replay when the probe drops).
ARGS = ["--method", "safeanchor", "--order", "medical,legal", "--set", "methods.safeanchor.replay_steps=2",
        "--set", "methods.safeanchor.replay_rounds=1", "--set", "tracking.enabled=false"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")


def _argv(storage: Path, cache: Path, run_id: str) -> list[str]:
    return ["--config", TINY, "--storage", str(storage), "--run-id", run_id, "--set", f"toyworld.cache_dir={cache}",
            *ARGS]


def _summary(storage: Path, run_id: str) -> dict:
    return json.loads((storage / run_id / "summary.json").read_text())


def _finished(run: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(run / "steps")) for p in (run / "steps").rglob("_COMPLETE"))


def test_resume_of_a_finished_run_runs_nothing_and_reproduces_the_summary(tmp_path, cache):
    storage = tmp_path / "runs"
    assert sequential.main(_argv(storage, cache, "r1")) == 0
    first = _summary(storage, "r1")
    steps = _finished(storage / "r1")
    assert "00-setup" in steps and "01-medical/02-train" in steps and "02-legal/91-eval" in steps
    assert sorted(first["executions"]) == steps  # every step ran exactly once

    # a fresh run into the same directory is refused (nothing overwritten)
    assert sequential.main(_argv(storage, cache, "r1")) == 2
    assert sequential.main(["--storage", str(storage), "--resume", "r1"]) == 0
    again = _summary(storage, "r1")
    assert again["executions"] == first["executions"]  # no step executed again
    for k in ("safety", "over_refusal", "helpful", "general", "domain", "retention"):
        assert json.dumps(again[k]) == json.dumps(first[k]), k  # NaN-safe (retention at s_0 = 0)


def test_half_written_step_is_rerun_not_read(tmp_path, cache):
    storage = tmp_path / "runs"
    assert sequential.main(_argv(storage, cache, "r2")) == 0
    first = _summary(storage, "r2")
    run = storage / "r2"
    # simulate a crash while writing the last eval: files present, marker missing, record garbage
    step = run / "steps" / "02-legal" / "91-eval"
    (step / "_COMPLETE").unlink()
    (step / "record.json").write_text("{not json")
    assert sequential.main(["--storage", str(storage), "--resume", "r2"]) == 0
    again = _summary(storage, "r2")
    assert again["executions"] == first["executions"] + ["02-legal/91-eval"]
    assert json.dumps(again["safety"]) == json.dumps(first["safety"])


def test_resume_refuses_overrides_and_unknown_runs(tmp_path, capsys):
    assert sequential.main(["--storage", str(tmp_path), "--resume", "nope"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert sequential.main(["--storage", str(tmp_path), "--resume", "nope", "--seed", "3"]) == 2
    assert "--seed" in capsys.readouterr().err


def test_driver_killed_after_first_domain_resumes_to_the_same_result(tmp_path, cache):
    storage = tmp_path / "runs"
    # the reference: one uninterrupted run
    assert sequential.main(_argv(storage, cache, "ref")) == 0
    done_before = kill_after_first_domain(_argv(storage, cache, "killed"), dict(os.environ), storage / "killed")

    t0, t_epoch = time.perf_counter(), time.time()
    assert sequential.main(["--storage", str(storage), "--resume", "killed"]) == 0
    elapsed = time.perf_counter() - t0
    assert_resumed_like_reference(storage, "ref", "killed", done_before, ["medical", "legal"], adapter_tol=1e-5)
    # summary.json's wall time counts the steps the killed process finished, not only the resume's
    from safeanchor.pipeline.store import StepStore
    from safeanchor.storage import RunDir

    steps = StepStore(RunDir.open(str(storage / "killed" / "steps")))
    earlier = steps.wall_s(before=t_epoch)  # setup, step 0 and the first domain
    assert earlier > 0.1
    # this process's time (elapsed, less the little before run_pipeline starts its clock) + earlier
    assert elapsed + 0.5 * earlier < _summary(storage, "killed")["wall_s"] <= elapsed + earlier


def kill_after_first_domain(argv: list[str], env: dict[str, str], run: Path, timeout: float = 240) -> list[str]:
    """Start workflows/sequential.py, SIGKILL it once the first domain's eval step is finished;
    returns the steps finished at that moment."""
    env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, str(ROOT / "workflows" / "sequential.py"), *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "steps" / "01-medical" / "91-eval" / "_COMPLETE"
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        proc.kill()
        pytest.fail("the first domain never finished")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (run / "summary.json").exists(), "killed too late: the run had already finished"
    return _finished(run)


def assert_resumed_like_reference(storage: Path, ref_id: str, run_id: str, done_before: list[str], domains: list[str],
                                  adapter_tol: float) -> None:
    """No step finished before the kill ran again; scores and final adapter equal the reference."""
    run = storage / run_id
    ref, out = _summary(storage, ref_id), _summary(storage, run_id)
    execs = out["executions"]
    for step in done_before:
        assert execs.count(step) == 1, f"finished step {step} ran again"
    assert sorted(set(execs)) == _finished(run)
    for k in ("safety", "over_refusal", "helpful", "general", "retention", "domain_plastic"):
        assert out[k] == pytest.approx(ref[k], abs=1e-6, nan_ok=True), k
    for d in domains:
        assert out["domain"][d] == pytest.approx(ref["domain"][d], abs=1e-6)
    # the tiny world's scores can be flat; the weights cannot: the final adapters must agree
    from safetensors.torch import load_file

    last = f"step{len(domains)}-{domains[-1]}"
    a = load_file(str(storage / ref_id / "adapters" / last / "adapter_model.safetensors"))
    b = load_file(str(run / "adapters" / last / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < adapter_tol, k
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # trained, not the zero init
