"""The pipeline's storage: `--storage file:///abs/dir`, a pyarrow SubTreeFileSystem and a
non-local filesystem receive every artefact of a run; a bad storage path is one error line."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))
import sequential  # noqa: E402  (workflows/sequential.py)

from safeanchor.config import ConfigError  # noqa: E402
from safeanchor.pipeline.config import load_run_config  # noqa: E402
from safeanchor.pipeline.sequential import run_pipeline  # noqa: E402
from safeanchor.storage import RunDir  # noqa: E402

TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
RUN_FILES = {"config.yaml", "metrics.jsonl", "summary.json"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("toycache")


def _assert_run_files(d: RunDir, domains: list[str], subspaces: bool, tracked: bool) -> dict:
    names = set(d.list(recursive=True))
    assert RUN_FILES <= names, names
    assert ("trajectory.png" in names) == tracked
    for t, dom in enumerate(domains, start=1):
        assert f"adapters/step{t}-{dom}/adapter_model.safetensors" in names
        assert (f"subspaces/step{t}-{dom}.safetensors" in names) == subspaces
        assert f"steps/{t:02d}-{dom}/02-train/_COMPLETE" in names
    assert not any(".tmp" in n for n in names), names  # every atomic write finished its move
    lines = d.read_text("metrics.jsonl").splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(len(domains) + 1))
    return d.read_json("summary.json")


def test_file_uri_storage_writes_where_it_says_and_resumes(tmp_path, cache, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    uri = f"file://{store}"
    argv = ["--config", TINY, "--storage", uri, "--set", f"toyworld.cache_dir={cache}", "--method", "lora",
            "--order", "medical", "--run-id", "r1"]
    assert sequential.main(argv) == 0
    s = _assert_run_files(RunDir.open(str(store / "r1")), ["medical"], subspaces=False, tracked=True)
    assert s["mlflow_tracking_uri"] == f"sqlite:///{store}/mlflow.db"
    assert (store / "mlflow.db").is_file() and (store / "mlartifacts").is_dir()
    assert list(cwd.iterdir()) == []  # no folder named 'file:', no ./mlruns
    before = s["executions"]
    assert sequential.main(["--storage", uri, "--resume", "r1"]) == 0
    again = json.loads((store / "r1" / "summary.json").read_text())
    assert again["executions"] == before  # a finished run: nothing ran again
    assert list(cwd.iterdir()) == []


def test_bad_storage_is_one_error_line_before_any_work(tmp_path, capsys):
    cache = tmp_path / "cache"
    for bad in ("/proc/nope", "nope://bucket/x"):
        rc = sequential.main(["--config", TINY, "--storage", bad, "--set", f"toyworld.cache_dir={cache}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith("error: storage: ") and "\n" not in err, err
        assert bad in err
    assert not cache.exists()  # failed before the toy world was built


def test_pipeline_on_a_subtree_filesystem(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd, base = tmp_path / "cwd", tmp_path / "base"
    cwd.mkdir()
    base.mkdir()
    monkeypatch.chdir(cwd)  # cfg.storage ("runs", relative) must not be used
    storage = RunDir(pafs.SubTreeFileSystem(str(base), pafs.LocalFileSystem()), "/runs")
    cfg = load_run_config(TINY, [f"toyworld.cache_dir={cache}", "methods.safeanchor.replay_steps=2"],
                          method="safeanchor", run_id="sub", **{"data.order": ["medical"]})
    run_pipeline(cfg, storage=storage)
    run = base / "runs" / "sub"
    s = _assert_run_files(RunDir.open(str(run)), ["medical"], subspaces=True, tracked=True)
    assert s["mlflow_tracking_uri"] == f"sqlite:///{base}/runs/mlflow.db"
    assert list(cwd.iterdir()) == []


def test_pipeline_on_a_non_local_filesystem(tmp_path, cache):
    """An in-memory filesystem stands for an object store: nothing of the run touches the disk."""
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    storage = RunDir(fs, f"/bucket-{uuid.uuid4().hex[:8]}/runs")
    assert storage.local_path() is None
    cfg = load_run_config(TINY, [f"toyworld.cache_dir={cache}", "methods.safeanchor.replay_steps=2",
                                 "tracking.enabled=false"],
                          method="safeanchor", run_id="mem", storage=str(tmp_path / "unused"),
                          **{"data.order": ["medical"]})
    run_pipeline(cfg, storage=storage)
    s = _assert_run_files(storage.sub("mem"), ["medical"], subspaces=True, tracked=False)
    assert not (tmp_path / "unused").exists()
    run_pipeline(cfg, resume=True, storage=storage)  # resume reads it back
    assert storage.sub("mem").read_json("summary.json")["executions"] == s["executions"]


def test_non_local_storage_without_an_mlflow_server_fails_before_any_work(tmp_path):
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    storage = RunDir(fs, f"/bucket-{uuid.uuid4().hex[:8]}/runs")
    cache = tmp_path / "cache"
    cfg = load_run_config(TINY, [f"toyworld.cache_dir={cache}"], run_id="m")
    with pytest.raises(ConfigError) as e:
        run_pipeline(cfg, storage=storage)
    assert e.value.key == "tracking.tracking_uri"
    assert not cache.exists() and not storage.exists("m")  # no toy world built, no run directory
