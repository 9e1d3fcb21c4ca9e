"""The judge interface shared by every backend (programmatic world judge, Flax VLM judge,
HTTP API judge), plus rubric dataclasses, order-flipping helpers and failure accounting.

Convention: ``compare(prompts, images1, images2)`` judges B pairs; images are uint8
(B, H, W, 3). ``winner`` is 1 when image 1 is better, 2 when image 2 is, 0 for a
tie/undecided pair; ``p_first`` is P(image 1 better), 0.5 for a tie.

Failures: a pair whose judgement failed (an unusable answer, a non-finite score, an input that
could not be processed) has ``valid`` False, winner 0 and p_first 0.5, and is counted by kind in
``failures``; `compare` does not raise for it. Per-input errors are `InputError`s naming the
input. Long runs count failed items in a `FailureBudget`, which stops the run with
`TooManyFailuresError` once more than ``max_failure_fraction`` of them failed.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from arr_jax.judge import parsing


class InputError(ValueError):
    """One input of a batch (a request, pair, image, file line) that cannot be processed. The
    message names it; ``index`` is its position in the batch a call was given (None when not
    known); ``kind`` is the status it is counted under (`parsing.INPUT_FAILURES`)."""

    def __init__(self, message: str, index: int | None = None, kind: str = parsing.INPUT_ERROR):
        super().__init__(message)
        self.index, self.kind = index, kind


class TooManyFailuresError(RuntimeError):
    """A long run stopped because more than its ``max_failure_fraction`` of items failed."""


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
    reasons:  B free-text explanations, or None (a failed pair's names what failed).
    valid:    (B,) bool, False where the judgement failed (winner 0, p_first 0.5); default all True.
    statuses: B per-pair parse statuses (`parsing.STATUSES`), or None when the judge has none.

    Units: ``failures`` counts PAIRS (one status per pair; a symmetrised pair judged in two orders
    is still one pair, see `combine_orders`).

    A p_first that is not finite (NaN, inf) or outside [0, 1] is a failure wherever it comes
    from: the constructor sets that pair's p_first to 0.5, winner 0, valid False, and counts it
    under ``failures["non_finite"]`` / ``failures["bad_value"]``.
    """

    winner: np.ndarray
    p_first: np.ndarray
    criteria: dict[str, np.ndarray] | None = None
    failures: dict[str, int] = dataclasses.field(default_factory=dict)
    reasons: list[str] | None = None
    valid: np.ndarray | None = None
    statuses: list[str] | None = None

    def __post_init__(self):
        self.winner = np.asarray(self.winner, np.int8)
        p = np.array(self.p_first, np.float32)
        if self.winner.shape != p.shape or self.winner.ndim != 1:
            raise ValueError(f"winner {self.winner.shape} and p_first {p.shape} must both be (B,)")
        self.valid = (np.ones(p.shape, bool) if self.valid is None
                      else np.array(self.valid, bool).reshape(p.shape))
        with np.errstate(invalid="ignore"):
            non_finite = ~np.isfinite(p)
            out_of_range = ~non_finite & ((p < 0) | (p > 1))
        if non_finite.any() or out_of_range.any():
            self.failures = dict(self.failures)
            for kind, bad in ((parsing.NON_FINITE, non_finite), (parsing.BAD_VALUE, out_of_range)):
                if bad.any():
                    self.failures[kind] = self.failures.get(kind, 0) + int(bad.sum())
            bad = non_finite | out_of_range
            raw = p.copy()
            p[bad] = 0.5
            self.winner = np.where(bad, 0, self.winner).astype(np.int8)
            self.valid = self.valid & ~bad
            if self.statuses is not None:
                self.statuses = [parsing.NON_FINITE if non_finite[i] else parsing.BAD_VALUE if out_of_range[i] else st
                                 for i, st in enumerate(self.statuses)]
            if self.reasons is not None:
                self.reasons = [f"unusable P(image 1) = {raw[i]}" + (f"; {r}" if r else "") if bad[i] else r
                                for i, r in enumerate(self.reasons)]
        self.p_first = p
        if self.statuses is not None:
            self.statuses = [str(x) for x in self.statuses]
            if len(self.statuses) != p.shape[0]:
                raise ValueError(f"statuses has {len(self.statuses)} entries for {p.shape[0]} pairs")

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


