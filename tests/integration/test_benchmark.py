"""workflows/benchmark.py runs end to end on the tiny preset and writes every figure the README
reports (a smoke test of the script; the figures themselves are read, not asserted)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "workflows"))
import benchmark  # noqa: E402  (workflows/benchmark.py)

KEYS = ("lora_step_s", "projection_step_s", "safeanchor_step_s", "ratio_projection", "ratio_safeanchor", "ssi_s",
        "domain_train_s", "projection_hooks_step_s", "ratio_projection_hooks")


def test_benchmark_writes_all_figures(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--config", str(ROOT / "workflows" / "configs" / "tiny.yaml"), "--steps", "2", "--rounds", "1",
            "--ssi-repeats", "2", "--out", str(out), "--set", f"toyworld.cache_dir={tmp_path / 'cache'}",
            "--set", f"storage={tmp_path / 'runs'}", "--set", "tracking.enabled=false"]
    assert benchmark.main(argv) == 0
    fig = json.loads(out.read_text())
    for k in KEYS:
        assert fig[k] > 0, k
    assert fig["ratio_safeanchor"] == fig["safeanchor_step_s"] / fig["lora_step_s"]
    assert fig["ratio_projection_hooks"] == fig["projection_hooks_step_s"] / fig["lora_step_s"]
    assert len(fig["ssi_runs_s"]) == 2 and fig["ssi_s"] == statistics.median(fig["ssi_runs_s"])


def test_per_tensor_proxy_hides_only_the_batched_transform():
    class Hooks:
        def transform_grad(self, name, grad):
            return grad

        def transform_grads(self, grads):
            pass

    proxy = benchmark.PerTensor(Hooks())
    assert getattr(proxy, "transform_grads", None) is None
    assert proxy.transform_grad("w", 1) == 1


def test_benchmark_bad_config_is_a_clear_error(tmp_path, capsys):
    assert benchmark.main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
