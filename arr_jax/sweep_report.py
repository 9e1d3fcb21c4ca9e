"""The results of a sweep (`arr_jax.sweep`): a table of every point's report and one plot.

``write_results(plan, states)`` writes, under ``plan.root``:

* ``results.csv`` and ``results.md`` — one row per point: its swept values, its state
  (``done`` / ``failed`` / ``pending``) and the numbers of its ``report.json``: top-level
  numeric fields under their own name, numeric fields one level down as ``parent.child``
  (booleans, strings and deeper levels are left out). CSV keeps full precision; markdown
  rounds to 4 significant digits.
  The markdown table shows the held-out figures (`_HELD_OUT`: gain, accuracies, held-out win
  rate, tie and order-flip rates, iterations, seconds) when the reports have them.
* ``results.png`` — one metric (``gain``, else ``rpo_accuracy``, ``eval.accuracy``,
  ``eval.win_rate`` when the reports have it, else the first number)
  against the first swept key that varies and is not a seed (keys zipped together share the
  axis); one line per combination of the other varying keys; seeds (keys whose last component
  ends in ``seed``) are replicates, shown as faint dots with their mean ± standard error.
  960×600 pixels, matplotlib Agg.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

# What a sweep is read for, best first: the demo's held-out gain, a training run's held-out figures.
_DEFAULT_METRICS = ("gain", "rpo_accuracy", "eval.accuracy", "eval.win_rate")
# The markdown table's columns when the reports have them (the CSV keeps every number).
_HELD_OUT = ("gain", "gain_se", "base_accuracy", "rpo_accuracy", "eval.accuracy", "eval.win_rate", "eval.win_rate_se",
             "eval.tie_rate", "eval.order_flip_rate", "iterations", "steps", "seconds", "seconds_this_run")


def flatten_report(report: dict) -> dict[str, float]:
    """Numeric top-level fields and numeric fields one level down (``parent.child``), in order."""
    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out: dict[str, float] = {}
    for k, v in report.items():
        if num(v):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items() if num(v2)})
    return out


def read_metrics(workdir: str | Path) -> dict[str, float]:
    """``flatten_report`` of ``workdir/report.json``; {} when missing or unreadable."""
    path = Path(workdir) / "report.json"
    try:
        return flatten_report(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, AttributeError):
        return {}


def _fmt(v: Any, digits: int | None = 4) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}" if digits else repr(v)
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(x, digits) for x in v) + ")"
    return str(v)


def collect(plan, states: dict[str, str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(metric column names in first-seen order, one row per point with 'values', 'state',
    'workdir', 'metrics')."""
    rows, columns = [], {}
    for p in plan.points:
        m = read_metrics(p.workdir)
        columns.update(dict.fromkeys(m))
        rows.append({"name": p.name, "values": p.values, "state": states.get(p.name, "pending"),
                     "workdir": p.workdir, "metrics": m})
    return list(columns), rows