def choice_probability(logp_first, logp_second) -> np.ndarray:
    """P(first choice) from the log-probabilities of two candidates (any matching shapes), the
    two renormalised: ``exp(lp1 - logaddexp(lp1, lp2))``, in float64, stable for very negative
    log-probs (one candidate at -inf gives exactly 0 or 1). NaN where it is undefined: both at
    -inf, any NaN or +inf; callers count those as failures (see `PairwiseBatch`)."""
    a = np.asarray(logp_first, np.float64)
    b = np.asarray(logp_second, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        p = np.exp(a - np.logaddexp(a, b))
    return np.where(np.isnan(a) | np.isnan(b) | (a == np.inf) | (b == np.inf), np.nan, p)


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
        valid=batch.valid.copy(),
        statuses=None if batch.statuses is None else list(batch.statuses),
    )


def combine_orders(fwd: PairwiseBatch, rev_flipped: PairwiseBatch, mode: str = "agree") -> PairwiseBatch:
    """Symmetrised judgement from a forward batch and a flipped swapped-order batch.

    mode "agree": a win only where both orders name the same winner, a tie otherwise
    (p_first = mean of the two). mode "mean": p_first = mean, winner from p_first. Either way a
    pair whose judgement failed in one order fails (winner 0, p_first 0.5, valid False): one
    order alone would bring back the positional bias symmetrising removes. ``failures`` of the
    result counts pairs, each failed pair once (see `pair_failures`), so it compares with limits
    stated in pairs.
    """
    if mode not in ("agree", "mean"):
        raise ValueError(f"unknown combine mode {mode!r}; expected 'agree' or 'mean'")
    valid = fwd.valid & rev_flipped.valid
    p = np.where(valid, 0.5 * (fwd.p_first + rev_flipped.p_first), 0.5)
    if mode == "agree":
        w = np.where((fwd.winner == rev_flipped.winner) & valid, fwd.winner, 0).astype(np.int8)
        p = np.where(w == 0, 0.5, p)
    else:
        w = np.where(valid, winner_from_p(p), 0).astype(np.int8)
    failures, statuses = pair_failures(fwd, rev_flipped, valid, w)
    reasons = None
    if fwd.reasons is not None and rev_flipped.reasons is not None:
        reasons = [f"fwd: {a} | rev: {b}" for a, b in zip(fwd.reasons, rev_flipped.reasons)]
    return PairwiseBatch(winner=w, p_first=p.astype(np.float32), criteria=fwd.criteria,
                         failures=failures, reasons=reasons, valid=valid, statuses=statuses)


def pair_failures(fwd: PairwiseBatch, rev: PairwiseBatch, valid: np.ndarray, winner: np.ndarray):
    """``failures`` of a symmetrised batch in PAIRS (a pair judged in two orders is one pair) and the
    per-pair statuses. A failed pair counts once, under the kind of its forward order when that
    failed, else of its swapped order; a usable pair counts as ``tie`` when the combined winner is 0
    and as ``fallback`` when either order answered in prose. Without per-pair statuses the failed
    pairs are attributed to kinds from the counts (forward kinds first), their total still in pairs."""
    n = len(valid)
    if fwd.statuses is not None and rev.statuses is not None:
        statuses = []
        for i in range(n):
            a, b = fwd.statuses[i], rev.statuses[i]
            if not valid[i]:
                st = a if not fwd.valid[i] else b
            elif winner[i] == 0:
                st = parsing.TIE
            elif parsing.FALLBACK in (a, b):
                st = parsing.FALLBACK
            else:
                st = a if a != parsing.OK else b
            statuses.append(st)
        return {k: v for k, v in Counter(statuses).items() if k not in (parsing.OK, parsing.REPAIRED)}, statuses
    failures: Counter = Counter()
    fail_kinds = lambda b: [(k, int(v)) for k, v in sorted(b.failures.items()) if k not in _NOT_FAILURES and v]  # noqa: E731
    budget = {"fwd": int(np.sum(~fwd.valid)), "rev": int(np.sum(fwd.valid & ~rev.valid))}
    for side, batch in (("fwd", fwd), ("rev", rev)):
        for k, v in fail_kinds(batch):
            take = min(v, budget[side])
            failures[k] += take
            budget[side] -= take
        if budget[side]:
            failures["failed"] += budget[side]
    ties = int(np.sum(valid & (winner == 0)))
    if ties:
        failures[parsing.TIE] = ties
    fb = max(int(fwd.failures.get(parsing.FALLBACK, 0)), int(rev.failures.get(parsing.FALLBACK, 0)))
    if fb:
        failures[parsing.FALLBACK] = fb
    return dict(failures), None


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
    statuses = None
    if all(b.statuses is not None for b in batches):
        statuses = [x for b in batches for x in b.statuses]
    return PairwiseBatch(
        winner=np.concatenate([b.winner for b in batches]),
        p_first=np.concatenate([b.p_first for b in batches]),
        criteria=crit, failures=failures, reasons=reasons,
        valid=np.concatenate([b.valid for b in batches]), statuses=statuses)


