"""Pairwise judge decisions → per-sample rewards and advantages (SPEC §2)."""
from __future__ import annotations

import numpy as np


def pair_rewards(winner: np.ndarray, win_reward: float = 1.0, lose_penalty: float = 0.1) -> np.ndarray:
    """``winner`` (P,) in {1, 2, 0=tie} → rewards (P, 2): winner ``+win_reward``, loser ``-lose_penalty``.

    Ties give 0 to both (no signal). No normalisation: the advantage IS the reward.
    """
    winner = np.asarray(winner)
    if winner.ndim != 1:
        raise ValueError(f"winner must be (P,), got shape {winner.shape}")
    bad = ~np.isin(winner, (0, 1, 2))
    if bad.any():
        raise ValueError(f"winner values must be 0 (tie), 1 or 2; got {np.unique(winner[bad])}")
    r = np.zeros((winner.shape[0], 2), np.float32)
    r[winner == 1] = (win_reward, -lose_penalty)
    r[winner == 2] = (-lose_penalty, win_reward)
    return r
