"""`ray job submit -- python workflows/sequential.py` against a `ray start --head` cluster, then
against two nodes on this machine (head + `ray start --address=...`), with the Train workers
placed on both nodes. The cluster is started and stopped by the test (bounded time)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(1200)]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")  # tests only; the product keeps token auth
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head():
    port, dash = _free_port(), _free_port()
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    subprocess.run([RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--resources", '{"head_node": 1}', f"--temp-dir={temp}", "--disable-usage-stats"],
                   env=_env(), check=True, capture_output=True, timeout=120)
    info = {"gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "temp": temp}
    try:
        yield info
    finally:
        subprocess.run([RAY, "stop", "--force"], env=_env(), capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def _submit(head: dict, storage: Path, cache: Path, run_id: str, workers: int) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", head["dashboard"], "--",
           sys.executable, str(ROOT / "workflows" / "sequential.py"), "--config", TINY, "--storage", str(storage),
           "--run-id", run_id, "--method", "lora", "--order", "medical",
           "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
           "--set", "cluster.executor=ray", "--set", f"cluster.num_workers={workers}",
           "--set", "train.max_steps=2", "--set", "cluster.placement_strategy=STRICT_SPREAD"]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _train_worker_nodes(head: dict) -> set[str]:
    code = ("import json; from ray.util.state import list_actors; "
            f"a = list_actors(address={head['dashboard']!r}, filters=[('class_name', '=', 'RayTrainWorker')], "
            "limit=1000, detail=True); print(json.dumps(sorted({x.node_id for x in a})))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_job_submit_on_head_then_on_two_nodes(head, tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    # 1) one node: the job's driver attaches to the cluster (no address needed inside a job)
    p = _submit(head, storage, cache, "one-node", workers=1)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((storage / "one-node" / "summary.json").read_text())
    assert s["steps"][0]["train"]["world_size"] == 1

    # 2) a second node on this machine; STRICT_SPREAD puts the 2 Train workers on different nodes
    subprocess.run([RAY, "start", f"--address={head['gcs']}", "--num-cpus=2", "--resources", '{"second_node": 1}',
                    "--disable-usage-stats"], env=_env(), check=True, capture_output=True, timeout=120)
    deadline = time.time() + 60
    code = f"import ray; ray.init(address={head['gcs']!r}); print(len([n for n in ray.nodes() if n['Alive']]))"
    while time.time() < deadline:
        n = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
        if n.stdout.strip().endswith("2"):
            break
        time.sleep(2)
    else:
        pytest.fail("the second node never joined")
    p = _submit(head, storage, cache, "two-nodes", workers=2)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((storage / "two-nodes" / "summary.json").read_text())
    assert s["steps"][0]["train"]["world_size"] == 2
    nodes = _train_worker_nodes(head)  # the one-node job used the head only
    assert len(nodes) == 2, f"Train workers ran on {len(nodes)} node(s)"


def test_driver_killed_after_first_domain_resumes_on_ray(head, tmp_path):
    """The same fault as tests/integration/test_resume.py, with every phase on Ray Train (2 workers)
    and SSI as Ray tasks: the driver dies after domain 1, `--resume` finishes the run without
    re-running a finished step, and the result equals an uninterrupted run of the same seed."""
    from test_resume import assert_resumed_like_reference, kill_after_first_domain

    storage, cache = tmp_path / "runs", tmp_path / "cache"
    env = dict(_env(), RAY_ADDRESS=head["gcs"])

    def argv(run_id: str) -> list[str]:
        return ["--config", TINY, "--storage", str(storage), "--run-id", run_id, "--method", "safeanchor",
                "--order", "medical,legal", "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
                "--set", "cluster.executor=ray", "--set", "cluster.num_workers=2", "--set", "train.max_steps=3",
                "--set", "methods.safeanchor.replay_steps=2", "--set", "methods.safeanchor.replay_rounds=1"]

    def job(args: list[str]) -> None:
        p = subprocess.run([sys.executable, str(ROOT / "workflows" / "sequential.py"), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    job(argv("ref"))
    done_before = kill_after_first_domain(argv("killed"), env, storage / "killed", timeout=600)
    job(["--storage", str(storage), "--resume", "killed"])
    ref = json.loads((storage / "ref" / "summary.json").read_text())
    assert ref["steps"][0]["train"]["world_size"] == 2
    # two Train workers sum their gradients in a fixed order: a resumed run reproduces the weights
    assert_resumed_like_reference(storage, "ref", "killed", done_before, ["medical", "legal"], adapter_tol=1e-5)
