"""One RPO iteration: rollout pairs → decode → judge → rewards → reference pass → PPO-clip + KL updates.

Kind-agnostic: the trainer sees an `arr_jax.policies.base.Policy` (model, ``apply_fn``,
``encode_fn``, ``decode_fn`` + ``decode_params``, latent shape) and a judge (anything with
``compare``; wrapped in `arr_jax.judge.reward.RubricJudge`, which attaches the run's rubric and
the editing sources). The same code drives the tiny pixel-space Flux of the CPU demo and
FLUX.1-dev / Kontext on a pod. Follows SPEC §2 (the paper's RPO; DanceGRPO's SDE step).

**One owner of the weights.** The policy's model holds the trained arrays at every moment a
caller can observe: `RPOTrainer.trainable` reads them from the model and assigning it writes
them back (`nnx.update`), so after `step`, `load_state_dict` or a best-weights swap the model
(and any pipeline sampling with it) uses exactly the trainer's state. The donated update never
leaves the model holding deleted arrays.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from arr_jax.diffusion.schedule import rollout_sigmas
from arr_jax.judge.base import PairwiseBatch, concat, flip_winner
from arr_jax.multihost import from_host_local, local_rows, sum_over_processes, to_host_local, union_keys
from arr_jax.perf import mfu
from arr_jax.progress import Announced, stage
from arr_jax.progress import enabled as progress_enabled
from arr_jax.policies.base import Policy, PromptItem, as_items
from arr_jax.rpo.programs import LossConfig, PolicyPrograms, make_optimizer
from arr_jax.rpo.rewards import pair_rewards
from arr_jax.sharding import ShardingRules, param_shardings

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RPOSettings:
    """Hyper-parameters of the RPO loop; defaults are the paper's T2I settings (SPEC §2)."""

    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_beta: float = 0.01
    kl_type: str = "k1"
    eta: float = 0.3
    sde_kind: str = "dance"
    time_shift: float = 3.0
    num_steps: int = 8                  # rollout denoising steps T
    train_window: tuple[int, int] | None = None  # trained steps [lo, hi) within 0..T-2; None = all but last
    pairs_per_batch: int = 32
    micro_batch: int = 64               # samples per forward (shape unit of rollout and update)
    ppo_epochs: int = 1
    steps_per_update: int = 0           # trained steps per optimiser step; 0 = all of them
    win_reward: float = 1.0
    lose_penalty: float = 0.1
    shared_noise: bool = True           # both samples of a pair start from the same x_T
    quantize_t: bool = True
    nan_policy: str = "skip"            # "skip" (count and keep going) or "stop"
    recompute_logp_old: bool = True     # logp_old from the update executable: on-policy ratio exactly 1

    def trained_steps(self) -> np.ndarray:
        lo, hi = self.train_window if self.train_window is not None else (0, self.num_steps - 1)
        if not (0 <= lo < hi <= self.num_steps - 1):
            raise ValueError(f"train_window {self.train_window} must satisfy 0 <= lo < hi <= num_steps-1 "
                             f"= {self.num_steps - 1}")
        return np.arange(lo, hi, dtype=np.int32)

    def validate(self) -> None:
        checks = [
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (0 < self.clip_eps < 1, "clip_eps must be in (0, 1)"),
            (self.kl_beta >= 0, "kl_beta must be >= 0"),
            (self.kl_type in ("k1", "gaussian"), "kl_type must be 'k1' or 'gaussian'"),
            (self.eta > 0, "eta must be > 0 (the SDE needs noise for a log-probability)"),
            (self.sde_kind in ("dance", "flow_grpo"), "sde_kind must be 'dance' or 'flow_grpo'"),
            (self.num_steps >= 2, "num_steps must be >= 2"),
            (self.pairs_per_batch >= 1, "pairs_per_batch must be >= 1"),
            (self.micro_batch >= 2 and self.micro_batch % 2 == 0, "micro_batch must be even and >= 2"),
            ((2 * self.pairs_per_batch) % self.micro_batch == 0,
             f"2*pairs_per_batch ({2 * self.pairs_per_batch}) must be a multiple of micro_batch ({self.micro_batch})"),
            (self.ppo_epochs >= 1, "ppo_epochs must be >= 1"),
            (self.steps_per_update >= 0, "steps_per_update must be >= 0"),
            (self.nan_policy in ("skip", "stop"), "nan_policy must be 'skip' or 'stop'"),
            (self.grad_clip > 0, "grad_clip must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad RPO setting: {msg}")
        self.trained_steps()


def rpo_settings(section) -> RPOSettings:
    """`RPOSettings` from a config section (extra keys such as ``iterations`` are ignored)."""
    names = {f.name for f in dataclasses.fields(RPOSettings)}
    kw = {k: v for k, v in section.items() if k in names}
    if kw.get("train_window") is not None:
        kw["train_window"] = tuple(kw["train_window"])
    return RPOSettings(**kw)


def build_programs(graphdef, policy: Policy, settings: RPOSettings, rules: ShardingRules | None = None):
    """``(programs, decode)``: the jitted programs of one RPO iteration over ``policy``'s model graph.

    ``programs`` is a `PolicyPrograms` (rollout, reference pass, update; with ``tx`` the AdamW of
    ``settings`` and ``sigmas`` the rollout's (T+1,) schedule); ``decode`` is ``policy.decode_fn``
    jitted with its images sharded like the batch (each process reads back its own rows). The
    trainer runs these; `arr_jax.preflight` lowers and compiles the very same objects for a TPU
    topology on abstract weights.
    """
    tx = make_optimizer(settings.learning_rate, settings.weight_decay, grad_clip=settings.grad_clip)
    sigmas = rollout_sigmas(settings.num_steps, settings.time_shift)
    loss = LossConfig(clip_eps=settings.clip_eps, kl_beta=settings.kl_beta, kl_type=settings.kl_type,
                      eta=settings.eta, sde_kind=settings.sde_kind, quantize_t=settings.quantize_t)
    programs = PolicyPrograms(graphdef, policy.apply_fn, loss, tx, sigmas)
    images = None if rules is None or rules.mesh is None else NamedSharding(rules.mesh, P(rules.rules["batch"]))
    return programs, jax.jit(policy.decode_fn, out_shardings=images)


def opt_state_shardings(tx, trainable, rules: ShardingRules | None):
    """Optimiser-state shardings: moments like their parameter (``trainable``'s leaves carry their
    ``sharding``: arrays or ``jax.ShapeDtypeStruct``), counters replicated over the mesh, so a
    restored state is placed exactly like a fresh one. None without a mesh."""
    if rules is None or rules.mesh is None:
        return None
    by_path = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(trainable)[0]}
    replicated = NamedSharding(rules.mesh, P())

    def pick(path, leaf):
        key = jax.tree_util.keystr(path)
        return next((sh for p, sh in by_path.items() if key.endswith(p)), replicated)

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, trainable))


