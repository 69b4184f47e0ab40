"""README's cluster commands as written, with Ray's token authentication ON (as a user's cluster
has it): `ray get-auth-token --generate`, `ray start --head`, `ray job submit -- python
workflows/sequential.py …`, then a second node joins (`ray start --address=…`) and the next job
puts its Train workers on both nodes. The shell is a user's after README's setup: the venv's
`python` first on PATH and `RAY_AUTH_MODE=token`; the token lives in this test's own HOME
(`~/.ray/auth_token`), never the user's. Flags beyond README's are test plumbing only: free
ports (other Ray instances may run on this machine), a short temp dir, `--block` so that the
test stops exactly the processes it started (`ray stop` would stop every Ray on the machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
# generous: a loaded 2-core machine is slow to start nodes (the module's cluster teardown counts
# toward the last test). Killing the driver on this cluster is tested in test_resume_mid_phase.py
# (mid-phase, resumed from the Train checkpoint); the kill after a whole domain is tested
# in-process by test_resume.py (the Ray variant here repeated both and took ~4 minutes of CI).
pytestmark = [pytest.mark.ray, pytest.mark.timeout(3600)]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _user_env(home: Path) -> dict[str, str]:
    """A user's shell after README's `. .venv/bin/activate` and `export RAY_AUTH_MODE=token`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    # the tree under test (the venv may hold an editable install of another checkout)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _node_flags() -> list[str]:
    """Free ports for everything a node listens on (test plumbing: README uses the defaults)."""
    agent, grpc, client, nm, om, metrics, renv = _free_ports(7)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
            f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={renv}", "--num-cpus=2", "--disable-usage-stats", "--block"], client


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([RAY, "start", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block`, then SIGKILL whatever is left in their process sessions —
    processes this test started, by id. Not waiting for Ray's drain (up to 30 s per node, which
    was a minute of every CI run): the test's nodes hold nothing that must outlive it."""
    try:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
    finally:  # also when a timeout interrupts the graceful stop
        sessions = {p.pid for p in procs}
        for pid in (int(x) for x in os.listdir("/proc") if x.isdigit()):
            try:
                if os.getsid(pid) in sessions:
                    os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = _user_env(home)
    # README: once, the cluster's token (written to ~/.ray/auth_token)
    p = _ray(["get-auth-token", "--generate"], env)
    assert p.returncode == 0 and (home / ".ray" / "auth_token").is_file(), p.stderr
    port, dash = _free_ports(2)
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # Ray's socket paths must stay short
    flags, client = _node_flags()
    procs = [_start(["--head", f"--port={port}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                     f"--temp-dir={temp}", "--resources", '{"head_node": 1}', *flags], env, home / "head.log")]
    info = {"env": env, "home": home, "gcs": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}",
            "temp": temp, "procs": procs}
    try:
        deadline = time.time() + 180
        while _ray(["job", "list", "--address", info["dashboard"]], env).returncode != 0:
            assert procs[0].poll() is None, (home / "head.log").read_text()[-3000:]
            assert time.time() < deadline, "the head's job server never answered"
            time.sleep(2)
        yield info
    finally:
        _stop(procs)
        shutil.rmtree(temp, ignore_errors=True)


def _sequential_args(storage: Path, cache: Path, run_id: str, workers: int) -> list[str]:
    # README: ray job submit --address http://HEAD:8265 -- python $PWD/workflows/sequential.py --storage …
    return ["python", str(ROOT / "workflows" / "sequential.py"), "--config", TINY, "--storage", str(storage),
            "--run-id", run_id, "--method", "lora", "--order", "medical",
            "--set", f"toyworld.cache_dir={cache}", "--set", "tracking.enabled=false",
            "--set", "cluster.executor=ray", "--set", f"cluster.num_workers={workers}",
            "--set", "train.max_steps=2", "--set", "cluster.placement_strategy=STRICT_SPREAD"]


def _submit(cluster: dict, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    deadline = time.time() + 120
    while True:
        p = _ray(["job", "submit", "--address", cluster["dashboard"], "--", *cmd], env or cluster["env"], timeout=900)
        # the head's dashboard agent registers a few seconds after the job server answers
        if "No available agent" not in p.stdout + p.stderr or time.time() > deadline:
            return p
        time.sleep(3)


def _train_worker_nodes(cluster: dict) -> set[str]:
    code = ("import json; from ray.util.state import list_actors; "
            f"a = list_actors(address={cluster['dashboard']!r}, filters=[('class_name', '=', 'RayTrainWorker')], "
            "limit=1000, detail=True); print(json.dumps(sorted({x.node_id for x in a})))")
    out = subprocess.run(["python", "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_job_submit_with_token_auth_on_head_then_on_two_nodes(cluster, tmp_path):
    storage, cache = tmp_path / "runs", tmp_path / "cache"
    # authentication is really on: a client without the token, or without RAY_AUTH_MODE=token
    # (the failure README's old command met), is refused
    no_token = dict(cluster["env"], HOME=str(tmp_path))
    p = _submit(cluster, ["python", "-c", "print(1)"], env=no_token)
    assert p.returncode != 0 and "AuthenticationError" in p.stdout + p.stderr, p.stdout + p.stderr
    no_mode = {k: v for k, v in cluster["env"].items() if k != "RAY_AUTH_MODE"}
    p = _submit(cluster, ["python", "-c", "print(1)"], env=no_mode)
    assert p.returncode != 0 and "Missing authentication token" in p.stdout + p.stderr, p.stdout + p.stderr

    # 1) one node: the job's driver attaches to the cluster with the node's token (no address,
    # no token handling in safeanchor)
    p = _submit(cluster, _sequential_args(storage, cache, "one-node", workers=1))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((storage / "one-node" / "summary.json").read_text())
    assert s["steps"][0]["train"]["world_size"] == 1
    assert "PreemptionWatcher" not in p.stdout + p.stderr  # the console shows progress, not Ray internals

    # 2) README: `ray start --address=HEAD:6379` on a second node (here: the same machine, same token)
    flags, _ = _node_flags()
    cluster["procs"].append(_start([f"--address={cluster['gcs']}", "--resources", '{"second_node": 1}', *flags],
                                   cluster["env"], cluster["home"] / "node2.log"))
    code = f"import ray; ray.init(address={cluster['gcs']!r}); print(len([n for n in ray.nodes() if n['Alive']]))"
    deadline = time.time() + 120
    while True:
        n = subprocess.run(["python", "-c", code], env=cluster["env"], capture_output=True, text=True, timeout=60)
        if n.stdout.strip().endswith("2"):
            break
        assert time.time() < deadline, "the second node never joined: " + (cluster["home"] / "node2.log").read_text()[-2000:]
        time.sleep(2)
    p = _submit(cluster, _sequential_args(storage, cache, "two-nodes", workers=2))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((storage / "two-nodes" / "summary.json").read_text())
    assert s["steps"][0]["train"]["world_size"] == 2
    nodes = _train_worker_nodes(cluster)  # STRICT_SPREAD: the 2 Train workers on different nodes
    assert len(nodes) == 2, f"Train workers ran on {len(nodes)} node(s)"

