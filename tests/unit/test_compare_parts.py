"""workflows/compare.py's parts without Ray: cells and orders, arms, the report on synthetic runs."""

from __future__ import annotations

import logging
import math
import statistics
import sys
from pathlib import Path

import pytest

from safeanchor import logs
from safeanchor.compare.cells import (
    Cell,
    expand_orders,
    make_arms,
    parse_configs,
    parse_variant,
    split_top,
)
from safeanchor.compare.driver import CompareSpec, cell_config, check_finished_cells, plan
from safeanchor.compare.report import build, collect, spread, write_report
from safeanchor.config import ConfigError, dump_yaml
from safeanchor.methods import METHODS
from safeanchor.storage import RunDir

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")
DOMAINS = ["medical", "legal", "code", "finance", "chemistry"]


def test_orders_permutations_explicit_and_T():
    assert expand_orders("preset", ["medical", "legal", "code"], DOMAINS, None) == [("medical", "legal", "code")]
    perms = expand_orders("all", ["medical", "legal", "code"], DOMAINS, None)
    assert len(perms) == 6 == len(set(perms)) and perms[0] == ("medical", "legal", "code")
    assert expand_orders("legal,code;code,legal", ["medical"], DOMAINS, None) == [("legal", "code"), ("code", "legal")]
    # T = 5 extends with the preset's other domains in data.domains order; T = 2 cuts; both kept
    got = expand_orders("preset", ["code", "medical", "legal"], DOMAINS, [3, 5])
    assert got == [("code", "medical", "legal"), ("code", "medical", "legal", "finance", "chemistry")]
    assert len(expand_orders("all", ["medical", "legal", "code"], DOMAINS, [2])) == 6  # 6 distinct 2-prefixes
    with pytest.raises(ConfigError, match="T = 6 needs 6 domains; data.domains has 5"):
        expand_orders("preset", ["medical"], DOMAINS, [6])
    with pytest.raises(ConfigError, match="unknown domain 'bio'"):
        expand_orders("medical,bio", ["medical"], DOMAINS, None)
    with pytest.raises(ConfigError, match="twice"):
        expand_orders("medical,medical", ["medical"], DOMAINS, None)


def test_variants_configs_and_arms(tmp_path):
    assert split_top("a=1,b=[x,y],c={k: 1, j: 2}") == ["a=1", "b=[x,y]", "c={k: 1, j: 2}"]
    assert parse_variant("strict=methods.safeanchor.strict=true,eval.harmful_files=[a.jsonl,b.jsonl]") == (
        "strict", None, ["methods.safeanchor.strict=true", "eval.harmful_files=[a.jsonl,b.jsonl]"])
    assert parse_variant("lr=method=lora,train.lr=1e-4") == ("lr", "lora", ["train.lr=1e-4"])
    for bad in ("strict", "x-seed1=a=1", "a b=c=1", "ok=novalue"):
        with pytest.raises(ConfigError):
            parse_variant(bad)
    tuned = tmp_path / "toy-lora.yaml"
    tuned.write_text(f"base: {TINY}\nmethod: lora\ntrain:\n  lr: 0.002\n")
    base, per = parse_configs([TINY, f"lora={tuned}"])
    assert base == TINY and per == {"lora": str(tuned)}
    arms = make_arms(["lora", "safeanchor"], ["strict=methods.safeanchor.strict=true"], base, per, set(METHODS))
    assert [(a.name, a.method, Path(a.config).name, a.variant) for a in arms] == [
        ("lora", "lora", "toy-lora.yaml", False), ("safeanchor", "safeanchor", "tiny.yaml", False),
        ("strict", "safeanchor", "tiny.yaml", True)]
    with pytest.raises(ConfigError, match="is a preset for method 'lora', given for 'ewc'"):
        make_arms(["ewc"], [], base, {"ewc": str(tuned)}, set(METHODS))
    with pytest.raises(ConfigError, match="already a method"):
        make_arms(["lora"], ["lora=train.lr=1"], base, {}, set(METHODS))
    with pytest.raises(ConfigError, match="unknown"):
        make_arms(["nope"], [], base, {}, set(METHODS))

    # the cells: methods on every seed x order, variants at the reference order only
    spec = CompareSpec(storage=str(tmp_path / "s"), arms=arms, seeds=[0, 1],
                       orders=[("medical", "legal"), ("legal", "medical")], overrides=["threads=2"])
    cells = plan(spec, ("medical", "legal"))
    assert len(cells) == 2 * 2 * 2 + 2 and Cell("strict", 1, ("medical", "legal")) in cells
    assert not any(c.arm == "strict" and c.order == ("legal", "medical") for c in cells)
    cfg = cell_config(spec, arms[0], cells[0], spec.storage)
    assert (cfg.method, cfg.train.lr, cfg.seed, cfg.data.order, cfg.threads) == ("lora", 0.002, 0, ["medical", "legal"], 2)
    assert cfg.resolved_run_id() == "lora-seed0-medical-legal"
    strict = cell_config(spec, arms[2], Cell("strict", 0, ("medical", "legal")), spec.storage)
    assert strict.method == "safeanchor" and strict.methods["safeanchor"]["strict"] is True

    # a run of the earlier compare.py (<method>-seed<s>) with this cell's config counts as finished
    from safeanchor.compare.driver import finished

    legacy = RunDir.open(spec.storage).sub("lora-seed0")
    legacy.write_text("config.yaml", dump_yaml(cfg))
    assert not finished(RunDir.open(spec.storage), cells[0], cfg)  # no summary yet
    legacy.write_json("summary.json", {"method": "lora"})
    assert finished(RunDir.open(spec.storage), cells[0], cfg)
    assert not finished(RunDir.open(spec.storage), cells[1], cell_config(spec, arms[1], cells[1], spec.storage))
    other_order = next(c for c in cells if c.arm == "lora" and c.seed == 0 and c.order != cells[0].order)
    assert not finished(RunDir.open(spec.storage), other_order, cell_config(spec, arms[0], other_order, spec.storage))
    legacy.delete("")

    # a finished cell of another config in the same storage is refused, naming the key
    root = RunDir.open(spec.storage)
    root.sub(cfg.resolved_run_id()).write_text("config.yaml", dump_yaml(cfg))
    check_finished_cells(root, {cfg.resolved_run_id(): cfg})  # same config: fine
    other = cell_config(CompareSpec(spec.storage, arms, [0], spec.orders, overrides=["train.lr=0.5"]),
                        arms[0], cells[0], spec.storage)
    with pytest.raises(ConfigError, match=r"lora-seed0-medical-legal \(train.lr\)"):
        check_finished_cells(root, {cfg.resolved_run_id(): other})


