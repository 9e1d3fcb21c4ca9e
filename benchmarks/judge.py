"""Qwen3-VL judge throughput: ours (JAX) vs transformers (PyTorch), same config, same machine.

    python benchmarks/judge.py --preset tiny            # CPU smoke run, random weights (the test suite runs it)
    python benchmarks/judge.py --preset small           # CPU, 8-layer 512-wide text model
    python benchmarks/judge.py --preset qwen3-vl-8b     # GPU: Qwen3-VL-8B-Instruct shapes, random weights, bf16
    python benchmarks/judge.py --model_dir /path/Qwen3-VL-8B-Instruct --dtype bfloat16 --batch 8 --image_size 512

A batch is B pairwise-judge prompts: text, image 1, text, image 2, text (random tokens and pixels).
Rows (medians of interleaved repeats, `benchmarks/report.py`):

  like for like
    prefill tok/s          one prompt forward that fills the KV cache, next-token logits (ours `Decoder.prefill`;
                           HF forward with use_cache and ``logits_to_keep=1``, as its generate prefills)
    choice decisions/s     one prefill reading P(image 1 wins) from two answer tokens' log-probs (ours
                           `Decoder.score_choices`; HF the same forward with ``logits_to_keep=1``)
    decode tok/s           greedy tokens after the prefill (ours `Decoder.generate`; HF ``generate``)
  against the authors' release path
    release decisions/s    generate a JSON verdict of ``--verdict_tokens`` (30) tokens with HF ``generate``,
                           detokenise and parse it (what a user of the release runs per pair), vs our
                           one-prefill choice decision.

MFU = model FLOPs / time / peak, the same model FLOPs for both sides: the jaxpr count (`arr_jax.perf`)
of the full forward (every layer at every prompt position, the LM head at the last one; ours skips
part of the last layer, so it does less than that). Peak: ``--peak_tflops``, else the chip's tabled
bf16 peak, else (CPU) the machine's float32 matmul rate measured with JAX in the same run
(`report.matmul_peak`). A ratio whose repeats vary more than it, or whose calls are below the
timer's resolution, is shown as "not resolved" (`report.resolve`). The ``qwen3-vl-8b`` preset builds
both models from the published Qwen3-VL-8B-Instruct config with random weights on the device (no
files written: 16 GB would not fit a GPU lease); ``tiny`` and ``small`` save a transformers snapshot that both sides load.
JSON: ``runs/benchmarks/judge_<preset>.json``.

API rows (``--api``; `api_main`): the served judge (`arr_jax.judge.api.OpenAIBackend`) against the
loopback vLLM-schema server over our Flax Qwen3-VL (`arr_jax.judge.flax_server.FlaxChatServer`,
which batches concurrent requests): decisions/s in choice mode (one token, log-probs) against
generate-and-parse (``--verdict_tokens`` tokens), each at client concurrency 1 and ``--concurrency``.
``--model_dir`` a real snapshot (with tokenizer.json), else the test suite's tiny random judge.

    python benchmarks/judge.py --api --pairs 16 --concurrency 8
"""
from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402

# Qwen3-VL-8B-Instruct config.json (text_config / vision_config fields that fix the shapes).
QWEN3_VL_8B = dict(
    text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, mrope=[24, 20, 20], vocab_size=151936),
    vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
    ids=dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653),
    source="shapes", dtype="bfloat16", batch=8, image_size=512, text_len=300, new_tokens=32, reps=3)

PRESETS = {
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, mrope=[4, 2, 2], vocab_size=512),
                 vision=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=8,
                             num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
                 source="files", dtype="float32", batch=2, image_size=64, text_len=48, new_tokens=8, reps=2),
    "small": dict(text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, mrope=[12, 10, 10], vocab_size=8192),
                  vision=dict(depth=6, hidden_size=256, intermediate_size=768, num_heads=4, patch_size=16,
                              num_position_embeddings=256, deepstack_visual_indexes=[1, 3, 5]),
                  source="files", dtype="float32", batch=2, image_size=64, text_len=60, new_tokens=16, reps=3),
    "qwen3-vl-8b": QWEN3_VL_8B,
}
CHOICE_IDS = [11, 12]


