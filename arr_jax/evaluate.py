"""Judge evaluation: pairwise accuracy fwd / swapped / mean / gap, with and without a rubric.

    python -m arr_jax.evaluate --config configs/evaluate_world.py
    python -m arr_jax.evaluate --config configs/evaluate_world.py:api \\
        --config.backend.openai.model=gpt-5 --config.data.kind=jsonl --config.data.path=test.jsonl \\
        --config.rubric=runs/arr_world/rubric.txt

Writes ``<workdir>/report.{md,json}`` and ``accuracy.png`` (see `arr_jax.arr.evaluation`).
Conditions: "direct" (no rubric) and "rubric" (the rubric file's text in the judge prompt).
"""
from __future__ import annotations

import hashlib
import time

from arr_jax import cli
from arr_jax.arr.evaluation import evaluate
from arr_jax.arr.induction import backend_identity
from arr_jax.data.pairs import make_pairs
from arr_jax.judge.factory import load_rubric, make_backend
from arr_jax.judge.templates import TemplateSet
from arr_jax.judge.text_judge import TextJudge


def make_judge(cfg):
    """A TextJudge over the configured backend; backend.kind "world_programmatic" gives the
    world's WorldJudge itself (ignores rubrics; a reference ceiling)."""
    if cfg.backend.kind == "world_programmatic":
        from arr_jax.world.judge import WorldJudge

        return WorldJudge()
    j = cfg.judge
    return TextJudge(make_backend(cfg.backend), mode=j.mode, templates=TemplateSet(j.templates_dir or None),
                     task_description=j.task_description or None, choice_scores=j.get("choice_scores", False))


def run(cfg) -> dict:
    """Evaluate as ``cfg`` says; returns the report dict (also written under cfg.workdir)."""
    for key in ("data", "backend", "judge", "conditions"):
        if key not in cfg:
            raise ValueError(f"config has no '{key}' key: pass --config configs/evaluate_world.py (or your own)")
    t0 = time.perf_counter()
    from arr_jax.progress import stage

    pairs = make_pairs(cfg.data)
    sub = cfg.backend.get(cfg.backend.kind, None) or {}
    model = sub.get("model_dir", "") or sub.get("model", "")
    with stage(f"loading the {cfg.backend.kind} judge" + (f" ({model})" if model else "")):
        judge = make_judge(cfg)
    rubrics, rubric_info = {}, None
    for cond in cfg.conditions:
        if cond == "direct":
            rubrics[cond] = None
        elif cond == "rubric":
            if not cfg.rubric:
                raise ValueError("bad config value rubric: empty, but conditions include 'rubric'")
            text = load_rubric(cfg.rubric)
            rubrics[cond] = text
            rubric_info = {"path": str(cfg.rubric), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        else:
            raise ValueError(f"bad config value conditions: {cond!r} (expected 'direct' and/or 'rubric')")
    report = evaluate(judge, pairs, rubrics, out_dir=cfg.workdir, batch_size=cfg.batch_size,
                      progress=cfg.get("progress", True), title=cfg.get("title", ""),
                      max_failure_fraction=cfg.get("max_failure_fraction", 0.1),
                      extra={"rubric": rubric_info, "config": cfg.to_dict(),
                             "backend": backend_identity(cfg.backend)})
    print(f"judge {report['judge']} on {len(pairs)} pairs ({time.perf_counter() - t0:.1f}s); accuracy in %:")
    for cond, res in report["conditions"].items():
        m = res["overall"]
        print(f"  {cond:>8}: fwd {100 * m['acc_fwd']:.1f}  rev {100 * m['acc_rev']:.1f}  avg {100 * m['avg']:.1f}  "
              f"delta {100 * m['delta']:+.1f}  sym-agree {100 * m['sym_agree']:.1f} "
              f"(ties {100 * m['sym_agree_tie']:.1f})  parse-fail {100 * m['parse_fail_fwd']:.1f}/"
              f"{100 * m['parse_fail_rev']:.1f}")
    fp = report["failed_pairs"]
    if fp["failed"]:
        print(f"  {fp['failed']} of {fp['items']} judged pairs failed and count as ties ({fp['kinds']}); "
              f"first: {fp['first'][0]}")
    print(f"report: {cfg.workdir}/report.md, report.json, accuracy.png")
    return report


def main(argv):
    del argv
    run(cli.config_from_flags())


if __name__ == "__main__":
    cli.run_main(main)
