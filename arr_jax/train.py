"""RPO training entry point (the loop the demo runs between its two evaluations).

    python -m arr_jax.train --config configs/demo.py [--config.rpo.iterations=60]

Every ``rpo.checkpoint_every`` iterations the full state (LoRA/params, optimiser, RNG,
iteration = data position, metric history) is saved with orbax; a rerun with the same
``workdir`` resumes and ends with the same parameters as an uninterrupted run.

Every ``rpo.eval_every`` iterations the policy plays the base policy on a fixed probe of
*train* prompts (same seeds; ``rpo.probe_prompts`` of them); with ``rpo.keep_best`` the
trainable weights with the best probe accuracy (criteria satisfied) are kept in
``workdir/best`` and are what the run returns (early stopping on training prompts; held-out
prompts are never looked at).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from arr_jax.world import spec
from arr_jax.world.evaluate import REWARD_CRITERIA


def train_prompt_sampler(cfg):
    """Prompts of iteration ``it``: a deterministic function of (seed, it), so resume is exact."""
    train = [p.text for p in spec.TRAIN_PROMPTS]

    def sample(it: int) -> list[str]:
        rng = np.random.default_rng([cfg.seed, 1, it])
        return [train[i] for i in rng.integers(0, len(train), cfg.rpo.pairs_per_batch)]

    return sample


def probe_set(num_prompts: int = 108, seeds: int = 1) -> tuple[list[str], list[int]]:
    """The probe: ``num_prompts`` train prompts spread over the whole grammar × ``seeds`` seeds."""
    train = [p.text for p in spec.TRAIN_PROMPTS]
    pick = np.linspace(0, len(train) - 1, min(num_prompts, len(train))).round().astype(int)
    ps = [train[i] for i in pick for _ in range(seeds)]
    return ps, list(range(len(ps)))


def train_rpo(cfg, trainer, judge) -> list[dict]:
    """Run RPO iterations up to ``cfg.rpo.iterations`` with TensorBoard, progress bar, checkpoints.

    With ``cfg.rpo.keep_best`` the trainer ends holding the probe-best weights, and the returned
    history's last entry records which iteration that was (``best_iteration``)."""
    from tensorboardX import SummaryWriter
    from tqdm.auto import tqdm

    from arr_jax.checkpoint import Checkpointer

    work = Path(cfg.workdir)
    writer = SummaryWriter(str(work / "tensorboard"))
    signature = {"model": cfg.model.to_dict(), "lora_rank": cfg.rpo.lora_rank,
                 "full_finetune": cfg.rpo.full_finetune}
    ckpt = Checkpointer((work / "checkpoints").absolute(), max_to_keep=2, model_signature=signature)
    history: list[dict] = []
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(trainer.state_dict())
        trainer.load_state_dict(state)
        history = list(extra.get("history", []))
        print(f"resumed RPO from iteration {trainer.iteration} ({work / 'checkpoints'})")
    prompts_at = train_prompt_sampler(cfg)
    keep_best = bool(cfg.rpo.get("keep_best", False)) and bool(cfg.rpo.eval_every)
    best_ckpt = Checkpointer((work / "best").absolute(), max_to_keep=1, model_signature=signature)
    best = {"iteration": -1, "score": -1.0}
    if keep_best and best_ckpt.latest_step() is not None:
        _, best = best_ckpt.restore({"trainable": trainer.trainable})
    probe_p, probe_s = probe_set(int(cfg.rpo.get("probe_prompts", 108)))
    probe_ref = None  # the base policy's probe images: fixed, generated once
    bar = tqdm(total=cfg.rpo.iterations, initial=trainer.iteration, desc="RPO", dynamic_ncols=True)
    while trainer.iteration < cfg.rpo.iterations:
        it = trainer.iteration
        m = trainer.step(prompts_at(it))
        m["iteration"] = it
        crit = [m[f"criteria/{c}"] for c in REWARD_CRITERIA if f"criteria/{c}" in m]
        if crit:  # the training-prompt learning curve (held-out prompts are never looked at here)
            m["criteria_satisfied"] = float(np.mean(crit))
        if cfg.rpo.eval_every and (it % cfg.rpo.eval_every == 0 or it + 1 == cfg.rpo.iterations):
            if probe_ref is None:
                probe_ref = trainer.generate(probe_p, probe_s, use_reference=True, sampler=cfg.eval.sampler)
            cur = trainer.generate(probe_p, probe_s, sampler=cfg.eval.sampler)
            res = judge.compare(probe_p, cur, probe_ref)
            m["win_rate_vs_base"] = float(np.mean(res.winner == 1) + 0.5 * np.mean(res.winner == 0))
            sat = {c: res.criteria[c] for c in REWARD_CRITERIA if c in res.criteria}
            if sat:  # criteria satisfied on the probe: (n, 2) = (current, base) per criterion
                m["probe_accuracy"] = float(np.mean([v[:, 0] for v in sat.values()]))
                m["probe_accuracy_base"] = float(np.mean([v[:, 1] for v in sat.values()]))
            score = m.get("probe_accuracy", m["win_rate_vs_base"])
            if keep_best and score >= best["score"]:
                best = {"iteration": it + 1, "score": score}
                if it + 1 not in best_ckpt.all_steps():  # a resumed run replays identical steps
                    best_ckpt.save(it + 1, {"trainable": trainer.trainable}, extra=best, force=True)
        history.append(m)
        for k, v in m.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(k, v, it)
        bar.update(1)
        bar.set_postfix(sat=f"{m.get('criteria_satisfied', float('nan')):.3f}", tie=f"{m['tie_rate']:.2f}",
                        kl=f"{m['kl']:.2e}", clip=f"{m['clip_frac']:.2f}")
        if (it + 1) % cfg.rpo.checkpoint_every == 0 or it + 1 == cfg.rpo.iterations:
            ckpt.save(it + 1, trainer.state_dict(), extra={"history": history}, force=True)
    bar.close()
    ckpt.wait()
    writer.flush()
    if keep_best and best["iteration"] > 0:
        best_ckpt.wait()
        state, best = best_ckpt.restore({"trainable": trainer.trainable})
        trainer.trainable = state["trainable"]
        print(f"keep_best: using the weights after iteration {best['iteration']} "
              f"(probe accuracy {best['score']:.3f})")
        if history:
            history[-1] = {**history[-1], "best_iteration": best["iteration"], "best_probe_score": best["score"]}
    return history


def main(argv):
    del argv
    from arr_jax.cli import config_from_flags
    from arr_jax.demo import build_trainer
    from arr_jax.world.judge import WorldJudge

    cfg = config_from_flags()
    judge = WorldJudge()
    trainer, _ = build_trainer(cfg, judge)
    history = train_rpo(cfg, trainer, judge)
    if history:
        last = history[-1]
        print(f"finished {trainer.iteration} iterations; last reward {last['reward_mean']:.3f}")


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