def hf_config(preset: str):
    """The transformers ``Qwen3VLConfig`` of a preset."""
    from transformers import Qwen3VLConfig

    p = PRESETS[preset]
    t = dict(p["text"])
    mrope = t.pop("mrope")
    v = t["vocab_size"]
    ids = p.get("ids") or dict(image_token_id=v - 4, video_token_id=v - 3, vision_start_token_id=v - 2,
                               vision_end_token_id=v - 1)
    return Qwen3VLConfig(
        text_config=dict(**t, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=mrope,
                                              mrope_interleaved=True)),
        vision_config=dict(**p["vision"], spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=t["hidden_size"]), tie_word_embeddings=False, **ids)


def build_snapshot(preset: str) -> str:
    """A random transformers model of a files preset, saved to a temporary snapshot directory."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    d = tempfile.mkdtemp(prefix=f"qwen3_vl_{preset}_")
    Qwen3VLForConditionalGeneration(hf_config(preset)).save_pretrained(d)
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
    text = lambda n: rng.integers(0, min(cfg.text.vocab_size, cfg.vision_start_token_id) - 1, n).tolist()  # noqa: E731
    one = lambda: ([*text(text_len // 3), cfg.vision_start_token_id, *[cfg.image_token_id] * n_tok,  # noqa: E731
                    cfg.vision_end_token_id, *text(text_len // 3), cfg.vision_start_token_id,
                    *[cfg.image_token_id] * n_tok, cfg.vision_end_token_id, *text(text_len - 2 * (text_len // 3))])
    ids = np.array([one() for _ in range(batch)], np.int32)
    grids = np.array([grid] * (2 * batch))
    pv = rng.standard_normal((int(grids.prod(-1).sum()), vc.patch_dim)).astype(np.float32)
    return prepare_inputs(cfg, ids, np.ones_like(ids), pv, grids), pv, grids


def detokenise(ids) -> str:
    """A stand-in detokeniser (printable characters from ids): random weights make no words, and both
    sides' parse runs on the same kind of text."""
    return "".join(chr(32 + int(i) % 95) for i in ids)


def parse_verdicts(rows) -> list:
    from arr_jax.judge.parsing import parse_pairwise

    return [parse_pairwise(detokenise(r)) for r in rows]


class Ours:
    """Our Flax Qwen3-VL behind `arr_jax.judge.decode.Decoder`'s public methods."""

    def __init__(self, p: dict, model_dir, dtype: str, cfg, inputs, new_tokens: int, verdict_tokens: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from arr_jax.judge.decode import Decoder
        from arr_jax.models.qwen3_vl import Qwen3VLForConditionalGeneration

        dt = getattr(jnp, dtype)
        if model_dir is not None:
            from arr_jax.convert.qwen3_vl import load_qwen3_vl

            model, _ = load_qwen3_vl(model_dir, dt)
        else:  # random weights of the shapes, made on the device
            make = lambda: Qwen3VLForConditionalGeneration(cfg, dtype=dt, rngs=nnx.Rngs(0), rules=None)  # noqa: E731
            graphdef = nnx.graphdef(nnx.eval_shape(make))
            model = nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()))())
        self.dec = Decoder(model)
        self.inputs, self.new_tokens, self.verdict_tokens = inputs, new_tokens, verdict_tokens
        self.s = inputs["input_ids"].shape[1]

    def prefill(self):
        import jax

        jax.block_until_ready(self.dec.prefill(self.inputs, self.s + self.new_tokens))

    def choices(self):
        return self.dec.score_choices(self.inputs, CHOICE_IDS)

    def generate(self, n):
        return lambda: self.dec.generate(self.inputs, max_new_tokens=n)

    def release(self):
        return parse_verdicts(self.dec.generate(self.inputs, max_new_tokens=self.verdict_tokens))

    def prefill_flops(self) -> tuple[float, float, float]:
        """``(model, prefill program, choice program)`` FLOPs from jaxprs. Model FLOPs: the full
        forward (every layer at every position, the LM head at the last), the work both sides'
        MFU is counted on; our programs skip the last layer's queries and MLP at the other
        positions (`Qwen3VLTextModel` ``last_only``), so they count fewer."""
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from arr_jax import perf
        from arr_jax.judge.decode import choice_logprobs, init_cache, prefill
        from arr_jax.models.qwen3_vl import model_kwargs

        b = self.inputs["input_ids"].shape[0]
        dev = {k: jnp.asarray(v) for k, v in self.inputs.items() if k != "rope_deltas"}
        gd = self.dec.graphdef

        def full(state, inp):
            m = nnx.merge(gd, state)
            h = m.hidden_states(inp["input_ids"], inp["positions"], inp["attention_mask"], **model_kwargs(inp))
            return m.logits(h[:, -1])

        f_model, _ = perf.jaxpr_flops(jax.jit(full), self.dec.state, dev)
        cache = init_cache(self.dec.cfg, b, self.s + self.new_tokens, self.dec.cache_dtype)
        f_pre, _ = perf.jaxpr_flops(jax.jit(functools.partial(prefill, gd)), self.dec.state, dev, cache)
        f_cho, _ = perf.jaxpr_flops(jax.jit(functools.partial(choice_logprobs, gd)), self.dec.state,
                                    dev, jnp.asarray(CHOICE_IDS, jnp.int32))
        return f_model, f_pre, f_cho


