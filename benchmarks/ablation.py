"""Before/after of each optimisation, measured side by side in one process (ours only).

    python benchmarks/ablation.py --preset small --what update
    python benchmarks/ablation.py --preset small --what rollout

Each variant is a trainer on the same snapshot built and compiled with some optimisations switched
back to their previous form; the timed calls then run interleaved (variant after variant, ``--reps``
rounds) and each variant's figure is its median. Variants:

  before        LoRA gradients by JAX autodiff, attention contracting the (B, S, H, D) layout
                (arr_jax as of issue 12's first measurement)
  +lora_vjp     the hand-written LoRA backward (`arr_jax.nn.layers.lora_delta`)
  +attention    the heads-major attention with q pre-scaled (`arr_jax.nn.attention.dot_product_attention`)
  after         both (the current code)
  after+scan    the current code with scanned blocks (`FluxConfig.scan_blocks`): compile time

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


def attention_bshd(q, k, v, *, impl="xla"):
    """Attention as it was: contracting (B, S, H, D) directly, logits scaled after the product."""
    import jax
    import jax.numpy as jnp

    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(fp.PRESETS))
    ap.add_argument("--what", default="update", choices=["update", "rollout"])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax

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
    result.update({"preset": args.preset, "what": args.what, "batch": B, "steps": steps, "rows": rows,
                   "timing": timing, "compile_s": compile_s})
    md = report.table(rows, [("variant", "variant"), ("median s / call", "seconds"),
                             (f"speedup vs {rows[0]['variant']}", "speedup"), ("min s / call", "min_s"),
                             ("speedup (min)", "speedup_min"), ("compile s", "compile_s")])
    md += f"\n\nours only, {args.what} on preset {args.preset}: batch {B}, T={steps}; medians of {args.reps} interleaved rounds"
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/ablation_{args.what}_{args.preset}.json")
    report.print_result(f"ablation ({args.what})", md, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
