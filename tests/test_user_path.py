"""The user's path: one-line errors whose hints work when followed, outputs that never overwrite each
other, and the warning about a judge whose one-order reward is position bias."""
from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arr_jax.judge.base import PairwiseBatch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["two red circles on the left", "one blue square on the top",
           "three green triangles on the right", "one yellow circle on the bottom"]


class FirstWins:
    """A judge that always prefers the first image: pure position bias."""

    def compare(self, prompts, images1, images2):
        n = len(prompts)
        return PairwiseBatch(winner=np.ones(n, np.int8), p_first=np.ones(n, np.float32))


class Brighter:
    """A fair judge: the brighter image wins, whichever order it is shown in."""

    def compare(self, prompts, images1, images2):
        a = np.asarray(images1, np.float64).mean(axis=(1, 2, 3))
        b = np.asarray(images2, np.float64).mean(axis=(1, 2, 3))
        w = np.where(a > b, 1, np.where(b > a, 2, 0)).astype(np.int8)
        return PairwiseBatch(winner=w, p_first=np.where(w == 1, 1.0, np.where(w == 2, 0.0, 0.5)))


@pytest.mark.parametrize("judge,biased", [(FirstWins(), True), (Brighter(), False)])
def test_order_flip_rate_is_measured_and_a_biased_judge_warned_about_once(judge, biased, caplog):
    from conftest import make_tiny_trainer

    tr = make_tiny_trainer(judge=judge, micro_batch=8, num_steps=3)
    with caplog.at_level(logging.WARNING, logger="arr_jax.rpo.trainer"):
        ms = [tr.step(PROMPTS) for _ in range(3)]
    assert [m["order_flip_rate"] for m in ms] == [1.0 if biased else 0.0] * 3
    assert ms[-1]["order_flip_rate_run"] == (1.0 if biased else 0.0) and tr.order_flips["pairs"] == 12
    warned = [r for r in caplog.records if "order-flip rate" in r.getMessage()]
    assert len(warned) == (1 if biased else 0)  # once, after 8 pairs
    if biased:
        assert "judge.symmetrize=agree" in warned[0].getMessage()
