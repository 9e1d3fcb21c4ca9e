"""Before/after of each optimisation, measured side by side in one process (ours only).

    python benchmarks/ablation.py --preset small --what update
    python benchmarks/ablation.py --preset small --what rollout
    python benchmarks/ablation.py --preset small --what judge      # the judge presets of benchmarks/judge.py

Each variant is a trainer on the same snapshot built and compiled with some optimisations switched
back to their previous form; the timed calls then run interleaved (variant after variant, ``--reps``
rounds) and each variant's figure is its median. Variants:

  before        LoRA gradients by JAX autodiff, attention contracting the (B, S, H, D) layout
                (arr_jax as of issue 12's first measurement)
  +lora_vjp     the hand-written LoRA backward (`arr_jax.nn.layers.lora_delta`)
  +attention    the heads-major attention with q pre-scaled (`arr_jax.nn.attention.dot_product_attention`)
  after         both (the current code)
  after+scan    the current code with scanned blocks (`FluxConfig.scan_blocks`): compile time

``--what judge`` (issue #22): the Qwen3-VL judge's prefill (`Decoder.prefill`, KV cache for the
prompt + ``new_tokens``) and choice scoring (`Decoder.score_choices`), as it was and as it is:

  before        a fresh ``jax.jit`` of the empty-cache maker per prefill (recompiled every call); the
                last layer's queries, MLP at every position; the prefill's queries attending over
                all of the cache's slots (the cache index traced, as it was)
  +cache_maker  the cache maker compiled once, the programs as before
  after         the current code (`Qwen3VLTextModel` ``last_only``, prefill over its own keys)

The previous forms are restored by patching the two module-level functions while a variant is traced
(`patched`), so every variant compiles its own program. JSON: runs/benchmarks/ablation_<what>_<preset>.json.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import flux_presets as fp  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.rollout import build_trainer  # noqa: E402
from benchmarks.update import LOSS  # noqa: E402


def lora_delta_autodiff(x, a, b, scale):
    """The LoRA update as it was: plain expression, gradients by JAX's transpose rules."""
    import jax.numpy as jnp

    return (scale * jnp.matmul(jnp.matmul(x, a), b)).astype(x.dtype)


