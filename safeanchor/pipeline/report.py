"""Compare runs: summary.json files -> one mean ± std row per method (markdown)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

COLUMNS = (
    ("safety_0", "safety before", lambda s: s["safety"][0]),
    ("safety", "safety after", lambda s: s["safety"][-1]),
    ("safety_seen", "seen-topic safety after", lambda s: s["safety_seen_topics"][-1] if "safety_seen_topics" in s else math.nan),
    ("retention", "retention", lambda s: s["retention"]),
    ("domain_plastic", "domain_plastic", lambda s: s["domain_plastic"]),
    ("domain_mean_final", "domain_mean_final", lambda s: s["domain_mean_final"]),
    ("general_kept", "general kept", lambda s: s["general"][-1] / s["general"][0] if s["general"][0] else math.nan),
    ("helpful_kept", "helpful kept", lambda s: s["helpful"][-1] / s["helpful"][0] if s["helpful"][0] else math.nan),
    ("over_refusal", "over_refusal after", lambda s: s["over_refusal"][-1]),
    ("extra_kept", "extra files kept", lambda s: _extra_kept(s)),
    ("wall_s", "wall s", lambda s: s.get("wall_s", math.nan)),
)


def _extra_kept(s: dict[str, Any]) -> float:
    """Mean over the extra HARMFUL files of final / step-0 refusal."""
    extra = s.get("extra_eval", {})
    names = s.get("extra_harmful", list(extra))
    vals = [extra[k][-1] / extra[k][0] for k in names if k in extra and extra[k] and extra[k][0]]
    return sum(vals) / len(vals) if vals else math.nan


def load_summaries(paths: list[Path]) -> list[dict[str, Any]]:
    out = []
    for p in paths:
        try:
            out.append(json.loads(Path(p).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable summary.json ({e})") from e
    return out


def aggregate(summaries: list[dict[str, Any]], key=None) -> dict[str, dict[str, tuple[float, float, int]]]:
    """row -> column -> (mean, std, n) over its runs (seeds); a row is a method, or key(summary)
    (workflows/compare.py: the arm, a method with its preset or a named variant). n counts the
    FINITE values the mean is taken over (a run whose value is NaN is not counted), so a cell
    says how many runs it stands on."""
    by: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by.setdefault(key(s) if key else s["method"], []).append(s)
    table = {}
    for m, runs in by.items():
        row = {}
        for key, _, fn in COLUMNS:
            xs = [float(fn(s)) for s in runs]
            xs = [x for x in xs if not math.isnan(x)]
            mean = statistics.fmean(xs) if xs else math.nan
            std = statistics.stdev(xs) if len(xs) > 1 else 0.0
            row[key] = (mean, std, len(xs))
        table[m] = row
    return table


def markdown(table: dict[str, dict[str, tuple[float, float, int]]], order: list[str] | None = None,
             label: str = "method") -> str:
    names = order or list(table)
    head = f"| {label} | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 2) + "|"
    rows = [head, sep]
    for m in names:
        if m not in table:
            continue
        cells = []
        n = max(c[2] for c in table[m].values())
        for key, _, _ in COLUMNS:
            mean, std, k = table[m][key]
            cell = "–" if math.isnan(mean) else (f"{mean:.0f}" if key == "wall_s" else f"{mean:.3f} ± {std:.3f}")
            if 0 < k < n:  # fewer finite values than runs: say so in the cell
                cell += f" (n={k})"
            cells.append(cell)
        rows.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
