"""The programs of one ARR-RPO iteration, lowered and compiled for a mesh without weights.

The policy programs are the trainer's own (`arr_jax.rpo.trainer.build_programs`: rollout, reference
pass, update, and the jitted ``decode_fn``), the judge's the `arr_jax.judge.decode.Decoder`'s (the
choice pass and the prefill + decode loop), built over an abstract policy (`AbstractPolicy`) and an
abstract Qwen3-VL. Every argument is a ``jax.ShapeDtypeStruct`` with the shape, dtype and sharding
the trainer gives it (`policy_arguments`), so what compiles here is what the pod runs.

Per program, `compile_program` reports XLA's memory analysis (argument / output / alias / temporary
bytes per device), FLOPs per device (`arr_jax.perf.jaxpr_flops`: loop bodies times their trip
counts, divided over the devices), HBM bytes per device (XLA's figure, which counts a loop body
once, scaled by the same trip-count factor the FLOPs need) and the roofline bound
``max(flops / peak, bytes / bandwidth)`` with XLA's un-scaled bytes (a lower bound on both sides).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass
class ProgramReport:
    """One compiled program, per device (bytes, FLOPs, seconds)."""

    name: str
    placement: str                 # "policy" or "judge": the devices it runs on
    calls: int                     # calls in one RPO iteration
    compile_s: float = math.nan
    argument_bytes: float = math.nan
    output_bytes: float = math.nan
    alias_bytes: float = math.nan
    temp_bytes: float = math.nan
    flops: float = math.nan
    bytes_accessed: float = math.nan  # estimate: XLA's bytes (loop bodies once) x the FLOPs' loop factor
    roofline_s: float = math.nan      # lower bound: max(FLOPs / peak, XLA's un-scaled bytes / bandwidth)
    bound: str = ""                # "compute" or "memory": which side of the roofline decides
    error: str = ""                # the compiler's message when it failed (e.g. out of memory)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _spec(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), dtype, sharding=sharding)


def batch_spec(rules, shape, dtype, axis: int = 0) -> jax.ShapeDtypeStruct:
    """An array of ``shape`` with ``axis`` sharded over the mesh's batch axes, as the trainer places it."""
    spec = [None] * len(shape)
    spec[axis] = rules.rules["batch"]
    return _spec(shape, dtype, NamedSharding(rules.mesh, P(*spec)))


def shard_bytes(tree) -> float:
    """Bytes one device holds of a pytree of sharded ``jax.ShapeDtypeStruct`` (its largest shard)."""
    total = 0.0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


# ---------------------------------------------------------------------------- the policy's programs

@dataclasses.dataclass
class PolicyPrograms:
    """The trainer's programs over an abstract policy, with their arguments and call counts."""

    programs: dict[str, tuple[Any, tuple, int]]   # name -> (jitted, args, calls per iteration)
    resident: dict[str, Any]                       # long-lived state on the policy's devices


