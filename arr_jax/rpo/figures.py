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


def save_grid(path: str | Path, rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str,
              col_labels: Sequence[str] | None = None, cell_inches: float = 1.1) -> Path:
    """Image rows (each (k, H, W, 3) uint8) as one labelled PNG: a label left of each row, an
    optional (wrapped) label above each column. Returns the path."""
    plt = _plt()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    label_w = 1.0 + 0.045 * max((len(s.split("\n")[0]) for s in row_labels), default=0)
    top = 0.55 + (0.14 * 3 if col_labels is not None else 0)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(label_w + n_cols * cell_inches, top + n_rows * cell_inches),
                             squeeze=False)
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
                ax.set_title(textwrap.fill(col_labels[j], 18), fontsize=6.5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_curves(path: str | Path, history: Sequence[dict], keys: Sequence[str], title: str,
                cols: int = 3) -> Path | None:
    """One small panel per metric key present in ``history`` (a list of per-iteration dicts with
    ``iteration``), ``cols`` panels per row, a moving average over noisy curves. None if no key."""
    plt = _plt()
    keys = [k for k in keys if any(k in h for h in history)]
    if not keys:
        return None
    cols = min(cols, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows + 0.4), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        xs = [h["iteration"] for h in history if k in h]
        ys = [h[k] for h in history if k in h]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1, alpha=0.6 if len(ys) >= 8 else 1.0)
        if len(ys) >= 8 and not k.startswith("eval/"):
            w = max(3, len(ys) // 8)
            ax.plot(xs[w - 1:], np.convolve(ys, np.ones(w) / w, mode="valid"), lw=2)
        ax.set_title(k, fontsize=9)
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    it = [h["iteration"] for h in history if "reward_mean" in h]
    a.plot(it, [h["reward_mean"] for h in history if "reward_mean" in h], lw=1, label="reward (mean per sample)")
    a.plot(it, [h["decisive_rate"] for h in history if "decisive_rate" in h], lw=1, label="decisive pairs")
    a.set_title("training (judge on the policy's own pairs)", fontsize=9)
    a.legend(fontsize=7)
    ev = [h for h in history if "eval/win_rate" in h]
    x = np.array([h["iteration"] + 1 for h in ev])
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
    b.set_ylim(0, 1)
    b.set_title("held-out prompts, fixed seeds", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("RPO iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
