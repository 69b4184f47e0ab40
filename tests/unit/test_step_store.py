"""`StepStore.wall_s`: the seconds the finished steps took, over every process that ran them."""

from __future__ import annotations

import json

import pytest

from safeanchor.pipeline.store import MARKER, StepStore
from safeanchor.storage import RunDir


def _log(steps: StepStore, step: str, t: float) -> None:
    steps.dir.append_line("_executions.jsonl", json.dumps({"step": step, "time": t}))


def _finish(steps: StepStore, step: str, t: float) -> None:
    steps.dir.write_bytes(f"{step}/{MARKER}", json.dumps({"finished": t}).encode())


def test_wall_s_sums_finished_steps_from_their_last_start(tmp_path):
    steps = StepStore(RunDir.open(str(tmp_path / "steps")))
    assert steps.wall_s() == 0.0  # nothing ran
    _log(steps, "00-setup", 100.0)
    _finish(steps, "00-setup", 103.0)  # 3 s, first process
    _log(steps, "01-medical/02-train", 103.0)  # killed: never finished in the first process ...
    _log(steps, "01-medical/02-train", 200.0)  # ... run again by the resume, 10 s
    _finish(steps, "01-medical/02-train", 210.0)
    _log(steps, "01-medical/91-eval", 210.0)  # started, unfinished: not counted
    assert steps.done("00-setup") and not steps.done("01-medical/91-eval")
    assert steps.wall_s() == pytest.approx(13.0)
    assert steps.wall_s(before=150.0) == pytest.approx(3.0)  # what the process before t=150 finished
