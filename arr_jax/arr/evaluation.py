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
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from arr_jax.judge import parsing
from arr_jax.judge.base import PairwiseBatch, combine_orders, flip
from arr_jax.judge.text_judge import accepts_sources

METRICS = ("acc_fwd", "acc_rev", "avg", "delta", "tie_fwd", "tie_rev", "parse_fail_fwd", "parse_fail_rev",
           "consistency", "sym_agree", "sym_agree_tie", "sym_agree_half", "sym_mean", "sym_mean_tie")


def _images(xs: list[np.ndarray]):
    return np.stack(xs) if len({x.shape for x in xs}) == 1 else xs


def judge_pairs(judge, pairs: Sequence, rubric: str | None = None, batch_size: int = 32,
                progress: bool = True, desc: str = "judging") -> dict:
    """Judge every pair in both orders. Returns per-pair arrays: label, category, fwd / rev
    winner and p_first (rev flipped to the dataset numbering), fwd / rev parse status, and
    the summed failure counts."""
    n = len(pairs)
    out = {k: [] for k in ("label", "category", "fwd", "rev", "p_fwd", "p_rev", "status_fwd", "status_rev")}
    failures: Counter = Counter()
    two_orders = getattr(judge, "compare_orders", None)
    bar = tqdm(total=n, desc=desc, unit="pair", disable=not progress)
    for s in range(0, n, batch_size):
        batch = pairs[s:s + batch_size]
        prompts = [p.prompt for p in batch]
        i1, i2 = _images([p.image1 for p in batch]), _images([p.image2 for p in batch])
        kw = {}
        if any(p.source is not None for p in batch):
            if not accepts_sources(judge):
                raise TypeError(f"judge {judge.name} cannot judge editing pairs (no 'sources' argument)")
            kw["sources"] = [p.source for p in batch]
        if two_orders is not None:
            fwd, rev, sf, sr = two_orders(prompts, i1, i2, rubric, **kw)
        else:
            fwd = judge.compare(prompts, i1, i2, rubric, **kw)
            rev = flip(judge.compare(prompts, i2, i1, rubric, **kw))
            sf = sr = [parsing.OK] * len(batch)
        failures.update({f"fwd:{k}": v for k, v in fwd.failures.items() if v})
        failures.update({f"rev:{k}": v for k, v in rev.failures.items() if v})
        out["label"] += [p.label for p in batch]
        out["category"] += [p.category or "" for p in batch]
        out["fwd"] += fwd.winner.tolist()
        out["rev"] += rev.winner.tolist()
        out["p_fwd"] += fwd.p_first.tolist()
        out["p_rev"] += rev.p_first.tolist()
        out["status_fwd"] += list(sf)
        out["status_rev"] += list(sr)
        bar.update(len(batch))
    bar.close()
    res = {k: np.asarray(v) for k, v in out.items() if not k.startswith(("status", "category"))}
    res.update(category=list(out["category"]), status_fwd=out["status_fwd"], status_rev=out["status_rev"],
               failures=dict(failures))
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
    """{"overall": metrics, "by_category": {category: metrics}, "failures": {...}}."""
    cats = np.asarray(r["category"], dtype=object)
    by = {c: metrics(r, cats == c) for c in sorted(set(r["category"])) if c}
    return {"overall": metrics(r), "by_category": by, "failures": r["failures"],
            "statuses": {"fwd": dict(Counter(r["status_fwd"])), "rev": dict(Counter(r["status_rev"]))}}


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
    fig.suptitle(report.get("title", ""), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(judge, pairs: Sequence, rubrics: dict[str, str | None], out_dir: str | Path | None = None,
             batch_size: int = 32, progress: bool = True, title: str = "", extra: dict | None = None) -> dict:
    """Evaluate ``judge`` on ``pairs`` under each condition (name -> rubric text or None);
    writes report.json, report.md and accuracy.png to ``out_dir`` when given."""
    report = {"title": title, "judge": judge.name, "n_pairs": len(pairs), "conditions": {}}
    report.update(extra or {})
    for cond, rubric in rubrics.items():
        r = judge_pairs(judge, pairs, rubric, batch_size, progress, desc=f"judging ({cond})")
        report["conditions"][cond] = summarize(r)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (out / "report.md").write_text(markdown(report), encoding="utf-8")
        bar_chart(report, out / "accuracy.png")
    return report
