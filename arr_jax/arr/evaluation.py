"""Judge evaluation on labelled pairs with the paper's positional-bias protocol (SPEC §1.7).

Every pair is judged in the dataset order (fwd) and swapped (rev); the swapped verdict is
flipped back to the dataset numbering. Reported, overall and per category, in [0, 1]:

  acc_fwd, acc_rev     fraction of pairs whose verdict names the labelled image (a tie is wrong)
  avg, delta           (fwd + rev) / 2 (the paper's headline) and fwd - rev
  tie_fwd, tie_rev     fraction of undecided verdicts (ties and unusable answers)
  parse_fail_fwd/rev   fraction of unusable answers (parse failures; text judges only)
  consistency          fraction decided the same way in both orders
  sym_agree            symmetrised judge (ours): a win only when both orders agree, else a tie;
                       sym_agree_half counts its ties as half right
  sym_mean             symmetrised by the mean of the two orders' P(image 1 better)

A text judge scores both orders in one batched backend call (`TextJudge.compare_orders`).

One bad pair (an image that cannot be read or used, a request the server rejects, a reply that
is no answer) never stops an evaluation: it is judged a tie, counted by kind, and named in the
report's ``errors``; ``max_failure_fraction`` (default 0.1) of such pairs stops the run with
`arr_jax.judge.base.TooManyFailuresError` naming the counts and the first failures. Unparseable
answers are the measurement (``parse_fail_*``), not errors.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from arr_jax.judge import parsing
from arr_jax.judge.base import FailureBudget, PairwiseBatch, combine_orders, concat, flip
from arr_jax.judge.text_judge import accepts_sources

log = logging.getLogger(__name__)

METRICS = ("acc_fwd", "acc_rev", "avg", "delta", "tie_fwd", "tie_rev", "parse_fail_fwd", "parse_fail_rev",
           "consistency", "sym_agree", "sym_agree_tie", "sym_agree_half", "sym_mean", "sym_mean_tie")


def _images(xs: list[np.ndarray]):
    return np.stack(xs) if len({x.shape for x in xs}) == 1 else xs


def _judge_both(judge, batch: Sequence, rubric: str | None):
    """(fwd, rev flipped, fwd statuses, rev statuses) of a batch of pairs."""
    prompts = [p.prompt for p in batch]
    i1, i2 = _images([p.image1 for p in batch]), _images([p.image2 for p in batch])
    kw = {}
    if any(p.source is not None for p in batch):
        if not accepts_sources(judge):
            raise TypeError(f"judge {judge.name} cannot judge editing pairs (no 'sources' argument)")
        kw["sources"] = [p.source for p in batch]
    two_orders = getattr(judge, "compare_orders", None)
    if two_orders is not None:
        return two_orders(prompts, i1, i2, rubric, **kw)
    fwd = judge.compare(prompts, i1, i2, rubric, **kw)
    rev = flip(judge.compare(prompts, i2, i1, rubric, **kw))
    status = lambda b: [parsing.OK if v else parsing.INPUT_ERROR for v in b.valid]  # noqa: E731
    return fwd, rev, status(fwd), status(rev)


def _failed_pair(pair_id: str, err: Exception):
    kind = getattr(err, "kind", parsing.INPUT_ERROR)
    why = f"pair {pair_id}: {err}"
    log.warning("judging failed (%s): %s", kind, why)
    b = PairwiseBatch(winner=[0], p_first=[0.5], failures={kind: 1}, reasons=[why], valid=[False])
    return b, b, [kind], [kind]


def _judge_isolated(judge, batch: Sequence, rubric: str | None):
    """`_judge_both`, except that a ValueError for the batch (one bad input) judges its pairs one
    at a time, and a pair that still fails is a failed pair (winner 0) naming it."""
    try:
        return _judge_both(judge, batch, rubric)
    except ValueError as e:
        if len(batch) == 1:
            return _failed_pair(batch[0].id, e)
    parts = []
    for p in batch:
        try:
            parts.append(_judge_both(judge, [p], rubric))
        except ValueError as e:
            parts.append(_failed_pair(p.id, e))
    return (concat([x[0] for x in parts]), concat([x[1] for x in parts]),
            [s for x in parts for s in x[2]], [s for x in parts for s in x[3]])


def _load(pairs: Sequence, lo: int, hi: int, ids: Sequence[str]) -> tuple[list, list[str]]:
    """Pairs lo..hi-1, and notes naming the ones that could not be read (left out)."""
    try:
        return list(pairs[lo:hi]), []
    except (OSError, ValueError, KeyError):
        pass
    got, bad = [], []
    for i in range(lo, hi):
        try:
            got.append(pairs[i])
        except (OSError, ValueError, KeyError) as e:
            bad.append(f"pair {ids[i] if ids else i} (index {i}): could not be read: {type(e).__name__}: {e}")
            log.warning("%s", bad[-1])
    return got, bad


def judge_pairs(judge, pairs: Sequence, rubric: str | None = None, batch_size: int = 32,
                progress: bool = True, desc: str = "judging", budget: FailureBudget | None = None) -> dict:
    """Judge every pair in both orders. Returns per-pair arrays: label, category, fwd / rev
    winner and p_first (rev flipped to the dataset numbering), fwd / rev status, the summed
    failure counts, and ``errors``: notes naming each pair that failed for a reason other than
    its answer's format (`parsing.RUN_ERRORS`: an input that could not be processed, a reply that
    is no answer, a non-finite score) or that could not be read (left out of the arrays).

    One bad pair never stops the run: a batch the judge refuses (ValueError) is judged pair by
    pair. ``budget`` (a `FailureBudget`) counts those failures per batch and stops the run with
    `TooManyFailuresError` when they pass its cap."""
    n = len(pairs)
    out = {k: [] for k in ("label", "category", "fwd", "rev", "p_fwd", "p_rev", "status_fwd", "status_rev")}
    failures: Counter = Counter()
    errors: list[str] = []
    ids = list(getattr(pairs, "ids", None) or [])
    bar = tqdm(total=n, desc=desc, unit="pair", disable=not progress)
    for s in range(0, n, batch_size):
        batch, unread = _load(pairs, s, min(s + batch_size, n), ids)
        failures.update({"load_error": len(unread)} if unread else {})
        notes, kinds = list(unread), Counter({"load_error": len(unread)} if unread else {})
        if batch:
            fwd, rev, sf, sr = _judge_isolated(judge, batch, rubric)
            failures.update({f"fwd:{k}": v for k, v in fwd.failures.items() if v})
            failures.update({f"rev:{k}": v for k, v in rev.failures.items() if v})
            for i, p in enumerate(batch):
                order, b = ((fwd, sf[i]) if sf[i] in parsing.RUN_ERRORS else
                            (rev, sr[i]) if sr[i] in parsing.RUN_ERRORS else (None, None))
                if order is not None:  # an error in either order fails the pair (counted once, by its kind)
                    kinds[b] += 1
                    why = order.reasons[i] if order.reasons is not None else ""
                    notes.append(why if str(why).startswith("pair ") else f"pair {p.id}: {b}: {why}")
            out["label"] += [p.label for p in batch]
            out["category"] += [p.category or "" for p in batch]
            out["fwd"] += fwd.winner.tolist()
            out["rev"] += rev.winner.tolist()
            out["p_fwd"] += fwd.p_first.tolist()
            out["p_rev"] += rev.p_first.tolist()
            out["status_fwd"] += list(sf)
            out["status_rev"] += list(sr)
        errors += notes
        if budget is not None:
            budget.add(len(batch) + len(unread), notes, kinds)
        bar.update(len(batch) + len(unread))
    bar.close()
    res = {k: np.asarray(v) for k, v in out.items() if not k.startswith(("status", "category"))}
    res["label"] = res["label"].astype(np.int64)
    res["fwd"], res["rev"] = res["fwd"].astype(np.int8), res["rev"].astype(np.int8)
    res.update(category=list(out["category"]), status_fwd=out["status_fwd"], status_rev=out["status_rev"],
               failures=dict(failures), errors=errors)
    return res


def metrics(r: dict, sel: np.ndarray | None = None) -> dict:
    """The METRICS over the pairs selected by the boolean mask ``sel`` (all by default)."""
    sel = np.ones(len(r["label"]), bool) if sel is None else np.asarray(sel, bool)
    lab, f, v = r["label"][sel], r["fwd"][sel], r["rev"][sel]
    n = int(sel.sum())
    if n == 0:
        return {"n": 0}
    fb = PairwiseBatch(winner=f, p_first=r["p_fwd"][sel])
    rb = PairwiseBatch(winner=v, p_first=r["p_rev"][sel])
    agree, mean = combine_orders(fb, rb, "agree").winner, combine_orders(fb, rb, "mean").winner
    bad = lambda st: np.array([s in parsing.FAILURES for s, m in zip(st, sel) if m])  # noqa: E731
    m = {"n": n, "acc_fwd": float(np.mean(f == lab)), "acc_rev": float(np.mean(v == lab)),
         "tie_fwd": float(np.mean(f == 0)), "tie_rev": float(np.mean(v == 0)),
         "parse_fail_fwd": float(bad(r["status_fwd"]).mean()), "parse_fail_rev": float(bad(r["status_rev"]).mean()),
         "consistency": float(np.mean((f == v) & (f != 0))),
         "sym_agree": float(np.mean(agree == lab)), "sym_agree_tie": float(np.mean(agree == 0)),
         "sym_mean": float(np.mean(mean == lab)), "sym_mean_tie": float(np.mean(mean == 0))}
    m["avg"] = 0.5 * (m["acc_fwd"] + m["acc_rev"])
    m["delta"] = m["acc_fwd"] - m["acc_rev"]
    m["sym_agree_half"] = m["sym_agree"] + 0.5 * m["sym_agree_tie"]
    return m


def summarize(r: dict) -> dict:
    """{"overall": metrics, "by_category": {category: metrics}, "failures": {...}, "statuses",
    "errors": notes naming failed pairs (at most 50)}."""
    cats = np.asarray(r["category"], dtype=object)
    by = {c: metrics(r, cats == c) for c in sorted(set(r["category"])) if c}
    return {"overall": metrics(r), "by_category": by, "failures": r["failures"],
            "statuses": {"fwd": dict(Counter(r["status_fwd"])), "rev": dict(Counter(r["status_rev"]))},
            "n_errors": len(r.get("errors", [])), "errors": list(r.get("errors", []))[:50]}


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def markdown(report: dict) -> str:
    """The report as markdown tables (percentages)."""
    lines = [f"# Judge evaluation: {report.get('title', '')}", "",
             f"judge `{report['judge']}`, {report['n_pairs']} pairs. Accuracy in %; rev is judged on swapped "
             "images and flipped back; Δ = fwd − rev; sym = both orders combined (ours).", "",
             "| condition | n | fwd | rev | avg | Δ | sym-agree (ties) | sym-agree ½ | sym-mean | tie fwd/rev | "
             "parse fail fwd/rev |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for cond, res in report["conditions"].items():
        m = res["overall"]
        lines.append(f"| {cond} | {m['n']} | {_pct(m['acc_fwd'])} | {_pct(m['acc_rev'])} | {_pct(m['avg'])} | "
                     f"{_pct(m['delta'])} | {_pct(m['sym_agree'])} ({_pct(m['sym_agree_tie'])}) | "
                     f"{_pct(m['sym_agree_half'])} | {_pct(m['sym_mean'])} | {_pct(m['tie_fwd'])}/{_pct(m['tie_rev'])} | "
                     f"{_pct(m['parse_fail_fwd'])}/{_pct(m['parse_fail_rev'])} |")
    cats = sorted({c for res in report["conditions"].values() for c in res["by_category"]})
    if cats:
        lines += ["", "## Per category", "", "| category | condition | n | fwd | rev | avg | Δ | sym-agree |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in cats:
            for cond, res in report["conditions"].items():
                m = res["by_category"].get(c)
                if m and m["n"]:
                    lines.append(f"| {c} | {cond} | {m['n']} | {_pct(m['acc_fwd'])} | {_pct(m['acc_rev'])} | "
                                 f"{_pct(m['avg'])} | {_pct(m['delta'])} | {_pct(m['sym_agree'])} |")
    lines += ["", "## Answer statuses", ""]
    for cond, res in report["conditions"].items():
        lines.append(f"- {cond}: fwd {res['statuses']['fwd']}, rev {res['statuses']['rev']}")
    if any(res.get("n_errors") for res in report["conditions"].values()):
        lines += ["", "## Failed pairs (judged as ties)", ""]
        for cond, res in report["conditions"].items():
            if res.get("n_errors"):
                lines.append(f"- {cond}: {res['n_errors']} pairs")
                lines += [f"  - {e}" for e in res["errors"][:10]]
    if report.get("rubric"):
        lines += ["", f"Rubric: `{report['rubric'].get('path', '')}` (sha256 {report['rubric'].get('sha256', '')[:12]})"]
    return "\n".join(lines) + "\n"


def bar_chart(report: dict, path: str | Path) -> None:
    """Grouped bars (fwd, rev, avg, sym-agree ½) per condition, plus avg per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(report["conditions"])
    keys = [("acc_fwd", "fwd"), ("acc_rev", "rev"), ("avg", "avg"), ("sym_agree_half", "sym-agree ½")]
    cats = sorted({c for r in report["conditions"].values() for c in r["by_category"]})
    fig, axes = plt.subplots(1, 2 if cats else 1, figsize=(11 if cats else 6, 3.6), squeeze=False)
    ax = axes[0, 0]
    w = 0.8 / len(keys)
    for j, (k, lab) in enumerate(keys):
        vals = [100 * report["conditions"][c]["overall"][k] for c in conds]
        bars = ax.bar(np.arange(len(conds)) + (j - (len(keys) - 1) / 2) * w, vals, w, label=lab)
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(np.arange(len(conds)), conds)
    ax.set_ylim(0, 122)
    ax.set_ylabel("pairwise accuracy (%)")
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    ax.set_title("fwd / rev / mean", fontsize=9)
    if cats:
        ax = axes[0, 1]
        w = 0.8 / len(conds)
        for j, c in enumerate(conds):
            vals = [100 * report["conditions"][c]["by_category"].get(k, {}).get("avg", 0.0) for k in cats]
            ax.bar(np.arange(len(cats)) + (j - (len(conds) - 1) / 2) * w, vals, w, label=c)
        ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 122)
        ax.legend(fontsize=7, ncol=len(conds), loc="upper center")
        ax.set_title("avg per category", fontsize=9)
    from arr_jax.rpo.figures import fit_text

    fig.suptitle(fit_text(report.get("title", ""), fig.get_figwidth() - 0.3, 9), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(judge, pairs: Sequence, rubrics: dict[str, str | None], out_dir: str | Path | None = None,
             batch_size: int = 32, progress: bool = True, title: str = "", extra: dict | None = None,
             max_failure_fraction: float = 0.1, min_items: int = 20) -> dict:
    """Evaluate ``judge`` on ``pairs`` under each condition (name -> rubric text or None);
    writes report.json, report.md and accuracy.png to ``out_dir`` when given. Failed pairs (see
    `judge_pairs`) are counted over all conditions; more than ``max_failure_fraction`` of them
    (once ``min_items`` pairs were judged, and at the end) raises `TooManyFailuresError`."""
    report = {"title": title, "judge": judge.name, "n_pairs": len(pairs), "conditions": {}}
    report.update(extra or {})
    budget = FailureBudget(max_failure_fraction, min_items, what="judged pairs (over all conditions)")
    for cond, rubric in rubrics.items():
        r = judge_pairs(judge, pairs, rubric, batch_size, progress, desc=f"judging ({cond})", budget=budget)
        report["conditions"][cond] = summarize(r)
    budget.check(final=True)
    report["failed_pairs"] = budget.summary()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        from arr_jax.checkpoint import atomic_write_text

        atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str) + "\n")
        (out / "report.md").write_text(markdown(report), encoding="utf-8")
        bar_chart(report, out / "accuracy.png")
    return report