def write_tables(plan, columns: list[str], rows: list[dict]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md`` under ``plan.root``."""
    root = Path(plan.root)
    root.mkdir(parents=True, exist_ok=True)
    keys = list(plan.keys)
    header = [plan.short[k] for k in keys] + ["state"] + columns
    with open(root / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header + ["workdir"])
        for r in rows:
            w.writerow([_fmt(r["values"].get(k, ""), None) for k in keys] + [r["state"]]
                       + [_fmt(r["metrics"][c], None) if c in r["metrics"] else "" for c in columns] + [r["workdir"]])
    shown = [c for c in columns if c in _HELD_OUT] or columns  # the held-out figures, not 50 columns
    md_header = [plan.short[k] for k in keys] + ["state"] + shown
    lines = [f"# Sweep {plan.config_arg} ({len(rows)} points, entry {plan.entry})", "",
             "| " + " | ".join(md_header) + " |", "|" + "---|" * len(md_header)]
    for r in rows:
        cells = ([_fmt(r["values"].get(k, "")) for k in keys] + [r["state"]]
                 + [_fmt(r["metrics"][c]) if c in r["metrics"] else "" for c in shown])
        lines.append("| " + " | ".join(cells) + " |")
    (root / "results.md").write_text("\n".join(lines) + "\n")
    return root / "results.csv", root / "results.md"


def _is_seed(key: str) -> bool:
    return key.rsplit(".", 1)[-1].endswith("seed")


def _factors(rows: list[dict], keys: list[str]) -> list[tuple[str, ...]]:
    """``keys`` grouped into factors: keys that vary together (zipped) form one factor."""
    groups: dict[tuple, list[str]] = {}
    for k in keys:
        seen: dict[str, int] = {}
        sig = tuple(seen.setdefault(repr(r["values"].get(k)), len(seen)) for r in rows)
        groups.setdefault(sig, []).append(k)
    return [tuple(g) for g in groups.values()]


def _order(values: list[Any]) -> list[Any]:
    uniq = list(dict.fromkeys(map(repr, values)))
    by_repr = {repr(v): v for v in values}
    vals = [by_repr[u] for u in uniq]
    if all(len(v) == 1 and isinstance(v[0], (int, float)) and not isinstance(v[0], bool) for v in vals):
        vals.sort()
    return vals


def write_plot(plan, rows: list[dict], metric: str, path: Path, plot_x: str = "") -> bool:
    """Plot ``metric`` per point (see the module docstring); False when no point has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [r for r in rows if metric in r["metrics"] and math.isfinite(r["metrics"][metric])]
    if not have:
        return False
    varying = [k for k in plan.keys if len({repr(r["values"].get(k)) for r in rows}) > 1]
    factors = _factors(rows, [k for k in varying if not _is_seed(k)])
    if plot_x:
        x_f = next((f for f in factors if plot_x in f or plot_x in [plan.short[k] for k in f]), None)
        if x_f is None:
            raise ValueError(f"--plot_x {plot_x}: not a swept key that varies ({', '.join(varying)})")
    else:
        x_f = factors[0] if factors else ()
    series_keys = [k for f in factors if f != x_f for k in f]

    def x_of(r):
        return tuple(r["values"].get(k) for k in x_f)

    xs = _order([x_of(r) for r in have])
    xpos = {repr(v): i for i, v in enumerate(xs)}
    series: dict[str, list[dict]] = {}
    for r in have:
        label = ", ".join(f"{plan.short[k]}={_fmt(r['values'].get(k))}" for k in series_keys)
        series.setdefault(label, []).append(r)

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=150)
    n_series = len(series)
    width = 0.5 / max(n_series, 1)
    replicate = any(_is_seed(k) for k in varying)
    for j, (label, rs) in enumerate(series.items()):
        offset = (j - (n_series - 1) / 2) * width
        mx, my = [], []
        for v in xs:
            ys = [r["metrics"][metric] for r in rs if repr(x_of(r)) == repr(v)]
            if not ys:
                continue
            x = xpos[repr(v)] + offset
            mean = sum(ys) / len(ys)
            se = (math.sqrt(sum((y - mean) ** 2 for y in ys) / (len(ys) - 1) / len(ys)) if len(ys) > 1 else 0.0)
            color = f"C{j % 10}"
            if len(ys) > 1:
                ax.scatter([x] * len(ys), ys, s=14, color=color, alpha=0.35, linewidths=0)
            ax.errorbar([x], [mean], yerr=[se] if se else None, fmt="o", color=color, capsize=3, ms=5)
            mx.append(x)
            my.append(mean)
        ax.plot(mx, my, "-", color=f"C{j % 10}", alpha=0.8, label=label or None)
    ax.set_xticks(range(len(xs)))
    if len(x_f) == 1:
        ax.set_xticklabels([_fmt(v[0]) for v in xs])
        ax.set_xlabel(plan.short[x_f[0]])
    else:  # zipped keys (or none): every tick names its values
        ax.set_xticklabels(["\n".join(f"{plan.short[k]}={_fmt(x)}" for k, x in zip(x_f, v)) or "all points"
                            for v in xs], fontsize=8)
    from arr_jax.rpo.figures import fit_text

    ax.set_ylabel(fit_text(metric, 3.0, 10))
    title = f"{metric} per sweep point"
    if replicate:
        title += " (dots: seeds; marker: mean ± SE)"
    ax.set_title(fit_text(title, 5.6, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if any(series):
        ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_results(plan, states: dict[str, str], metric: str = "", plot_x: str = "") -> list[Path]:
    """Tables and plot for ``plan`` (see the module docstring); returns the paths written.

    Raises ValueError when ``metric`` is given but no finished point's report has it."""
    columns, rows = collect(plan, states)
    written = list(write_tables(plan, columns, rows))
    if metric and columns and metric not in columns:
        raise ValueError(f"--metric {metric}: not in any report.json (have: {', '.join(columns)})")
    metric = metric or next((m for m in _DEFAULT_METRICS if m in columns), columns[0] if columns else "")
    path = Path(plan.root) / "results.png"
    if metric and write_plot(plan, rows, metric, path, plot_x):
        written.append(path)
    else:
        print("no finished point has a numeric report.json; no plot written")
    return written