def _summary(method, seed, order, safety, plastic):
    """A summary.json of a finished run (the fields the report reads)."""
    t = len(order)
    dom = {d: [0.0] * (i + 1) + [plastic - 0.05 * k for k in range(t - i)] for i, d in enumerate(order)}
    return {"method": method, "seed": seed, "order": list(order), "split": "test",
            "safety": safety, "over_refusal": [0.0] * (t + 1), "helpful": [1.0] * (t + 1),
            "general": [0.9] * (t + 1), "domain": dom, "domain_plastic": plastic,
            "domain_mean_final": statistics.fmean(v[-1] for v in dom.values()),
            "retention": safety[-1] / safety[0], "extra_eval": {}, "extra_harmful": [], "wall_s": 10.0}


def _write(root: RunDir, run_id: str, s: dict) -> None:
    root.sub(run_id).write_json("summary.json", s)


def _memory_dir(root: str) -> RunDir:
    """An in-memory fsspec filesystem: the stand-in for an object store (nothing on local disk)."""
    import fsspec
    import pyarrow.fs as pafs

    return RunDir(pafs.PyFileSystem(pafs.FSSpecHandler(fsspec.filesystem("memory"))), root)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_report_sections_spreads_and_plots(tmp_path, where):
    root = RunDir.open(str(tmp_path / "cmp")) if where == "local" else _memory_dir(f"/{tmp_path.name}/cmp")
    assert (root.local_path() is None) == (where == "memory")
    o1, o2 = ("medical", "legal", "code"), ("legal", "code", "medical")
    o5 = (*o1, "finance", "chemistry")
    # lora: safety after = 0.2 + 0.1*seed + 0.3*(order 2): order spread 0.212, seed spread 0.071
    for seed in (0, 1):
        for k, o in enumerate((o1, o2)):
            _write(root, f"lora-seed{seed}-{'-'.join(o)}", _summary("lora", seed, o, [0.9, 0.5, 0.3, 0.2 + 0.1 * seed + 0.3 * k], 0.5))
            _write(root, f"safeanchor-seed{seed}-{'-'.join(o)}", _summary("safeanchor", seed, o, [0.9, 0.9, 0.85, 0.8], 0.6))
        _write(root, f"strict-seed{seed}-{'-'.join(o1)}", _summary("safeanchor", seed, o1, [0.9, 0.9, 0.9, 0.88], 0.4))
        _write(root, f"lora-seed{seed}-{'-'.join(o5)}", _summary("lora", seed, o5, [0.9, 0.6, 0.4, 0.3, 0.2, 0.1], 0.5))
    root.sub("lora-seed3-medical-legal-code").write_text("config.yaml", "method: lora\n")  # interrupted
    entries, unfinished = collect(root)
    assert len(entries) == 12 and unfinished == ["lora-seed3-medical-legal-code"]
    assert {e.arm for e in entries} == {"lora", "safeanchor", "strict"}
    lora3 = [e for e in entries if e.arm == "lora" and len(e.order) == 3]
    so, ks, ss, ms = spread(lora3, "safety")
    assert (ks, ms) == (2, 2)
    assert so == pytest.approx(statistics.stdev([0.2, 0.5])) and ss == pytest.approx(statistics.stdev([0.2, 0.3]))

    state = {"arms": {"lora": {"method": "lora", "config": "tiny.yaml", "overrides": [], "variant": False},
                      "safeanchor": {"method": "safeanchor", "config": "tiny.yaml", "overrides": [], "variant": False},
                      "strict": {"method": "safeanchor", "config": "tiny.yaml",
                                 "overrides": ["methods.safeanchor.strict=true"], "variant": True}},
             "reference_order": list(o1), "failures": {"ewc-seed0-medical-legal-code": "DataError: boom"}}
    text, metrics, table = build(entries, unfinished, state)
    sections = [line for line in text.splitlines() if line.startswith("## ")]
    assert sections == ["## Table 1: methods (order medical → legal → code, T = 3)",
                        "## Ablations (order medical → legal → code, T = 3)", "## Domain orders (T = 3)",
                        "## Trajectory, T = 3 (order medical → legal → code)",
                        "## Trajectory, T = 5 (order medical → legal → code → finance → chemistry)",
                        "## Plots", "## Cells"]
    rows = [r for r in table.splitlines() if r.startswith("| lora") or r.startswith("| safeanchor")]
    assert len(rows) == 2 and rows[0].startswith("| lora | 2 | 0.900 ± 0.000 | 0.250 ± 0.071 |")
    assert "| strict | 2 | 0.900 ± 0.000 | 0.880 ± 0.000 |" in text  # the ablation row
    assert "| lora | safety after | 0.212 | 2 | 0.071 | 2 |" in text  # order vs seed spread
    assert "| safeanchor | safety after | 0.000 | 2 | 0.000 | 2 |" in text
    # paired with lora by (order, seed): 0.8 − {0.2, 0.5, 0.3, 0.6}; the T = 5 cells are not pairs here
    assert "| arm − lora | metric | pairs | positive | mean difference | smallest | largest |" in text
    assert "| safeanchor | safety after | 4 | 4 | +0.400 | +0.200 | +0.600 |" in text
    assert "| lora | 2 | 0.900 ± 0.000 | 0.600 ± 0.000 | 0.400 ± 0.000 | 0.300 ± 0.000 | 0.200 ± 0.000 | 0.100 ± 0.000 |" in text
    assert "`ewc-seed0-medical-legal-code`: DataError: boom" in text and "lora-seed3-medical-legal-code" in text
    assert metrics["lora/safety"] == pytest.approx(0.25) and metrics["strict/safety"] == pytest.approx(0.88)
    assert math.isclose(metrics["safeanchor/retention"], 0.8 / 0.9)

    out = write_report(root, state)
    assert out["files"] == ["report.md", "forgetting.png", "forgetting_T5.png", "safety_trajectory.png", "tradeoff.png"]
    for name in out["files"][1:]:
        assert root.read_bytes(name)[:4] == b"\x89PNG"
    assert root.read_text("report.md") == text


