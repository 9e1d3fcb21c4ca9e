"""Held-out evaluation of a policy on the synthetic world, and the demo's pictures.

Accuracy = fraction of reward criteria (colour, shape, count, position) an image satisfies,
averaged over images. Base and RPO images come from the same (prompt, seed) noise, so the
comparison is paired: the standard error is that of the per-image differences.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

REWARD_CRITERIA = ("colour", "shape", "count", "position")


def criteria_table(judge, prompts: Sequence[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-criterion booleans (n,) for every image, from the judge's pointwise checks."""
    return {k: np.asarray(v, bool) for k, v in judge.check(list(prompts), images).items()}


def summarize(table: dict[str, np.ndarray], reward_criteria=REWARD_CRITERIA) -> dict:
    per_image = np.mean([table[c] for c in reward_criteria], axis=0)
    out = {"accuracy": float(per_image.mean()), "all_criteria": float(np.mean(np.all([table[c] for c in reward_criteria], 0)))}
    out.update({f"criteria/{k}": float(v.mean()) for k, v in table.items()})
    return out


def paired_comparison(base: dict[str, np.ndarray], new: dict[str, np.ndarray], reward_criteria=REWARD_CRITERIA) -> dict:
    """Mean gain of ``new`` over ``base`` (accuracy points) with the paired standard error."""
    a = np.mean([base[c] for c in reward_criteria], axis=0).astype(np.float64)
    b = np.mean([new[c] for c in reward_criteria], axis=0).astype(np.float64)
    d = b - a
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    gain = float(d.mean())
    out = {"n_images": int(len(d)), "gain": gain, "gain_se": se,
           "gain_z": gain / se if se and se > 0 else float("inf") if gain > 0 else 0.0}
    for c in base:
        db = new[c].astype(np.float64) - base[c].astype(np.float64)
        out[f"gain/{c}"] = float(db.mean())
        out[f"gain_se/{c}"] = float(db.std(ddof=1) / np.sqrt(len(db))) if len(db) > 1 else float("nan")
    return out


def save_grid(path: str | Path, rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str,
              col_labels: Sequence[str] | None = None, scale: int = 3) -> None:
    """Save image rows (each (k, H, W, 3) uint8) as one labelled PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(n_cols * 0.9 * scale / 3 + 2.2, n_rows * 0.95 * scale / 3 + 0.6),
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
                ax.set_ylabel(row_labels[i], rotation=0, ha="right", va="center", fontsize=7)
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_curves(path: str | Path, history: Sequence[dict], keys: Sequence[str], title: str) -> None:
    """Plot metric curves (one panel per key) from a list of per-iteration metric dicts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in h for h in history)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, k in zip(axes[0], keys):
        xs = [h["iteration"] for h in history if k in h]
        ys = [h[k] for h in history if k in h]
        ax.plot(xs, ys, marker="." if len(xs) < 30 else None, lw=1)
        if len(ys) >= 8 and "win_rate" not in k:
            w = max(3, len(ys) // 8)
            sm = np.convolve(ys, np.ones(w) / w, mode="valid")
            ax.plot(xs[w - 1:], sm, lw=2)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("RPO iteration", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
