"""safeanchor.storage.RunDir: every run artefact through pyarrow.fs, written atomically.

Three filesystems: a `file://` URI, a `pyarrow.fs.SubTreeFileSystem` over the local disk, and
an in-memory fsspec filesystem (the stand-in for an object store: nothing on the local disk)."""

from __future__ import annotations

from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest

from safeanchor.config import ConfigError
from safeanchor.storage import RunDir, open_storage
from safeanchor.tracking import TrackingConfig, default_tracking_uri


def _memory_dir(root: str) -> RunDir:
    fs = pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory")))
    return RunDir(fs, root)


@pytest.fixture(params=["file-uri", "subtree", "memory"])
def rundir(request, tmp_path) -> tuple[RunDir, Path | None]:
    """(a RunDir for run 'r', where its files land on the local disk or None)."""
    if request.param == "file-uri":
        return RunDir.open(f"file://{tmp_path}/store", "r"), tmp_path / "store" / "r"
    if request.param == "subtree":
        sub = pafs.SubTreeFileSystem(str(tmp_path / "base"), pafs.LocalFileSystem())
        (tmp_path / "base").mkdir()
        return RunDir.open("/store", "r", filesystem=sub), tmp_path / "base" / "store" / "r"
    return _memory_dir(f"/{tmp_path.name}/store").sub("r"), None


def test_files_land_where_the_storage_says(rundir):
    d, on_disk = rundir
    d.write_text("config.yaml", "a: 1\n")
    d.write_json("summary.json", {"x": 1.5})
    d.write_bytes("steps/01-x/record.json", b"{}")
    assert d.read_text("config.yaml") == "a: 1\n" and d.read_json("summary.json") == {"x": 1.5}
    assert d.list() == ["config.yaml", "summary.json"]
    assert d.list("steps", recursive=True) == ["01-x/record.json"]
    assert d.is_dir("steps") and d.is_file("steps/01-x/record.json") and not d.exists("nope")
    if on_disk is not None:
        assert (on_disk / "config.yaml").read_text() == "a: 1\n"
        assert (on_disk / "steps" / "01-x" / "record.json").read_bytes() == b"{}"
        assert d.local_path() == on_disk and d.uri() == str(on_disk)
        assert not Path("file:").exists()  # the bug this replaces: a local folder named 'file:'
    else:
        assert d.local_path() is None


def test_overwrite_is_atomic_and_a_failed_write_keeps_the_old_file(rundir):
    d, _ = rundir
    d.write_text("metrics.jsonl", "old\n")
    with pytest.raises(TypeError):
        d.write_bytes("metrics.jsonl", object())  # fails while writing the temporary file
    assert d.read_text("metrics.jsonl") == "old\n"
    d.write_text("metrics.jsonl", "new\n")
    assert d.read_text("metrics.jsonl") == "new\n"
    assert d.list(recursive=True) == ["metrics.jsonl"]  # no temporary file left behind


def test_append_line_rewrites_whole_lines(rundir):
    d, _ = rundir
    d.append_line("steps/_executions.jsonl", '{"step": "a"}')
    d.append_line("steps/_executions.jsonl", '{"step": "b"}\n')
    assert d.read_text("steps/_executions.jsonl") == '{"step": "a"}\n{"step": "b"}\n'


def test_staged_uploads_a_local_directory_and_local_copy_reads_it_back(rundir, tmp_path):
    d, on_disk = rundir
    d.write_text("adapters/a/stale.bin", "x")
    with d.staged("adapters/a") as tmp:  # what peft's save_pretrained writes into
        (tmp / "adapter_model.safetensors").write_bytes(b"w")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "cfg.json").write_text("{}")
    assert not tmp.exists()
    assert d.list("adapters/a", recursive=True) == ["adapter_model.safetensors", "sub/cfg.json"]  # replaced
    with d.local_copy("adapters/a") as local:
        assert (local / "sub" / "cfg.json").read_text() == "{}"
        if on_disk is not None:
            assert local == on_disk / "adapters" / "a"  # no copy on a local disk
    with d.local_copy("adapters/a/adapter_model.safetensors") as local:
        assert local.read_bytes() == b"w"
    if on_disk is None:
        assert not local.exists()  # the download was temporary
    with pytest.raises(FileNotFoundError):
        with d.local_copy("adapters/none"):
            pass


def test_staged_uploads_nothing_when_the_block_fails(rundir):
    d, _ = rundir
    with pytest.raises(RuntimeError), d.staged("adapters/b") as tmp:
        (tmp / "half.bin").write_bytes(b"h")
        raise RuntimeError("save failed")
    assert not d.exists("adapters/b")


def test_bad_storage_is_one_line_naming_storage(tmp_path):
    for bad in ("foo://bucket/x", "file://relative/x", ""):
        with pytest.raises(ConfigError) as e:
            open_storage(bad)
        assert e.value.key == "storage" and "\n" not in str(e.value)
    with pytest.raises(ConfigError) as e:
        RunDir.open("/proc/nope").check_writable()
    assert e.value.key == "storage" and "/proc/nope" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile"):
        RunDir.open(str(tmp_path / "afile")).check_writable()
    RunDir.open(str(tmp_path / "new" / "dir")).check_writable()  # created, probe removed
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_uris_for_ray_and_mlflow(tmp_path):
    local = RunDir.open(str(tmp_path), "r")
    assert local.uri("ray") == str(tmp_path / "r" / "ray") and local.ray_filesystem() is None
    s3 = RunDir(_memory_dir("/").fs, "bucket/prefix", "s3://")  # an object store: only its names are used here
    assert s3.sub("r").uri("ray") == "s3://bucket/prefix/r/ray" and s3.ray_filesystem() is None
    mem = _memory_dir("/m")
    assert mem.ray_filesystem() is mem.fs  # Ray Train gets the filesystem object itself
    # SQLite (the default MLflow store) needs a local disk: a clear error, not a folder named 's3:'
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        default_tracking_uri(TrackingConfig(), mem)
    uri = default_tracking_uri(TrackingConfig(), RunDir.open(f"file://{tmp_path}"))
    assert uri == f"sqlite:///{tmp_path}/mlflow.db"