def attention_bshd(q, k, v, *, impl="xla", kv_mask=None):
    """Attention as it was: contracting (B, S, H, D) directly, logits scaled after the product
    (``kv_mask`` (B, T) as `arr_jax.nn.attention.dot_product_attention` takes it since)."""
    import jax
    import jax.numpy as jnp

    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    if kv_mask is not None:
        logits = jnp.where(kv_mask.astype(bool)[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


@contextlib.contextmanager
def patched(lora_vjp: bool, attention: bool):
    """Swap the previous forms in (for tracing) where a flag is False."""
    from arr_jax.nn import attention as attn_mod
    from arr_jax.nn import layers

    saved = layers.lora_delta, attn_mod.dot_product_attention
    if not lora_vjp:
        layers.lora_delta = lora_delta_autodiff
    if not attention:
        attn_mod.dot_product_attention = attention_bshd
    try:
        yield
    finally:
        layers.lora_delta, attn_mod.dot_product_attention = saved


VARIANTS = {"before": dict(lora_vjp=False, attention=False), "+lora_vjp": dict(lora_vjp=True, attention=False),
            "+attention": dict(lora_vjp=False, attention=True), "after": dict(lora_vjp=True, attention=True),
            "after+scan": dict(lora_vjp=True, attention=True, scan_blocks=True)}


def judge_before_programs(dec):
    """The judge's programs as they were before issue #22 (see the module docstring), on ``dec``'s model."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.judge.decode import KVCache
    from arr_jax.models.qwen3_vl import model_kwargs

    def prefill(graphdef, state, inputs, cache):
        model = nnx.merge(graphdef, state)
        ids, am = inputs["input_ids"], inputs["attention_mask"] > 0
        s, t = ids.shape[1], cache.max_len
        valid = jax.lax.dynamic_update_slice(cache.valid, am, (0, 0))
        mask = (jnp.arange(t)[None, :] <= jnp.arange(s)[:, None])[None] & valid[:, None, :]
        hidden, ck, cv = model.hidden_states(ids, inputs["positions"], am, cache_k=cache.k, cache_v=cache.v,
                                             cache_index=jnp.zeros((), jnp.int32), mask=mask, **model_kwargs(inputs))
        logits = model.logits(hidden[:, -1])
        return logits, KVCache(k=ck, v=cv, valid=valid, index=jnp.asarray(s, jnp.int32), next_pos=cache.next_pos)

    def choices(graphdef, state, inputs, candidate_ids):
        model = nnx.merge(graphdef, state)
        hidden = model.hidden_states(inputs["input_ids"], inputs["positions"], inputs["attention_mask"],
                                     **model_kwargs(inputs))
        return jnp.take(jax.nn.log_softmax(model.logits(hidden[:, -1]), axis=-1), candidate_ids, axis=-1)

    def init_cache_fresh(cfg, batch, max_len, dtype):
        t = cfg.text
        shape = (t.num_hidden_layers, batch, max_len, t.num_key_value_heads, t.head_dim)

        def make():
            z = jnp.zeros(shape, dtype)
            return KVCache(k=z, v=z, valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32),
                           next_pos=jnp.zeros((batch,), jnp.int32))

        return jax.jit(make)()

    return (jax.jit(functools.partial(prefill, dec.graphdef), donate_argnums=(2,)),
            jax.jit(functools.partial(choices, dec.graphdef)), init_cache_fresh)


def judge_ablation(args) -> dict:
    """Before/after of the judge's prefill and choice scoring (ours only, one process, interleaved)."""
    import jax
    import jax.numpy as jnp

    from arr_jax.judge.decode import init_cache
    from arr_jax.models.qwen3_vl import Qwen3VLConfig
    from benchmarks import judge as J

    if args.preset not in J.PRESETS:
        raise SystemExit(f"--what judge takes a judge preset ({', '.join(sorted(J.PRESETS))}), not {args.preset!r}")
    p = J.PRESETS[args.preset]
    result = report.header("ablation")
    model_dir = J.build_snapshot(args.preset)
    cfg = Qwen3VLConfig.from_dir(model_dir)
    inputs, _, _ = J.make_batch(cfg, p["batch"], p["image_size"], p["text_len"])
    ours = J.Ours(p, model_dir, p["dtype"], cfg, inputs, p["new_tokens"], 30)
    dec, s = ours.dec, ours.s
    t_len = s + p["new_tokens"]
    pre_old, cho_old, fresh = judge_before_programs(dec)
    cands = jnp.asarray(J.CHOICE_IDS, jnp.int32)
    b = inputs["input_ids"].shape[0]

    def prefill_with(maker, program):
        def run():
            cache = maker(dec.cfg, b, t_len, dec.cache_dtype)
            jax.block_until_ready(program(dec.state, dec._put(inputs), cache))
        return run

    sides = {"prefill before": prefill_with(fresh, pre_old), "prefill +cache_maker": prefill_with(init_cache, pre_old),
             "prefill after": lambda: jax.block_until_ready(dec.prefill(inputs, t_len)),
             "choice before": lambda: np.asarray(cho_old(dec.state, dec._put(inputs), cands)),
             "choice after": lambda: dec.score_choices(inputs, J.CHOICE_IDS)}
    ref_pre = np.asarray(dec.prefill(inputs, t_len)[0])
    np.testing.assert_allclose(np.asarray(pre_old(dec.state, dec._put(inputs), init_cache(dec.cfg, b, t_len,
                                                                                          dec.cache_dtype))[0]),
                               ref_pre, rtol=1e-4, atol=1e-4)  # the same logits before and after
    timing = report.interleaved(sides, args.reps)
    rows = []
    for op in ("prefill", "choice"):
        base = timing[f"{op} before"]
        for name, t in timing.items():
            if name.startswith(op):
                row = {"variant": name, "ms": 1e3 * t["median_s"], "before_ms": 1e3 * base["median_s"]}
                report.add_ratio(row, "ms", "before_ms", [t], [base], higher_is_better=False)
                if t is base:
                    row["ratio_shown"] = "1 (baseline)"
                rows.append(row)
    result.update({"preset": args.preset, "what": "judge", "batch": b, "prompt_tokens": s, "cache_len": t_len,
                   "rows": rows, "timing": timing})
    md = report.table(rows, [("variant", "variant"), ("median ms / call", "ms"), ("speedup vs before", "ratio_shown")])
    md += (f"\n\nours only, judge preset {args.preset}: batch {b}, {s} prompt tokens, cache {t_len}; medians of "
           f"{args.reps} interleaved rounds after one warm-up each")
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/ablation_judge_{args.preset}.json")
    report.print_result("ablation (judge)", md, result)
    print(f"wrote {out}")
    return result


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="a FLUX preset (update, rollout) or a judge preset (judge)")
    ap.add_argument("--what", default="update", choices=["update", "rollout", "judge"])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.what == "judge":
        return judge_ablation(args)
    import jax

    if args.preset not in fp.PRESETS:
        raise SystemExit(f"--what {args.what} takes a FLUX preset ({', '.join(sorted(fp.PRESETS))}), "
                         f"not {args.preset!r}")
    base = fp.PRESETS[args.preset]
    steps = base["update_steps"] if args.what == "update" else base["steps"]
    B = args.batch or (base["update_batch"] if args.what == "update" else base["rollout_batch"])
    result = report.header("ablation")
    adv = np.tile(np.asarray([1.0, -0.1], np.float32), B // 2)
    sides, trainers, compile_s = {}, {}, {}
    for name in args.variants.split(","):
        v = VARIANTS[name]
        p = fp.preset(args.preset, steps=steps, scan_blocks=v.get("scan_blocks", False))
        model_dir = fp.snapshot_dir(p)
        with patched(v["lora_vjp"], v["attention"]):
            tr = build_trainer(p, model_dir, "xla", batch=B, kl_type="k1", **LOSS)
            batch = tr.rollout(fp.prompts(B // 2), jax.random.key(0))
            if args.what == "update":
                fn = (lambda tr, batch: lambda: tr.optimizer_step(batch, adv))(tr, batch)
            else:
                fn = (lambda tr: lambda: tr.rollout(fp.prompts(B // 2), jax.random.key(1)))(tr)
            fn()  # compiles this variant's programs under the patch
        progs = tr.programs
        compile_s[name] = {n: getattr(progs, n).compile_s for n in ("rollout", "ref_pass", "train_step")}
        sides[name], trainers[name] = fn, tr
    timing = report.interleaved(sides, args.reps, warmup=0)
    first = timing[next(iter(timing))]
    rows = [{"variant": n, "seconds": t["median_s"], "speedup": first["median_s"] / t["median_s"], "min_s": t["min_s"],
             "speedup_min": first["min_s"] / t["min_s"],
             "compile_s": compile_s[n]["train_step" if args.what == "update" else "rollout"]}
            for n, t in timing.items()]
    for row, t in zip(rows, timing.values()):
        row["speedup_status"], row["speedup_shown"] = report.resolve(row["speedup"], [t], [first])
        if t is first:
            row["speedup_shown"] = "1 (baseline)"
    result.update({"preset": args.preset, "what": args.what, "batch": B, "steps": steps, "rows": rows,
                   "timing": timing, "compile_s": compile_s})
    md = report.table(rows, [("variant", "variant"), ("median s / call", "seconds"),
                             (f"speedup vs {rows[0]['variant']}", "speedup_shown"), ("min s / call", "min_s"),
                             ("speedup (min)", "speedup_min"), ("compile s", "compile_s")])
    md += f"\n\nours only, {args.what} on preset {args.preset}: batch {B}, T={steps}; medians of {args.reps} interleaved rounds"
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/ablation_{args.what}_{args.preset}.json")
    report.print_result(f"ablation ({args.what})", md, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
