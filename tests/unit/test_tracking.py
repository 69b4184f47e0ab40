"""safeanchor.tracking without the pipeline: config, helpers, the no-op tracker, URI resolution,
and run status on success / failure (a throwaway SQLite store under tmp_path)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from safeanchor.config import ConfigError, from_dict
from safeanchor.pipeline.config import load_run_config
from safeanchor.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    flatten,
    make_tracker,
    numeric_scalars,
)

SUMMARY = {"method": "lora", "seed": 0, "order": ["a", "b"], "safety": [0.9, 0.8, 0.7],
           "over_refusal": [0.1, 0.1, 0.2], "general": [0.5, 0.5, 0.4], "helpful": [0.6, 0.6, 0.6],
           "domain": {"a": [0.1, 0.5, 0.4], "b": [0.0, 0.1, 0.6]}}


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def test_config_defaults_and_checks():
    cfg = load_run_config(None)
    assert cfg.tracking == TrackingConfig(enabled=True, tracking_uri=None, experiment="safeanchor")
    assert load_run_config(None, ["tracking.enabled=false"]).tracking.enabled is False
    with pytest.raises(ConfigError) as ei:
        load_run_config(None, ["tracking.experiment=''"])
    assert ei.value.key == "tracking.experiment"
    with pytest.raises(ConfigError):
        from_dict(TrackingConfig, {"enabled": "yes"})


def test_flatten_dotted_strings_truncated():
    flat = flatten({"a": {"b": 1, "c": [1, "x"], "d": {}}, "e": None, "f": "y" * 7000, "g h?": 2})
    assert flat["a.b"] == "1" and flat["a.c"] == '[1, "x"]' and flat["a.d"] == "{}"
    assert flat["e"] == "None"
    assert len(flat["f"]) == 6000
    assert flat["g h_"] == "2"  # characters MLflow rejects are replaced


def test_numeric_scalars_depth_two():
    info = {"ssi": {"k_mean": 1.5, "k": {"x.A": 0}, "domain": "med"},
            "csm": {"rounds": 2, "triggered": True, "s_t": float("nan")}, "top": 3}
    m = numeric_scalars(info)
    assert m.keys() == {"ssi/k_mean", "csm/rounds", "csm/triggered", "csm/s_t", "top"}
    assert m["csm/rounds"] == 2.0 and m["csm/triggered"] == 1.0 and math.isnan(m["csm/s_t"])


def test_disabled_tracker_is_a_noop(tmp_path):
    storage = tmp_path / "runs"
    t = make_tracker(TrackingConfig(enabled=False), storage)
    assert isinstance(t, NullTracker)
    t.start("r", {"a": 1})
    with t.domain(1, "a"):
        t.log_metrics({"safety": 1.0}, step=1, child=True)
        t.log_artifact(tmp_path, "adapter", child=True)
    t.log_metrics({"safety": 1.0}, step=1)
    t.finish(SUMMARY, tmp_path)
    t.fail()
    assert t.run_id is None and t.tracking_uri is None
    assert not storage.exists()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "trajectory.png").exists()
    assert not list(tmp_path.rglob("mlflow.db"))


def test_default_uri_env_override_and_explicit_uri(tmp_path, monkeypatch):
    storage = tmp_path / "runs"
    t = Tracker(TrackingConfig(), storage)
    assert t.tracking_uri == f"sqlite:///{storage.resolve() / 'mlflow.db'}"
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    t = Tracker(TrackingConfig(experiment="e2"), tmp_path / "runs2")
    assert t.tracking_uri == other
    assert (tmp_path / "other.db").exists() and not (tmp_path / "runs2" / "mlflow.db").exists()
    explicit = f"sqlite:///{tmp_path / 'explicit.db'}"
    assert Tracker(TrackingConfig(tracking_uri=explicit), storage).tracking_uri == explicit


def test_tracker_logs_runs_and_ends_them(tmp_path):
    from mlflow.tracking import MlflowClient

    storage, run_dir = tmp_path / "runs", tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "w.bin").write_bytes(b"x")
    t = Tracker(TrackingConfig(), storage)
    t.start("r", {"method": "lora", "train": {"lr": 0.1}}, tags={"seed": 0})
    t.log_metrics({"safety": 0.9, "bad": "x"}, step=0)
    with t.domain(1, "a"):
        t.log_metrics({"safety": 0.8, "csm/s_t": float("nan")}, step=1, child=True)
        t.log_artifact(run_dir / "adapter", "adapter", child=True)
    with pytest.raises(RuntimeError):  # no child open any more
        t.log_metrics({"safety": 0.8}, step=1, child=True)
    t.finish(SUMMARY, run_dir)
    t.fail()  # after finish: no-op
    c = MlflowClient(tracking_uri=t.tracking_uri)
    parent = c.get_run(t.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"method": "lora", "train.lr": "0.1"}
    assert parent.data.tags["seed"] == "0" and "bad" not in parent.data.metrics
    (child,) = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{t.run_id}'")
    assert child.info.run_name == "step1-a" and child.info.status == "FINISHED"
    assert math.isnan(child.data.metrics["csm/s_t"])  # MLflow keeps NaN
    assert [f.path for f in c.list_artifacts(child.info.run_id, "adapter")] == ["adapter/w.bin"]
    assert {f.path for f in c.list_artifacts(t.run_id)} == {"summary.json", "trajectory.png"}
    assert (run_dir / "trajectory.png").exists() and (run_dir / "summary.json").exists()
    assert (storage / "mlartifacts" / "safeanchor").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_failure_ends_child_and_parent_failed(tmp_path):
    from mlflow.tracking import MlflowClient

    t = Tracker(TrackingConfig(), tmp_path / "runs")
    t.start("r", {})
    with pytest.raises(ValueError), t.domain(1, "a"):
        raise ValueError("boom")
    t.fail()
    c = MlflowClient(tracking_uri=t.tracking_uri)
    parent = c.get_run(t.run_id)
    assert parent.info.status == "FAILED"
    (child,) = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{t.run_id}'")
    assert child.info.status == "FAILED"


def _open_store(storage: str) -> str:
    from safeanchor.tracking import Tracker, TrackingConfig

    t = Tracker(TrackingConfig(), Path(storage))
    t.start("concurrent", {"a": 1})
    t.finish({"safety": [1.0]}, Path(storage))
    return t.run_id


def test_parallel_runs_share_a_fresh_sqlite_store(tmp_path):
    """compare.py --parallel: several processes create the same new store at once (schema race)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(3) as pool:
        ids = pool.map(_open_store, [str(tmp_path)] * 3)
    assert len(set(ids)) == 3
