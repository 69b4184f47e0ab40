"""The tiny pipeline logs to MLflow: a parent run, one nested child per domain, artifacts under
the storage directory (never ./mlruns)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))
import sequential  # noqa: E402  (workflows/sequential.py)

TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
ORDER = ["medical", "legal"]


def _preset_lr() -> float:
    from safeanchor.pipeline.config import load_run_config

    return load_run_config(TINY).train.lr


TRAIN_LR = _preset_lr()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cache):
    cwd = tmp_path_factory.mktemp("cwd")
    storage = tmp_path_factory.mktemp("storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        argv = ["--config", TINY, "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}",
                "--method", "safeanchor", "--order", ",".join(ORDER),
                "--set", "methods.safeanchor.replay_steps=2", "--set", "methods.safeanchor.tau=1.0"]
        assert sequential.main(argv) == 0
    run_dir = storage / f"safeanchor-seed0-{'-'.join(ORDER)}"
    summary = json.loads((run_dir / "summary.json").read_text())
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"])
    return {"summary": summary, "client": client, "cwd": cwd, "storage": storage, "run_dir": run_dir}


def _children(client, parent):
    exp = parent.info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def _artifacts(client, run_id, path=None):
    return {Path(f.path).name: f for f in client.list_artifacts(run_id, path)}


def test_summary_names_the_run(tracked):
    s, storage = tracked["summary"], tracked["storage"]
    assert s["mlflow_tracking_uri"] == f"sqlite:///{storage.resolve() / 'mlflow.db'}"
    assert s["mlflow_run_id"]
    assert (storage / "mlflow.db").exists()


def test_parent_run_params_tags_and_metric_history(tracked):
    client, s = tracked["client"], tracked["summary"]
    parent = client.get_run(s["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "safeanchor-seed0-medical-legal"
    assert parent.info.artifact_uri.startswith((tracked["storage"].resolve() / "mlartifacts").as_uri())
    params = parent.data.params
    assert params["method"] == "safeanchor"
    assert float(params["train.lr"]) == pytest.approx(TRAIN_LR)
    assert params["methods.safeanchor.replay_steps"] == "2"
    assert json.loads(params["data.order"]) == ORDER
    assert "tracking.enabled" in params
    tags = parent.data.tags
    assert tags["method"] == "safeanchor" and tags["seed"] == "0" and tags["order"] == "medical,legal"
    hist = client.get_metric_history(parent.info.run_id, "safety")
    assert sorted(m.step for m in hist) == [0, 1, 2]
    assert [m.value for m in sorted(hist, key=lambda m: m.step)] == pytest.approx(s["safety"])
    for key in ("train/loss_last", "ssi/k_mean", "csm/rounds"):
        assert sorted(m.step for m in client.get_metric_history(parent.info.run_id, key)) == [1, 2], key
    assert "ssi/k" not in parent.data.metrics  # a per-tensor dict (depth 3): not a metric


def test_one_child_per_domain_with_metrics_and_adapter(tracked):
    client, s = tracked["client"], tracked["summary"]
    parent = client.get_run(s["mlflow_run_id"])
    children = _children(client, parent)
    assert sorted(c.info.run_name for c in children) == ["step1-medical", "step2-legal"]
    for t, d in enumerate(ORDER, start=1):
        (child,) = [c for c in children if c.info.run_name == f"step{t}-{d}"]
        assert child.info.status == "FINISHED"
        m = child.data.metrics
        assert m["safety"] == pytest.approx(s["safety"][t])
        assert m[f"domain/{d}"] == pytest.approx(s["domain"][d][t])
        assert {"train/loss_last", "train/step_s", "train/wall_s", "ssi/k_mean"} <= set(m)
        assert client.get_metric_history(child.info.run_id, "safety")[0].step == t
        arts = _artifacts(client, child.info.run_id)
        assert arts["adapter"].is_dir
        assert "adapter_model.safetensors" in _artifacts(client, child.info.run_id, "adapter")
        subs = _artifacts(client, child.info.run_id, "subspaces")
        assert list(subs) == [f"step{t}-{d}.safetensors"]


def test_parent_artifacts_and_nothing_in_cwd(tracked, tmp_path):
    client, s = tracked["client"], tracked["summary"]
    arts = _artifacts(client, s["mlflow_run_id"])
    assert {"summary.json", "trajectory.png"} <= set(arts)
    local = Path(client.download_artifacts(s["mlflow_run_id"], "summary.json", str(tmp_path)))
    assert json.loads(local.read_text())["mlflow_run_id"] == s["mlflow_run_id"]
    png = tracked["run_dir"] / "trajectory.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(tracked["cwd"].iterdir()) == []  # no ./mlruns (nor anything else) in the cwd


def test_disabled_tracking_writes_no_store(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = tmp_path / "runs"
    argv = ["--config", TINY, "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}",
            "--order", "code", "--method", "lora", "--set", "tracking.enabled=false"]
    assert sequential.main(argv) == 0
    s = json.loads((storage / "lora-seed0-code" / "summary.json").read_text())
    assert s["mlflow_run_id"] is None and s["mlflow_tracking_uri"] is None
    assert sorted(p.name for p in storage.iterdir()) == ["lora-seed0-code"]
    assert not (tmp_path / "mlruns").exists() and not list(tmp_path.rglob("mlflow.db"))


def test_failed_pipeline_ends_runs_failed(tmp_path, cache, monkeypatch):
    from mlflow.tracking import MlflowClient

    from safeanchor.pipeline import sequential as pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("training exploded")

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment overrides the default
    monkeypatch.setattr(pipeline, "train_examples", boom)
    argv = ["--config", TINY, "--storage", str(tmp_path / "runs"), "--set",
            f"toyworld.cache_dir={cache}", "--order", "code"]
    with pytest.raises(RuntimeError, match="exploded"):
        sequential.main(argv)
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("safeanchor").experiment_id],
                                   "tags.mlflow.parentRunId IS NULL")
    assert parent.info.status == "FAILED"
    (child,) = _children(client, parent)
    assert child.info.run_name == "step1-code" and child.info.status == "FAILED"


def test_resume_continues_the_same_parent_run(tracked):
    """--resume reopens the pipeline run's MLflow parent (and the domain's child) instead of a
    new one, and logs again only the tracking steps without a marker: here the last domain's
    (as if the driver died after logging it, before its marker: tracking is at-least-once)."""
    client, s, storage, run_dir = tracked["client"], tracked["summary"], tracked["storage"], tracked["run_dir"]
    exp = client.get_run(s["mlflow_run_id"]).info.experiment_id
    children_before = {c.info.run_name: c.info.run_id for c in _children(client, client.get_run(s["mlflow_run_id"]))}
    (run_dir / "steps" / "02-legal" / "92-track" / "_COMPLETE").unlink()
    (run_dir / "summary.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tracked["cwd"])
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert sequential.main(["--storage", str(storage), "--resume", run_dir.name]) == 0
    again = json.loads((run_dir / "summary.json").read_text())
    assert again["mlflow_run_id"] == s["mlflow_run_id"]
    (parent,) = client.search_runs([exp], "tags.mlflow.parentRunId IS NULL")
    assert parent.info.run_id == s["mlflow_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["resumed"] == "True"
    children = {c.info.run_name: c.info.run_id for c in _children(client, parent)}
    assert children == children_before  # no new child for either domain
    hist = client.get_metric_history(parent.info.run_id, "safety")
    assert sorted(m.step for m in hist) == [0, 1, 2, 2]  # step 2 logged again, steps 0 and 1 not
    assert again["executions"][-1] == "02-legal/92-track"
