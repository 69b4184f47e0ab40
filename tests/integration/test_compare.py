"""workflows/compare.py end to end on the tiny preset: 2 methods x 2 seeds x 2 orders as Ray
tasks on a local Ray (training in-process inside each cell), a variant whose cells fail, the
report, MLflow nesting, and a rerun that runs nothing finished again."""

from __future__ import annotations

import json
import sqlite3
import sys

import pytest
from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "workflows"))
import compare  # noqa: E402  (workflows/compare.py)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

ORDERS = (("medical", "legal"), ("legal", "medical"))


def _mlflow_runs(db):
    with sqlite3.connect(db) as con:
        return con.execute("select r.run_uuid, r.name, r.status, t.value from runs r left join tags t "
                           "on t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId'").fetchall()


def _section(text: str, title: str) -> str:
    part = text.split(f"\n## {title}", 1)[1]
    return part.split("\n## ", 1)[0]


def test_compare_cells_report_resume_and_failure(ray_instance, cache, tmp_path):
    storage = tmp_path / "cmp"
    argv = ["--config", TINY, "--methods", "lora,safeanchor", "--seeds", "0,1",
            "--orders", ";".join(",".join(o) for o in ORDERS), "--threads", "1", "--storage", str(storage),
            "--variant", f"broken=data.safety_calib={tmp_path / 'missing.jsonl'}",
            "--set", f"toyworld.cache_dir={cache}", "--set", "methods.safeanchor.replay_steps=2",
            "--set", "train.max_steps=2"]
    assert compare.main(argv) == 1  # the variant's cells failed; the others finished

    ids = [f"{m}-seed{s}-{'-'.join(o)}" for m in ("lora", "safeanchor") for s in (0, 1) for o in ORDERS]
    for run_id in ids:
        s = json.loads((storage / run_id / "summary.json").read_text())
        assert s["method"] == run_id.split("-")[0] and len(s["safety"]) == 3
        assert s["steps"][0]["train"]["steps"] == 2
        assert not (storage / run_id / "ray").exists()  # trained in the cell's task, no Ray Train run
    broken = ["broken-seed0-medical-legal", "broken-seed1-medical-legal"]  # variants: reference order only
    assert sorted(p.parent.name for p in storage.glob("*/summary.json")) == sorted(ids)
    state = json.loads((storage / "compare.json").read_text())
    assert sorted(state["failures"]) == broken and all("missing.jsonl" in v for v in state["failures"].values())
    assert "Traceback" in (storage / "logs" / f"{broken[0]}.log").read_text()
    # cells that start together with an unbuilt toy world: one builds it, the others wait and load it
    assert sum(p.read_text().count("[toyworld] building") for p in (storage / "logs").iterdir()) <= 1

    report = (storage / "report.md").read_text()
    table1 = _section(report, "Table 1")
    assert table1.startswith(": methods (order medical → legal, T = 2)")
    assert [r.split("|")[1:3] for r in table1.splitlines() if r.startswith("| lora") or r.startswith("| safeanchor")] \
        == [[" lora ", " 2 "], [" safeanchor ", " 2 "]]
    ablations = _section(report, "Ablations")
    assert "| broken |" not in report and "- `broken`: safeanchor + `data.safety_calib=" in ablations
    assert "No finished cell at this order yet: broken" in ablations and "| safeanchor | 2 |" in ablations
    orders = _section(report, "Domain orders (T = 2)")
    assert "| lora | medical → legal | 2 |" in orders and "| safeanchor | legal → medical | 2 |" in orders
    assert "| lora | safety after |" in orders and "| safeanchor | domain_plastic |" in orders
    assert "## Trajectory, T = 2 (order medical → legal)" in report
    for run_id in broken:
        assert f"`{run_id}`: DataError" in _section(report, "Cells")
    pngs = sorted(p.name for p in storage.glob("*.png"))
    assert {"safety_trajectory.png", "tradeoff.png", "forgetting.png"} <= set(pngs)
    assert all((storage / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)

    # MLflow: one comparison run, each finished cell's pipeline run nested under it
    runs = _mlflow_runs(storage / "mlflow.db")
    parent = [r for r in runs if r[0] == state["mlflow_run_id"]]
    assert len(parent) == 1 and parent[0][1] == "compare-cmp" and parent[0][2] == "FAILED"
    cells = {r[1]: r[2] for r in runs if r[3] == state["mlflow_run_id"]}
    assert cells == {run_id: "FINISHED" for run_id in ids}

    # rerun: finished cells are not run again; a cell whose summary is missing (interrupted after
    # its last step) continues from its steps without executing any again; the failures are retried
    before = {i: (storage / i / "summary.json").stat().st_mtime_ns for i in ids[1:]}
    logs = {i: (storage / "logs" / f"{i}.log").read_text() for i in ids}
    executions = (storage / ids[0] / "steps" / "_executions.jsonl").read_text()
    (storage / ids[0] / "summary.json").unlink()
    assert compare.main(argv) == 1
    assert {i: (storage / i / "summary.json").stat().st_mtime_ns for i in ids[1:]} == before
    assert (storage / ids[0] / "summary.json").is_file()
    assert (storage / ids[0] / "steps" / "_executions.jsonl").read_text() == executions
    assert {i: (storage / "logs" / f"{i}.log").read_text() for i in ids[1:]} == {i: logs[i] for i in ids[1:]}
    assert (storage / "logs" / f"{ids[0]}.log").read_text().removeprefix(logs[ids[0]]).startswith(
        f"=== {ids[0]}: resumed")
    runs = _mlflow_runs(storage / "mlflow.db")
    assert [r[0] for r in runs if r[3] is None and r[1] == "compare-cmp"] == [state["mlflow_run_id"]]
    assert sorted(r[1] for r in runs if r[3] == state["mlflow_run_id"]) == sorted(ids)  # resumed in its own run

    # the report alone, from the finished cells
    report = (storage / "report.md").read_text()
    (storage / "report.md").unlink()
    assert compare.main(["--report", str(storage)]) == 0
    assert (storage / "report.md").read_text() == report


def test_cells_train_on_ray_train_workers(ray_instance, cache, tmp_path, capfd):
    """`cluster.executor: ray` inside the cells: each cell's phases (and SafeAnchor's SSI) run on
    one Train run of its own whose worker reserves its CPU beside the cell's task, so on 2 CPUs
    one cell runs at a time (two would each hold a CPU and wait for ever for their worker's),
    and each worker's torch uses the CPU it reserved."""
    storage = tmp_path / "cmp"
    argv = ["--config", TINY, "--methods", "lora,safeanchor", "--seeds", "0", "--orders", "medical",
            "--threads", "1", "--storage", str(storage), "--set", f"toyworld.cache_dir={cache}",
            "--set", "tracking.enabled=false", "--set", "cluster.executor=ray", "--set", "cluster.num_workers=1",
            "--set", "methods.safeanchor.replay_steps=2", "--set", "train.max_steps=2",
            "--set", "cluster.torch_threads_per_worker=null"]  # the tiny preset's 1: compare's own rule here
    assert compare.main(argv) == 0
    out = capfd.readouterr()
    assert "[compare] 1 cells at once (2 CPUs, 2 per cell at its peak)" in out.out + out.err
    for m in ("lora", "safeanchor"):
        run = storage / f"{m}-seed0-medical"
        s = json.loads((run / "summary.json").read_text())
        assert s["method"] == m and s["steps"][0]["train"]["world_size"] == 1 and s["train_runs"] == 1
        assert (run / "ray").is_dir()  # Ray Train's storage for the cell's phases
        cfg = (run / "config.yaml").read_text()
        assert "executor: ray" in cfg and "torch_threads_per_worker: 1" in cfg
    assert "| safeanchor | 1 |" in _section((storage / "report.md").read_text(), "Table 1")
