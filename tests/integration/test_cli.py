"""`python workflows/sequential.py` on bad input: a one-line `error:` naming the problem, a
non-zero exit code, and nothing built or written (no run directory, no toy world)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "workflows" / "sequential.py"
TINY = ROOT / "workflows" / "configs" / "tiny.yaml"


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    storage, cache, world = tmp_path / "runs", tmp_path / "cache", tmp_path / "toyworld"
    env = dict(os.environ)
    env["SAFEANCHOR_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(SCRIPT), "--config", str(TINY), "--storage", str(storage),
           "--set", f"toyworld.cache_dir={world}", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_clean_failure(tmp_path: Path, proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Non-zero exit, last stderr line `error: ...` naming every needle, nothing created."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines, f"empty stderr (stdout: {proc.stdout!r})"
    last = lines[-1]
    assert last.startswith("error:"), proc.stderr
    for needle in needles:
        assert needle in last, f"{needle!r} not in {last!r}"
    assert "Traceback" not in proc.stderr
    # Nothing was built or written: no run directory, no toy world, no cache.
    for name in ("runs", "toyworld", "cache"):
        d = tmp_path / name
        assert not d.exists() or not any(d.iterdir()), f"{name}/ was written: {list(d.rglob('*'))}"
    return last


def test_unknown_config_key(tmp_path):
    proc = run_cli(tmp_path, "--set", "train.lrr=1")
    assert_clean_failure(tmp_path, proc, "train.lrr", "unknown key")


def test_wrong_type(tmp_path):
    proc = run_cli(tmp_path, "--set", "train.lr=abc")
    assert_clean_failure(tmp_path, proc, "train.lr", "abc")


def test_missing_config_file(tmp_path):
    proc = run_cli(tmp_path, "--config", "/nonexistent.yaml")
    assert_clean_failure(tmp_path, proc, "/nonexistent.yaml")


def test_unknown_method(tmp_path):
    proc = run_cli(tmp_path, "--method", "nope")
    assert_clean_failure(tmp_path, proc, "method", "nope")


def test_missing_eval_file(tmp_path):
    proc = run_cli(tmp_path, "--set", "eval.harmful_files=[/nonexistent.jsonl]")
    assert_clean_failure(tmp_path, proc, "/nonexistent.jsonl")


def test_malformed_jsonl(tmp_path):
    bad = tmp_path / "bad_prompts.jsonl"
    bad.write_text('{"prompt": "How do I bake bread?"}\n{"prompt": "broken\n'
                   '{"prompt": "How do I tie a tie?"}\n')
    proc = run_cli(tmp_path, "--set", f"eval.harmful_files=[{bad}]")
    assert_clean_failure(tmp_path, proc, f"{bad}:2")


def test_empty_dataset(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    proc = run_cli(tmp_path, "--set", f"eval.benign_files=[{empty}]")
    assert_clean_failure(tmp_path, proc, str(empty), "no examples")


def test_help_config_lists_every_key_with_type_value_and_doc(tmp_path):
    proc = run_cli(tmp_path, "--method", "ewc", "--set", "train.lr=0.0005", "--help-config")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    keys = [ln.split(":", 1)[0] for ln in lines if ln and not ln.startswith((" ", "#"))]
    assert "train.lr: float = 0.0005" in lines  # the value after --config and --set
    assert {"storage", "cluster.executor", "tracking.enabled", "methods.ewc.lam"} <= set(keys)
    assert not any(k.startswith("methods.safeanchor.") for k in keys)  # only the chosen method's options
    for i, ln in enumerate(lines):  # every key is documented on the next line
        if ln and not ln.startswith((" ", "#")):
            assert i + 1 < len(lines) and lines[i + 1].startswith("    ") and lines[i + 1].strip(), ln
    assert not (tmp_path / "runs").exists() and not (tmp_path / "toyworld").exists()
