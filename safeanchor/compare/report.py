"""A comparison's report: report.md and its plots, from the finished cells' summary.json files.

Sections of report.md (every number a mean ± std over the cells it names, n beside it):

- **Table 1** (the paper's shape): one row per method arm at the reference order; safety
  before / after, retention, domain_plastic, domain_mean_final, general / helpful kept,
  over-refusal, seen-topic safety, extra files kept, wall time (`safeanchor.pipeline.report`;
  the wall time is the cell's finished steps, summed over every process that ran them, so a
  resumed cell counts what it did before its interruption).
- **Ablations**: the variants (named configs / overrides) beside their base method, same columns.
- **Domain orders**: per order, and the spread over orders at a fixed seed against the spread
  over seeds at a fixed order (does the order matter more than the seed?).
- **Trajectories**: safety and the mean score of the domains trained so far after every step,
  for every T (number of domains) present: the T = 5 trajectory when T = 5 cells exist.
- **Cells**: finished per arm, unfinished (interrupted) ones, failed ones with their error.

Plots: safety_trajectory.png (per method, seed bands, one panel per T), tradeoff.png (final
safety vs domain_plastic per arm: every cell, and the mean with ±1 std), forgetting.png
(per method: the score on domain i after step j, mean over seeds; forgetting_T<T>.png for the
other T's).
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safeanchor.compare.cells import arm_of
from safeanchor.pipeline.report import COLUMNS, aggregate, markdown
from safeanchor.pipeline.store import StepStore
from safeanchor.storage import RunDir

logger = logging.getLogger(__name__)

NOT_CELLS = ("logs", "mlartifacts")
SPREAD_METRICS = (("retention", "retention"), ("domain_plastic", "domain_plastic"),
                  ("domain_mean_final", "domain_mean_final"), ("safety", "safety after"))
PLOTS = ("safety_trajectory.png", "tradeoff.png", "forgetting.png")


@dataclass
class Entry:
    run_id: str
    arm: str
    summary: dict[str, Any]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.summary["order"])


def collect(root: RunDir) -> tuple[list[Entry], list[str]]:
    """(finished cells, unfinished run ids: a config.yaml but no summary.json) under root."""
    entries, unfinished = [], []
    for name in root.dirs():
        if name in NOT_CELLS:
            continue
        d = root.sub(name)
        if d.is_file("summary.json"):
            s = d.read_json("summary.json")
            if d.is_file("steps/_executions.jsonl"):
                # wall time from the steps: a cell resumed by a process that wrote only its own
                # time into summary.json counts the steps it finished earlier too
                s = {**s, "wall_s": StepStore(d.sub("steps")).wall_s()}
            entries.append(Entry(name, arm_of(name, s), s))
        elif d.is_file("config.yaml"):
            unfinished.append(name)
    return entries, unfinished


def final(s: dict[str, Any], key: str) -> float:
    v = s["safety"][-1] if key == "safety" else s.get(key, math.nan)
    return math.nan if v is None else float(v)


def _ms(xs: list[float]) -> tuple[float, float, int]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def _fmt(m: float, s: float, n: int | None = None) -> str:
    if math.isnan(m):
        return "–"
    return f"{m:.3f} ± {s:.3f}" + (f" (n={n})" if n is not None else "")


def _shown_path(path: str) -> str:
    """A preset's path as the report shows it: relative to the working directory when it lies under
    it (a report committed from a checkout names the repository's file), else as recorded."""
    p = Path(path)
    return str(p.relative_to(Path.cwd())) if p.is_absolute() and p.is_relative_to(Path.cwd()) else path


def _arrow(order: tuple[str, ...]) -> str:
    return " → ".join(order)


def spread(entries: list[Entry], key: str) -> tuple[float, int, float, int]:
    """(std over orders at a fixed seed, averaged over the k seeds that have >= 2 orders, k,
        std over seeds at a fixed order, averaged over the m orders that have >= 2 seeds, m)."""
    by_seed: dict[int, list[float]] = {}
    by_order: dict[tuple, list[float]] = {}
    for e in entries:
        v = final(e.summary, key)
        if math.isnan(v):
            continue
        by_seed.setdefault(e.summary["seed"], []).append(v)
        by_order.setdefault(e.order, []).append(v)
    over_orders = [statistics.stdev(v) for v in by_seed.values() if len(v) > 1]
    over_seeds = [statistics.stdev(v) for v in by_order.values() if len(v) > 1]
    mean = lambda xs: statistics.fmean(xs) if xs else math.nan  # noqa: E731
    return mean(over_orders), len(over_orders), mean(over_seeds), len(over_seeds)


def main_order(entries: list[Entry], t: int, reference: tuple[str, ...]) -> tuple[str, ...] | None:
    """The order a T's trajectory is drawn at: the reference order if it has T domains, else the
    order of T domains most cells ran (ties: the first in sorted order)."""
    if len(reference) == t and any(e.order == reference for e in entries):
        return reference
    counts = Counter(e.order for e in entries if len(e.order) == t)
    if not counts:
        return None
    top = max(counts.values())
    return sorted(o for o, n in counts.items() if n == top)[0]


def trajectory(entries: list[Entry], key: str) -> list[tuple[float, float, int]]:
    """Per step 0..T, mean ± std over the entries of safety (key "safety") or of the mean score of
    the domains trained so far (key "domains_so_far"; step 0: nan)."""
    t = len(entries[0].order)
    out = []
    for j in range(t + 1):
        if key == "domains_so_far":
            xs = [statistics.fmean(e.summary["domain"][d][j] for d in e.order[:j]) if j else math.nan for e in entries]
        else:
            xs = [e.summary[key][j] for e in entries]
        out.append(_ms([math.nan if x is None else float(x) for x in xs]))
    return out


def forgetting_matrix(entries: list[Entry]) -> list[list[float]]:
    """M[i][j] = score on domain order[i] after step j (j = 0: before any), mean over entries."""
    order = entries[0].order
    return [[_ms([e.summary["domain"][d][j] for e in entries])[0] for j in range(len(order) + 1)] for d in order]


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def _arm_order(state: dict[str, Any], entries: list[Entry], variants: bool) -> list[str]:
    defined = state.get("arms", {})
    names = [n for n, a in defined.items() if bool(a.get("variant")) == variants]
    if not variants:  # arms found on disk but not defined here (a storage from an earlier compare.py)
        names += sorted({e.arm for e in entries if e.arm not in defined})
    return names


def _table(entries: list[Entry], rows: list[str]) -> tuple[str, dict]:
    table = aggregate([{**e.summary, "_arm": e.arm} for e in entries], key=lambda s: s["_arm"])
    return markdown(table, [r for r in rows if r in table], label="arm"), table


def build(entries: list[Entry], unfinished: list[str], state: dict[str, Any]) -> tuple[str, dict[str, float], str]:
    """(report.md text, MLflow metrics of Table 1 and the ablations, Table 1's markdown)."""
    arms_def = state.get("arms", {})
    reference = tuple(state.get("reference_order") or ())
    if not reference and entries:  # no compare.json: the order most cells ran
        reference = Counter(e.order for e in entries).most_common(1)[0][0]
    methods = _arm_order(state, entries, variants=False)
    variants = _arm_order(state, entries, variants=True)
    at_ref = [e for e in entries if e.order == reference]
    seeds = sorted({e.summary["seed"] for e in entries})
    lines = ["# Comparison", ""]
    lines.append(f"{len(entries)} finished cells; arms: {', '.join(methods + variants) or 'none'}; seeds "
                 f"{', '.join(map(str, seeds)) or 'none'}; {len({e.order for e in entries})} domain orders. "
                 "Mean ± std over the cells named in each table (std: sample std, 0 for one cell); the `seeds` "
                 "column is the number of cells, `(n=k)` marks a metric finite in fewer of them; `–`: no finite "
                 "value. Splits: " + ", ".join(sorted({e.summary.get('split', 'test') for e in entries}) or ["–"])
                 + ".")
    if state.get("overrides"):
        lines.append(f"\nEvery cell's overrides: {', '.join(f'`{o}`' for o in state['overrides'])}.")
    metrics: dict[str, float] = {}

    lines += ["", f"## Table 1: methods (order {_arrow(reference)}, T = {len(reference)})", ""]
    table1, agg = _table(at_ref, methods)
    lines.append(table1 if any(m in agg for m in methods) else "No finished cell at this order.")
    lines += _missing(methods, agg)
    described = [m for m in methods if m in arms_def]
    lines += [""] if described else []
    lines += [f"- `{m}`: preset `{_shown_path(arms_def[m]['config'])}`" for m in described]
    for arm, row in agg.items():
        metrics.update({f"{arm}/{k}": v[0] for k, v in row.items() if not math.isnan(v[0])})

    if variants:
        bases = list(dict.fromkeys(arms_def[v]["method"] for v in variants if v in arms_def))
        lines += ["", f"## Ablations (order {_arrow(reference)}, T = {len(reference)})", ""]
        tab, agg = _table(at_ref, bases + variants)
        lines.append(tab if agg else "No finished cell at this order.")
        lines += _missing(variants, agg)
        lines.append("")
        for v in variants:
            a = arms_def.get(v, {})
            lines.append(f"- `{v}`: {a.get('method')} + " + (", ".join(f"`{o}`" for o in a.get("overrides", []))
                                                             or "its preset"))
        for arm, row in agg.items():
            metrics.update({f"{arm}/{k}": v[0] for k, v in row.items() if not math.isnan(v[0])})

    lines += _orders_section(entries, methods, len(reference))
    lengths = sorted({len(e.order) for e in entries if e.arm in methods})
    for t in lengths:
        lines += _trajectory_section(entries, methods, t, reference)
    if lengths and max(lengths) < 5:
        lines += ["", f"No T = 5 cells here (T present: {', '.join(map(str, lengths))}); `--T 5` runs them."]

    lines += ["", "## Plots", ""]
    images = [f"![{p[:-4]}]({p})" for p in PLOTS]
    images += [f"![forgetting T={t}](forgetting_T{t}.png)" for t in lengths if t != len(reference)]
    lines.append("\n\n".join(images))

    lines += ["", "## Cells", ""]
    counts = Counter(e.arm for e in entries)
    lines.append("Finished: " + (", ".join(f"{a} {n}" for a, n in sorted(counts.items())) or "none") + ".")
    if unfinished:
        lines.append(f"\nUnfinished (interrupted; rerunning the same command continues them): {', '.join(unfinished)}.")
    failures = state.get("failures", {})
    if failures:
        lines += ["", f"Failed ({len(failures)}; their logs: `logs/<run id>.log`):", ""]
        lines += [f"- `{k}`: {v}" for k, v in sorted(failures.items())]
    return "\n".join(lines) + "\n", metrics, table1


def _missing(arms: list[str], agg: dict) -> list[str]:
    gone = [a for a in arms if a not in agg]
    return [f"\nNo finished cell at this order yet: {', '.join(gone)} (see Cells)."] if gone else []


def _orders_section(entries: list[Entry], methods: list[str], t: int) -> list[str]:
    groups = {m: [e for e in entries if e.arm == m and len(e.order) == t] for m in methods}
    groups = {m: g for m, g in groups.items() if len({e.order for e in g}) > 1}
    lines = ["", f"## Domain orders (T = {t})", ""]
    if not groups:
        return lines + ["No arm has more than one order of this length (`--orders all` runs the six of three)."]
    lines += ["| arm | order | seeds | " + " | ".join(t for _, t in SPREAD_METRICS) + " |",
              "|---" * (3 + len(SPREAD_METRICS)) + "|"]
    for m, g in groups.items():
        for order in sorted({e.order for e in g}):
            cells = [e for e in g if e.order == order]
            vals = [_ms([final(e.summary, k) for e in cells]) for k, _ in SPREAD_METRICS]
            lines.append(f"| {m} | {_arrow(order)} | {len(cells)} | " + " | ".join(_fmt(*v[:2]) for v in vals) + " |")
    lines += ["", "Order spread against seed spread: the std over orders at a fixed seed (averaged over the seeds "
              "that ran two or more orders) beside the std over seeds at a fixed order (averaged over the orders "
              "that ran two or more seeds). Order spread well above seed spread: the order matters.", "",
              "| arm | metric | std over orders (fixed seed) | seeds | std over seeds (fixed order) | orders |",
              "|---|---|---|---|---|---|"]
    for m, g in groups.items():
        for k, title in SPREAD_METRICS:
            so, ks, ss, ms = spread(g, k)
            f = lambda x: "–" if math.isnan(x) else f"{x:.3f}"  # noqa: E731
            lines.append(f"| {m} | {title} | {f(so)} | {ks} | {f(ss)} | {ms} |")
    return lines + _paired_lines(groups)


def paired(a: list[Entry], b: list[Entry], key: str) -> list[float]:
    """a − b on `key` for every (order, seed) both ran, in sorted (order, seed) order."""
    bv = {(e.order, e.summary["seed"]): final(e.summary, key) for e in b}
    out = []
    for e in sorted(a, key=lambda e: (e.order, e.summary["seed"])):
        k = (e.order, e.summary["seed"])
        if k in bv and not (math.isnan(final(e.summary, key)) or math.isnan(bv[k])):
            out.append(final(e.summary, key) - bv[k])
    return out


def _paired_lines(groups: dict[str, list[Entry]]) -> list[str]:
    """Each arm against the first one, cell by cell over the (order, seed) pairs both ran."""
    arms = list(groups)
    if len(arms) < 2:
        return []
    base = arms[0]
    lines = ["", f"Paired with {base} by (order, seed): the difference arm − {base} of each pair of cells that "
             "ran the same order with the same seed, and on how many pairs it is positive.", "",
             f"| arm − {base} | metric | pairs | positive | mean difference | smallest | largest |",
             "|---|---|---|---|---|---|---|"]
    for m in arms[1:]:
        for k, title in SPREAD_METRICS:
            d = paired(groups[m], groups[base], k)
            if d:
                lines.append(f"| {m} | {title} | {len(d)} | {sum(x > 0 for x in d)} | {statistics.fmean(d):+.3f} "
                             f"| {min(d):+.3f} | {max(d):+.3f} |")
    return lines


def _trajectory_section(entries: list[Entry], methods: list[str], t: int, reference: tuple[str, ...]) -> list[str]:
    order = main_order([e for e in entries if e.arm in methods], t, reference)
    lines = ["", f"## Trajectory, T = {t} (order {_arrow(order)})", ""]
    steps = ["0 (aligned)"] + [f"{j} {d}" for j, d in enumerate(order, start=1)]
    for key, title in (("safety", "safety"), ("domains_so_far", "mean score of the domains trained so far")):
        lines += [f"{title}, after each step:", "", "| arm | seeds | " + " | ".join(steps) + " |",
                  "|---" * (2 + len(steps)) + "|"]
        for m in methods:
            g = [e for e in entries if e.arm == m and e.order == order]
            if g:
                lines.append(f"| {m} | {len(g)} | " + " | ".join(_fmt(*v[:2]) for v in trajectory(g, key)) + " |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------------
# plots (matplotlib's object API: no pyplot state)
# ---------------------------------------------------------------------------------------------


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_safety_trajectories(entries: list[Entry], methods: list[str], reference: tuple[str, ...], path: Path) -> None:
    lengths = sorted({len(e.order) for e in entries if e.arm in methods}) or [len(reference)]
    fig = _figure(5.2 * len(lengths), 4.2)
    for i, t in enumerate(lengths):
        ax = fig.add_subplot(1, len(lengths), i + 1)
        order = main_order([e for e in entries if e.arm in methods], t, reference)
        for m in methods:
            g = [e for e in entries if e.arm == m and e.order == order]
            if not g:
                continue
            tr = trajectory(g, "safety")
            xs = list(range(len(tr)))
            mean = [v[0] for v in tr]
            lo = [v[0] - v[1] for v in tr]
            hi = [v[0] + v[1] for v in tr]
            (line,) = ax.plot(xs, mean, marker="o", label=f"{m} (n={len(g)})")
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        if order:
            ax.set_xticks(range(len(order) + 1))
            ax.set_xticklabels(["aligned", *order], fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("after step")
        ax.set_ylabel("safety (refusal rate, harmful set)")
        ax.set_title(f"T = {t}: mean ± std over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_tradeoff(entries: list[Entry], arms: list[str], reference: tuple[str, ...], path: Path,
                  variants: set[str]) -> None:
    fig = _figure(6.0, 4.6)
    ax = fig.add_subplot(1, 1, 1)
    for m in arms:
        g = [e for e in entries if e.arm == m and e.order == reference]
        if not g:
            continue
        xs = [final(e.summary, "safety") for e in g]
        ys = [final(e.summary, "domain_plastic") for e in g]
        mx, sx, _ = _ms(xs)
        my, sy, _ = _ms(ys)
        pts = ax.scatter(xs, ys, s=14, alpha=0.45, marker="^" if m in variants else "o")
        ax.errorbar([mx], [my], xerr=[sx], yerr=[sy], color=pts.get_facecolor()[0][:3], marker="^" if m in variants
                    else "o", markersize=9, capsize=3, label=f"{m} (n={len(g)})")
    ax.set_xlabel(f"safety after the last domain ({_arrow(reference)})")
    ax.set_ylabel("domain_plastic (score right after each domain)")
    ax.set_title("safety vs domain score: each cell, and mean ± std", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")


def plot_forgetting(entries: list[Entry], methods: list[str], order: tuple[str, ...] | None, path: Path) -> None:
    groups = [(m, [e for e in entries if e.arm == m and e.order == order]) for m in methods]
    groups = [(m, g) for m, g in groups if g]
    n = max(1, len(groups))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    t = len(order or ())
    fig = _figure(max(3.2, 0.75 * (t + 1) + 1.6) * cols, max(2.6, 0.55 * t + 1.4) * rows)
    if not groups:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no finished cells", ha="center", va="center")
        ax.set_axis_off()
    for i, (m, g) in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        M = forgetting_matrix(g)
        im = ax.imshow(M, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for r, row in enumerate(M):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if v < 0.6 else "black")
        ax.set_xticks(range(t + 1))
        ax.set_xticklabels(["0", *(f"{j}" for j in range(1, t + 1))], fontsize=7)
        ax.set_yticks(range(t))
        ax.set_yticklabels(list(order), fontsize=7)
        ax.set_xlabel("after step", fontsize=8)
        ax.set_title(f"{m} (n={len(g)})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(f"domain score after each step, mean over seeds ({_arrow(order or ())})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")


def write_report(root: RunDir, state: dict[str, Any]) -> dict[str, Any]:
    """Write report.md and the plots under root (atomically, any pyarrow filesystem).
    Returns {"files": names written, "metrics": {arm/column: mean}, "table": Table 1}."""
    entries, unfinished = collect(root)
    text, metrics, table = build(entries, unfinished, state)
    reference = tuple(state.get("reference_order") or ())
    if not reference and entries:
        reference = Counter(e.order for e in entries).most_common(1)[0][0]
    methods = _arm_order(state, entries, variants=False)
    variants = _arm_order(state, entries, variants=True)
    files = []
    with tempfile.TemporaryDirectory(prefix="safeanchor-compare-") as tmp:
        out = Path(tmp)
        plot_safety_trajectories(entries, methods, reference, out / "safety_trajectory.png")
        plot_tradeoff(entries, methods + variants, reference, out / "tradeoff.png", set(variants))
        plot_forgetting(entries, methods, reference, out / "forgetting.png")
        for t in sorted({len(e.order) for e in entries if e.arm in methods} - {len(reference)}):
            plot_forgetting(entries, methods, main_order([e for e in entries if e.arm in methods], t, reference),
                            out / f"forgetting_T{t}.png")
        for p in sorted(out.iterdir()):
            root.write_bytes(p.name, p.read_bytes())
            files.append(p.name)
    root.write_text("report.md", text)
    files.insert(0, "report.md")
    logger.info(f"[compare] {root.uri('report.md')}: {len(entries)} cells; plots {', '.join(files[1:])}")
    return {"files": files, "metrics": metrics, "table": table}


__all__ = ["COLUMNS", "Entry", "build", "collect", "write_report"]
