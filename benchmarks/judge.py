"""Qwen3-VL judge throughput: ours (JAX) vs transformers (PyTorch), same config, same machine.

Measures prefill tokens/s, decode tokens/s and pairwise decisions/s (one prefill over a prompt
with two images + the log-probs of two answer tokens), with XLA's FLOP and byte counts for our
programs, and MFU / bandwidth use when the peak numbers are known. Prints a table and writes JSON.

  python benchmarks/judge.py --preset tiny                     # CPU smoke run, random weights
  python benchmarks/judge.py --model_dir /path/Qwen3-VL-8B-Instruct --dtype bfloat16 --batch 8 \
      --image_size 512 --new_tokens 64 --peak_tflops 989 --peak_gbps 4800   # H200

Without ``--model_dir`` a random model of the preset size is built with transformers and saved to a
temporary snapshot, which both implementations then load.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, mrope=[4, 2, 2], vocab_size=512),
                 vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                             num_position_embeddings=16, deepstack_visual_indexes=[0, 1])),
    "small": dict(text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, mrope=[12, 10, 10], vocab_size=8192),
                  vision=dict(depth=6, hidden_size=256, intermediate_size=768, num_heads=4, patch_size=16,
                              num_position_embeddings=256, deepstack_visual_indexes=[1, 3, 5])),
}


def build_snapshot(preset: str) -> str:
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    p = PRESETS[preset]
    t = dict(p["text"])
    mrope = t.pop("mrope")
    v = t["vocab_size"]
    cfg = Qwen3VLConfig(
        text_config=dict(**t, max_position_embeddings=32768,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=mrope,
                                              mrope_interleaved=True)),
        vision_config=dict(**p["vision"], spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=t["hidden_size"]),
        image_token_id=v - 4, video_token_id=v - 3, vision_start_token_id=v - 2, vision_end_token_id=v - 1)
    torch.manual_seed(0)
    d = tempfile.mkdtemp(prefix=f"qwen3_vl_{preset}_")
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(d)
    return d


def make_batch(cfg, batch: int, image_size: int, text_len: int, seed: int = 0):
    """Pairwise-judge prompts: text, image 1, text, image 2, text (random tokens and pixels)."""
    from arr_jax.judge.processor import smart_resize
    from arr_jax.models.qwen3_vl import prepare_inputs

    vc = cfg.vision
    factor = vc.patch_size * vc.spatial_merge_size
    h, w = smart_resize(image_size, image_size, factor, 4 * factor * factor, 1 << 24)
    grid = [1, h // vc.patch_size, w // vc.patch_size]
    n_tok = grid[1] * grid[2] // vc.spatial_merge_size ** 2
    rng = np.random.default_rng(seed)
    text = lambda n: rng.integers(0, min(cfg.text.vocab_size, cfg.image_token_id) - 1, n).tolist()  # noqa: E731
    one = lambda: ([*text(text_len // 3), cfg.vision_start_token_id, *[cfg.image_token_id] * n_tok,  # noqa: E731
                    cfg.vision_end_token_id, *text(text_len // 3), cfg.vision_start_token_id,
                    *[cfg.image_token_id] * n_tok, cfg.vision_end_token_id, *text(text_len - 2 * (text_len // 3))])
    ids = np.array([one() for _ in range(batch)], np.int32)
    grids = np.array([grid] * (2 * batch))
    pv = rng.standard_normal((int(grids.prod(-1).sum()), vc.patch_dim)).astype(np.float32)
    return prepare_inputs(cfg, ids, np.ones_like(ids), pv, grids), pv, grids


def timeit(fn, reps: int) -> float:
    """Median wall time of ``reps`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cost(jitted, *args, **kw) -> dict:
    try:
        c = jitted.lower(*args, **kw).compile().cost_analysis()
        c = c[0] if isinstance(c, (list, tuple)) else c
        return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}
    except Exception as e:  # cost analysis is best effort
        return {"flops": math.nan, "bytes": math.nan, "error": str(e)}


def bench_ours(model_dir, dtype, inputs, new_tokens, reps):
    import jax
    import jax.numpy as jnp

    from arr_jax.convert.qwen3_vl import load_qwen3_vl
    from arr_jax.judge.decode import Decoder, decode_step, init_cache

    model, cfg = load_qwen3_vl(model_dir, getattr(jnp, dtype))
    dec = Decoder(model)
    dev = dec._put(inputs)
    b, s = inputs["input_ids"].shape
    cands = jnp.asarray([11, 12], jnp.int32)

    def prefill():
        logits, cache = dec._prefill(dec.state, dev, init_cache(cfg, b, s + new_tokens, dec.cache_dtype))
        return jax.block_until_ready(logits), cache

    def gen(n):
        return lambda: jax.block_until_ready(dec.generate(inputs, max_new_tokens=n))

    def choices():
        return jax.block_until_ready(dec._choices(dec.state, dev, cands))

    t_prefill = timeit(prefill, reps)
    t_one, t_full = timeit(gen(1), reps), timeit(gen(new_tokens), reps)
    t_choice = timeit(choices, reps)
    cache = init_cache(cfg, b, s + new_tokens, dec.cache_dtype)
    c_pre = cost(dec._prefill, dec.state, dev, cache)
    _, cache = prefill()
    step = jax.jit(lambda st, tok, c: decode_step(dec.graphdef, st, tok, c))
    c_dec = cost(step, dec.state, jnp.zeros((b,), jnp.int32), cache)
    c_cho = cost(dec._choices, dec.state, dev, cands)
    t_dec = max(t_full - t_one, 1e-9)  # the (new_tokens - 1) decode steps
    return {
        "prefill_s": t_prefill, "prefill_tok_s": b * s / t_prefill,
        "decode_s": t_dec, "decode_tok_s": b * (new_tokens - 1) / t_dec,
        "choice_s": t_choice, "decisions_s": b / t_choice,
        "prefill_flops": c_pre["flops"], "prefill_bytes": c_pre["bytes"],
        "decode_step_flops": c_dec["flops"], "decode_step_bytes": c_dec["bytes"],
        "choice_flops": c_cho["flops"], "choice_bytes": c_cho["bytes"],
        "device": str(jax.devices()[0].platform),
    }


def bench_torch(model_dir, dtype, inputs, pv, grids, new_tokens, reps):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(dev).eval()
    cfg = model.config
    ids = torch.tensor(inputs["input_ids"], dtype=torch.long, device=dev)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.tensor(pv, device=dev),
              image_grid_thw=torch.tensor(grids, device=dev), mm_token_type_ids=(ids == cfg.image_token_id).long())
    b, s = ids.shape
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def prefill():
        with torch.no_grad():
            model(**kw, use_cache=True)
        sync()

    def gen(n):
        def run():
            with torch.no_grad():
                model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync()
        return run

    def choices():
        with torch.no_grad():
            torch.log_softmax(model(**kw, logits_to_keep=1).logits[:, -1].float(), -1)[:, [11, 12]]
        sync()

    t_prefill = timeit(prefill, reps)
    t_one, t_full = timeit(gen(1), reps), timeit(gen(new_tokens), reps)
    t_choice = timeit(choices, reps)
    t_dec = max(t_full - t_one, 1e-9)
    return {"prefill_s": t_prefill, "prefill_tok_s": b * s / t_prefill, "decode_s": t_dec,
            "decode_tok_s": b * (new_tokens - 1) / t_dec, "choice_s": t_choice, "decisions_s": b / t_choice,
            "device": dev}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--text_len", type=int, default=48)
    ap.add_argument("--new_tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no_torch", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak, for MFU")
    ap.add_argument("--peak_gbps", type=float, default=None, help="device memory bandwidth, for utilisation")
    ap.add_argument("--out", default="runs/benchmarks/judge_results.json")
    args = ap.parse_args(argv)

    from arr_jax.models.qwen3_vl import Qwen3VLConfig

    model_dir = args.model_dir or build_snapshot(args.preset)
    cfg = Qwen3VLConfig.from_dir(model_dir)
    inputs, pv, grids = make_batch(cfg, args.batch, args.image_size, args.text_len)
    b, s = inputs["input_ids"].shape
    res = {"config": {k: v for k, v in vars(args).items()}, "prompt_tokens": s, "batch": b,
           "ours": bench_ours(model_dir, args.dtype, inputs, args.new_tokens, args.reps)}
    if not args.no_torch:
        res["transformers"] = bench_torch(model_dir, args.dtype, inputs, pv, grids, args.new_tokens, args.reps)

    o = res["ours"]
    o["prefill_tflop_s"] = o["prefill_flops"] / o["prefill_s"] / 1e12
    o["decode_gb_s"] = o["decode_step_bytes"] * (args.new_tokens - 1) / o["decode_s"] / 1e9
    if args.peak_tflops:
        o["prefill_mfu"] = o["prefill_tflop_s"] / args.peak_tflops
    if args.peak_gbps:
        o["decode_bw_util"] = o["decode_gb_s"] / args.peak_gbps

    rows = [("prefill tok/s", "prefill_tok_s"), ("decode tok/s", "decode_tok_s"),
            ("pairwise decisions/s", "decisions_s")]
    print(f"\nQwen3-VL judge  batch={b} prompt={s} tokens new={args.new_tokens} dtype={args.dtype} "
          f"device={o['device']}")
    print(f"{'metric':<24}{'ours':>14}{'transformers':>14}{'ratio':>8}")
    for name, key in rows:
        ref = res.get("transformers", {}).get(key)
        ratio = f"{o[key] / ref:8.2f}" if ref else f"{'-':>8}"
        print(f"{name:<24}{o[key]:>14.1f}{(ref if ref else float('nan')):>14.1f}{ratio}")
    print(f"{'prefill GFLOP / GB':<24}{o['prefill_flops'] / 1e9:>14.3f}{o['prefill_bytes'] / 1e9:>14.3f}")
    print(f"{'decode step GFLOP / GB':<24}{o['decode_step_flops'] / 1e9:>14.4f}{o['decode_step_bytes'] / 1e9:>14.4f}")
    print(f"{'prefill TFLOP/s':<24}{o['prefill_tflop_s']:>14.4f}"
          + (f"   MFU {o['prefill_mfu']:.1%}" if "prefill_mfu" in o else ""))
    print(f"{'decode GB/s':<24}{o['decode_gb_s']:>14.2f}"
          + (f"   BW util {o['decode_bw_util']:.1%}" if "decode_bw_util" in o else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
