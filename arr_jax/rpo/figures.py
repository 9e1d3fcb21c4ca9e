"""Pictures of an RPO run: image grids and metric curves, legible at their natural size (matplotlib, Agg)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fit_text(text: str, width_in: float, fontsize: float, max_lines: int | None = None) -> str:
    """``text`` wrapped into lines that fit ``width_in`` inches at ``fontsize`` points (an average
    glyph taken as 0.55 em wide; long words such as paths are broken), at most ``max_lines`` lines
    (the last ending in "..."). Titles of every figure go through it so none is clipped."""
    chars = max(8, int(width_in * 72 / (0.55 * fontsize)))
    lines = [w for part in str(text).split("\n") for w in (textwrap.wrap(part, chars) or [""])]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:max(chars - 3, 1)].rstrip() + "..."
    return "\n".join(lines)


def save_grid(path: str | Path, rows: Sequence[np.ndarray | Sequence[np.ndarray]], row_labels: Sequence[str],
              title: str, col_labels: Sequence[str] | None = None, cell_inches: float = 1.1) -> Path:
    """Image rows (each (k, H, W, 3) uint8, or a list of k (H_i, W_i, 3) images of any sizes, e.g. edit
    sources) as one labelled PNG: a label left of each row, an optional label above each column (at
    most 3 wrapped lines); the title wraps to the figure's width. Returns the path."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    label_w = 1.0 + 0.045 * max((len(s.split("\n")[0]) for s in row_labels), default=0)
    fig_w = label_w + n_cols * cell_inches
    title = fit_text(title, fig_w - 0.3, 9)
    top = 0.4 + 0.17 * (title.count("\n") + 1) + (0.14 * 3 if col_labels is not None else 0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(fig_w, top + n_rows * cell_inches), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(row):
                ax.imshow(row[j], interpolation="nearest")
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=8)
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(fit_text(col_labels[j], cell_inches * 0.95, 6.5, max_lines=3), fontsize=6.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


CRITERION_MARKS = {"colour": "C", "shape": "S", "count": "#", "position": "P", "clean_background": "B"}


def save_before_after(path: str | Path, prompts: Sequence[str], base: np.ndarray, rpo: np.ndarray, title: str,
                      checks_base: dict[str, np.ndarray] | None = None,
                      checks_rpo: dict[str, np.ndarray] | None = None,
                      blocks_per_row: int = 2, cell_inches: float = 0.95) -> Path:
    """Base vs RPO on the same prompts and seeds: one framed block per prompt, titled by the prompt,
    its "base" row above its "RPO" row, a column per seed.

    ``base``/``rpo``: uint8 (P, K, H, W, 3), P prompts x K seeds (the same noise in both). With
    ``checks_base``/``checks_rpo`` ({criterion: (P, K) bool}), each image gets one mark per
    criterion under it (`CRITERION_MARKS`: green = satisfied, red = not), and each row its count of
    satisfied checks. Raises ``ValueError`` if the shapes disagree. Returns the path.
    """
    plt = _plt()
    base, rpo = np.asarray(base), np.asarray(rpo)
    if base.shape != rpo.shape or base.ndim != 5 or len(prompts) != base.shape[0]:
        raise ValueError(f"base {base.shape} and rpo {rpo.shape} must both be (P={len(prompts)}, K, H, W, 3)")
    n, k = base.shape[:2]
    for side, checks in (("checks_base", checks_base), ("checks_rpo", checks_rpo)):
        for c, v in (checks or {}).items():
            if np.shape(v) != (n, k):
                raise ValueError(f"{side}[{c!r}] has shape {np.shape(v)}; expected (P, K) = {(n, k)}")
    cols = max(1, min(blocks_per_row, n))
    grid_rows = math.ceil(n / cols)
    marks = bool(checks_base) and bool(checks_rpo)
    if marks and set(checks_base) != set(checks_rpo):
        raise ValueError(f"checks_base names {sorted(checks_base)} but checks_rpo names {sorted(checks_rpo)}")
    crits = [c for c in checks_base if c in CRITERION_MARKS] if marks else []
    row_h = cell_inches + (0.2 if marks else 0.0)
    block_w, block_h = 0.75 + k * cell_inches, 0.4 + 2 * row_h
    fig_w = cols * block_w + 0.2
    lines = [title]
    if marks:
        lines.append("marks under each image: " + ", ".join(f"{CRITERION_MARKS[c]} {c}" for c in crits)
                     + " (green: satisfied, red: not)")
    text = "\n".join(fit_text(t, fig_w - 0.3, 9) for t in lines)
    header = 0.2 + 0.17 * (text.count("\n") + 1)
    fig = plt.figure(figsize=(fig_w, grid_rows * block_h + header))
    top, body = fig.subfigures(2, 1, height_ratios=[header, grid_rows * block_h])
    subfigs = np.atleast_1d(body.subfigures(grid_rows, cols, wspace=0.04, hspace=0.04)).reshape(grid_rows, cols)
    for b in range(grid_rows * cols):
        sf = subfigs.flat[b]
        if b >= n:
            continue
        sf.set_edgecolor("0.55")
        sf.set_linewidth(1.0)
        sf.suptitle(fit_text(prompts[b], block_w - 0.2, 9.5, max_lines=1), fontsize=8.5, fontweight="bold", y=0.985)
        axes = sf.subplots(2, k, squeeze=False, gridspec_kw=dict(left=0.75 / block_w, right=0.98, top=0.86,
                                                                 bottom=0.1 if marks else 0.03, hspace=0.3 if marks else 0.08,
                                                                 wspace=0.06))
        for r, (name, imgs, checks) in enumerate((("base", base, checks_base), ("RPO", rpo, checks_rpo))):
            for j in range(k):
                ax = axes[r, j]
                ax.imshow(imgs[b, j], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for side in ax.spines.values():
                    side.set_color("#2b7bba" if name == "RPO" else "0.4")
                    side.set_linewidth(1.5 if name == "RPO" else 0.8)
                if marks:
                    for m, c in enumerate(crits):
                        ok = bool(np.asarray(checks[c])[b, j])
                        ax.text((m + 0.5) / len(crits), -0.04, CRITERION_MARKS[c], transform=ax.transAxes,
                                ha="center", va="top", fontsize=6.5, fontweight="bold",
                                color="#1a9641" if ok else "#d7191c")
            label = name
            if marks:
                got = sum(int(np.asarray(checks[c])[b].sum()) for c in crits)
                label += f"\n{got}/{len(crits) * k}"
            axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8,
                                  color="#2b7bba" if name == "RPO" else "black",
                                  fontweight="bold" if name == "RPO" else "normal")
    top.suptitle(text, fontsize=9, y=0.95, va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(path: str | Path, history: Sequence[dict], keys: Sequence[str | tuple[str, ...]], title: str,
                cols: int = 3) -> Path | None:
    """One small panel per metric in ``history`` (a list of per-iteration dicts with ``iteration``),
    ``cols`` panels per row, a moving average over noisy training curves.

    An entry of ``keys`` is a metric name or a tuple of names drawn in one panel with a legend (e.g.
    the four criteria); metrics absent from ``history`` are left out, and None is returned if none
    is present. Sized to be read at its natural size (about 330 x 260 px per panel at 110 dpi).
    """
    plt = _plt()
    panels = []
    for k in keys:
        group = tuple(k) if isinstance(k, (tuple, list)) else (k,)
        group = tuple(g for g in group if any(g in h for h in history))
        if group:
            panels.append(group)
    if not panels:
        return None
    cols = min(cols, len(panels))
    rows = math.ceil(len(panels) / cols)
    title = fit_text(title, 3.0 * cols - 0.3, 10)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.35 * rows + 0.3 + 0.18 * (title.count("\n") + 1)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, group in zip(axes.flat, panels):
        for k in group:
            xs = [h["iteration"] for h in history if k in h]
            ys = [h[k] for h in history if k in h]
            label = k.rsplit("/", 1)[-1] if len(group) > 1 else None
            line, = ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1,
                            alpha=0.5 if len(ys) >= 8 and not k.startswith("eval/") else 1.0, label=label)
            if len(ys) >= 8 and not k.startswith("eval/"):
                w = max(3, len(ys) // 8)
                ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=2, color=line.get_color())
        if len(group) > 1:
            prefix = group[0].rsplit("/", 1)[0]
            ax.set_title(prefix if all(g.startswith(prefix + "/") for g in group) else ", ".join(group), fontsize=9)
            ax.legend(fontsize=7, loc="best")
        else:
            ax.set_title(fit_text(group[0], 2.8, 9, max_lines=2), fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("RPO iteration", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_reward_and_win_rate(path: str | Path, history: Sequence[dict], title: str) -> Path:
    """The run in one figure: training reward and decisive-pair rate (left), held-out win rate
    against the base with its standard error and the tie rate (right)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 2.8 + 0.18 * (fit_text(title, 8.1, 10).count("\n") + 1)))
    it = [h["iteration"] for h in history if "reward_mean" in h]
    a.plot(it, [h["reward_mean"] for h in history if "reward_mean" in h], lw=1, label="reward (mean per sample)")
    a.plot(it, [h["decisive_rate"] for h in history if "decisive_rate" in h], lw=1, label="decisive pairs")
    a.set_title("training (judge on the policy's own pairs)", fontsize=9)
    a.legend(fontsize=7)
    ev = [h for h in history if "eval/win_rate" in h]
    x = np.array([h["iteration"] for h in ev])  # iteration N = after N updates (from 1)
    w = np.array([h["eval/win_rate"] for h in ev])
    se = np.array([h.get("eval/win_rate_se", 0.0) for h in ev])
    b.axhline(0.5, color="grey", lw=0.8, ls="--")
    if len(ev):
        b.plot(x, w, marker="o", ms=3, label="win rate vs base")
        b.fill_between(x, w - se, w + se, alpha=0.25)
        b.plot(x, [h.get("eval/tie_rate", np.nan) for h in ev], lw=1, label="tie rate")
        b.legend(fontsize=7)
    else:
        b.text(0.5, 0.5, "no held-out evaluation\n(rpo.eval_every = 0)", ha="center", va="center", fontsize=8)
    b.set_ylim(-0.03, 1.05)  # a tie rate of 1.0 (or a win rate of 0) stays visible above (below) the frame
    b.set_title("held-out prompts, fixed seeds", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("RPO iteration (from 1)", fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)  # no fractional iterations on short runs
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(fit_text(title, 8.1, 10), fontsize=10)  # long titles wrap instead of being clipped
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