# --------------------------------------------------------------------------------------------
# Failure accounting over long runs

_NOT_FAILURES = (parsing.OK, parsing.REPAIRED, parsing.FALLBACK, parsing.TIE)


class FailureBudget:
    """Failed items (pairs) of a long run, counted by kind, with a cap on their fraction.

    ``add`` / ``add_batch`` record items; once at least ``min_items`` items were seen (so one
    early failure does not stop a run) and more than ``max_failure_fraction`` of them failed,
    they raise `TooManyFailuresError` with the counts, the kinds and the first failures, each
    naming its item. ``check(final=True)`` applies the cap whatever the count (at the end of a
    short run). ``max_failure_fraction`` 1.0 never stops a run; 0.0 stops at the first failure.

    Used by `arr_jax.arr.evaluation.evaluate`, `arr_jax.arr.induction.induce` and the RPO
    trainer (``budget.add_batch(judge.compare(...), names)`` after each judged batch).
    """

    def __init__(self, max_failure_fraction: float = 0.1, min_items: int = 20, what: str = "pairs",
                 keep: int = 5):
        if not 0.0 <= max_failure_fraction <= 1.0:
            raise ValueError(f"max_failure_fraction must be in [0, 1], got {max_failure_fraction}")
        if min_items < 0 or keep < 0:
            raise ValueError(f"min_items ({min_items}) and keep ({keep}) must be >= 0")
        self.max_failure_fraction, self.min_items, self.what, self.keep = (
            float(max_failure_fraction), int(min_items), what, int(keep))
        self.items = 0
        self.failed = 0
        self.kinds: Counter = Counter()
        self.first: list[str] = []

    @property
    def fraction(self) -> float:
        return self.failed / self.items if self.items else 0.0

    def add(self, n_items: int, failed: Sequence[str] = (), kinds: Mapping[str, int] | None = None,
            check: bool = True) -> None:
        """Record ``n_items`` items of which ``len(failed)`` failed; ``failed`` holds one note per
        failed item naming it; ``kinds`` counts failures by kind (default: ``{"failed": n}``)."""
        if len(failed) > n_items:
            raise ValueError(f"{len(failed)} failed items out of {n_items}")
        self.items += int(n_items)
        self.failed += len(failed)
        self.kinds.update({k: int(v) for k, v in (kinds if kinds is not None else {"failed": len(failed)}).items()
                           if v})
        self.first += [str(x)[:500] for x in failed[:max(self.keep - len(self.first), 0)]]
        if check:
            self.check()

    def add_batch(self, batch: PairwiseBatch, names: Sequence[str] | None = None, where: str = "",
                  check: bool = True) -> None:
        """Record a judged batch: its invalid pairs fail, named by ``names[i]`` (default "pair i")
        and ``where`` (e.g. "step 12: "), with the batch's reason; kinds from ``batch.failures``
        (ties and prose fallbacks are not failures)."""
        bad = np.flatnonzero(~batch.valid)
        notes = []
        for i in bad:
            name = names[i] if names is not None else f"pair {i}"
            why = batch.reasons[i] if batch.reasons is not None else ""
            notes.append(f"{where}{name}" + (f": {why}" if why else ""))
        kinds = {k: v for k, v in batch.failures.items() if v and k not in _NOT_FAILURES}
        self.add(len(batch), notes, kinds if kinds or not notes else None, check=check)

    def message(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in self.kinds.most_common())
        first = "".join(f"\n  - {x}" for x in self.first)
        return (f"{self.failed} of {self.items} {self.what} failed ({100 * self.fraction:.1f}%, more than "
                f"max_failure_fraction={self.max_failure_fraction:g}); by kind: {kinds or 'none'}; "
                f"first failures:{first or ' none recorded'}")

    def check(self, final: bool = False) -> None:
        """Raise `TooManyFailuresError` when over the cap (see the class docstring)."""
        if (final or self.items >= self.min_items) and self.failed and self.fraction > self.max_failure_fraction:
            raise TooManyFailuresError(self.message())

    def summary(self) -> dict:
        """JSON-able counts: items, failed, fraction, kinds, first (notes)."""
        return {"items": self.items, "failed": self.failed, "fraction": self.fraction,
                "kinds": dict(self.kinds), "first": list(self.first),
                "max_failure_fraction": self.max_failure_fraction}
