"""The judge interface shared by every backend (programmatic world judge, Flax VLM judge,
HTTP API judge), plus rubric dataclasses and order-flipping helpers.

Convention: ``compare(prompts, images1, images2)`` judges B pairs; images are uint8
(B, H, W, 3). ``winner`` is 1 when image 1 is better, 2 when image 2 is, 0 for a
tie/undecided pair; ``p_first`` is P(image 1 better), 0.5 for a tie.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Criterion:
    """One binary criterion, checkable on a single image."""

    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class Rubric:
    """An ordered set of criteria; ``text`` is what goes into a judge's prompt."""

    criteria: tuple[Criterion, ...]
    title: str = "Rubric"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.criteria)

    @property
    def text(self) -> str:
        lines = [f"{self.title}:"] + [f"- {c.name}: {c.text}" for c in self.criteria]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text


@dataclasses.dataclass
class PairwiseBatch:
    """Result of judging B image pairs.

    winner:   (B,) int8, 1 = image 1 better, 2 = image 2 better, 0 = tie/undecided.
    p_first:  (B,) float32, P(image 1 better); 0.5 for a tie.
    criteria: name -> (B, 2) bool per-image verdicts (column 0 = image 1), or None.
    failures: counted failures by kind (parse errors, unreadable images, ...).
    reasons:  B free-text explanations, or None.
    """

    winner: np.ndarray
    p_first: np.ndarray
    criteria: dict[str, np.ndarray] | None = None
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    reasons: list[str] | None = None

    def __post_init__(self):
        self.winner = np.asarray(self.winner, np.int8)
        self.p_first = np.asarray(self.p_first, np.float32)
        if self.winner.shape != self.p_first.shape or self.winner.ndim != 1:
            raise ValueError(f"winner {self.winner.shape} and p_first {self.p_first.shape} "
                             "must both be (B,)")

    def __len__(self) -> int:
        return int(self.winner.shape[0])


@runtime_checkable
class Judge(Protocol):
    """Pairwise judge. images1/images2: uint8 (B, H, W, 3); rubric: text for the judge's
    system prompt (backends that derive their own criteria may ignore it)."""

    name: str

    def compare(
        self,
        prompts: Sequence[str],
        images1: np.ndarray,
        images2: np.ndarray,
        rubric: str | None = None,
    ) -> PairwiseBatch: ...


def winner_from_p(p_first: np.ndarray, tie_band: float = 0.0) -> np.ndarray:
    """(B,) float P(image 1 better) -> (B,) int8 winner; |p - 0.5| <= tie_band is a tie."""
    p = np.asarray(p_first, np.float32)
    w = np.where(p > 0.5 + tie_band, 1, np.where(p < 0.5 - tie_band, 2, 0))
    return w.astype(np.int8)


def flip_winner(winner: np.ndarray) -> np.ndarray:
    """Swap the roles of image 1 and image 2 in a (B,) winner array (0 stays 0)."""
    w = np.asarray(winner, np.int8)
    return np.where(w == 0, 0, 3 - w).astype(np.int8)


def flip(batch: PairwiseBatch) -> PairwiseBatch:
    """Re-express a batch judged on (images2, images1) in the (images1, images2) order.

    Used for swapped-order (rev) evaluation: judge the swapped pair, then flip to compare
    with the forward judgement. Reasons are kept verbatim (they refer to the judged order).
    """
    crit = None
    if batch.criteria is not None:
        crit = {k: np.asarray(v)[:, ::-1].copy() for k, v in batch.criteria.items()}
    return PairwiseBatch(
        winner=flip_winner(batch.winner),
        p_first=1.0 - batch.p_first,
        criteria=crit,
        failures=dict(batch.failures),
        reasons=None if batch.reasons is None else list(batch.reasons),
    )


def combine_orders(fwd: PairwiseBatch, rev_flipped: PairwiseBatch, mode: str = "agree") -> PairwiseBatch:
    """Symmetrised judgement from a forward batch and a flipped swapped-order batch.

    mode "agree": a win only where both orders name the same winner, a tie otherwise
    (p_first = mean of the two). mode "mean": p_first = mean, winner from p_first.
    """
    p = 0.5 * (fwd.p_first + rev_flipped.p_first)
    if mode == "agree":
        w = np.where(fwd.winner == rev_flipped.winner, fwd.winner, 0).astype(np.int8)
        p = np.where(w == 0, 0.5, p)
    elif mode == "mean":
        w = winner_from_p(p)
    else:
        raise ValueError(f"unknown combine mode {mode!r}; expected 'agree' or 'mean'")
    failures = dict(fwd.failures)
    for k, v in rev_flipped.failures.items():
        failures[k] = failures.get(k, 0) + v
    reasons = None
    if fwd.reasons is not None and rev_flipped.reasons is not None:
        reasons = [f"fwd: {a} | rev: {b}" for a, b in zip(fwd.reasons, rev_flipped.reasons)]
    return PairwiseBatch(winner=w, p_first=p.astype(np.float32), criteria=fwd.criteria,
                         failures=failures, reasons=reasons)


def concat(batches: Sequence[PairwiseBatch]) -> PairwiseBatch:
    """Concatenate batches along B (failures summed; criteria kept where all have them)."""
    if not batches:
        raise ValueError("concat of no batches")
    crit = None
    if all(b.criteria is not None for b in batches):
        names = set(batches[0].criteria)
        if all(set(b.criteria) == names for b in batches):
            crit = {k: np.concatenate([b.criteria[k] for b in batches]) for k in batches[0].criteria}
    failures: dict[str, int] = {}
    for b in batches:
        for k, v in b.failures.items():
            failures[k] = failures.get(k, 0) + v
    reasons = None
    if all(b.reasons is not None for b in batches):
        reasons = [r for b in batches for r in b.reasons]
    return PairwiseBatch(
        winner=np.concatenate([b.winner for b in batches]),
        p_first=np.concatenate([b.p_first for b in batches]),
        criteria=crit, failures=failures, reasons=reasons)
