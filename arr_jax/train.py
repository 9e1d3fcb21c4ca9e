"""RPO training entry point (the loop the demo runs between its two evaluations).

    python -m arr_jax.train --config configs/demo.py [--config.rpo.iterations=60]

Every ``rpo.checkpoint_every`` iterations the full state (LoRA/params, optimiser, RNG,
iteration = data position, metric history) is saved with orbax; a rerun with the same
``workdir`` resumes and ends with the same parameters as an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from arr_jax.world import spec


def train_prompt_sampler(cfg):
    """Prompts of iteration ``it``: a deterministic function of (seed, it), so resume is exact."""
    train = [p.text for p in spec.TRAIN_PROMPTS]

    def sample(it: int) -> list[str]:
        rng = np.random.default_rng([cfg.seed, 1, it])
        return [train[i] for i in rng.integers(0, len(train), cfg.rpo.pairs_per_batch)]

    return sample


def train_rpo(cfg, trainer, judge) -> list[dict]:
    """Run RPO iterations up to ``cfg.rpo.iterations`` with TensorBoard, progress bar, checkpoints."""
    from tensorboardX import SummaryWriter
    from tqdm.auto import tqdm

    from arr_jax.checkpoint import Checkpointer

    work = Path(cfg.workdir)
    writer = SummaryWriter(str(work / "tensorboard"))
    ckpt = Checkpointer((work / "checkpoints").absolute(), max_to_keep=2,
                        model_signature={"model": cfg.model.to_dict(), "lora_rank": cfg.rpo.lora_rank,
                                         "full_finetune": cfg.rpo.full_finetune})
    history: list[dict] = []
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(trainer.state_dict())
        trainer.load_state_dict(state)
        history = list(extra.get("history", []))
        print(f"resumed RPO from iteration {trainer.iteration} ({work / 'checkpoints'})")
    prompts_at = train_prompt_sampler(cfg)
    probe = [p.text for p in spec.TRAIN_PROMPTS][:16]
    probe_p = [p for p in probe for _ in range(2)]
    probe_s = list(range(len(probe_p)))
    bar = tqdm(total=cfg.rpo.iterations, initial=trainer.iteration, desc="RPO", dynamic_ncols=True)
    while trainer.iteration < cfg.rpo.iterations:
        it = trainer.iteration
        m = trainer.step(prompts_at(it))
        m["iteration"] = it
        if cfg.rpo.eval_every and (it % cfg.rpo.eval_every == 0 or it + 1 == cfg.rpo.iterations):
            cur = trainer.generate(probe_p, probe_s, sampler=cfg.eval.sampler)
            ref = trainer.generate(probe_p, probe_s, use_reference=True, sampler=cfg.eval.sampler)
            res = judge.compare(probe_p, cur, ref)
            m["win_rate_vs_base"] = float(np.mean(res.winner == 1) + 0.5 * np.mean(res.winner == 0))
        history.append(m)
        for k, v in m.items():
            if isinstance(v, (int, float)):
                writer.add_scalar(k, v, it)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward_mean']:.3f}", tie=f"{m['tie_rate']:.2f}", kl=f"{m['kl']:.4f}",
                        clip=f"{m['clip_frac']:.2f}")
        if (it + 1) % cfg.rpo.checkpoint_every == 0 or it + 1 == cfg.rpo.iterations:
            ckpt.save(it + 1, trainer.state_dict(), extra={"history": history}, force=True)
    bar.close()
    ckpt.wait()
    writer.flush()
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
