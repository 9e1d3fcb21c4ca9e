"""Held-out evaluation of a policy on the synthetic world (pictures: `arr_jax.rpo.figures`).

Accuracy = fraction of reward criteria (colour, shape, count, position) an image satisfies,
averaged over images. Base and RPO images come from the same (prompt, seed) noise, so the
comparison is paired: the standard error is that of the per-image differences.
"""
from __future__ import annotations

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