def policy_programs(abstract, settings, rules, *, trainable: str = "lora") -> PolicyPrograms:
    """Rollout, decode, reference pass and update of ``abstract`` (an `AbstractPolicy`) under ``settings``
    (`RPOSettings`) on ``rules``' mesh, built by `arr_jax.rpo.trainer.build_programs` as the trainer does."""
    from arr_jax.nn.lora import LoRAParam
    from arr_jax.rpo.trainer import build_programs, opt_state_shardings

    policy = abstract.policy
    mesh = rules.mesh
    rep = _replicated(mesh)
    filt = LoRAParam if trainable == "lora" else nnx.Param
    graphdef, tr, fr = nnx.split(policy.model, filt, ...)
    programs, decode = build_programs(graphdef, policy, settings, rules)
    opt = jax.tree.map(lambda s, sh: _spec(s.shape, s.dtype, sh), jax.eval_shape(programs.tx.init, tr),
                       opt_state_shardings(programs.tx, tr, rules))
    s = settings
    mb, T = s.micro_batch, s.num_steps
    M = 2 * s.pairs_per_batch // mb
    steps = s.trained_steps()
    K = len(steps)
    chunk = s.steps_per_update or K
    lat = tuple(policy.latent_shape)

    def cond(*lead, axis):
        return jax.tree.map(lambda c: batch_spec(rules, lead + tuple(c.shape), c.dtype, axis), abstract.cond)

    # The logp_old recompute runs the update program forward only: the same work as a reference pass over
    # every micro-batch, so it is costed as M more reference calls (not as an update with its backward).
    update_calls = s.ppo_epochs * math.ceil(K / chunk)
    ref_calls = M * (1 + int(s.recompute_logp_old))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = _spec(key.shape, key.dtype, rep)
    sigmas = _spec((T + 1,), jnp.float32, rep)
    x_init = batch_spec(rules, (mb,) + lat, jnp.float32)
    rollout = (programs.rollout, (tr, fr, cond(mb, axis=0), x_init, key, sigmas), M)
    dec = (decode, (policy.decode_params, x_init), M)
    ref = (programs.ref_pass, (tr, fr, cond(mb, axis=0), batch_spec(rules, (T + 1, mb) + lat, jnp.float32, 1),
                               _spec((K,), jnp.int32, rep)), ref_calls)
    dev = {"latents": batch_spec(rules, (M, T + 1, mb) + lat, jnp.float32, 2),
           "logp_old": batch_spec(rules, (M, T, mb), jnp.float32, 2),
           "adv": batch_spec(rules, (M, mb), jnp.float32, 1), "cond": cond(M, mb, axis=1),
           "logp_ref": batch_spec(rules, (M, K, mb), jnp.float32, 2)}
    if s.kl_type == "gaussian":
        dev["mean_ref"] = batch_spec(rules, (M, K, mb) + lat, jnp.float32, 2)
    upd = (programs.train_step, (tr, opt, fr, dev, _spec((chunk,), jnp.int32, rep), _spec((chunk,), jnp.int32, rep),
                                 _spec((), jnp.bool_, rep)), update_calls)
    resident = {"trainable": tr, "reference": tr, "frozen": fr, "optimizer": opt, "decoder": policy.decode_params,
                "rollout_batch": dev}
    return PolicyPrograms({"rollout": rollout, "decode": dec, "reference": ref, "update": upd}, resident)


# ---------------------------------------------------------------------------- the judge's programs

def judge_config(jc, model_dir: str = ""):
    """The judge's `Qwen3VLConfig`: ``model_dir``'s config.json, else Qwen3-VL-8B-Instruct's published one."""
    from arr_jax.memory.judge import QWEN3_VL_8B_CONFIG
    from arr_jax.models.qwen3_vl import Qwen3VLConfig

    path = Path(model_dir) / "config.json" if model_dir else None
    if path is not None and path.is_file():
        return Qwen3VLConfig.from_hf(json.loads(path.read_text())), str(path)
    return Qwen3VLConfig.from_hf(QWEN3_VL_8B_CONFIG), "Qwen3-VL-8B-Instruct published config"