class Torch:
    """transformers' Qwen3VLForConditionalGeneration: forward, generate, and the release's verdict path."""

    def __init__(self, preset: str, model_dir, dtype: str, inputs, pv, grids, new_tokens: int, verdict_tokens: int):
        import torch
        from transformers import Qwen3VLForConditionalGeneration

        self.torch = torch
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        dt = getattr(torch, dtype)
        if model_dir is not None:
            model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=dt).to(dev)
        else:
            torch.manual_seed(0)
            with torch.device(dev):
                model = Qwen3VLForConditionalGeneration._from_config(hf_config(preset), dtype=dt)
        self.model = model.eval()
        cfg = model.config
        ids = torch.tensor(inputs["input_ids"], dtype=torch.long, device=dev)
        self.kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=torch.tensor(pv, device=dev, dtype=dt),
                       image_grid_thw=torch.tensor(grids, device=dev),
                       mm_token_type_ids=(ids == cfg.image_token_id).long())
        self.new_tokens, self.verdict_tokens = new_tokens, verdict_tokens
        self.sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        self.device = dev

    def prefill(self):
        # as generate's prefill: fill the cache, logits at the last position only
        with self.torch.no_grad():
            self.model(**self.kw, use_cache=True, logits_to_keep=1)
        self.sync()

    def choices(self):
        with self.torch.no_grad():
            lp = self.torch.log_softmax(self.model(**self.kw, logits_to_keep=1).logits[:, -1].float(), -1)
            return lp[:, CHOICE_IDS].cpu().numpy()  # on the host, as ours

    def _gen(self, n):
        with self.torch.no_grad():
            out = self.model.generate(**self.kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        self.sync()
        return out[:, self.kw["input_ids"].shape[1]:].cpu().numpy()

    def generate(self, n):
        return lambda: self._gen(n)

    def release(self):
        return len(parse_verdicts(self._gen(self.verdict_tokens)))

    def info(self) -> dict:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads(), "device": self.device}


