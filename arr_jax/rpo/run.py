"""ARR-RPO from a config: the four factories (policy, prompts, judge, evaluator), the trainer,
and the training loop with checkpoints, LoRA export, held-out evaluation and pictures.

    run = build_run(cfg)      # arr_jax.policies.build_policy, arr_jax.data.prompts.build_prompts,
                              # arr_jax.judge.factory.build_judge, build_evaluator
    history = train(run)      # resumes from <workdir>/checkpoints

Outputs under ``cfg.workdir``: ``checkpoints/`` (orbax: trained weights, optimiser, RNG,
iteration, metric history), ``lora/step_<N>.safetensors`` and ``lora/final.safetensors``
(diffusers / PEFT layout; metadata: rubric sha256, judge, policy, RPO settings, the ``rpo.init_lora``
file it started from), ``run.json``
(what the run is), ``tensorboard/``, ``eval/eval_<N>.png`` grids, ``reward_and_win_rate.png``,
``curves.png`` and ``report.json``; with ``log.wandb`` the same scalars, grids and final LoRA in a
Weights & Biases run under ``wandb/`` (`arr_jax.rpo.wandb_log`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from arr_jax.checkpoint import atomic_write_text
from arr_jax.data.prompts import build_prompts, iteration_prompts
from arr_jax.judge.factory import build_judge, check_judge
from arr_jax.policies import build_policy
from arr_jax.policies.base import Policy, PromptItem
from arr_jax.progress import stage
from arr_jax.rpo.evaluator import Evaluator
from arr_jax.rpo.trainer import RPOTrainer, rpo_settings

log = logging.getLogger(__name__)

CURVE_KEYS = ("reward_mean", "decisive_rate", "eval/win_rate", "eval/accuracy", "kl", "clip_frac", "ratio_std",
              "grad_norm", "time/iteration")


class RubricMismatchError(ValueError):
    """A resumed run was started with a different rubric than the one its checkpoints were trained with."""


class ResumeMismatchError(ValueError):
    """A resumed run changed what it trains on (prompts, policy or judge snapshot, objective settings)."""


# RPO settings that change neither the objective nor the data (performance and bookkeeping only).
_NOT_OBJECTIVE = frozenset({"micro_batch", "iterations", "eval_every", "checkpoint_every", "keep_best",
                            "allow_resume_changes", "nan_policy", "recompute_logp_old", "steps_per_update_auto"})


@dataclasses.dataclass
class RPORun:
    """Everything one training run is made of (`build_run`)."""

    cfg: Any
    policy: Policy
    trainer: RPOTrainer
    judge: Any                      # arr_jax.judge.reward.RubricJudge
    evaluator: Evaluator | None
    train_prompts: list[PromptItem]
    eval_prompts: list[PromptItem]
    workdir: Path
    resume_changes: list = dataclasses.field(default_factory=list)  # deliberate input changes on resume
    init_lora: dict | None = None   # rpo.init_lora: the file the adapters started from (path, sha256, rank, alpha)

    @property
    def is_writer(self) -> bool:
        """Process 0 writes files shared by all processes (metrics, pictures, LoRA files)."""
        return jax.process_index() == 0


def judge_devices(cfg, devices=None) -> list:
    """The devices the judge runs on (see `mesh_rules`)."""
    me = jax.process_index() if devices is None else devices[0].process_index
    devices = list(jax.devices() if devices is None else devices)
    local = [d for d in devices if d.process_index == me]
    hosts = len({d.process_index for d in devices})
    n = int(cfg.get("judge", {}).get("mesh", 0)) if "judge" in cfg else 0
    if n <= 0:  # the policy's mesh; with several processes, each judges on its own devices
        return devices if hosts == 1 else local
    if n >= len(local):
        raise ValueError(f"judge.mesh={n}: a judge sub-mesh needs fewer devices than the {len(local)} of this "
                         "process, so the policy keeps some")
    return local[-n:]


def mesh_rules(cfg, devices=None):
    """``(policy_rules, judge_rules)``: sharding rules over the policy's mesh (``cfg.mesh``) and the judge's.

    ``judge.mesh = 0`` (default): the judge shares the policy's devices; N > 0: the judge runs on a
    sub-mesh of N devices (the last N of each process) and the policy on the rest. With several
    processes the judge is data-parallel across processes (each process judges its own pairs on
    its own devices: no image crosses hosts) and sharded within a process. None where a mesh would
    hold one device. ``devices``: all devices of the run (default ``jax.devices()``; `arr_jax.preflight`
    passes a TPU topology's, whose first device's host plays this process).
    """
    from arr_jax.sharding import make_mesh, make_rules

    judge = judge_devices(cfg, devices)  # before the default: None means "this process's view"
    devices = list(jax.devices() if devices is None else devices)
    hosts = len({d.process_index for d in devices})
    taken = {d.id for d in judge} if int(cfg.get("judge", {}).get("mesh", 0) if "judge" in cfg else 0) > 0 else set()
    if taken and hosts > 1:  # every process gives its last N devices to its judge
        n = len(judge)
        by_proc: dict[int, list] = {}
        for d in devices:
            by_proc.setdefault(d.process_index, []).append(d)
        taken = {d.id for ds in by_proc.values() for d in ds[-n:]}
    policy = [d for d in devices if d.id not in taken]
    m = cfg.get("mesh", None)
    shape = m.to_dict() if m is not None else {"data": -1}
    policy_rules = make_rules(make_mesh(**shape, devices=policy)) if len(policy) > 1 else None
    judge_rules = (policy_rules if not taken and hosts == 1
                   else make_rules(make_mesh(data=1, fsdp=-1, tensor=1, devices=judge)) if len(judge) > 1 else None)
    return policy_rules, judge_rules


def world_criteria(items, images) -> dict:
    """The world's rubric criteria per image (programmatic checks) plus ``accuracy``: the mean of
    the rewarded ones (colour, shape, count, position)."""
    from arr_jax.world.evaluate import REWARD_CRITERIA
    from arr_jax.world.judge import WorldJudge

    table = WorldJudge().check([it.text for it in items], images)
    table["accuracy"] = np.mean([table[c] for c in REWARD_CRITERIA], axis=0)
    return table


def build_evaluator(cfg, judge, eval_prompts, workdir: Path, rules=None) -> Evaluator | None:
    """The held-out evaluator (None when ``rpo.eval_every`` is 0). ``eval.judge.kind`` "" means the
    training judge; any other kind builds a separate evaluation judge (e.g. an API model)."""
    if not cfg.rpo.get("eval_every", 0):
        return None
    e = cfg.eval
    ej = e.get("judge", None)
    eval_judge = judge if ej is None or not ej.kind else build_judge(ej, rules=rules, workdir=workdir)
    return Evaluator(eval_prompts, eval_judge, seeds_per_prompt=e.get("seeds", 1), sampler=e.sampler,
                     grid_prompts=e.get("grid_prompts", 8), outdir=workdir / "eval",
                     criteria_fn=world_criteria if cfg.kind == "world" else None)


def _where(model_dir) -> str:
    return f" from {model_dir}" if model_dir else ""


def _describe(rules) -> str:
    if rules is None or rules.mesh is None:
        return "1 device"
    return "x".join(f"{k}={v}" for k, v in rules.mesh.shape.items()) + f" ({rules.mesh.size} devices)"


def build_run(cfg) -> RPORun:
    """Read the prompts first (bad files fail before anything is built), then the policy,
    the judge and the evaluator, and the trainer over them."""
    from arr_jax.rpo.wandb_log import check_wandb

    check_wandb(cfg)            # config.log.wandb without the package fails before anything loads
    workdir = Path(cfg.workdir)
    train_prompts = build_prompts(cfg, "train")
    eval_prompts = build_prompts(cfg, "eval") if cfg.rpo.get("eval_every", 0) else []
    if cfg.rpo.get("init_lora", ""):  # a missing file or a wrong rank fails before any weight loads
        from arr_jax.rpo.init_lora import read_init_lora

        read_init_lora(cfg.rpo.init_lora, cfg.rpo)
    rules, judge_rules = mesh_rules(cfg)
    if jax.process_index() == 0:
        print(f"mesh: policy {_describe(rules)}, judge {_describe(judge_rules)}; {jax.process_count()} process(es), "
              f"{jax.local_device_count()} local / {jax.device_count()} global devices", flush=True)
    check_judge(cfg.judge)      # a served judge: endpoint, key, model, log-probs, before anything loads
    with stage(f"loading the {cfg.kind} policy's weights{_where(cfg.get('model_dir', '') or cfg.get('base_checkpoint', ''))}"):
        policy = build_policy(cfg, rules)
    with stage(f"loading the {cfg.judge.kind} judge{_where(cfg.judge.get('model_dir', ''))}"):
        judge = build_judge(cfg.judge, rules=judge_rules, workdir=workdir)
    if policy.is_editing and not judge.accepts_sources:
        raise ValueError(f"judge.kind {cfg.judge.kind!r} cannot judge edits: use 'qwen3_vl' or 'api' with the "
                         f"{cfg.kind} policy")
    evaluator = build_evaluator(cfg, judge, eval_prompts, workdir, judge_rules)
    init, reference = None, "base"
    if cfg.rpo.get("init_lora", ""):
        from arr_jax.rpo.init_lora import REFERENCES, load_init_lora

        reference = cfg.rpo.get("init_lora_reference", "init")
        if reference not in REFERENCES:
            raise ValueError(f"bad config value rpo.init_lora_reference: {reference!r} is not one of {REFERENCES}")
        if policy.export_lora is None and not cfg.rpo.get("full_finetune", False):
            raise ValueError(f"bad config value rpo.init_lora: the {cfg.kind} policy has no diffusers / PEFT LoRA "
                             "layout to start from; pass --config.rpo.init_lora=''")
        with stage(f"loading the initial LoRA {cfg.rpo.init_lora}"):
            init = {**load_init_lora(policy.model, cfg.rpo.init_lora, cfg.rpo), "reference": reference}
    trainer = RPOTrainer(policy, judge, rpo_settings(cfg.rpo), rules=rules, seed=cfg.seed,
                         trainable="full" if cfg.rpo.get("full_finetune", False) else "lora",
                         order_check_pairs=cfg.judge.get("order_check_pairs", 4),
                         order_flip_warn=cfg.judge.get("order_flip_warn", 0.3), reference=reference)
    return RPORun(cfg=cfg, policy=policy, trainer=trainer, judge=judge, evaluator=evaluator,
                  train_prompts=train_prompts, eval_prompts=eval_prompts, workdir=workdir, init_lora=init)


# ---------------------------------------------------------------------------- metadata

def run_metadata(run: RPORun) -> dict:
    """What the run is: policy, judge (kind, model, rubric and its sha256), RPO settings."""
    r = run.cfg.rpo
    return {"policy": run.policy.identity, "judge": run.judge.identity,
            "rubric_sha256": run.judge.rubric_sha256, "rubric_path": run.judge.identity.get("rubric_path"),
            "rpo": {k: (list(v) if isinstance(v, tuple) else v) for k, v in r.to_dict().items()},
            "prompts_sha256": prompts_sha256(run.train_prompts), "resume_changes": list(run.resume_changes),
            "init_lora": run.init_lora}


def _signature(run: RPORun) -> dict:
    r = run.cfg.rpo
    sig = {"policy": run.policy.identity, "rubric_sha256": run.judge.rubric_sha256,
           "lora": {"rank": r.lora_rank, "alpha": r.lora_alpha, "targets": list(r.lora_targets),
                    "full_finetune": bool(r.get("full_finetune", False))}}
    if run.trainer.mode == "lora" and run.trainer.reference == "init":  # the checkpoint also holds the reference
        sig["lora"]["reference"] = "init"
    return sig


def _check_rubric(ckpt, run: RPORun) -> None:
    stored = (ckpt.metadata().get("model_signature") or {}).get("rubric_sha256")
    now = run.judge.rubric_sha256
    if stored != now:
        raise RubricMismatchError(
            f"{ckpt.directory} was trained with rubric sha256 {stored} but this run's rubric "
            f"({run.judge.identity.get('rubric_path') or 'none'}) has sha256 {now}: resume with the same "
            "rubric file, or start a new --config.workdir")


def prompts_sha256(items: list[PromptItem]) -> str:
    """sha256 of the training prompts as the run reads them: texts, categories and source-image bytes, in order."""
    import hashlib

    h = hashlib.sha256()
    for it in items:
        h.update(it.text.encode("utf-8") + b"\0" + (it.category or "").encode() + b"\0")
        if it.source is not None:
            src = np.ascontiguousarray(it.source)
            h.update(str(src.shape).encode() + hashlib.sha256(src.tobytes()).digest())
    return h.hexdigest()


def resume_signature(run: RPORun) -> dict:
    """What a resumed run must share with its checkpoints, in one place: the training prompts (content
    hash, count, file), the policy (identity: snapshot, sizes), the judge (identity: kind, model / snapshot,
    mode, symmetrisation, rubric sha256) and every RPO setting that changes the objective or the data
    (learning rate, clip, KL, SDE, steps, window, rewards, pairs per batch, seed; not `_NOT_OBJECTIVE`)."""
    r = run.cfg.rpo
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(r.to_dict().items())
                if k not in _NOT_OBJECTIVE}
    if not settings.get("init_lora"):  # unset: the signature of runs from before rpo.init_lora existed
        settings.pop("init_lora", None)
        settings.pop("init_lora_reference", None)
    return json.loads(json.dumps({
        "prompts": {"sha256": prompts_sha256(run.train_prompts), "count": len(run.train_prompts),
                    "file": run.cfg.get("prompts_file", "") or None},
        "policy": run.policy.identity, "judge": run.judge.identity, "rpo": settings, "seed": run.cfg.get("seed", 0)},
        default=str))


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _check_resume(stored: dict | None, now: dict, run: RPORun, iteration: int) -> dict | None:
    """Compare the stored resume signature with this run's. Unchanged: None. Changed without
    ``rpo.allow_resume_changes``: `ResumeMismatchError` naming each change. Changed with it: a warning
    and the history entry ``{"iteration", "changes": {key: [stored, now]}}`` that `train` records."""
    if not stored:  # a checkpoint written before resume signatures existed: nothing to compare
        return None
    a, b = _flat(stored), _flat(now)
    changes = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and k != "prompts.file"}
    if changes and (a.get("prompts.file") != b.get("prompts.file")):
        changes["prompts.file"] = [a.get("prompts.file"), b.get("prompts.file")]
    if not changes:
        return None
    listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in list(changes.items())[:12])
    where = run.workdir / "checkpoints"
    if not bool(run.cfg.rpo.get("allow_resume_changes", False)):
        raise ResumeMismatchError(
            f"{where} was trained (to iteration {iteration}) with other inputs than this run's: {listed}. Resume with "
            "the same prompts / snapshots / settings, start a new --config.workdir, or pass "
            "--config.rpo.allow_resume_changes=True to continue with the changes (recorded in run.json's history)")
    msg = f"resuming {where} at iteration {iteration} with changed inputs (allow_resume_changes): {listed}"
    log.warning(msg)
    if run.is_writer:
        print(f"warning: {msg}", flush=True)
    return {"iteration": iteration, "changes": changes}


def export_lora(run: RPORun, name: str, iteration: int) -> Path | None:
    """``<workdir>/lora/<name>.safetensors`` in the diffusers/PEFT layout. Every process calls it (the
    adapters are gathered from all processes' devices); process 0 writes."""
    if run.policy.export_lora is None:
        return None
    meta = {**run_metadata(run), "iteration": iteration}
    path = run.workdir / "lora" / f"{name}.safetensors"
    if jax.process_count() == 1:
        return run.policy.export_lora(run.policy.model, path, meta)
    from flax import nnx

    from arr_jax.multihost import host_tree

    host = host_tree(run.trainer.trainable)
    if not run.is_writer:
        return None
    device = jax.tree.map(lambda x: x, run.trainer.trainable)
    nnx.update(run.policy.model, host)  # host copies just for writing them out; no device work meanwhile
    try:
        return run.policy.export_lora(run.policy.model, path, meta)
    finally:
        nnx.update(run.policy.model, device)


# ---------------------------------------------------------------------------- the loop

def train(run: RPORun, *, progress: bool = True) -> list[dict]:
    """Run RPO iterations up to ``rpo.iterations`` (resuming from ``<workdir>/checkpoints``).

    Every ``rpo.checkpoint_every`` iterations: an orbax checkpoint and ``lora/step_<N>``; every
    ``rpo.eval_every``: the held-out evaluation. With ``rpo.keep_best`` the run ends on the
    weights with the best held-out score (``eval/accuracy`` where the kind has one, else
    ``eval/win_rate``), kept in ``<workdir>/best`` (this selects on the evaluation prompts).
    Returns the per-iteration metric history.
    """
    from tensorboardX import SummaryWriter
    from tqdm.auto import tqdm

    from arr_jax.checkpoint import Checkpointer
    from arr_jax.rpo.figures import save_curves, save_reward_and_win_rate

    cfg, trainer, work = run.cfg, run.trainer, run.workdir
    r = cfg.rpo
    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    signature = _signature(run)
    ckpt = Checkpointer((work / "checkpoints").absolute(), max_to_keep=2, model_signature=signature)
    history: list[dict] = []
    resume_sig = resume_signature(run)
    changes: list[dict] = []  # deliberate changes of inputs on resume (rpo.allow_resume_changes)
    if ckpt.latest_step() is not None:
        _check_rubric(ckpt, run)
        extra = restore_checkpoint(ckpt, trainer)
        changes = list(extra.get("resume_changes", []))
        change = _check_resume(extra.get("resume_signature"), resume_sig, run, int(ckpt.latest_step()))
        if change is not None:
            changes.append(change)
        run.resume_changes = changes
        history = list(extra.get("history", []))
        if run.is_writer:
            print(f"resumed RPO from iteration {trainer.iteration} ({work / 'checkpoints'})")
    if run.is_writer:
        meta = {**run_metadata(run), "policy_info": {k: v for k, v in run.policy.info.items()
                                                     if isinstance(v, (str, int, float, type(None)))},
                "config": cfg.to_dict(), "devices": jax.device_count(), "processes": jax.process_count(),
                "resume_signature": resume_sig, "resume_changes": changes}
        atomic_write_text(work / "run.json", json.dumps(meta, indent=2, default=str))
    if run.is_writer:
        print(f"judge {run.judge.name}: " + (f"rubric {run.judge.identity['rubric_path']} (sha256 "
                                         f"{run.judge.rubric_sha256[:12]})" if run.judge.rubric_sha256
                                             else "no rubric (direct judge)"))
    if run.policy.precompute is not None:
        with stage(f"encoding {len(run.train_prompts) + len(run.eval_prompts)} prompts (training and held-out)"):
            run.policy.precompute(run.train_prompts + run.eval_prompts)
    writer = None
    if run.is_writer:  # TensorBoard, and Weights & Biases with config.log.wandb (the same scalars and grids)
        from arr_jax.rpo.wandb_log import RunWriter, start_wandb

        writer = RunWriter(SummaryWriter(str(work / "tensorboard")), start_wandb(cfg, work, meta))
    keep_best = bool(r.get("keep_best", False)) and run.evaluator is not None
    best_ckpt = Checkpointer((work / "best").absolute(), max_to_keep=1, model_signature=signature)
    best = {"iteration": -1, "score": -1.0}
    if keep_best and best_ckpt.latest_step() is not None:
        _, best = best_ckpt.restore({"trainable": trainer.trainable})
    max_fail = float(cfg.judge.get("max_failure_fraction", 1.0))
    bar = tqdm(total=r.iterations, initial=trainer.iteration, desc="RPO", dynamic_ncols=True,
               disable=not progress or not run.is_writer)
    while trainer.iteration < r.iterations:
        it = trainer.iteration
        items = iteration_prompts(run.train_prompts, cfg.seed, it, r.pairs_per_batch)
        m = trainer.step(items)
        m["iteration"] = it + 1  # iterations count from 1: "iteration N" is the N-th update (README)
        m.update(run.judge.metrics())
        failed = judge_failures(m)
        if failed > max_fail * r.pairs_per_batch:
            raise RuntimeError(f"iteration {it + 1}: the judge failed on {failed:.0f} of {r.pairs_per_batch} pairs "
                               f"(pairs by status: { {k[15:]: v for k, v in m.items() if k.startswith('judge_failures/')} }), "
                               f"above judge.max_failure_fraction={max_fail} of the pairs; the last checkpoint is in "
                               f"{work / 'checkpoints'}")
        if m.get("decisive_rate", 1.0) == 0.0 and run.is_writer:
            msg = (f"iteration {it + 1}: no decisive pair: all {r.pairs_per_batch} pairs are ties or failures "
                   f"({failed:.0f} failed), so every reward is zero and this iteration teaches nothing")
            log.warning(msg)
            print(f"warning: {msg}", flush=True)
        if run.evaluator is not None and ((it + 1) % r.eval_every == 0 or it + 1 == r.iterations):
            t0 = time.perf_counter()
            with stage(f"held-out evaluation after iteration {it + 1} ({len(run.evaluator.items)} images per "
                       f"policy, judge {_judge_label(run.evaluator.judge)})"):
                m.update(run.evaluator(trainer, it + 1, writer))
            m["time/eval"] = time.perf_counter() - t0
            score = m.get("eval/accuracy", m["eval/win_rate"])
            if keep_best and score >= best["score"]:
                best = {"iteration": it + 1, "score": score}
                if it + 1 not in best_ckpt.all_steps():  # a resumed run replays identical steps
                    best_ckpt.save(it + 1, {"trainable": trainer.trainable}, extra=best, force=True)
        history.append(m)
        if writer is not None:
            for k, v in m.items():
                if isinstance(v, (int, float)):
                    writer.add_scalar(k, v, it + 1)
        bar.update(1)
        bar.set_postfix(_postfix(m, history))
        if (it + 1) % r.checkpoint_every == 0 or it + 1 == r.iterations:
            save_checkpoint(ckpt, trainer, history, resume_signature=resume_sig, resume_changes=changes)
            export_lora(run, f"step_{it + 1}", it + 1)
    bar.close()
    ckpt.wait()
    if keep_best and best["iteration"] > 0:
        best_ckpt.wait()
        state, best = best_ckpt.restore({"trainable": trainer.trainable})
        trainer.trainable = state["trainable"]
        if run.is_writer:
            print(f"keep_best: using the weights after iteration {best['iteration']} (held-out score {best['score']:.3f})")
        if history:
            history[-1] = {**history[-1], "best_iteration": best["iteration"], "best_score": best["score"]}
    final = export_lora(run, "final", trainer.iteration)
    if writer is not None:
        writer.log_lora(final, json.loads(json.dumps({**run_metadata(run), "iteration": trainer.iteration},
                                                     default=str)))
        writer.flush()
        writer.close()
    if run.is_writer and history:
        save_reward_and_win_rate(work / "reward_and_win_rate.png", history,
                                 f"ARR-RPO: {cfg.kind} policy, judge {run.judge.name}")
        save_curves(work / "curves.png", history, CURVE_KEYS, f"ARR-RPO: {cfg.kind} policy")
        _write_report(run, history, final, time.perf_counter() - t_start)
    return history


def save_checkpoint(ckpt, trainer: RPOTrainer, history: list[dict], **extra) -> None:
    """Checkpoint after iteration ``trainer.iteration``: the trainer's arrays (`RPOTrainer.state_dict`)
    and, as JSON, the metric history, its host state (`RPOTrainer.host_state`: order-flip counts) and
    ``extra`` (the resume signature and the changes a resume accepted)."""
    ckpt.save(trainer.iteration, trainer.state_dict(),
              extra={"history": history, "trainer": trainer.host_state(), **extra}, force=True)


def restore_checkpoint(ckpt, trainer: RPOTrainer) -> dict:
    """Load the latest checkpoint of `save_checkpoint` into ``trainer``; returns its JSON extra
    (``history``, ``resume_signature``, ``resume_changes``)."""
    state, extra = ckpt.restore(trainer.state_dict())
    trainer.load_state_dict(state)
    trainer.load_host_state(extra.get("trainer", {}))
    return extra


def judge_failures(m: dict) -> float:
    """PAIRS of one iteration's metrics ``m`` whose judgement failed: every pair that yielded no decision
    and no defined tie (``valid`` False: unreadable inputs, failed, truncated or unparseable replies such
    as ``no_json`` / ``invalid_json`` / ``missing_field``, non-finite scores). Compared by `train` with
    ``judge.max_failure_fraction * rpo.pairs_per_batch`` (pairs). Ties and prose fallbacks are outcomes
    of the judge, not failures. Uses ``judge_failed_pairs`` (the trainer's count of invalid pairs) and
    falls back on the per-status counts ``judge_failures/<status>`` (pairs) of `parsing.FAILURES`."""
    from arr_jax.judge.parsing import FAILURES

    if "judge_failed_pairs" in m:
        return float(m["judge_failed_pairs"])
    return float(sum(v for k, v in m.items() if k.startswith("judge_failures/") and k.split("/", 1)[1] in FAILURES))


def _postfix(m: dict, history: list[dict]) -> dict:
    last_eval = next((h for h in reversed(history) if "eval/win_rate" in h), None)
    out = {"tie": f"{m['tie_rate']:.2f}", "kl": f"{m['kl']:.1e}", "s/it": f"{m['time/iteration']:.1f}"}
    if "throughput/images_per_s" in m:
        out["img/s"] = f"{m['throughput/images_per_s']:.1f}"
    if "perf/update_tflop_s" in m:
        out["upd TF/s"] = f"{m['perf/update_tflop_s']:.2f}"
    if "perf/update_mfu" in m:
        out["MFU"] = f"{100 * m['perf/update_mfu']:.0f}%"
    if last_eval is not None:
        out["win"] = f"{last_eval['eval/win_rate']:.2f}"
    return out


def _write_report(run: RPORun, history: list[dict], final_lora: Path | None, seconds: float) -> None:
    last_eval = next((h for h in reversed(history) if "eval/win_rate" in h), {})
    work = run.workdir
    report = {"iterations": run.trainer.iteration, "seconds_this_run": seconds,
              "eval": {k[5:]: v for k, v in last_eval.items() if k.startswith("eval/")},
              "rubric_sha256": run.judge.rubric_sha256, "judge": run.judge.identity,
              "eval_judge": run.evaluator.judge.identity if run.evaluator is not None else None,
              "last_metrics": history[-1],
              "outputs": {"lora": str(final_lora) if final_lora else None, "checkpoints": str(work / "checkpoints"),
                          "tensorboard": str(work / "tensorboard"), "eval_grids": str(work / "eval"),
                          "figure": str(work / "reward_and_win_rate.png"), "curves": str(work / "curves.png")}}
    atomic_write_text(work / "report.json", json.dumps(report, indent=2, default=float))


def _judge_label(judge) -> str:
    ident = getattr(judge, "identity", {}) or {}
    model = ident.get("model")
    return f"{ident.get('kind', judge.name)}" + (f" {model}" if model and model != ident.get("kind") else "")


def summary(run: RPORun, history: list[dict]) -> str:
    """The lines `python -m arr_jax.train` ends with: held-out win rate and where the outputs are."""
    work = run.workdir
    last_eval = next((h for h in reversed(history) if "eval/win_rate" in h), None)
    lines = [f"finished {run.trainer.iteration} RPO iterations ({run.cfg.kind} policy, judge {run.judge.name})"]
    if last_eval is not None:
        lines.append(f"held-out win rate against the base after iteration {last_eval['iteration']} (judge "
                     f"{_judge_label(run.evaluator.judge)}): {last_eval['eval/win_rate']:.3f} "
                     f"± {last_eval['eval/win_rate_se']:.3f} (ties {last_eval['eval/tie_rate']:.2f}, "
                     f"{int(last_eval['eval/pairs'])} pairs)")
    else:
        lines.append("no held-out evaluation (rpo.eval_every = 0)")
    final = work / "lora" / "final.safetensors"
    lines += [f"LoRA:        {final if final.exists() else 'not exported'}",
              f"checkpoints: {work / 'checkpoints'}",
              f"TensorBoard: tensorboard --logdir {work / 'tensorboard'}",
              f"pictures:    {work / 'reward_and_win_rate.png'}, {work / 'curves.png'}, {work / 'eval'}/",
              f"report:      {work / 'report.json'}"]
    return "\n".join(lines)
