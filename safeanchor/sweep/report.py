"""What a sweep writes under <storage>/<sweep_id>/: trials.csv, trials.md, pareto.png, best.yaml.

A trial is *complete* when it reported every domain of every tuning seed; only complete trials
enter the Pareto front and the choice of the best config (a trial stopped by ASHA after one
domain has a running retention that is not comparable with a final one).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

import yaml

from safeanchor.config import apply_overrides, load_yaml
from safeanchor.sweep.objective import STEP_METRICS, ObjectiveConfig, pareto_front
from safeanchor.sweep.space import as_overrides

METRIC_COLS = ("objective", "retention", "domain_plastic", *STEP_METRICS)


def trial_rows(trials: list[dict[str, Any]], params: list[str], reports: int) -> list[dict[str, Any]]:
    """Rows of the trial table. trials: {"trial_id", "status", "point", "metrics", "error"} with
    `metrics` the trial's last report ({} if none); reports: how many a complete trial makes."""
    rows = []
    for tr in trials:
        m = tr["metrics"] or {}
        done = int(m.get("training_iteration", 0) or 0)
        rows.append({
            "trial_id": tr["trial_id"],
            "status": "error" if tr.get("error") else ("complete" if done >= reports else
                                                       ("stopped" if tr["status"] == "TERMINATED" else "unfinished")),
            "reports": done,
            **{p: tr["point"].get(p) for p in params},
            **{k: m.get(k, float("nan")) for k in METRIC_COLS},
        })
    complete = [i for i, r in enumerate(rows) if r["status"] == "complete"]
    front = pareto_front([(rows[i]["retention"], rows[i]["domain_plastic"]) for i in complete])
    on_front = {complete[j] for j in front}
    best = best_index(rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in on_front
        r["best"] = i == best
    return sorted(rows, key=lambda r: (r["status"] != "complete", -_num(r["objective"]), r["trial_id"]))


def best_index(rows: list[dict[str, Any]]) -> int | None:
    """The complete trial with the highest objective (ties: higher retention, then trial id)."""
    ok = [i for i, r in enumerate(rows) if r["status"] == "complete" and not math.isnan(_num(r["objective"]))]
    if not ok:
        return None
    def key(i: int) -> tuple:
        ret = _num(rows[i]["retention"])
        return (-rows[i]["objective"], -ret if not math.isnan(ret) else math.inf, rows[i]["trial_id"])

    return min(ok, key=key)


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "", None: "null"}[v]
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial_id"])
    w.writeheader()
    w.writerows(rows)
    _atomic(path, buf.getvalue())


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    cols = list(rows[0]) if rows else ["trial_id"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict[str, Any]], obj: ObjectiveConfig, path: Path, title: str) -> Path:
    """Validation retention vs domain_plastic: complete trials (front joined, best starred),
    partial ones as crosses at their last report, the retention target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = lambda rs: ([_num(r["retention"]) for r in rs], [_num(r["domain_plastic"]) for r in rs])  # noqa: E731
    done = [r for r in rows if r["status"] == "complete"]
    part = [r for r in rows if r["status"] != "complete"]
    if part:
        ax.scatter(*pts(part), marker="x", color="0.6", label="stopped / unfinished (last report)")
    if done:
        ax.scatter(*pts(done), color="tab:blue", label="complete")
    front = sorted((r for r in done if r["pareto"]), key=lambda r: _num(r["retention"]))
    if front:
        ax.plot(*pts(front), "-o", color="tab:orange", label="Pareto front")
    best = [r for r in rows if r["best"]]
    if best:
        ax.scatter(*pts(best), marker="*", s=250, color="tab:red", zorder=5, label=f"best ({best[0]['trial_id']})")
    ax.axvline(obj.retention_target, ls="--", color="0.3", lw=1, label=f"retention target {obj.retention_target}")
    ax.set_xlabel("validation retention (safety_T / safety_0)")
    ax.set_ylabel("validation domain_plastic")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def best_yaml(config: str, overrides: list[str], method: str, point: dict[str, Any], comment: str) -> str:
    """A preset that `workflows/sequential.py --config` runs as is: the base preset (its `base:`
    chain merged in, so it stands alone anywhere), the user's overrides except the sweep's own
    (eval.split / seed / run_id / storage stay the preset's: a tuned config is reported on the
    test split with reporting seeds; placement and tracking -- cluster.*, threads, tracking.* --
    stay the preset's too: they say where the sweep ran, not what was tuned), the method and the
    best point."""
    keep = [o for o in overrides if not _sweep_only(o.partition("=")[0].strip())]
    data = apply_overrides(load_yaml(config), [*keep, *as_overrides(point)])
    data["method"] = method
    body = yaml.safe_dump(data, sort_keys=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines()) + body


def _sweep_only(key: str) -> bool:
    return key in ("eval.split", "seed", "run_id", "storage", "threads") or key.startswith(("cluster.", "tracking."))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


write_text = _atomic
