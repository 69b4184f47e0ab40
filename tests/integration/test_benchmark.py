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
    argv = ["--config", str(ROOT / "workflows" / "configs" / "tiny.yaml"), "--steps", "2", "--rounds", "3",
            "--threads", "1,2", "--ssi-repeats", "2", "--out", str(out),
            "--set", f"toyworld.cache_dir={tmp_path / 'cache'}",
            "--set", f"storage={tmp_path / 'runs'}", "--set", "tracking.enabled=false"]
    assert benchmark.main(argv) == 0
    fig = json.loads(out.read_text())
    for k in KEYS:
        assert fig[k] > 0, k
    assert set(fig["by_threads"]) == {"1", "2"} and fig["threads"] == 1
    one = fig["by_threads"]["1"]
    # paired ratios: the median over rounds of each round's variant / LoRA time
    rounds = list(zip(one["rounds_safeanchor_s"], one["rounds_lora_s"], strict=True))
    assert len(rounds) == 3
    assert fig["ratio_safeanchor"] == statistics.median(a / b for a, b in rounds)
    assert fig["ratio_safeanchor_halves"] == [statistics.median(a / b for a, b in rounds[0::2]),
                                              statistics.median(a / b for a, b in rounds[1::2])]
    assert fig["ratio_safeanchor_cpu"] > 0 and fig["by_threads"]["2"]["ratio_projection_hooks"] > 0
    assert fig["anchor_floor"] == 1 + fig["anchor_batch"] / (fig["batch_size"] * fig["anchor_every"])
    assert fig["safeanchor_over_floor"] == fig["ratio_safeanchor"] - fig["anchor_floor"]
    # the floor timed: a LoRA step plus a separate pass of anchor_batch examples every anchor_every steps
    assert fig["anchor_floor_measured"] == fig["ratio_extra_pass"] > 0 and fig["extra_pass_step_s"] > 0
    assert fig["safeanchor_over_measured_floor"] == fig["ratio_safeanchor"] - fig["ratio_extra_pass"]
    assert set(fig["by_threads"]["2"]) >= {"ratio_extra_pass", "safeanchor_over_measured_floor"}
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


def test_executor_score_diffs_compare_every_metric():
    a = {"safety": [0.9, 0.5], "retention": 0.55, "domain": {"medical": [0.1, float("nan")]},
         "wall_s": 10.0, "method": "lora", "only_here": 1.0, "train_runs": 0,
         "machine": {"cores": 2, "torch_threads": 2}}
    b = {"safety": [0.9, 0.25], "retention": 0.55, "domain": {"medical": [0.1, float("nan")]},
         "wall_s": 99.0, "method": "lora", "train_runs": 1, "machine": {"cores": 16, "torch_threads": 1}}
    d = benchmark.score_diffs(a, b)
    assert d["safety[1]"] == 0.25 and d["safety[0]"] == 0.0 and d["retention"] == 0.0
    assert d["domain.medical[1]"] == 0.0  # NaN on both sides is the same score
    assert d["only_here"] == float("inf")  # a metric one executor lacks is a difference
    assert "wall_s" not in d and "train_runs" not in d  # timing and placement are not scores
    assert not any(k.startswith("machine") for k in d)  # nor the hardware


def test_cpu_meter_attributes_a_process_trees_cpu_time_to_its_roles():
    """The executors benchmark's CPU accounting: the root's own time is `driver`, a child titled
    `ray::...` (as Ray titles its workers) is `ray_workers`, any other child `ray_services`; a
    process that ends before the root still counts."""
    import subprocess

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
    child = ("import subprocess, sys\n" + burn.format(s=0.6) +
             "subprocess.run(['bash', '-c', 'exec -a ray::Burner ' + sys.executable + ' -c \"$0\"', " +
             repr(burn.format(s=1.0)) + "], check=True)\n"
             "subprocess.run([sys.executable, '-c', " + repr(burn.format(s=0.8)) + "], check=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", child])
    meter = benchmark.CpuMeter(proc.pid, period=0.05)
    assert proc.wait() == 0
    cpu = meter.stop()
    g = cpu["by_group_s"]
    assert 0.6 <= g["driver"] < 1.5, cpu
    assert 0.9 <= g["ray_workers"] < 1.6, cpu
    assert 0.75 <= g["ray_services"] < 1.5, cpu
    assert cpu["by_process_s"]["ray::Burner"] == g["ray_workers"]
    assert cpu["total_s"] == round(sum(g.values()), 2)
    assert cpu["machine_busy_s"] >= 0.9 * cpu["total_s"]
    t, last = meter.timeline[-1]  # cumulative per label, in time order
    assert last["ray::Burner"] == g["ray_workers"] and t >= meter.timeline[0][0]
    burner = [c.get("ray::Burner", 0.0) for _, c in meter.timeline]
    assert burner == sorted(burner) and burner[0] < burner[-1]


def test_extra_pass_is_a_pass_over_the_first_examples_on_every_kth_step():
    """The measured floor's hooks: the first n examples of the step's batch, every k-th step
    (counted like the anchor's), through the model's own loss; the batched path's identity."""
    import torch

    seen = []

    def model(input_ids, attention_mask, labels):
        seen.append(input_ids.shape[0])
        return type("Out", (), {"loss": labels.float().mean()})()

    batch = {k: torch.arange(12).reshape(6, 2) for k in ("input_ids", "attention_mask", "labels")}
    hooks = benchmark.ExtraPass(4, 2)
    got = [hooks.unprojected_loss(model, batch) for _ in range(4)]
    assert seen == [4, 4] and got[1] is None and got[3] is None
    assert float(got[0]) == float(torch.arange(8).float().mean())  # rows 0-3 only
    g = {"w": torch.ones(3)}
    hooks.transform_grads(g)
    assert torch.equal(g["w"], torch.ones(3))