def test_cli_errors_name_the_option(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "workflows"))
    import compare

    base = ["--config", TINY, "--storage", str(tmp_path)]
    cases = [(["--methods", "lora,nope"], "methods: unknown"), (["--seeds", "a"], "seeds:"),
             (["--orders", "medical,bio"], "orders: unknown domain"), (["--T", "9"], "T: T = 9 needs"),
             (["--variant", "x=method=nope"], "variant: x: unknown method"),
             (["--report", str(tmp_path / "empty")], "report: no finished cell")]
    for argv, msg in cases:
        assert compare.main(base + argv) == 2, argv
        assert msg in capsys.readouterr().err
    spec = compare.build_spec(compare.parse_args(["--config", TINY, "--orders", "all", "--T", "2", "--seeds", "0-2"]))
    assert spec.seeds == [0, 1, 2] and len(spec.orders) == 6 and [a.name for a in spec.arms] == ["lora", "safeanchor"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_cell_log_appends_attempts(tmp_path, where):
    from safeanchor.compare.driver import cell_log

    root = RunDir.open(str(tmp_path)) if where == "local" else _memory_dir(f"/{tmp_path.name}/logs")
    logger = logging.getLogger("safeanchor.pipeline.sequential")  # any module's logger
    console = logs.setup()  # a console handler already there (a shared worker's) is left out
    for attempt in ("started", "resumed"):
        with cell_log(root, "lora-seed0-medical"):
            logger.info(f"=== {attempt} ===")
            logger.info("line")
        logging.getLogger("safeanchor").info("after the cell: not in its log")
    assert root.read_text("logs/lora-seed0-medical.log") == "=== started ===\nline\n=== resumed ===\nline\n"
    assert logging.getLogger("safeanchor").handlers == [console]  # restored


def test_report_names_presets_relative_to_the_checkout(tmp_path, monkeypatch):
    from safeanchor.compare.report import _shown_path

    monkeypatch.chdir(tmp_path)
    assert _shown_path(str(tmp_path / "workflows" / "configs" / "tuned" / "toy-lora.yaml")) == \
        "workflows/configs/tuned/toy-lora.yaml"
    assert _shown_path("/elsewhere/toy-lora.yaml") == "/elsewhere/toy-lora.yaml"
    assert _shown_path("tiny.yaml") == "tiny.yaml"
