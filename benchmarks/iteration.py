"""One whole RPO iteration, seconds and MFU per phase: rollout, decode, judge, reference pass, update.

    python benchmarks/iteration.py --preset tiny       # CPU: tiny FLUX snapshot + tiny Flax Qwen3-VL judge
    python benchmarks/iteration.py --preset flux-dev   # GPU: FLUX.1-dev shapes + Qwen3-VL-8B shapes (random
                                                       # weights, bf16) on one device; --pairs sets the batch

The iteration is `RPOTrainer.step` (the public API): rollout of 2 samples per prompt (T SDE steps,
jitted scan), VAE decode to uint8 on the host (the only host round-trip: the judge needs images),
the judge (our Flax Qwen3-VL in the same process, one-prefill choice scores under the rubric's
prompt), rewards, the LoRA-off reference pass, the forward-only logp_old recompute and the
optimiser step(s). Seconds per phase come from ``trainer.timing``; FLOPs per phase from the jaxprs
of the programs the phase ran (`arr_jax.perf.Instrumented` around the trainer's programs; the judge's
choice program is counted on the inputs it was called with). The first iteration compiles (its
times are reported as ``compile_iteration``); the figures are the median of ``--iters`` more.

flux-dev on one H200: FLUX.1-dev bf16 (23.8 GB) + Qwen3-VL-8B bf16 (17.5 GB) + activations. The
paper's batch is 32 pairs; ``--pairs`` defaults to 8 (16 samples, one micro-batch) to keep the GPU
suite inside its time box. JSON: runs/benchmarks/iteration_<preset>.json.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import flux_presets as fp  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.rollout import default_attention  # noqa: E402

PRESETS = {"tiny": dict(flux="tiny", judge="tiny", pairs=2, micro_batch=4, steps=3, iters=2),
           "flux-dev": dict(flux="flux-dev", judge="qwen3-vl-8b", pairs=8, micro_batch=16, steps=8, iters=2)}


def judge_files(preset: str) -> Path:
    """A judge snapshot directory: tokenizer, preprocessor and config (+ weights for tiny).

    tiny: the test suite's tiny random Qwen3-VL (weights saved). qwen3-vl-8b: the 8B shapes with the
    tiny tokenizer's special-token ids, and no weights (they are made on the device)."""
    from tests.test_vlm_judge import judge_snapshot

    tiny = Path(judge_snapshot())
    if preset == "tiny":
        return tiny
    from benchmarks.judge import hf_config

    d = Path(tempfile.mkdtemp(prefix="qwen3_vl_8b_shapes_"))
    for name in ("tokenizer.json", "preprocessor_config.json"):
        (d / name).write_bytes((tiny / name).read_bytes())
    small = json.loads((tiny / "config.json").read_text())
    cfg = hf_config(preset).to_dict()
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        cfg[k] = small[k]
    cfg["vision_config"]["patch_size"] = small["vision_config"]["patch_size"]  # the preprocessor's patch size
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def build_judge(preset: str, dtype: str):
    """The reward judge: our Flax Qwen3-VL (`FlaxVLMBackend`) with choice scores, no rubric (direct)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.judge.processor import Qwen3VLProcessor
    from arr_jax.judge.reward import RubricJudge
    from arr_jax.judge.text_judge import TextJudge
    from arr_jax.judge.vlm_backend import FlaxVLMBackend
    from arr_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    d = judge_files(preset)
    dt = getattr(jnp, dtype)
    if (d / "model.safetensors").exists() or list(d.glob("*.safetensors")):
        backend = FlaxVLMBackend.from_snapshot(d, dtype, max_new_tokens=16, batch_size=8, seq_bucket=128)
    else:
        cfg = Qwen3VLConfig.from_dir(d)
        make = lambda: Qwen3VLForConditionalGeneration(cfg, dtype=dt, rngs=nnx.Rngs(0), rules=None)  # noqa: E731
        model = nnx.merge(nnx.graphdef(nnx.eval_shape(make)), jax.jit(lambda: nnx.state(make()))())
        backend = FlaxVLMBackend(model, Qwen3VLProcessor.from_dir(d), max_new_tokens=32, batch_size=8)
    return RubricJudge(TextJudge(backend, mode="pairwise", choice_scores=True)), backend


class ChoiceFlops:
    """Wraps ``backend.decoder.score_choices`` (public) to count the FLOPs of each call's choice program."""

    def __init__(self, backend):
        self.dec = backend.decoder
        self.inner = self.dec.score_choices
        self.cache: dict[tuple, float] = {}
        self.flops = 0.0
        self.dec.score_choices = self

    def __call__(self, inputs, candidate_ids):
        import jax
        import jax.numpy as jnp

        from arr_jax import perf
        from arr_jax.judge.decode import choice_logprobs

        key = tuple((k, np.shape(v)) for k, v in sorted(inputs.items()))
        if key not in self.cache:
            dev = {k: jnp.asarray(v) for k, v in inputs.items() if k != "rope_deltas"}
            self.cache[key], _ = perf.jaxpr_flops(jax.jit(functools.partial(choice_logprobs, self.dec.graphdef)),
                                                  self.dec.state, dev, jnp.asarray(candidate_ids, jnp.int32))
        self.flops += self.cache[key]
        return self.inner(inputs, candidate_ids)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--pairs", type=int, default=None, help="prompt pairs per iteration")
    ap.add_argument("--micro_batch", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="timed iterations after the compiling one")
    ap.add_argument("--attention_impl", default=None)
    ap.add_argument("--num_layers", type=int, default=None, help="override the FLUX double-block count (dry runs)")
    ap.add_argument("--num_single_layers", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import jax

    from arr_jax import perf
    from arr_jax.rpo.trainer import RPOSettings, RPOTrainer

    ip = PRESETS[args.preset]
    pairs = args.pairs or ip["pairs"]
    mb = args.micro_batch or min(ip["micro_batch"], 2 * pairs)
    iters = args.iters or ip["iters"]
    p = fp.preset(ip["flux"], steps=ip["steps"], num_layers=args.num_layers, num_single_layers=args.num_single_layers)
    attn = default_attention(args.attention_impl)
    remat = p["dtype"] != "float32"
    result = report.header("iteration")
    model_dir = fp.snapshot_dir(p) if p["source"] == "files" else None
    policy = fp.our_policy(p, model_dir, attention_impl=attn, remat=remat)
    judge, backend = build_judge(ip["judge"], p["dtype"])
    counter = ChoiceFlops(backend)
    s = RPOSettings(num_steps=p["steps"], pairs_per_batch=pairs, micro_batch=mb)
    trainer = RPOTrainer(policy, judge, s, seed=0)
    progs = trainer.programs
    for name in ("rollout", "ref_pass", "train_step"):
        setattr(progs, name, perf.Instrumented(getattr(progs, name), name))
    M = 2 * pairs // mb
    x0 = jax.ShapeDtypeStruct((mb,) + tuple(policy.latent_shape), jax.numpy.float32)
    dec_cost = perf.program_cost(jax.jit(policy.decode_fn), policy.decode_params, x0)

    prompts = fp.prompts(pairs)
    first = trainer.step(prompts)
    compile_iteration = {k: v for k, v in first.items() if k.startswith("time/")}
    runs = []
    for _ in range(iters):
        counter.flops = 0.0
        met = trainer.step(prompts)
        t = dict(trainer.timing)
        rp, ts = progs.ref_pass.last.flops, progs.train_step.last.flops
        n_opt = int(met["optimizer_steps"])
        n_fwd = 1 if s.recompute_logp_old else 0
        flops = {"rollout": progs.rollout.last.flops * M, "decode": dec_cost.flops * M, "judge": counter.flops,
                 "reference": rp * M, "update": ts * n_opt + rp * M * n_fwd - (rp * M * n_opt if remat else 0.0)}
        runs.append({"seconds": t, "flops": flops, "iteration_s": met["time/iteration"]})
    phases = ["encode", "rollout", "decode", "judge", "reference", "update"]
    rows = []
    for ph in phases:
        sec = float(np.median([r["seconds"].get(ph, np.nan) for r in runs]))
        fl = runs[-1]["flops"].get(ph)
        rows.append({"phase": ph, "seconds": sec, "gflop": None if fl is None else fl / 1e9,
                     "tflop_s": None if fl is None or not sec else fl / sec / 1e12,
                     "mfu": None if fl is None else perf.mfu(fl, sec)})
    total = float(np.median([r["iteration_s"] for r in runs]))
    all_flops = sum(runs[-1]["flops"].values())
    rows.append({"phase": "iteration", "seconds": total, "gflop": all_flops / 1e9, "tflop_s": all_flops / total / 1e12,
                 "mfu": perf.mfu(all_flops, total)})
    compile_s = {n: getattr(progs, n).compile_s for n in ("rollout", "ref_pass", "train_step")}
    result.update({"preset": args.preset, "flux": p["name"], "judge": ip["judge"], "pairs": pairs, "micro_batch": mb,
                   "steps": p["steps"], "res": p["res"], "dtype": p["dtype"], "attention_impl": attn, "remat": remat,
                   "rows": rows, "runs": runs, "compile_iteration_s": compile_iteration, "compile_s": compile_s,
                   "metrics_last": {k: v for k, v in met.items() if isinstance(v, (int, float))}})
    md = report.table(rows, [("phase", "phase"), ("seconds", "seconds"), ("GFLOP", "gflop"), ("TFLOP/s", "tflop_s"),
                             ("MFU", "mfu")])
    md += (f"\n\nRPO iteration ({args.preset}): {pairs} pairs ({2 * pairs} samples, micro-batch {mb}), T={p['steps']}, "
           f"{p['res']}x{p['res']}, {p['dtype']}, judge {ip['judge']}, attention {attn}, remat {remat}; first "
           f"(compiling) iteration {compile_iteration.get('time/iteration', float('nan')):.1f}s; compile "
           + ", ".join(f"{k} {v:.1f}s" for k, v in compile_s.items()))
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/iteration_{args.preset}.json")
    report.print_result("iteration", md, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