def api_main(argv=None) -> dict:
    """The API rows (module docstring): {"rows": {"<mode> c<concurrency>": decisions/s}, ...}."""
    import time

    ap = argparse.ArgumentParser(description="API judge rows of benchmarks/judge.py")
    ap.add_argument("--api", action="store_true")
    ap.add_argument("--model_dir", default=None)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--verdict_tokens", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_vlm_judge import RUBRIC, judge_snapshot, pair_batch

    from arr_jax.judge.api import OpenAIBackend
    from arr_jax.judge.flax_server import FlaxChatServer
    from arr_jax.judge.text_judge import TextJudge
    from arr_jax.judge.vlm_backend import FlaxVLMBackend

    b = FlaxVLMBackend.from_snapshot(args.model_dir or judge_snapshot(), "float32", max_new_tokens=16, batch_size=8,
                                     seq_bucket=128)
    prompts, i1, i2 = pair_batch(args.pairs)
    result = report.header("judge_api")
    rows = {}
    with FlaxChatServer(b, "judge", max_batch=max(args.concurrency, 1), max_new_tokens=args.verdict_tokens) as srv:
        for mode in ("choice", "generate"):
            for conc in (1, args.concurrency):
                def run():
                    be = OpenAIBackend(model="judge", endpoint=srv.url, api_key="", concurrency=conc,
                                       max_tokens=args.verdict_tokens)
                    judge = TextJudge(be, choice_scores=mode == "choice")
                    t0 = time.perf_counter()
                    judge.compare(prompts, i1, i2, RUBRIC)
                    return time.perf_counter() - t0
                run()                                   # compile the server's shapes
                took = min(run() for _ in range(2))
                rows[f"{mode} c{conc}"] = args.pairs / took
                print(f"API judge {mode:8s} concurrency {conc:2d}: {args.pairs / took:8.1f} decisions/s", flush=True)
    result.update(rows=rows, pairs=args.pairs, verdict_tokens=args.verdict_tokens, unit="decisions/s",
                  server="FlaxChatServer (loopback, batched)", model_dir=args.model_dir or "tiny random")
    out = Path(args.out or "runs/benchmarks/judge_api.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    import json

    out.write_text(json.dumps(result, indent=1, default=str))
    return result


def main(argv=None) -> dict:
    if "--api" in (sys.argv[1:] if argv is None else argv):
        return api_main(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", default=None, help="a real snapshot (overrides the preset's weights)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--image_size", type=int, default=None)
    ap.add_argument("--text_len", type=int, default=None)
    ap.add_argument("--new_tokens", type=int, default=None, help="decode tokens for the decode rate")
    ap.add_argument("--verdict_tokens", type=int, default=30, help="tokens of the release path's JSON verdict")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no_torch", action="store_true")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak, for MFU (default: arr_jax.perf)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from arr_jax import perf
    from arr_jax.models.qwen3_vl import Qwen3VLConfig

    p = PRESETS[args.preset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else p[name]  # noqa: E731
    dtype, B, image_size, text_len, new_tokens, reps = (pick(k) for k in ("dtype", "batch", "image_size", "text_len",
                                                                          "new_tokens", "reps"))
    result = report.header("judge")
    if args.model_dir:
        model_dir = args.model_dir
    else:
        model_dir = build_snapshot(args.preset) if p["source"] == "files" else None
    cfg = Qwen3VLConfig.from_dir(model_dir) if model_dir else Qwen3VLConfig.from_hf(hf_config(args.preset).to_dict())
    inputs, pv, grids = make_batch(cfg, B, image_size, text_len)
    s = inputs["input_ids"].shape[1]
    ours = Ours(p, model_dir, dtype, cfg, inputs, new_tokens, args.verdict_tokens)
    ref = None
    if not args.no_torch:
        ref = report.Side(Torch, args.preset, model_dir, dtype, inputs, pv, grids, new_tokens, args.verdict_tokens)
    t = {}
    for metric, method in (("prefill", "prefill"), ("choice", "choices"), ("release", "release")):
        sides = {"ours": getattr(ours, method)}
        if ref is not None:
            sides["transformers"] = ref.fn(method)
        t[metric] = report.interleaved(sides, reps)
    for metric, n in (("gen1", 1), ("genN", new_tokens)):
        sides = {"ours": ours.generate(n)}
        if ref is not None:
            sides["transformers"] = ref.fn("_gen", n)
        t[metric] = report.interleaved(sides, reps)
    if ref is not None:
        result["torch_side"] = ref.call("info")
        ref.close()
    f_model, f_pre, f_cho = ours.prefill_flops()
    peak_info = None
    if args.peak_tflops:
        peak = args.peak_tflops * 1e12
    elif perf.chip_spec() is None:  # CPU: the machine's measured matmul rate (JAX, float32)
        peak_info = report.matmul_peak()
        peak = peak_info["tflop_s"] * 1e12
    else:
        peak = None  # the chip's tabled bf16 peak (`arr_jax.perf.CHIPS`)

    def side(n):
        m = lambda k: t[k].get(n, {}).get("median_s")  # noqa: E731
        if m("prefill") is None:
            return {}
        dec = m("genN") - m("gen1")  # the new_tokens - 1 decode steps
        return {"prefill_tok_s": B * s / m("prefill"), "decisions_s": B / m("choice"),
                "decode_tok_s": B * (new_tokens - 1) / dec if dec > 0 else None, "release_decisions_s": B / m("release"),
                "prefill_tflop_s": f_model / m("prefill") / 1e12,
                "prefill_mfu": perf.mfu(f_model, m("prefill"), peak_flops=peak),
                "choice_mfu": perf.mfu(f_model, m("choice"), peak_flops=peak)}

    o, r = side("ours"), side("transformers")
    rows = [
        {"row": "prefill tok/s (like for like)", "ours": o["prefill_tok_s"], "ref": r.get("prefill_tok_s")},
        {"row": "choice decisions/s (like for like)", "ours": o["decisions_s"], "ref": r.get("decisions_s")},
        {"row": "decode tok/s (like for like)", "ours": o["decode_tok_s"], "ref": r.get("decode_tok_s")},
        {"row": f"decisions/s: our choice vs release ({args.verdict_tokens}-token JSON verdict, parsed)",
         "ours": o["decisions_s"], "ref": r.get("release_decisions_s")},
        {"row": "prefill MFU", "ours": o["prefill_mfu"], "ref": r.get("prefill_mfu")},
        {"row": "prefill TFLOP/s", "ours": o["prefill_tflop_s"], "ref": r.get("prefill_tflop_s")},
    ]
    have = lambda k: [t[k]["transformers"]] if "transformers" in t[k] else []  # noqa: E731
    for row, ours_t, ref_t in zip(rows, ([t["prefill"]["ours"]], [t["choice"]["ours"]],
                                         [t["genN"]["ours"], t["gen1"]["ours"]], [t["choice"]["ours"]]),
                                  (have("prefill"), have("choice"), have("genN") + have("gen1"), have("release"))):
        report.add_ratio(row, "ours", "ref", ours_t, ref_t)
    for name in ("ours", "transformers"):  # a decode rate is a difference of two calls' times
        n_t, one_t = t["genN"].get(name, {}).get("times_s"), t["gen1"].get(name, {}).get("times_s")
        if rows[2]["ratio_status"] == "ok" and n_t and one_t and min(n_t) <= max(one_t):
            rows[2]["ratio_status"] = "noise"
            rows[2]["ratio_shown"] = (f"not resolved: {name}'s {new_tokens}-token and 1-token generate times "
                                      "overlap between repeats")
    result.update({"preset": args.preset, "model_dir": model_dir, "dtype": dtype, "batch": B, "prompt_tokens": s,
                   "image_size": image_size, "new_tokens": new_tokens, "verdict_tokens": args.verdict_tokens,
                   "reps": reps, "timing": t, "ours": o, "transformers": r, "model_flops": f_model,
                   "prefill_flops": f_pre, "choice_flops": f_cho, "rows": rows, "peak": peak_info or (
                       {"tflop_s": peak / 1e12, "source": "--peak_tflops"} if peak else None)})
    md = report.table(rows, [("metric", "row"), ("ours", "ours"), ("transformers", "ref"), ("ratio", "ratio_shown")])
    md += (f"\n\nQwen3-VL judge ({args.preset}): batch {B} pairs, {s} prompt tokens, {dtype}; model FLOPs of a "
           f"prefill {f_model / 1e9:.2f} G (ours computes {f_pre / 1e9:.2f} G: the last layer at the last position "
           f"only); MFU = model FLOPs / s / peak, peak "
           + (f"{peak_info['tflop_s'] * 1e3:.0f} GFLOP/s measured ({peak_info['n']}^3 float32 matmul, JAX, load "
              f"{peak_info['load']})" if peak_info else ("tabled for the chip" if peak is None else
                                                          f"{peak / 1e12:.3g} TFLOP/s given")))
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/judge_{args.preset}.json")
    report.print_result("judge", md, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
