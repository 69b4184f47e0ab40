"""The sweep's pure parts: objective, running metrics, Pareto front, search spaces, trial table,
best.yaml, seed policy (no Ray)."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from safeanchor.config import ConfigError, apply_overrides
from safeanchor.methods import METHODS
from safeanchor.pipeline.config import load_run_config
from safeanchor.pipeline.sequential import summarize
from safeanchor.sweep import report
from safeanchor.sweep.driver import (
    SweepSpec,
    check_seeds,
    check_space,
    concurrency,
    trial_cpus,
    trial_resources,
)
from safeanchor.sweep.objective import (
    ObjectiveConfig,
    mean_over_seeds,
    objective,
    pareto_front,
    running_metrics,
)
from safeanchor.sweep.space import as_overrides, check_spec, corners, load_space, to_tune
from safeanchor.sweep.trainable import TrialContext, history_from_metrics

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = ROOT / "workflows" / "configs" / "sweeps"
TOY = str(ROOT / "workflows" / "configs" / "toy.yaml")
TINY = str(ROOT / "workflows" / "configs" / "tiny.yaml")


# ---- objective ------------------------------------------------------------------------------

def test_objective_is_domain_score_above_target_and_penalised_below():
    cfg = ObjectiveConfig(retention_target=0.9, penalty=10.0)
    assert objective(0.95, 0.6, cfg) == pytest.approx(0.6)
    assert objective(0.90, 0.6, cfg) == pytest.approx(0.6)
    assert objective(0.85, 0.6, cfg) == pytest.approx(0.6 - 10 * 0.05)
    # below the target, a little retention outweighs a lot of domain score
    assert objective(0.89, 0.9, cfg) < objective(0.90, 0.85, cfg)
    # NaN counts as 0: never better than any real value
    assert objective(float("nan"), 0.6, cfg) == pytest.approx(0.6 - 9.0)
    assert objective(0.95, float("nan"), cfg) == 0.0
    assert objective(0.5, 0.6, ObjectiveConfig(0.9, 0.0)) == pytest.approx(0.6)  # penalty 0: unconstrained


@pytest.mark.parametrize("bad", [{"retention_target": 1.5}, {"retention_target": -0.1}, {"penalty": -1.0}])
def test_objective_config_rejects_out_of_range(bad):
    with pytest.raises(ConfigError):
        ObjectiveConfig(**bad)


def _history(order, rng):
    keys = ("safety", "over_refusal", "helpful", "general")
    return [{**{k: rng.random() for k in keys}, **{f"domain/{d}": rng.random() for d in order}}
            for _ in range(len(order) + 1)]


def test_running_metrics_at_the_end_equal_the_run_summary():
    rng = random.Random(0)
    order = ["medical", "legal", "code"]
    cfg = load_run_config(TOY, [], **{"data.order": order})
    for _ in range(5):
        h = _history(order, rng)
        s = summarize(cfg, h, [])
        m = running_metrics(h, order)
        assert m["retention"] == pytest.approx(s["retention"])
        assert m["domain_plastic"] == pytest.approx(s["domain_plastic"])


def test_running_metrics_after_t_domains():
    order = ["a", "b"]
    h = [{"safety": 0.8, "domain/a": 0.1, "domain/b": 0.0},
         {"safety": 0.6, "domain/a": 0.5, "domain/b": 0.2},
         {"safety": 0.4, "domain/a": 0.3, "domain/b": 0.7}]
    assert running_metrics(h[:2], order) == pytest.approx({"retention": 0.75, "domain_plastic": 0.5})
    assert running_metrics(h, order) == pytest.approx({"retention": 0.5, "domain_plastic": 0.6})
    h0 = [dict(x, safety=0.0) for x in h]
    assert math.isnan(running_metrics(h0, order)["retention"])
    with pytest.raises(ValueError):
        running_metrics(h[:1], order)


def test_mean_over_seeds():
    m = mean_over_seeds([{"retention": 1.0, "domain_plastic": 0.2}, {"retention": 0.5, "domain_plastic": 0.4}])
    assert m == pytest.approx({"retention": 0.75, "domain_plastic": 0.3})
    assert math.isnan(mean_over_seeds([{"retention": float("nan"), "domain_plastic": 0.1}])["retention"])


# ---- Pareto front ---------------------------------------------------------------------------

def test_pareto_front_by_hand():
    pts = [(0.9, 0.5), (0.8, 0.7), (0.85, 0.6), (0.8, 0.6), (0.95, 0.4), (0.7, 0.7), (float("nan"), 0.9)]
    # (0.8, 0.6) is dominated by (0.85, 0.6) and (0.8, 0.7); (0.7, 0.7) by (0.8, 0.7); NaN excluded
    assert pareto_front(pts) == [4, 0, 2, 1]
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0, 1]  # identical points: both kept
    assert pareto_front([]) == []


def test_pareto_front_properties_on_random_points():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = [tuple(map(float, p)) for p in rng.integers(0, 6, size=(15, 2)) / 5]
        front = set(pareto_front(pts))
        dom = lambda q, p: q[0] >= p[0] and q[1] >= p[1] and q != p  # noqa: E731
        for i in front:  # nothing dominates a front point
            assert not any(dom(pts[j], pts[i]) for j in range(len(pts)))
        for i in set(range(len(pts))) - front:  # a front point dominates every other point
            assert any(dom(pts[j], pts[i]) for j in front)


# ---- search spaces --------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_has_a_space_that_builds_run_configs(method, tmp_path):
    got, space = load_space(SWEEPS / f"{method}.yaml")
    assert got == method
    assert "train.lr" in space  # every method searches the learning rate over the same range
    assert (SWEEPS / f"{method}.yaml").read_text().startswith("# python workflows/sweep.py --method " + method)
    spec = SweepSpec(sweep_id="t", storage=str(tmp_path), method=method, config=TOY, space=space,
                     space_file=str(SWEEPS / f"{method}.yaml"), seeds=[100])
    ctx = TrialContext(config=TOY, overrides=["eval.split=val"], method=method, seeds=[100], runs_dir=str(tmp_path))
    cfg = check_space(spec, ctx)  # every corner of the space is a valid run config
    assert cfg.method == method and cfg.eval.split == "val" and cfg.seed == 100


def test_safeanchor_space_covers_rank_threshold_and_weights():
    _, space = load_space(SWEEPS / "safeanchor.yaml")
    for k in ("rho", "k_max", "k_fixed", "tau", "gamma", "lam"):
        assert f"methods.safeanchor.{k}" in space
    assert None in space["methods.safeanchor.k_fixed"]["values"]  # the energy rule is one choice


def test_space_errors_name_the_key(tmp_path):
    for spec, msg in [({"type": "normal", "low": 0, "high": 1}, "type"),
                      ({"type": "uniform", "low": 1, "high": 1}, "low must be < high"),
                      ({"type": "loguniform", "low": 0, "high": 1}, "low > 0"),
                      ({"type": "int", "low": 0.5, "high": 3}, "integers"),
                      ({"type": "choice", "values": []}, "non-empty"),
                      ({"type": "uniform", "low": 0, "high": 1, "step": 2}, "exactly")]:
        with pytest.raises(ConfigError, match=msg) as e:
            check_spec("params.x", spec)
        assert e.value.key == "params.x"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: lora\nparams:\n  train.no_such_option: {type: uniform, low: 0.1, high: 0.2}\n")
    _, space = load_space(bad)
    spec = SweepSpec(sweep_id="t", storage=str(tmp_path), method="lora", config=TOY, space=space, space_file=str(bad))
    ctx = TrialContext(config=TOY, overrides=["eval.split=val"], method="lora", seeds=[100], runs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="no_such_option"):
        check_space(spec, ctx)


def test_to_tune_samples_stay_in_bounds_and_int_is_inclusive():
    space = {"a": {"type": "int", "low": 1, "high": 2}, "b": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
             "c": {"type": "choice", "values": [None, 3]}}
    dom = to_tune(space)
    ints = {dom["a"].sample() for _ in range(200)}
    assert ints == {1, 2}
    assert all(1e-4 <= dom["b"].sample() <= 1e-2 for _ in range(100))
    assert {dom["c"].sample() for _ in range(100)} == {None, 3}
    assert len(corners(space)) == 2 and {p["c"] for p in corners(space)} == {None, 3}


def test_overrides_round_trip_values():
    point = {"train.lr": np.float64(1.5e-5), "methods.safeanchor.k_fixed": None, "methods.safeanchor.k_max": np.int64(8),
             "data.order": ["medical"]}
    data = apply_overrides({}, as_overrides(point))
    assert data["train"]["lr"] == 1.5e-5 and data["methods"]["safeanchor"]["k_fixed"] is None
    assert data["methods"]["safeanchor"]["k_max"] == 8 and type(data["methods"]["safeanchor"]["k_max"]) is int
    assert data["data"]["order"] == ["medical"]


# ---- outputs --------------------------------------------------------------------------------

def _trial(tid, status, it, ret, dp, point=None):
    return {"trial_id": tid, "status": status, "point": point or {"x": 1}, "error": status == "ERROR",
            "metrics": {"training_iteration": it, "retention": ret, "domain_plastic": dp,
                        "objective": objective(ret, dp, ObjectiveConfig())}}


def test_trial_rows_status_best_and_front_use_complete_trials_only():
    trials = [_trial("a", "TERMINATED", 3, 0.95, 0.5), _trial("b", "TERMINATED", 3, 0.92, 0.6),
              _trial("c", "TERMINATED", 1, 1.00, 0.9),  # stopped by ASHA after one domain: not comparable
              _trial("d", "TERMINATED", 3, 0.80, 0.7), _trial("e", "ERROR", 2, 0.99, 0.99),
              _trial("f", "RUNNING", 2, 0.99, 0.99)]
    rows = {r["trial_id"]: r for r in report.trial_rows(trials, ["x"], reports=3)}
    assert [rows[k]["status"] for k in "abcdef"] == ["complete", "complete", "stopped", "complete", "error", "unfinished"]
    assert [k for k in "abcdef" if rows[k]["best"]] == ["b"]  # highest objective with retention >= 0.9
    assert {k for k in "abcdef" if rows[k]["pareto"]} == {"a", "b", "d"}
    ordered = report.trial_rows(trials, ["x"], reports=3)
    assert ordered[0]["trial_id"] == "b" and [r["status"] for r in ordered[:3]] == ["complete"] * 3


def test_outputs_written(tmp_path):
    trials = [_trial("a", "TERMINATED", 3, 0.95, 0.5), _trial("b", "TERMINATED", 3, float("nan"), 0.6)]
    rows = report.trial_rows(trials, ["x"], reports=3)
    report.write_csv(rows, tmp_path / "t.csv")
    assert (tmp_path / "t.csv").read_text().splitlines()[0].startswith("trial_id,status,reports,x,objective")
    md = report.markdown(rows, "# title")
    assert md.count("\n| ") == 3 and "nan" in md
    report.plot_pareto(rows, ObjectiveConfig(), tmp_path / "p.png", "t")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_best_yaml_is_a_standalone_preset_with_the_point(tmp_path):
    point = {"methods.safeanchor.gamma": 0.7, "methods.safeanchor.k_fixed": 4, "train.lr": 5e-4}
    text = report.best_yaml(TINY, ["data.order=[medical]", "eval.split=val", "seed=100", "threads=1",
                                   "cluster.executor=local", "tracking.enabled=false"], "safeanchor", point,
                            "python workflows/sequential.py --config best.yaml\nsecond line")
    assert text.startswith("# python workflows/sequential.py --config best.yaml\n# second line\n")
    path = tmp_path / "sub" / "best.yaml"
    path.parent.mkdir()
    path.write_text(text)
    assert "base" not in yaml.safe_load(text)  # the tiny -> toy chain is merged in
    cfg = load_run_config(path)  # from another directory: no relative `base:` to resolve
    assert cfg.method == "safeanchor" and cfg.methods["safeanchor"]["gamma"] == 0.7
    assert cfg.methods["safeanchor"]["k_fixed"] == 4 and cfg.train.lr == 5e-4
    assert cfg.data.order == ["medical"] and cfg.toyworld.model.hidden_size == 32  # tiny preset kept
    assert cfg.eval.split == "test" and cfg.seed == 0  # reported on the test split, reporting seeds
    # where the sweep ran (placement, tracking) is not part of what was tuned
    preset = load_run_config(TINY)
    assert (cfg.cluster, cfg.tracking, cfg.threads) == (preset.cluster, preset.tracking, preset.threads)


def test_history_from_metrics(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0, "safety": 0.5}\n{"step": 1, "domain": "medical", "safety": 0.4, "domain/medical": 0.3}\n')
    assert history_from_metrics(p) == [{"safety": 0.5}, {"safety": 0.4, "domain/medical": 0.3}]


# ---- seeds, resources, CLI ------------------------------------------------------------------

def test_reporting_seeds_refused_unless_asked():
    check_seeds([100, 101, 102, 103, 104], False)
    for seeds in ([0], [100, 4], [3]):
        with pytest.raises(ConfigError, match="reporting seeds"):
            check_seeds(seeds, False)
        check_seeds(seeds, True)
    with pytest.raises(ConfigError):
        check_seeds([100, 100], False)


def test_concurrency_from_resources():
    local = load_run_config(TINY, ["threads=2"])
    assert trial_cpus(local) == (2.0, 2.0)
    ray_cfg = load_run_config(TINY, ["cluster.executor=ray", "cluster.num_workers=2", "cluster.ssi_workers=1"])
    assert trial_cpus(ray_cfg) == (1.0, 3.0)  # the trial process + 2 Train workers
    assert concurrency(8, 3.0, 10) == 2 and concurrency(8, 1.0, 3) == 3 and concurrency(1, 3.0, 5) == 1
    # in-process training on a GPU cluster: each trial holds a GPU, GPUs bound concurrency
    assert trial_resources(local, 0) == {"CPU": 2.0}
    assert trial_resources(local, 4) == {"CPU": 2.0, "GPU": 1.0}
    assert trial_resources(load_run_config(TINY, ["cluster.use_gpu=false"]), 4) == {"CPU": 1.0}
    assert trial_resources(ray_cfg, 4) == {"CPU": 1.0}  # Train workers reserve their own GPUs
    assert concurrency(16, 2.0, 10, cluster_gpus=2, run_gpus=1.0) == 2


def _sweep_main():
    sys.path.insert(0, str(ROOT / "workflows"))
    import sweep

    return sweep


def test_cli_refuses_reporting_seeds_and_resume_with_new_settings(tmp_path, capsys):
    sweep = _sweep_main()
    assert sweep.parse_seeds("100-102,7") == [100, 101, 102, 7]
    assert sweep.main(["--method", "lora", "--config", TINY, "--seeds", "0-4", "--storage", str(tmp_path)]) == 2
    assert "reporting seeds" in capsys.readouterr().err
    assert sweep.main(["--resume", "x", "--trials", "3", "--storage", str(tmp_path)]) == 2
    assert "--trials" in capsys.readouterr().err
    assert sweep.main(["--resume", "x", "--storage", str(tmp_path)]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert sweep.main(["--method", "ewc", "--space", str(SWEEPS / "lora.yaml"), "--config", TINY,
                       "--storage", str(tmp_path)]) == 2
    assert "space for 'lora'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written by a refused sweep
