"""atomic_dir: the temp-dir-then-rename pattern of the caches (toy world, alignment, GGUF); machine()."""

import stat

import pytest

from safeanchor.utils import atomic_dir, machine


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_success_renames_the_temp_dir_into_place(tmp_path):
    final = tmp_path / "cache" / "entry"  # the parent does not exist yet
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".entry.") and tmp.is_dir()
        assert not final.exists()  # nothing visible before the block ends
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("hello")
    assert (final / "sub" / "a.txt").read_text() == "hello"
    assert not tmp.exists()
    assert [p.name for p in final.parent.iterdir()] == ["entry"]  # no temp dir left
    assert _mode(final) == 0o755


def test_mode_none_keeps_mkdtemp_private_mode(tmp_path):
    with atomic_dir(tmp_path / "entry", mode=None) as tmp:
        (tmp / "x").write_text("1")
    assert _mode(tmp_path / "entry") == 0o700


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_exception_leaves_no_final_dir_and_no_temp_dir(tmp_path, exc):
    final = tmp_path / "entry"
    with pytest.raises(exc):
        with atomic_dir(final) as tmp:
            (tmp / "partial.bin").write_bytes(b"\0" * 10)
            raise exc("interrupted")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_what_was_at_final(tmp_path):
    final = tmp_path / "entry"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_existing_final_is_replaced_whole(tmp_path):
    """An incomplete earlier attempt, or a directory another process finished first: the last
    finisher's directory replaces it entirely (no file of the old one survives)."""
    final = tmp_path / "entry"
    final.mkdir()
    (final / "stale.txt").write_text("stale")
    with atomic_dir(final) as tmp:
        (tmp / "done.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["done.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]


def test_machine_names_the_kernels_and_threads_in_use():
    import json

    import torch

    m = machine()
    assert m["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert isinstance(m["cpu"], str) and m["cpu"] and m["cores"] >= 1
    assert ("gpu" in m) == torch.cuda.is_available()
    json.dumps(m)  # saved as is in summary.json / report.json