def judge_inputs(cfg, *, rows: int, images: int, height: int, width: int, text_tokens: int, seq_bucket: int,
                 patch_bucket: int, image_bucket: int, image_cfg=None) -> dict[str, np.ndarray]:
    """A batch of ``rows`` pairwise prompts as the judge's processor makes it (numpy): ``images`` images of
    ``height x width`` each (resized as `arr_jax.judge.processor.smart_resize` does) framed by vision
    start/end tokens, ``text_tokens`` other tokens, left-padded to ``seq_bucket``, through
    `arr_jax.models.qwen3_vl.prepare_inputs` (patches packed per frame and bucketed). ``image_cfg``: the
    snapshot's `ImageConfig` (pixel limits; default: the model's patch sizes with the processor defaults)."""
    from arr_jax.judge.decode import left_pad
    from arr_jax.judge.processor import ImageConfig, smart_resize
    from arr_jax.models.qwen3_vl import prepare_inputs

    v = cfg.vision
    ic = image_cfg or ImageConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                  temporal_patch_size=v.temporal_patch_size)
    h, w = smart_resize(height, width, ic.factor, ic.min_pixels, ic.max_pixels)
    gh, gw = h // v.patch_size, w // v.patch_size
    n_img = gh * gw // v.spatial_merge_size ** 2
    text = 1  # any ordinary token id
    one = []
    for _ in range(images):
        one += [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img + [cfg.vision_end_token_id]
    one += [text] * text_tokens
    length = -(-len(one) // seq_bucket) * seq_bucket
    ids, mask = left_pad([one] * rows, 0, length)
    grid = np.tile(np.asarray([[1, gh, gw]]), (rows * images, 1))
    dim = 3 * v.temporal_patch_size * v.patch_size ** 2
    pv = np.zeros((rows * images * gh * gw, dim), np.float32)
    out = prepare_inputs(cfg, ids, mask, pv, grid, patch_bucket=patch_bucket, image_bucket=image_bucket)
    out.pop("rope_deltas", None)
    return out


def judge_programs(jc, rules, *, pairs: int, images: int, height: int, width: int, text_tokens: int) -> tuple:
    """``(programs, resident, source)`` of the Qwen3-VL judge of config section ``jc`` (``judge.kind=qwen3_vl``):
    the choice pass (one cache-free forward, what ``judge.choice_scores`` runs) and the prefill and decode
    loop (what generated verdicts and prompt rubrics run), built by `arr_jax.judge.decode.Decoder` over
    an abstract model placed by ``rules``. ``pairs`` pairs are judged per iteration (twice with
    ``judge.symmetrize``)."""
    from arr_jax.judge.decode import KVCache, Decoder
    from arr_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration
    from arr_jax.policies.base import place_abstract

    from arr_jax.judge.processor import ImageConfig

    q = jc.qwen3_vl
    model_dir = jc.get("model_dir", "") or q.get("model_dir", "")
    cfg, source = judge_config(jc, model_dir)
    pre = Path(model_dir) / "preprocessor_config.json" if model_dir else None
    image_cfg = ImageConfig.from_hf(json.loads(pre.read_text())) if pre is not None and pre.is_file() else None
    dtype = jnp.dtype(q.dtype)
    model = place_abstract(nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, dtype=dtype, rngs=nnx.Rngs(0),
                                                                                    rules=rules)), rules)
    dec = Decoder(model, rules, cache_dtype=dtype, max_length=q.get("max_length", 0) or None)
    mesh, rep = rules.mesh, _replicated(rules.mesh)
    n_batch = int(np.prod([mesh.shape[a] for a in np.atleast_1d(rules.rules["batch"])]))
    rows = int(q.batch_size)
    requests = pairs * (2 if jc.get("symmetrize", "off") not in ("off", "", None) else 1)
    calls = math.ceil(requests / rows)
    host = judge_inputs(cfg, rows=rows, images=images, height=height, width=width, text_tokens=text_tokens,
                        seq_bucket=int(q.seq_bucket or 1), patch_bucket=int(q.patch_bucket or 1),
                        image_bucket=int(q.image_bucket or 1), image_cfg=image_cfg)

    def place(k, v):  # as Decoder._put places them
        axis = 1 if k == "positions" else 0
        if k not in ("pixel_values", "pos_index", "pos_weight", "rope_pos", "patch_len") and v.shape[axis] % n_batch == 0:
            return batch_spec(rules, v.shape, v.dtype, axis)
        return _spec(v.shape, v.dtype, rep)

    inputs = {k: place(k, v) for k, v in host.items()}
    cand = _spec((2,), jnp.int32, rep)
    choice = (dec._choices, (dec.state, inputs, cand), calls)
    s = host["input_ids"].shape[1]
    t = s + int(q.max_new_tokens)
    layers, kvh, hd = cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim
    kv_spec = rules.sharding(("layers", "batch", "seq", "act_heads", None))
    cache = KVCache(k=_spec((layers, rows, t, kvh, hd), dtype, kv_spec), v=_spec((layers, rows, t, kvh, hd), dtype, kv_spec),
                    valid=_spec((rows, t), jnp.bool_, rep), index=_spec((), jnp.int32, rep),
                    next_pos=_spec((rows,), jnp.int32, rep))
    generate = not bool(jc.get("choice_scores", True))
    prefill = (dec._prefill, (dec.state, inputs, cache), calls if generate else 0)
    logits = batch_spec(rules, (rows, cfg.text.vocab_size), jnp.float32) if rows % n_batch == 0 else \
        _spec((rows, cfg.text.vocab_size), jnp.float32, rep)
    key = jax.eval_shape(lambda: jax.random.key(0))
    loop_fn = lambda st, lg, c, k, stops: dec._generate(  # noqa: E731  (static sampler settings)
        st, lg, c, k, stops, max_new_tokens=int(q.max_new_tokens), pad_id=0, temperature=float(q.temperature),
        top_p=float(q.top_p))
    loop = jax.jit(loop_fn, donate_argnums=(2,))
    gen = (loop, (dec.state, logits, cache, _spec(key.shape, key.dtype, rep), _spec((4,), jnp.int32, rep)),
           calls if generate else 0)
    programs = {"judge_choice": choice, "judge_prefill": prefill, "judge_decode": gen}
    return programs, {"judge": dec.state}, source


