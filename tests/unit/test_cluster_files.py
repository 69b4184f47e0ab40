"""Every file under cluster/ parses, names only entry points, presets and DeepSpeed files that exist,
and is accepted by what will read it: Ray 2.60's cluster-launcher schema, KubeRay's RayCluster /
RayJob field names (KubeRay v1.7 API types), this project's DeepSpeed config code and DeepSpeed's
own config parser. No cloud, Kubernetes or GPU is touched."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
DEEPSPEED = sorted((CLUSTER / "deepspeed").glob("*.json"))

# Field names of KubeRay's v1 API types at release v1.7.0 (ray-operator/apis/ray/v1/
# raycluster_types.go, rayjob_types.go; read from github:ray-project/kuberay, 2026-11-29).
RAYCLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                   "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions",
                   "historyServerOptions", "networkPolicy", "tlsOptions", "headGroupSpec", "rayVersion",
                   "workerGroupSpecs"}
AUTH_OPTIONS = {"enableK8sTokenAuth", "secretName", "mode"}
HEAD_GROUP = {"template", "headService", "enableIngress", "ingressOptions", "resources", "labels",
              "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "priority", "resources", "labels", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "preRunningDeadlineSeconds",
               "shutdownAfterJobFinishes", "suspend"}

# What a file may point at inside the repository.
REF = re.compile(r"(?<![\w/])((?:workflows|cluster|safeanchor)/[\w./-]+\.(?:py|yaml|json)|cluster/docker/Dockerfile)")


def _parsed() -> dict[Path, list]:
    out = {}
    for path in sorted(CLUSTER.rglob("*")):
        if path.suffix in (".yaml", ".yml"):
            out[path] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        elif path.suffix == ".json":
            out[path] = [json.loads(path.read_text())]
    return out


def _strings(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _kuberay() -> dict[str, dict]:
    docs = {}
    for parsed in _parsed().values():
        for d in parsed:
            if isinstance(d, dict) and str(d.get("apiVersion", "")).startswith("ray.io"):
                docs[d["kind"]] = d
    return docs


def test_every_cluster_file_parses_and_the_set_is_complete():
    parsed = _parsed()
    names = {p.relative_to(CLUSTER).as_posix() for p in parsed}
    assert {"aws-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/storage.yaml",
            "deepspeed/zero2.json", "deepspeed/zero3.json", "deepspeed/zero3_offload.json"} <= names
    assert all(parsed.values()), "an empty file"


def test_every_referenced_repo_path_exists():
    """Entry points, presets and DeepSpeed files named anywhere under cluster/ (YAML, JSON, the
    Dockerfile, README) and the DeepSpeed file of every preset exist in the repository."""
    texts = {p: p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}
    found = {(p, m) for p, t in texts.items() for m in REF.findall(t)}
    assert any(m.startswith("workflows/sequential.py") for _, m in found)
    missing = [f"{p.relative_to(ROOT)}: {m}" for p, m in found if not (ROOT / m).exists()]
    assert not missing, missing
    for preset in (ROOT / "workflows" / "configs").glob("*.yaml"):
        from safeanchor.config import load_yaml

        ds = load_yaml(preset).get("cluster", {}).get("deepspeed", {}).get("config_file")
        assert ds is None or (ROOT / ds).is_file(), f"{preset.name}: {ds}"
    for src in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", texts[CLUSTER / "docker" / "Dockerfile"], re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which does not exist"


def _entrypoints() -> list[str]:
    """Every `python workflows/...` command line in the cluster files (launcher comments, RayJob)."""
    cmds = []
    for p in CLUSTER.rglob("*"):
        if p.is_file():
            text = p.read_text().replace("\\\n", " ")
            cmds += re.findall(r"python (workflows/\S+\.py[^\n`'\"]*)", text)
    return cmds


def test_entry_points_name_an_existing_script_and_preset():
    cmds = _entrypoints()
    assert cmds
    for cmd in cmds:
        args = shlex.split(cmd.split("#")[0])
        assert (ROOT / args[0]).is_file(), cmd
        if "--config" in args:
            assert (ROOT / args[args.index("--config") + 1]).is_file(), cmd


def test_launcher_yaml_is_valid_for_ray_and_turns_token_auth_on():
    import jsonschema
    import ray
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    validate_config(cfg)
    assert cfg["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmd in cfg["head_start_ray_commands"][1:] + cfg["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    gpu = cfg["available_node_types"]["ray.worker.gpu"]
    assert gpu["min_workers"] >= 2  # the presets' cluster.num_workers
    assert any("pip install" in c and "safeanchor" in c for c in cfg["setup_commands"])
    assert any("/mnt/shared" in c for c in cfg["initialization_commands"])


def _check_fields(node: dict, allowed: set[str], where: str) -> None:
    extra = set(node) - allowed
    assert not extra, f"{where}: unknown field(s) {sorted(extra)}"


def _check_cluster_spec(spec: dict, where: str, claim: str) -> None:
    import ray

    _check_fields(spec, RAYCLUSTER_SPEC, where)
    _check_fields(spec["authOptions"], AUTH_OPTIONS, f"{where}.authOptions")
    assert spec["authOptions"] == {"mode": "token", "secretName": "safeanchor-ray-token"}
    assert spec["rayVersion"] == ray.__version__
    _check_fields(spec["headGroupSpec"], HEAD_GROUP, f"{where}.headGroupSpec")
    assert all(isinstance(v, str) for v in spec["headGroupSpec"]["rayStartParams"].values())
    pods = [spec["headGroupSpec"]["template"]["spec"]]
    gpus = 0
    for g in spec["workerGroupSpecs"]:
        _check_fields(g, WORKER_GROUP, f"{where}.workerGroupSpecs[{g['groupName']}]")
        pods.append(g["template"]["spec"])
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += int(limits.get("nvidia.com/gpu", 0)) * g["replicas"]
    assert gpus >= 2  # llama2-7b-chat.yaml: 2 Train workers x 1 GPU
    for pod in pods:
        vols = {v["name"]: v for v in pod["volumes"]}
        assert vols["shared"]["persistentVolumeClaim"]["claimName"] == claim
        c = pod["containers"][0]
        assert {"name": "shared", "mountPath": "/mnt/shared"} in c["volumeMounts"]
        assert c["image"] == pods[0]["containers"][0]["image"]


def test_kuberay_manifests_use_ray_io_v1_fields_token_auth_and_shared_storage():
    docs = _kuberay()
    assert set(docs) == {"RayCluster", "RayJob"}
    assert all(d["apiVersion"] == "ray.io/v1" for d in docs.values())
    pvc = yaml.safe_load((CLUSTER / "kuberay" / "storage.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    claim = pvc["metadata"]["name"]
    _check_cluster_spec(docs["RayCluster"]["spec"], "RayCluster.spec", claim)
    job = docs["RayJob"]["spec"]
    _check_fields(job, RAYJOB_SPEC, "RayJob.spec")
    _check_cluster_spec(job["rayClusterSpec"], "RayJob.spec.rayClusterSpec", claim)
    assert job["rayClusterSpec"] == docs["RayCluster"]["spec"]  # one cluster definition, two uses
    args = shlex.split(job["entrypoint"])
    assert args[:2] == ["python", "workflows/sequential.py"]
    assert args[args.index("--storage") + 1].startswith("/mnt/shared/")
    env = yaml.safe_load(job["runtimeEnvYAML"])
    assert env["working_dir"] == docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["workingDir"]


def test_entrypoint_preset_plans_with_the_manifests_storage(monkeypatch):
    """The RayJob's exact command line, with --dry-run, resolves offline: preset, DeepSpeed file,
    storage on the shared mount, MLflow store there."""
    import importlib.util

    job = _kuberay()["RayJob"]["spec"]
    args = shlex.split(job["entrypoint"])[2:]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = importlib.util.spec_from_file_location("sequential_cli", ROOT / "workflows" / "sequential.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from safeanchor.dryrun import build_plan
    from safeanchor.pipeline.config import load_run_config

    ns = mod.parse_args(args)
    cfg = load_run_config(ns.config, ns.overrides, storage=ns.storage)
    lines, _ = build_plan(cfg)
    assert any(ln.startswith("storage: /mnt/shared/runs -> local directory /mnt/shared/runs/") for ln in lines)
    assert any("MLflow: sqlite under the storage (/mnt/shared/runs/mlflow.db)" in ln for ln in lines)


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_files_pass_project_and_deepspeed_parsers(path, monkeypatch):
    """DeepSpeedConfig (the loop-owned keys refused, stage read), engine_config (the loop's keys
    added), then DeepSpeed's own parser (pydantic, unknown ZeRO keys forbidden) on the result."""
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    from deepspeed.runtime.config import DeepSpeedConfig as DSConfig

    from safeanchor.distributed.config import DeepSpeedConfig, engine_config

    ds = DeepSpeedConfig(config_file=str(path))
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    assert ds.stage() == stage
    parsed = DSConfig(engine_config(ds.resolved(), batch_size=16, world=1, grad_clip=1.0, bf16=True))
    assert parsed.zero_optimization_stage == stage and parsed.train_batch_size == 16
    if "offload" in path.name:
        assert parsed.zero_config.offload_param.device == "cpu"
        assert parsed.zero_config.offload_optimizer.device == "cpu"
        assert parsed.zero_force_ds_cpu_optimizer is False  # the loop's torch AdamW is allowed with offload
