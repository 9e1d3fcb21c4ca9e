"""The CPU demo: the whole ARR-RPO path on the synthetic world, judged criterion by criterion.

    python -m arr_jax.demo [--config configs/demo.py] [--config.rpo.iterations=60]

1. ARR: induce a rubric file from labelled world pairs with the world's programmatic "VLM"
   (`arr_jax.arr.induction`, seconds; resumable);
2. the base policy on held-out prompts with fixed seeds;
3. RPO with the text judge over the world backend, conditioned on that rubric, through the same
   code as ``python -m arr_jax.train`` (`arr_jax.rpo.run`);
4. the RPO policy on the same prompts and seeds; ``report.json`` (accuracies, paired gain, per
   criterion, the rubric file and its sha256), curves and the before/after grid in ``workdir``;
   the two accuracies printed last.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

CURVE_KEYS = ("eval/accuracy", "eval/win_rate",
              ("eval/criteria/colour", "eval/criteria/shape", "eval/criteria/count", "eval/criteria/position"),
              "decisive_rate", "kl", "clip_frac")


def run(cfg) -> dict:
    from arr_jax.arr.induction import induce_from_config
    from arr_jax.rpo.figures import save_before_after, save_curves
    from arr_jax.rpo.run import build_run, train
    from arr_jax.world.evaluate import criteria_table, paired_comparison, summarize
    from arr_jax.world.judge import WorldJudge

    t0 = time.perf_counter()
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)

    # 1. ARR: the rubric file the reward judge reads
    rubric_file = induce_from_config(cfg.induce)
    run_ = build_run(cfg)
    trainer = run_.trainer
    checker = WorldJudge()
    k = cfg.eval.report_seeds
    prompts = [it.text for it in run_.eval_prompts]
    ev_prompts = [p for p in prompts for _ in range(k)]
    ev_seeds = [10_000 + 100 * i + s for i in range(len(prompts)) for s in range(k)]

    # 2. the base policy on held-out prompts (LoRA off = the base weights exactly)
    base_imgs = trainer.generate(ev_prompts, ev_seeds, use_reference=True, sampler=cfg.eval.sampler)
    base_tab = criteria_table(checker, ev_prompts, base_imgs)
    base_sum = summarize(base_tab)
    print(f"base policy, held-out: accuracy {base_sum['accuracy']:.3f} "
          + " ".join(f"{n.split('/')[1]}={v:.2f}" for n, v in base_sum.items() if n.startswith("criteria/")))

    # 3. RPO (resumes from workdir/checkpoints if a run was interrupted)
    history = train(run_)

    # 4. the RPO policy on the same prompts and seeds
    rpo_imgs = trainer.generate(ev_prompts, ev_seeds, sampler=cfg.eval.sampler)
    rpo_tab = criteria_table(checker, ev_prompts, rpo_imgs)
    rpo_sum = summarize(rpo_tab)
    cmp = paired_comparison(base_tab, rpo_tab)
    save_curves(work / "reward_curve.png", history, CURVE_KEYS,
                "RPO on the synthetic world (held-out prompts every eval_every iterations)")
    per = min(k, 4)
    shown = np.linspace(0, len(prompts) - 1, min(cfg.eval.grid_prompts, len(prompts))).round().astype(int)
    crits = ("colour", "shape", "count", "position")

    def block(x):  # (P*k, ...) -> the shown prompts' first `per` seeds, (len(shown), per, ...)
        return np.asarray(x).reshape(len(prompts), k, *np.shape(x)[1:])[shown, :per]

    save_before_after(work / "before_after.png", [prompts[i] for i in shown], block(base_imgs), block(rpo_imgs),
                      f"held-out prompts, same seeds: base (accuracy {base_sum['accuracy']:.2f}) vs RPO "
                      f"(accuracy {rpo_sum['accuracy']:.2f})",
                      checks_base={c: block(base_tab[c]) for c in crits},
                      checks_rpo={c: block(rpo_tab[c]) for c in crits})
    report = {
        "base_accuracy": base_sum["accuracy"], "rpo_accuracy": rpo_sum["accuracy"],
        "gain": cmp["gain"], "gain_se": cmp["gain_se"], "gain_z": cmp["gain_z"], "n_images": cmp["n_images"],
        "steps": int(trainer.iteration), "seconds": time.perf_counter() - t0,
        "rubric": {"path": run_.judge.identity["rubric_path"], "sha256": run_.judge.rubric_sha256,
                   "themes": [t.name for t in rubric_file.themes]},
        "judge": run_.judge.identity,
        "base": base_sum, "rpo": rpo_sum, "paired": cmp,
        "eval": {"prompts": prompts, "seeds_per_prompt": k, "sampler": cfg.eval.sampler,
                 "heldout_prompts_never_used_in_pretraining_or_rpo": not cfg.eval.prompts_file},
        "rpo_settings": cfg.rpo.to_dict(), "departures_from_paper": list(cfg.rpo.departures),
        "base_policy": run_.policy.info,
        "counters": dict(trainer.counters),
        "best_iteration": (history[-1].get("best_iteration") if history else None),
        "quality_check": {  # held-out, not part of the reward unless the rubric names it
            "name": "clean_background", "base": base_sum["criteria/clean_background"],
            "rpo": rpo_sum["criteria/clean_background"], "change": cmp["gain/clean_background"],
            "change_se": cmp["gain_se/clean_background"]},
        "last_metrics": history[-1] if history else {},
    }
    from arr_jax.checkpoint import atomic_write_text

    atomic_write_text(work / "report.json", json.dumps(report, indent=2, default=float))
    print(f"rubric {report['rubric']['path']} (sha256 {str(report['rubric']['sha256'])[:12]}): "
          f"{', '.join(report['rubric']['themes'])}")
    print(f"wrote {work / 'report.json'}, {work / 'reward_curve.png'}, {work / 'before_after.png'}, "
          f"{work / 'reward_and_win_rate.png'}")
    print(f"clean background (held-out quality check): base {base_sum['criteria/clean_background']:.3f} -> RPO "
          f"{rpo_sum['criteria/clean_background']:.3f} ({100 * cmp['gain/clean_background']:+.1f} ± "
          f"{100 * cmp['gain_se/clean_background']:.1f} points)")
    print("per criterion: " + ", ".join(f"{c} {100 * cmp[f'gain/{c}']:+.1f} ± {100 * cmp[f'gain_se/{c}']:.1f}"
                                        for c in ("colour", "shape", "count", "position")))
    print(f"gain {100 * cmp['gain']:+.1f} points ± {100 * cmp['gain_se']:.1f} (paired SE, n={cmp['n_images']})")
    print(f"base_accuracy {base_sum['accuracy']:.4f}")
    print(f"rpo_accuracy  {rpo_sum['accuracy']:.4f}")
    return report


def main(argv):
    del argv
    from arr_jax.cli import config_from_flags

    run(config_from_flags())


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