# ---------------------------------------------------------------------------- compile and measure

def memory_figures(compiled) -> dict[str, float]:
    """Per-device bytes from XLA's memory analysis of a compiled program."""
    m = compiled.memory_analysis()
    get = lambda n: float(getattr(m, n, math.nan)) if m is not None else math.nan  # noqa: E731
    return {"argument_bytes": get("argument_size_in_bytes"), "output_bytes": get("output_size_in_bytes"),
            "alias_bytes": get("alias_size_in_bytes"), "temp_bytes": get("temp_size_in_bytes")}


def compile_program(name: str, jitted, args: tuple, *, calls: int, placement: str, num_devices: int,
                    peak_flops: float, hbm_bytes_per_s: float) -> ProgramReport:
    """Lower and compile ``jitted(*args)`` for the mesh its arguments name; a compiler error (e.g.
    ``RESOURCE_EXHAUSTED`` when a program cannot fit) is kept in ``error``, not raised."""
    from arr_jax.perf import jaxpr_flops, xla_cost

    rep = ProgramReport(name=name, placement=placement, calls=calls)
    try:
        flops, _ = jaxpr_flops(jitted, *args)
        t0 = time.perf_counter()
        compiled = jitted.lower(*args).compile()
        rep.compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001  the compiler's own message is the report
        rep.error = " ".join(str(e).split())[:400]
        return rep
    for k, v in memory_figures(compiled).items():
        setattr(rep, k, v)
    ca = xla_cost(compiled)
    rep.flops = flops / num_devices
    xla_flops = ca.get("flops", math.nan)
    loops = rep.flops / xla_flops if xla_flops and math.isfinite(xla_flops) and xla_flops > 0 else 1.0
    once = ca.get("bytes accessed", math.nan)
    rep.bytes_accessed = once * max(loops, 1.0)
    # A lower bound needs lower bounds on both sides: the FLOPs are exact (trip counts included); XLA's
    # bytes count each loop body once, an under-count. The scaled estimate can overstate (weights read once
    # per layer, not once per trip), so it is reported but does not enter the bound.
    t_c = rep.flops / peak_flops
    t_m = once / hbm_bytes_per_s if math.isfinite(once) else 0.0
    rep.roofline_s, rep.bound = max(t_c, t_m), ("compute" if t_c >= t_m else "memory")
    return rep
