"""Every registered method through the pipeline on Ray (Train workers + DeepSpeed, SSI tasks).

Two training steps per method on the tiny preset, 2 Train workers on one shared Ray instance.
Run here: every method with code of its own on the Train workers (WORKER_SIDE), except
SafeAnchor, which other Ray tests run the same way (ELSEWHERE). A method without such code
(LoRA, and e.g. interleave or Safe LoRA, whose parts run in the driver, the same for both
executors) trains its phases on the workers exactly as LoRA does, which ELSEWHERE covers.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "workflows"))
import sequential  # noqa: E402  (workflows/sequential.py)

from safeanchor.methods import METHODS  # noqa: E402
from safeanchor.methods.base import Method  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

# Method members that run in a Train worker or start a phase there: the hooks and loss of a
# phase, re-attaching model changes in a fresh process, a setup that trains (Vaccine), a gate
# that asks for a phase (SafeAnchor's replay).
WORKER_SIDE = ("setup", "gate", "attach", "phase_hooks", "loss", "unprojected_loss", "transform_grad",
               "after_backward", "in_process_phases")

# methods whose whole pipeline on Ray Train workers another test runs with these assertions
ELSEWHERE = {
    # test_compare.py::test_cells_train_on_ray_train_workers (1 worker, 2 steps, one Train run per
    # cell, SafeAnchor's replay allowed); test_cluster.py's job submit (lora, 1 then 2 workers)
    "lora": "test_compare.py, test_cluster.py",
    # test_resume_mid_phase.py (2 workers, 16 steps, killed and resumed); test_distributed_train.py
    # (the real hooks under bf16 + ZeRO-2 with replay forced by the gate)
    "safeanchor": "test_compare.py, test_resume_mid_phase.py, test_distributed_train.py",
}


def worker_side(name: str) -> bool:
    cls = METHODS[name].cls
    return any(getattr(cls, m) is not getattr(Method, m) for m in WORKER_SIDE)


ON_RAY_HERE = sorted(m for m in METHODS if worker_side(m) and m not in ELSEWHERE)


def test_every_method_runs_on_ray_here_or_like_a_covered_one():
    assert set(ELSEWHERE) <= set(METHODS)  # a renamed method must not drop out of both
    assert not worker_side("lora")  # what the methods without worker code are covered by
    assert {"ewc", "olora", "safegrad", "vaccine"} <= set(ON_RAY_HERE)  # the rule sees their hooks


@pytest.mark.parametrize("method", ON_RAY_HERE)
def test_method_runs_two_steps_on_ray(method, ray_instance, cache, tmp_path, capfd):
    storage = tmp_path / "runs"
    argv = ["--config", TINY, "--storage", str(storage), "--method", method, "--order", "medical",
            "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
            "--set", "cluster.executor=ray", "--set", "cluster.num_workers=2", "--set", "train.max_steps=2",
            "--set", "methods.safeanchor.replay_steps=2", "--set", "methods.vaccine.max_steps=2", "--set", "methods.vaccine.batch_size=4",
            "--set", "methods.ewc.fisher_samples=8"]
    assert sequential.main(argv) == 0
    run = next(p for p in storage.iterdir() if (p / "summary.json").exists())
    s = json.loads((run / "summary.json").read_text())
    assert s["method"] == method and len(s["safety"]) == 2
    train = s["steps"][0]["train"]
    assert train["steps"] == 2 and train["world_size"] == 2  # trained by 2 Ray Train workers
    assert (run / "ray").is_dir()  # Ray Train's storage for the phase runs
    # every Ray phase of the run (SafeAnchor: also the replay its gate may ask for) on ONE set
    # of Train workers, started once
    assert s["train_runs"] == 1
    # the console: the workers' progress lines (forwarded by Ray), not a model-loading bar per
    # phase (split at newlines only: a bar redraws itself after a carriage return)
    seen, deadline = "", time.time() + 30
    while time.time() < deadline:
        out = capfd.readouterr()
        seen += out.out + out.err
        worker = [x for x in seen.split("\n") if "RayTrainWorker" in x]
        if any("[medical] step 2/2" in x for x in worker):
            break
        time.sleep(0.5)
    time.sleep(1.0)  # what the workers printed before that line (stderr, forwarded on its own)
    out = capfd.readouterr()
    worker = [x for x in (seen + out.out + out.err).split("\n") if "RayTrainWorker" in x]
    assert any("[medical] step 2/2" in x for x in worker), seen[-3000:]
    assert not any("Loading weights" in x for x in worker), [x for x in worker if "Loading weights" in x]
