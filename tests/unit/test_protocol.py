"""workflows/protocol.py: the fair protocol's bookkeeping (budget fixed per storage, tuned configs
written from each sweep's best.yaml, stages refusing to run out of order)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from safeanchor.pipeline.config import load_run_config
from safeanchor.sweep import report

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")


@pytest.fixture()
def protocol():
    spec = importlib.util.spec_from_file_location("protocol", ROOT / "workflows" / "protocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_sweep(storage: Path, method: str, point: dict) -> None:
    d = storage / "sweeps" / f"{method}-tiny"
    d.mkdir(parents=True)
    comment = f"python workflows/sequential.py --config {d / 'best.yaml'}\nBest of sweep {method}-tiny\nTuned: x"
    (d / "best.yaml").write_text(report.best_yaml(TINY, ["eval.split=val", "threads=2"], method, point, comment))


def test_tuned_configs_come_from_each_sweeps_best_and_run_as_presets(protocol, tmp_path):
    _fake_sweep(tmp_path, "lora", {"train.lr": 1.5e-3})
    _fake_sweep(tmp_path, "ewc", {"train.lr": 4e-4, "methods.ewc.lam": 7.0})
    args = protocol.parse_args(["--config", TINY, "--storage", str(tmp_path), "--methods", "lora,ewc",
                                "--tuned-dir", str(tmp_path / "tuned")])
    assert protocol.stage_tuned(args, tmp_path, "tiny", ["lora", "ewc"])
    lora = tmp_path / "tuned" / "tiny-lora.yaml"
    text = lora.read_text()
    assert text.startswith("# python workflows/sequential.py --config workflows/configs/tuned/tiny-lora.yaml\n")
    assert "8 trials" in text and "tuning seeds 100,101" in text and "Best of sweep lora-tiny" in text
    assert str(tmp_path) not in text.splitlines()[0]
    cfg = load_run_config(lora)
    # the tuning runs' settings (split, threads) do not leak into the tuned preset
    assert cfg.method == "lora" and cfg.train.lr == 1.5e-3 and cfg.eval.split == "test"
    assert cfg.threads == load_run_config(TINY).threads == 1
    ewc = load_run_config(tmp_path / "tuned" / "tiny-ewc.yaml")
    assert ewc.method == "ewc" and ewc.methods["ewc"]["lam"] == 7.0
    assert yaml.safe_load(text)["method"] == "lora"


def test_stages_refuse_to_run_out_of_order(protocol, tmp_path, capsys):
    args = protocol.parse_args(["--config", TINY, "--storage", str(tmp_path), "--tuned-dir", str(tmp_path / "t")])
    assert not protocol.stage_tuned(args, tmp_path, "tiny", ["lora"])
    assert not protocol.stage_compare(args, tmp_path, "tiny", ["lora"])
    err = capsys.readouterr().err
    assert "no best.yaml for lora" in err and "tiny-lora.yaml missing" in err


def test_the_budget_is_fixed_per_storage_and_wall_time_accumulates(protocol, tmp_path, monkeypatch):
    state = protocol.State(tmp_path, "tiny", ["lora"])
    state.add_wall("sweeps", 10.0, part="lora")
    protocol.State(tmp_path, "tiny", ["lora"]).add_wall("sweeps", 5.5, part="lora")  # a later session
    protocol.State(tmp_path, "tiny", ["lora"]).add_wall("sweeps", 2.0, part="ewc")
    data = json.loads((tmp_path / "protocol.json").read_text())
    assert data["wall_s"] == {"sweeps": 17.5} and data["budget"] == protocol.BUDGET and data["commits"]
    assert data["part_wall_s"] == {"sweeps": {"lora": 15.5, "ewc": 2.0}}
    monkeypatch.setitem(protocol.BUDGET, "trials", 99)
    with pytest.raises(SystemExit, match="one protocol, one budget"):
        protocol.State(tmp_path, "tiny", ["lora"])


def test_bad_input_is_named(protocol, tmp_path, capsys):
    assert protocol.main(["--methods", "lora,nope", "--storage", str(tmp_path)]) == 2
    assert protocol.main(["--config", str(tmp_path / "missing.yaml"), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "methods: unknown ['nope']" in err and "missing.yaml does not exist" in err
    assert not (tmp_path / "protocol.json").exists()


def test_every_comparison_call_is_one_compare_accepts(protocol, tmp_path, monkeypatch):
    """Stage 3's three compare.py calls (Table 1, the orders, T = 5), each parsed by compare.py's
    own spec builder: every call names the tuned configs of exactly the methods it runs (a preset
    for a method it does not run is refused, which stopped the first protocol after Table 1)."""
    spec = importlib.util.spec_from_file_location("compare_cli", ROOT / "workflows" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    methods = ["lora", "ewc", "safeanchor"]
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    for m in methods:
        (tuned / f"tiny-{m}.yaml").write_text(yaml.safe_dump({"base": TINY, "method": m}))
    calls = []
    monkeypatch.setattr(protocol, "_run", lambda cmd: calls.append(cmd) or 0)
    args = protocol.parse_args(["--storage", str(tmp_path), "--tuned-dir", str(tuned), "--config", TINY])
    assert protocol.stage_compare(args, tmp_path, "tiny", methods)
    assert len(calls) == 3
    runs = []
    for cmd in calls:
        assert Path(cmd[1]).name == "compare.py"
        built = compare.build_spec(compare.parse_args(cmd[2:]))  # raises ConfigError on a refused call
        runs.append(sorted(a.name for a in built.arms))
        for arm in built.arms:
            assert arm.config == str((tuned / f"tiny-{arm.name}.yaml").resolve())
    assert runs == [sorted(methods), ["lora", "safeanchor"], ["lora", "safeanchor"]]