class NonFiniteLossError(FloatingPointError):
    """Raised under ``nan_policy='stop'`` when an update produced a NaN/Inf loss or gradient."""


@dataclasses.dataclass
class RolloutBatch:
    """A rollout of P prompt pairs (2P samples) in the layout of `arr_jax.rpo.programs`.

    items:    this process's prompts (`PromptItem`, with sources when editing): all P on one
              process, else the pairs its devices hold (`RPOTrainer.local_pairs`).
    latents:  (M, T+1, mb, *latent) float32 global array: every x_t of every sample (M micro-batches of mb).
    logp_old: (M, T, mb) float32 log-probs of the sampled transitions.
    cond:     pytree of (M, mb, ...) conditioning (each prompt's, repeated for its two samples).
    images:   uint8 (2 len(items), H, W, 3) on this host: the decode of each of its samples' last
              ``x0_hat``; images ``2p`` and ``2p+1`` are the pair of ``items[p]``.
    """

    items: list[PromptItem]
    latents: Any
    logp_old: Any
    cond: Any
    images: np.ndarray

    @property
    def prompts(self) -> list[str]:
        return [it.text for it in self.items]


class RPOTrainer:
    """Holds the policy's optimiser state and reference, and runs RPO iterations.

    Args:
      policy:    an `arr_jax.policies.base.Policy` (any kind).
      judge:     a pairwise judge (``compare(prompts, images1, images2, ...)``) or a
                 `arr_jax.judge.reward.RubricJudge` carrying the run's rubric.
      settings:  `RPOSettings` (validated here; a bad value raises ``ValueError`` naming it).
      trainable: "lora", "full" or None (LoRA when the model has adapters).
      rules:     `ShardingRules` with a mesh: parameters are placed by their logical axes and the
                 batch is sharded over ("data", "fsdp").
      seed:      RNG seed of the rollouts (iteration ``i`` uses ``fold_in(key(seed), i)``).
      order_check_pairs: pairs per iteration (per process) that a one-order judge also judges in the
                 swapped order, to measure its order-flip rate (`order_check`); 0 turns it off.
      order_flip_warn: the run's order-flip rate above which one warning names ``judge.symmetrize``.
      reference: the reference policy (KL anchor, held-out baseline) of LoRA training: "base" (LoRA off:
                 zeroed adapters, no second copy of the base) or "init" (the adapters the model holds at
                 construction, e.g. loaded from ``rpo.init_lora``; saved in `state_dict`). Full
                 fine-tuning always anchors on its initial weights.
    """

    def __init__(self, policy: Policy, judge, settings: RPOSettings, *, trainable: str | None = None,
                 rules: ShardingRules | None = None, seed: int = 0, order_check_pairs: int = 4,
                 order_flip_warn: float = 0.3, reference: str = "base"):
        from arr_jax.judge.reward import as_rubric_judge
        from arr_jax.nn.lora import LoRAParam

        if not isinstance(policy, Policy):
            raise TypeError(f"RPOTrainer needs an arr_jax.policies.base.Policy, got {type(policy).__name__}")
        settings.validate()
        self.s = settings
        self.policy = policy
        self.judge = as_rubric_judge(judge)
        self.rules = rules
        if rules is not None and rules.mesh is not None:
            axes = np.atleast_1d(rules.rules["batch"])
            n = int(np.prod([rules.mesh.shape[a] for a in axes]))
            if settings.micro_batch % n:
                raise ValueError(f"rpo.micro_batch={settings.micro_batch} samples cannot be split over the {n} "
                                 f"devices of the mesh's batch axes {tuple(axes)}: use a multiple of {n}")
        self.latent_shape = tuple(policy.latent_shape)
        # The rows of every micro-batch this process rolls out, decodes and judges (all of them on one
        # process); a pair's two samples must sit on the same process.
        self.rows = (np.arange(settings.micro_batch) if self._sharding(1) is None
                     else local_rows(self._sharding(1), (settings.micro_batch,)))
        if np.any(self.rows[0::2] % 2) or not np.array_equal(self.rows[1::2], self.rows[0::2] + 1):
            raise ValueError(f"rpo.micro_batch={settings.micro_batch}: every process must hold whole pairs of "
                             f"samples, but this process holds rows {self.rows.tolist()}; use a micro_batch of "
                             f"2 x {jax.process_count()} x (a multiple of the devices per process)")
        model = policy.model
        has_lora = any(True for _ in jax.tree.leaves(nnx.state(model, LoRAParam)))
        if trainable not in (None, "lora", "full"):
            raise ValueError(f"trainable must be 'lora', 'full' or None (auto), got {trainable!r}")
        if trainable == "lora" and not has_lora:
            raise ValueError("trainable='lora' but the model has no LoRA adapters (set a LoRAConfig)")
        self.mode = "lora" if (trainable is None and has_lora) or trainable == "lora" else "full"
        if reference not in ("base", "init"):
            raise ValueError(f"reference must be 'base' or 'init', got {reference!r}")
        self.reference = "init" if self.mode == "full" else reference
        self._filter = LoRAParam if self.mode == "lora" else nnx.Param
        self.graphdef, tr, fr = nnx.split(model, self._filter, ...)
        if rules is not None and rules.mesh is not None:
            tr = jax.device_put(tr, param_shardings(tr, rules))
            fr = jax.device_put(fr, param_shardings(fr, rules))
            nnx.update(model, tr, fr)
        self.frozen = fr
        # Reference policy: LoRA off (zeroed adapters, no second copy of the base) or the initial weights.
        self.ref_trainable = (jax.tree.map(jnp.zeros_like, tr) if self.reference == "base"
                              else jax.tree.map(jnp.copy, tr))
        # The jitted programs: built by `build_programs`, which `arr_jax.preflight` compiles for pods too.
        self.programs, self._decode = build_programs(self.graphdef, policy, settings, rules)
        self.tx, self.sigmas = self.programs.tx, self.programs.sigmas
        self.opt_state = jax.jit(self.tx.init, out_shardings=self._opt_shardings(tr))(tr)
        # Every program of an iteration is compiled ahead of time once per input signature and counts
        # its FLOPs (`arr_jax.perf`): achieved TFLOP/s and MFU per phase go into each step's metrics.
        # Each says when it compiles, with its seconds (`arr_jax.progress.Announced`, process 0).
        self.programs.rollout = Announced(self.programs.rollout, "rollout")
        self.programs.ref_pass = Announced(self.programs.ref_pass, "reference")
        self.programs.train_step = Announced(self.programs.train_step, "update")
        self.programs.ode = Announced(self.programs.ode, "ode sampler")
        self._decode = Announced(self._decode, "decode")
        self._instrumented = {"rollout": self.programs.rollout, "decode": self._decode,
                              "reference": self.programs.ref_pass, "update": self.programs.train_step}
        self._noise_fns: dict = {}
        self._judge_pool = None
        self._compile_seen: dict[str, float] = {}
        self.key = jax.random.key(seed)
        self.iteration = 0
        self.counters = {"nonfinite_updates": 0}
        self.timing: dict[str, float] = {}
        self.order_check_pairs, self.order_flip_warn = int(order_check_pairs), float(order_flip_warn)
        self.order_flips = {"flips": 0.0, "pairs": 0.0, "warned": False}
        self._judged = False

    # --- the weights: owned by the policy's model -------------------------------------------
    @property
    def model(self) -> nnx.Module:
        return self.policy.model

    @property
    def trainable(self) -> nnx.State:
        """The trained variables (LoRA adapters or all params), read from the model."""
        return nnx.state(self.policy.model, self._filter)

    @trainable.setter
    def trainable(self, value) -> None:
        nnx.update(self.policy.model, value)

    # --- sharding helpers ---------------------------------------------------------------
    def _sharding(self, ndim: int, batch_axis: int = 0) -> NamedSharding | None:
        """The batch axis over the mesh's ("data", "fsdp"); None without a mesh."""
        if self.rules is None or self.rules.mesh is None:
            return None
        spec = [None] * ndim
        spec[batch_axis] = self.rules.rules["batch"]
        return NamedSharding(self.rules.mesh, P(*spec))

    def _put(self, x, batch_axis: int):
        """A global array (the same value on every process) placed with the batch axis sharded."""
        sh = self._sharding(np.ndim(x), batch_axis)
        return jnp.asarray(x) if sh is None else jax.device_put(x, sh)

    def _from_local(self, local, batch_axis: int, global_len: int):
        """A global array from this process's rows (``self.rows`` of ``global_len``) along ``batch_axis``."""
        local = np.asarray(local)
        sh = self._sharding(local.ndim, batch_axis)
        if sh is None:
            return jnp.asarray(local)
        shape = list(local.shape)
        shape[batch_axis] = global_len
        return from_host_local(local, sh, tuple(shape))

    def _noise(self, key: jax.Array, n: int, shared: bool) -> jax.Array:
        """N(0, 1) latents (n, *latent) made on the devices (the same values on any mesh or process
        layout); ``shared``: both samples of each pair start from the same noise."""
        sh = self._sharding(1 + len(self.latent_shape))
        fn = self._noise_fns.get((n, shared))
        if fn is None:
            def make(k):
                if shared:
                    return jnp.repeat(jax.random.normal(k, (n // 2,) + self.latent_shape, jnp.float32), 2, axis=0)
                return jax.random.normal(k, (n,) + self.latent_shape, jnp.float32)
            fn = self._noise_fns[(n, shared)] = jax.jit(make, out_shardings=sh)
        return fn(key)

    def _opt_shardings(self, trainable):
        """Optimiser-state shardings (`opt_state_shardings`); None without a mesh."""
        return opt_state_shardings(self.tx, trainable, self.rules)

    def _replicated(self, x):
        """``x`` on every device of the mesh (a global array every process can save), as is without one."""
        if self.rules is None or self.rules.mesh is None:
            return x
        sh = NamedSharding(self.rules.mesh, P())
        typed = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        data = np.asarray(jax.random.key_data(x) if typed else x)
        out = jax.make_array_from_callback(data.shape, sh, lambda idx: data[idx])
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x)) if typed else out

    def state_dict(self) -> dict:
        """Everything resume needs: trained weights, optimiser, RNG key, iteration (= data position)."""
        d = {"trainable": self.trainable, "opt_state": self.opt_state, "rng": self._replicated(self.key),
             "iteration": self._replicated(jnp.asarray(self.iteration, jnp.int32))}
        if self.reference == "init":  # full fine-tuning, or LoRA from rpo.init_lora anchored on it
            d["reference"] = self.ref_trainable
        return d

    def host_state(self) -> dict:
        """JSON-able state resume needs beside `state_dict` (saved in the checkpoint's ``extra``): the
        order-flip check's counts over the run so far, so a resumed run neither forgets them nor
        warns a second time."""
        return {"order_flips": dict(self.order_flips)}

    def load_host_state(self, d: dict) -> None:
        """Restore `host_state` (missing keys, e.g. from an older checkpoint, keep the fresh values)."""
        if "order_flips" in d:
            f = d["order_flips"]
            self.order_flips = {"flips": float(f["flips"]), "pairs": float(f["pairs"]), "warned": bool(f["warned"])}

    def load_state_dict(self, d: dict) -> None:
        self.trainable, self.opt_state, self.key = d["trainable"], d["opt_state"], d["rng"]
        self.iteration = int(d["iteration"])
        if "reference" in d:
            self.ref_trainable = d["reference"]

    # --- one iteration ------------------------------------------------------------------
    def _conditioning(self, items: Sequence[PromptItem], repeat: int) -> Any:
        cond = self.policy.encode_fn(list(items))
        return jax.tree.map(lambda c: jnp.repeat(jnp.asarray(c), repeat, axis=0), cond)

    def local_pairs(self, n_pairs: int) -> np.ndarray:
        """Indices of the pairs (of ``n_pairs``, in flattened sample order) this process rolls out and
        judges: its rows of every micro-batch, a deterministic slice of the iteration's prompts."""
        mb = self.s.micro_batch
        return np.concatenate([(m * mb + self.rows[0::2]) // 2 for m in range(2 * n_pairs // mb)])

    def rollout(self, prompts: Sequence[PromptItem | str], key: jax.Array, trainable=None,
                on_decoded=None) -> RolloutBatch:
        """Two SDE samples per prompt with the current policy (or ``trainable``), decoded for the judge.

        ``prompts`` are the iteration's P prompts (the same list on every process). Each process
        encodes, decodes and keeps the images of its own pairs only (`local_pairs`).
        ``on_decoded(items, images)`` is called after each micro-batch reaches the host, with that
        micro-batch's local pairs and their images (2 per pair).
        """
        s = self.s
        items = as_items(prompts)
        tr = self.trainable if trainable is None else trainable
        n_pairs = len(items)
        B, mb = 2 * n_pairs, s.micro_batch
        if B % mb:
            raise ValueError(f"{n_pairs} prompts give {B} samples, not a multiple of micro_batch={mb}")
        M = B // mb
        k_noise, k_sde = jax.random.split(key)
        t0 = time.perf_counter()
        conds = []
        for m in range(M):
            local = [items[j] for j in (m * mb + self.rows[0::2]) // 2]
            cond = self._conditioning(local, 2)
            conds.append(jax.tree.map(lambda c: self._from_local(c, 0, mb), cond))
        t1 = time.perf_counter()
        lat, logp, x0s = [], [], []
        for m in range(M):  # dispatched asynchronously: the devices run ahead of the host loop below
            traj = self.programs.rollout(tr, self.frozen, conds[m], self._noise(jax.random.fold_in(k_noise, m), mb,
                                                                                s.shared_noise),
                                         jax.random.fold_in(k_sde, m), self.sigmas)
            lat.append(traj.latents)
            logp.append(traj.log_probs)
            x0s.append(traj.x0)
        images, t_decode = [], 0.0
        for m, x in enumerate(x0s):
            jax.block_until_ready(x)
            td = time.perf_counter()
            images.append(to_host_local(self._decode(self.policy.decode_params, x))[1])
            t_decode += time.perf_counter() - td
            if on_decoded is not None:  # e.g. hand micro-batch m to the judge while m+1 still rolls out
                on_decoded([items[j] for j in (m * mb + self.rows[0::2]) // 2], images[-1])
        images = np.concatenate(images, axis=0)
        t3 = time.perf_counter()
        self.timing.update({"encode": t1 - t0, "rollout": t3 - t1 - t_decode, "decode": t_decode})
        cond = jax.tree.map(lambda *cs: jnp.stack(cs), *conds)
        return RolloutBatch(items=[items[j] for j in self.local_pairs(n_pairs)], latents=jnp.stack(lat),
                            logp_old=jnp.stack(logp), cond=cond, images=images)

    def judge_batch(self, batch: RolloutBatch) -> tuple[np.ndarray, dict]:
        """Judge this process's pairs under the run's rubric; returns their advantages (2 x local
        pairs,) and judge metrics summed over processes (rates over all pairs)."""
        return self._rewards(self._judge_pairs(batch.items, batch.images))

    def _judge_pairs(self, items, images) -> PairwiseBatch:
        t0 = time.perf_counter()
        res = self.judge.compare(items, images[0::2], images[1::2])
        self.timing["judge_busy"] = self.timing.get("judge_busy", 0.0) + time.perf_counter() - t0
        return res

    def _first_judging(self, n_pairs: int):
        """The first iteration says it waits on the judge (which may compile or load first), with its
        seconds; later ones are timed in the RPO bar."""
        if self._judged:
            return contextlib.nullcontext()
        self._judged = True
        return stage(f"judging the first {n_pairs} pairs ({self.judge.name})")

    def _wait_for_judge(self, futures, n_pairs: int) -> list[PairwiseBatch]:
        """The results of a host judge's micro-batches, in order. The first iteration says it waits
        (`_first_judging`); later waits longer than 2 s show a bar of the micro-batches judged."""
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        with self._first_judging(n_pairs):
            pending = [f for f in futures if not f.done()]
            with tqdm(total=len(futures), initial=len(futures) - len(pending), desc="waiting on the judge",
                      unit="micro-batch", leave=False, delay=2.0, dynamic_ncols=True,
                      disable=not progress_enabled()) as bar:
                for _ in as_completed(pending):
                    bar.update(1)
        return [f.result() for f in futures]

    def _one_order(self) -> bool:
        """The judge decides each pair from one image order (``judge.symmetrize = off``)."""
        return not getattr(self.judge.judge, "symmetrize", None)

    def order_check(self, items, images, winner: np.ndarray) -> dict:
        """The one-order judge's order-flip rate on ``order_check_pairs`` of this iteration's pairs
        (a different slice each iteration): those pairs are judged again with the images swapped, and
        a flip is a pair whose two orders name different winners (ties count as no flip; the same
        measure as ``eval/order_flip_rate``). Returns ``order_flip_rate`` (this iteration, over all
        processes) and ``order_flip_rate_run`` (the run so far); logs one warning, pointing at
        ``judge.symmetrize``, once the run's rate exceeds ``order_flip_warn`` over at least 8 pairs:
        such a reward mostly says which image came first. A symmetric judge already judges both
        orders (its flips become ties): nothing to measure, ``{}``.

        items: this process's pairs; images: uint8 (2 x pairs, H, W, 3), pair i = rows 2i, 2i+1;
        winner: (pairs,) int8 of the judged order."""
        n = len(winner)
        k = min(self.order_check_pairs, n)
        if k <= 0 or not self._one_order():
            return {}
        idx = (self.iteration * k + np.arange(k)) % n
        images = np.asarray(images)
        swapped = np.stack([images[1::2][idx], images[0::2][idx]], axis=1).reshape(2 * k, *images.shape[1:])
        rev = self._judge_pairs([items[i] for i in idx], swapped)
        fwd, back = np.asarray(winner)[idx], flip_winner(rev.winner)
        flips = float(np.sum((fwd != back) & (fwd != 0) & (back != 0)))
        tot = sum_over_processes({"flips": flips, "pairs": float(k)})
        run = self.order_flips
        run["flips"] += tot["flips"]
        run["pairs"] += tot["pairs"]
        rate_run = run["flips"] / run["pairs"]
        if not run["warned"] and run["pairs"] >= 8 and rate_run > self.order_flip_warn:
            run["warned"] = True
            if jax.process_index() == 0:
                log.warning(
                    "the judge named a different winner when the two images were swapped in %.0f%% of %d checked "
                    "pairs (order-flip rate above %.2f): its one-order reward is largely position bias. Set "
                    "--config.judge.symmetrize=agree (a win only when both orders agree) or =mean to judge both "
                    "orders; README: 'Position bias'.", 100 * rate_run, run["pairs"], self.order_flip_warn)
        return {"order_flip_rate": tot["flips"] / tot["pairs"], "order_flip_rate_run": rate_run}

    def _rewards(self, res: PairwiseBatch) -> tuple[np.ndarray, dict]:
        rewards = pair_rewards(res.winner, self.s.win_reward, self.s.lose_penalty)
        sums = {"n": float(len(res.winner)), "reward": float(rewards.sum()), "tie": float(np.sum(res.winner == 0)),
                "p_first": float(np.sum(res.p_first)), "judge_failed_pairs": float(np.sum(~res.valid))}
        for name, v in (res.criteria or {}).items():
            sums[f"criteria/{name}"] = float(np.sum(np.mean(v, axis=-1)))
        for name in union_keys((res.failures or {}).keys()):
            sums[f"judge_failures/{name}"] = float((res.failures or {}).get(name, 0))
        tot = sum_over_processes(sums)
        n = max(tot.pop("n"), 1.0)
        m = {"reward_mean": tot.pop("reward") / (2 * n), "tie_rate": tot["tie"] / n,
             "decisive_rate": 1.0 - tot.pop("tie") / n, "p_first_mean": tot.pop("p_first") / n}
        for k, v in tot.items():
            m[k] = v / n if k.startswith("criteria/") else v
        return rewards.reshape(-1), m

    def _device_batch(self, batch: RolloutBatch, advantages) -> dict:
        """The update's inputs on device, with the reference pass (LoRA off) of the trained steps.

        ``advantages``: this process's samples (2 x local pairs,), in the order of ``batch.items``.
        """
        M, mb = batch.logp_old.shape[0], batch.logp_old.shape[2]
        adv = np.asarray(advantages, np.float32)
        if adv.shape != (M * len(self.rows),):
            raise ValueError(f"advantages must be ({M * len(self.rows)},) for this batch (this process's "
                             f"samples), got {adv.shape}")
        t0 = time.perf_counter()
        steps_all = jnp.asarray(self.s.trained_steps())
        dev = {"latents": batch.latents, "logp_old": batch.logp_old,
               "adv": self._from_local(adv.reshape(M, len(self.rows)), 1, mb),
               "cond": jax.tree.map(lambda c: self._put(c, 1), batch.cond)}
        refs = [self.programs.ref_pass(self.ref_trainable, self.frozen,
                                       jax.tree.map(lambda c: c[m], dev["cond"]), dev["latents"][m], steps_all)
                for m in range(M)]
        dev["logp_ref"] = jnp.stack([r[0] for r in refs])
        if self.s.kl_type == "gaussian":
            dev["mean_ref"] = jnp.stack([r[1] for r in refs])
        jax.block_until_ready(dev["logp_ref"])
        self.timing["reference"] = time.perf_counter() - t0
        return dev

    def _train_step(self, dev: dict, pos: np.ndarray, apply_update: bool) -> dict:
        """One call of the update executable on the trained steps at positions ``pos``."""
        steps_all = self.s.trained_steps()
        new_tr, self.opt_state, met = self.programs.train_step(
            self.trainable, self.opt_state, self.frozen, dev, jnp.asarray(steps_all[pos]),
            jnp.asarray(pos, jnp.int32), jnp.asarray(apply_update))
        self.trainable = new_tr  # the model owns the new arrays (the old ones were donated)
        return met

    def optimizer_step(self, batch: RolloutBatch, advantages, steps: Sequence[int] | None = None) -> dict:
        """Exactly one optimiser step on ``batch`` with per-sample ``advantages`` (2P,).

        ``steps`` are positions in the trained-step list (default: all). ``logp_old`` is the
        batch's as given. Returns the step's metrics (loss, kl, ratio stats, grad_norm, ...).
        Benchmarks and tests use this instead of rebuilding the trainer's internal batch.
        """
        dev = self._device_batch(batch, advantages)
        pos = np.arange(len(self.s.trained_steps())) if steps is None else np.asarray(steps)
        met = self._train_step(dev, pos, True)
        met.pop("logp")
        return {k: float(v) for k, v in jax.device_get(met).items()}

    def update(self, batch: RolloutBatch, advantages, rng: np.random.Generator | None = None) -> dict:
        """PPO epochs over the trained steps; returns metrics averaged over optimiser steps."""
        s = self.s
        rng = np.random.default_rng(0) if rng is None else rng
        dev = self._device_batch(batch, advantages)
        t0 = time.perf_counter()
        K = len(s.trained_steps())
        chunk = s.steps_per_update or K
        orders = [rng.permutation(K) for _ in range(s.ppo_epochs)]
        self._recompute_flops = 0.0
        if s.recompute_logp_old:
            before = self.programs.train_step.flops_run
            dev["logp_old"] = self._recompute_logp_old(dev, orders[0], chunk)
            # forward-only calls of the update program: timed and counted apart from the optimiser steps
            self._recompute_flops = self.programs.train_step.flops_run - before
            self.timing["logp_old"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        history = []
        for order in orders:
            for c0 in range(0, K, chunk):
                met = self._train_step(dev, order[c0:c0 + chunk], True)
                met.pop("logp")
                met = jax.device_get(met)  # also blocks: keeps CPU collectives from piling up
                if met["nonfinite"] > 0:
                    self.counters["nonfinite_updates"] += 1
                    if s.nan_policy == "stop":
                        raise NonFiniteLossError(
                            f"non-finite loss or gradient at iteration {self.iteration} (loss={met['loss']}, "
                            f"grad_norm={met['grad_norm']}); set nan_policy='skip' to skip such updates")
                history.append(met)
        out = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
        out["ratio_max_dev"] = float(max(h["ratio_max_dev"] for h in history))
        out["ratio_max_dev_first_step"] = float(history[0]["ratio_max_dev"])
        out["optimizer_steps"] = len(history)
        if s.recompute_logp_old:
            out["logp_mismatch"] = self._last_mismatch
        out["nonfinite_updates_total"] = self.counters["nonfinite_updates"]
        self.timing["update"] = time.perf_counter() - t0
        return out

    def _recompute_logp_old(self, dev: dict, order: np.ndarray, chunk: int):
        """logp_old from forward-only runs of the update executable (see `PolicyPrograms._train_step`)."""
        steps_all = self.s.trained_steps()
        rollout_logp = jnp.asarray(dev["logp_old"])
        new = rollout_logp
        for c0 in range(0, len(order), chunk):
            pos = order[c0:c0 + chunk]
            met = self._train_step(dev, pos, False)
            new = new.at[:, jnp.asarray(steps_all[pos])].set(met["logp"])
        trained = jnp.asarray(steps_all)
        self._last_mismatch = float(jnp.max(jnp.abs(new[:, trained] - rollout_logp[:, trained])))
        return new

    def step(self, prompts: Sequence[PromptItem | str]) -> dict:
        """One full RPO iteration on ``prompts`` (P pairs): rollout, decode, judge, reference, update.

        Returns metrics: the judge's (reward_mean, tie_rate, failures), the update's (loss, kl,
        ratio stats, clip_frac, grad_norm), seconds per phase (``time/*``) and throughput.
        """
        self.timing = {}
        for prog in self._instrumented.values():
            prog.reset()
        t0 = time.perf_counter()
        key = jax.random.fold_in(self.key, self.iteration)
        if getattr(self.judge, "host_only", False):
            # A judge that runs on the host (an API, the world's checks) judges micro-batch m in a
            # thread while m+1 rolls out and decodes; every reward is in before the update.
            if self._judge_pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._judge_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judge")
            futures = []
            batch = self.rollout(prompts, key, on_decoded=lambda items, imgs: futures.append(
                self._judge_pool.submit(self._judge_pairs, items, imgs)))
            t1 = time.perf_counter()
            res = concat(self._wait_for_judge(futures, len(batch.items)))
        else:
            batch = self.rollout(prompts, key)
            t1 = time.perf_counter()
            with self._first_judging(len(batch.items)):
                res = self._judge_pairs(batch.items, batch.images)
        adv, jm = self._rewards(res)
        jm.update(self.order_check(batch.items, batch.images, res.winner))
        self.timing["judge"] = time.perf_counter() - t1  # what the iteration waited for the judge
        rng = np.random.default_rng(int(jax.random.randint(jax.random.fold_in(key, 7), (), 0, 2**31 - 1)))
        um = self.update(batch, adv, rng)
        self.iteration += 1
        out = {**jm, **um, **{f"time/{k}": v for k, v in self.timing.items()},
               "time/iteration": time.perf_counter() - t0}
        out.update(self._throughput(len(as_items(prompts))))
        return out

    def _throughput(self, n_pairs: int) -> dict:
        """Rates of this iteration: images/s, judge decisions/s, update sample-steps/s, and for each
        jitted program its achieved TFLOP/s (model FLOPs from its jaxpr over the phase's seconds) and
        MFU against the chip's peak (`arr_jax.perf`; none on CPU); compile seconds when it compiled."""
        t, s = self.timing, self.s
        sample_steps = 2 * n_pairs * len(s.trained_steps()) * s.ppo_epochs
        out = {}
        n_dev = self.rules.mesh.size if self.rules is not None and self.rules.mesh is not None else 1
        device = (self.rules.mesh.devices.flat[0] if self.rules is not None and self.rules.mesh is not None
                  else jax.devices()[0])
        for phase, prog in self._instrumented.items():
            seconds = t.get(phase, 0.0)
            # the logp_old recompute runs the update program forward only; its cond counts the backward
            # too, so those calls are left out of the update's rate (their seconds are time/logp_old)
            flops = prog.flops_run - (getattr(self, "_recompute_flops", 0.0) if phase == "update" else 0.0)
            if prog.calls and seconds > 0 and flops > 0:
                out[f"perf/{phase}_tflop_s"] = flops / seconds / 1e12
                u = mfu(flops, seconds, device, num_devices=n_dev)
                if u is not None:
                    out[f"perf/{phase}_mfu"] = u
            if prog.compile_s > self._compile_seen.get(phase, 0.0):
                out[f"compile/{phase}_s"] = prog.compile_s - self._compile_seen.get(phase, 0.0)
                self._compile_seen[phase] = prog.compile_s
        if t.get("rollout", 0) + t.get("decode", 0) > 0:
            out["throughput/images_per_s"] = 2 * n_pairs / (t.get("rollout", 0) + t.get("decode", 0))
        if t.get("judge_busy", 0) > 0:
            out["throughput/judge_decisions_per_s"] = n_pairs / t["judge_busy"]
        if t.get("update", 0) > 0:
            out["throughput/update_sample_steps_per_s"] = sample_steps / t["update"]
        return out

    # --- evaluation helpers ---------------------------------------------------------------
    def local_indices(self, n: int) -> np.ndarray:
        """Which of ``n`` (prompt, seed) items `generate` returns on this process (all of them on one)."""
        mb = self.s.micro_batch
        idx = np.concatenate([lo + self.rows for lo in range(0, n, mb)])
        return idx[idx < n]

    def generate(self, prompts: Sequence[PromptItem | str], seeds: Sequence[int], *, use_reference: bool = False,
                 sampler: str = "sde", sigmas=None) -> np.ndarray:
        """One image per (prompt, seed): uint8 (len(local_indices(n)), H, W, 3): this process's items.

        The noise depends only on the seed, so the current and the reference policy (LoRA off, or
        the initial LoRA with ``reference="init"``) are compared on identical noise. ``sampler``: "sde" (the rollout sampler; its step noise
        also fixed by the first seed of each chunk) or "ode" (deterministic Euler). ``sigmas``
        (T'+1,) default to the rollout's. Every process must call it with the same arguments.
        """
        items = as_items(prompts)
        if len(items) != len(seeds):
            raise ValueError(f"{len(items)} prompts but {len(seeds)} seeds")
        if sampler not in ("sde", "ode"):
            raise ValueError(f"sampler must be 'sde' or 'ode', got {sampler!r}")
        sig = self.sigmas if sigmas is None else np.asarray(sigmas, np.float32)
        tr = self.ref_trainable if use_reference else self.trainable
        mb, n = self.s.micro_batch, len(items)
        out = []
        for lo in range(0, n, mb):
            its, ss = list(items[lo:lo + mb]), list(seeds[lo:lo + mb])
            real = len(its)
            its, ss = its + [its[-1]] * (mb - real), ss + [ss[-1]] * (mb - real)  # keep one compiled shape
            mine = self.rows
            x_local = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(0), int(ss[r])),
                                                             self.latent_shape)) for r in mine])
            x_init = self._from_local(x_local, 0, mb)
            cond = jax.tree.map(lambda c: self._from_local(c, 0, mb), self._conditioning([its[r] for r in mine], 1))
            if sampler == "ode":
                x0 = self.programs.ode(tr, self.frozen, cond, x_init, sig)
            else:
                x0 = self.programs.rollout(tr, self.frozen, cond, x_init,
                                           jax.random.fold_in(jax.random.key(1), int(ss[0])), sig).x0
            rows, imgs = to_host_local(self._decode(self.policy.decode_params, x0))
            out.append(imgs[rows < real])
        return np.concatenate(out, axis=0)
