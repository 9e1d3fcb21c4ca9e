"""Held-out evaluation during RPO: the current policy against the base (LoRA off), the
reward-hacking guard (SPEC §3: the proxy reward rising while a held-out judge falls).

Every ``rpo.eval_every`` iterations, on held-out prompts with fixed seeds (the same noise for
both policies), the evaluation judge (by default the training judge) compares each current
image with the base image of the same prompt and seed in both orders. Per pair the score is
1 (current wins), 0 (base wins) or 0.5 (tie), averaged over the two orders, so the judge's
positional bias cancels. Reported: ``eval/win_rate`` with its standard error, ``eval/tie_rate``
(pairs left undecided after both orders), ``eval/order_flip_rate`` (the two orders named
different winners) and judge failures; an image grid (a base row and a current row, same prompts
and seeds; for edits a source row above them) as PNG and in TensorBoard. Kind-specific checks (the
world's rubric criteria) come from ``criteria_fn``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from arr_jax.judge.base import flip_winner
from arr_jax.multihost import is_main, sum_over_processes, union_keys
from arr_jax.policies.base import PromptItem


def _scores(winner: np.ndarray) -> np.ndarray:
    return np.where(winner == 1, 1.0, np.where(winner == 2, 0.0, 0.5))


class Evaluator:
    """Current policy vs base on held-out prompts (see the module docstring).

    Args:
      items:             held-out prompts.
      judge:             a `RubricJudge` (the training judge, or a separate gold judge).
      seeds_per_prompt:  images per prompt; seeds are fixed: ``seed_offset + 100 * i + s``.
      sampler:           "sde" (the rollout sampler) or "ode"; ``sigmas`` its schedule (None: rollout's).
      grid_prompts:      prompts shown in the grid (spread over the set).
      outdir:            where grids go (``eval_<iteration>.png``); None: no pictures.
      criteria_fn:       optional ``(items, images) -> {name: (n,) bool}`` checks, reported as
                         ``eval/criteria/<name>`` and ``eval/accuracy`` for the current policy.
    """

    def __init__(self, items: Sequence[PromptItem], judge, *, seeds_per_prompt: int = 1, sampler: str = "sde",
                 sigmas=None, grid_prompts: int = 8, outdir: str | Path | None = None,
                 criteria_fn: Callable | None = None, seed_offset: int = 10_000):
        if not items:
            raise ValueError("the evaluator needs held-out prompts")
        if seeds_per_prompt < 1:
            raise ValueError(f"eval.seeds_per_prompt must be >= 1, got {seeds_per_prompt}")
        self.prompts = list(items)
        self.items = [it for it in self.prompts for _ in range(seeds_per_prompt)]
        self.seeds = [seed_offset + 100 * i + s for i in range(len(self.prompts)) for s in range(seeds_per_prompt)]
        self.k = seeds_per_prompt
        self.judge, self.sampler, self.sigmas = judge, sampler, sigmas
        self.grid_prompts = max(0, min(grid_prompts, len(self.prompts)))
        self.outdir = None if outdir is None else Path(outdir)
        self.criteria_fn = criteria_fn
        self._base: np.ndarray | None = None

    def images(self, trainer, *, base: bool) -> np.ndarray:
        """uint8 (n_local, H, W, 3) of this process's items (`RPOTrainer.local_indices`): the base
        (cached: it never changes) or the current policy."""
        if base and self._base is not None:
            return self._base
        out = trainer.generate(self.items, self.seeds, use_reference=base, sampler=self.sampler, sigmas=self.sigmas)
        if base:
            self._base = out
        return out

    def _symmetric(self) -> bool:
        return bool(getattr(getattr(self.judge, "judge", None), "symmetrize", None))

    def compare(self, current: np.ndarray, base: np.ndarray, items: Sequence[PromptItem] | None = None) -> dict:
        """Win-rate metrics of ``current`` against ``base`` images (both orders), over all processes:
        each passes its own images and items (default: all items)."""
        items = self.items if items is None else list(items)
        fwd = self.judge.compare(items, current, base)
        if self._symmetric():  # the judge already combined both orders
            rev_w = fwd.winner
            failures, failed = dict(fwd.failures), ~fwd.valid
        else:  # failures in PAIRS: a pair failed in both orders counts once
            from arr_jax.judge.base import flip, pair_failures

            rev = self.judge.compare(items, base, current)
            rev_w = flip_winner(rev.winner)
            failed = ~(fwd.valid & rev.valid)
            failures, _ = pair_failures(fwd, flip(rev), ~failed, np.where(fwd.winner == rev_w, fwd.winner, 0))
        s = 0.5 * (_scores(fwd.winner) + _scores(rev_w))
        sums = {"n": float(len(s)), "s": float(s.sum()), "s2": float((s ** 2).sum()), "tie": float(np.sum(s == 0.5)),
                "flip": float(np.sum((fwd.winner != rev_w) & (fwd.winner != 0) & (rev_w != 0))),
                "eval/judge_failed_pairs": float(np.sum(failed))}
        for k in union_keys(failures):
            sums[f"eval/judge_failures/{k}"] = float(failures.get(k, 0))
        tot = sum_over_processes(sums)
        n = tot.pop("n")
        mean = tot.pop("s") / n
        var = max(tot.pop("s2") / n - mean ** 2, 0.0) * n / (n - 1) if n > 1 else float("nan")
        out = {"eval/win_rate": mean, "eval/win_rate_se": float(np.sqrt(var / n)) if n > 1 else float("nan"),
               "eval/tie_rate": tot.pop("tie") / n, "eval/order_flip_rate": tot.pop("flip") / n, "eval/pairs": n}
        out.update(tot)
        return out

    def __call__(self, trainer, iteration: int, writer=None) -> dict:
        """Evaluate now (every process calls it); returns ``eval/*`` metrics and, on process 0,
        writes the grid (PNG + TensorBoard)."""
        local = trainer.local_indices(len(self.items))
        items = [self.items[i] for i in local]
        base = self.images(trainer, base=True)
        cur = self.images(trainer, base=False)
        out = self.compare(cur, base, items)
        if self.criteria_fn is not None:
            table = self.criteria_fn(items, cur)
            tot = sum_over_processes({"n": float(len(items)), **{k: float(np.sum(v)) for k, v in table.items()}})
            n = tot.pop("n")
            for name, v in tot.items():
                out["eval/accuracy" if name == "accuracy" else f"eval/criteria/{name}"] = v / n
        if self.outdir is not None and self.grid_prompts and is_main():
            path = self.save_grid(base, cur, local, iteration)
            if writer is not None:
                from arr_jax.data.images import to_rgb_uint8

                writer.add_image("eval/grid", to_rgb_uint8(path), iteration, dataformats="HWC")
        return out

    def save_grid(self, base: np.ndarray, cur: np.ndarray, local: np.ndarray, iteration: int) -> Path:
        """Base row over current row, one column per shown prompt (its first seed among this
        process's images); for edits a source row on top, so each edit is shown under its source.

        base, cur: uint8 (n_local, H, W, 3) in the order of ``local`` (this process's item indices).
        Returns ``<outdir>/eval_<iteration:05d>.png``."""
        from arr_jax.rpo.figures import save_grid

        first = [j for j, i in enumerate(local) if i % self.k == 0]  # positions of each prompt's first seed
        pick = [first[int(t)] for t in np.linspace(0, len(first) - 1, min(self.grid_prompts, len(first))).round()]
        shown = [self.items[local[j]] for j in pick]
        rows, labels = [base[pick], cur[pick]], ["base", f"RPO {iteration}"]
        what = "prompts"
        if any(it.source is not None for it in shown):  # an editing run: what each edit started from
            blank = np.full_like(base[0], 255)
            rows.insert(0, [blank if it.source is None else np.asarray(it.source) for it in shown])
            labels.insert(0, "source")
            what = "edits (source above each)"
        title = f"held-out {what}, same seeds: base (LoRA off) vs policy after {iteration} iterations"
        return save_grid(self.outdir / f"eval_{iteration:05d}.png", rows, labels, title,
                         col_labels=[it.text for it in shown])
