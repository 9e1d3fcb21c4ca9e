"""FLUX rollout throughput: ours (JAX) vs diffusers' FluxPipeline (PyTorch), same weights, same shapes.

    python benchmarks/rollout.py --preset tiny        # CPU, seconds (the test suite runs this)
    python benchmarks/rollout.py --preset small       # CPU, ~118M-parameter FLUX-shaped model, 128x128
    python benchmarks/rollout.py --preset flux-dev    # GPU, FLUX.1-dev shapes, random weights, bf16, 512x512

Rows (images/s, medians of interleaved repeats; see benchmarks/report.py):

  sde   ours: `RPOTrainer.rollout` -- T SDE steps in one jitted scan keeping every latent and log-prob,
        then the VAE decode, uint8 images on the host (what an RPO iteration runs).
  ode   ours: `RPOTrainer.generate(sampler="ode")` -- T Euler steps + decode, uint8 on the host.
  ref   diffusers ``FluxPipeline(prompt_embeds=..., latents=..., num_inference_steps=T)`` + decode,
        uint8 on the host: what a user of the authors' release / DanceGRPO runs per rollout.

Both sides run the same network: the policy's LoRA adapters (rank from the preset, on the attention
projections) are attached on both (PEFT on the PyTorch side). The ratio is ours / diffusers.
FLOPs come from our programs (`arr_jax.perf.program_cost`, scan lengths included) and are used for
both sides' TFLOP/s and MFU (same work). JSON goes to ``runs/benchmarks/rollout_<preset>.json``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import flux_presets as fp  # noqa: E402
from benchmarks import report  # noqa: E402


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="tiny", choices=sorted(fp.PRESETS))
    ap.add_argument("--batch", type=int, default=None, help="samples per rollout (even); preset default")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps T; preset default")
    ap.add_argument("--res", type=int, default=None, help="image side; preset default")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per side; preset default")
    ap.add_argument("--num_layers", type=int, default=None, help="override the double-block count (dry runs)")
    ap.add_argument("--num_single_layers", type=int, default=None, help="override the single-block count")
    ap.add_argument("--attention_impl", default=None, help="xla | cudnn | auto (default: cudnn on GPU, else xla)")
    ap.add_argument("--scan_blocks", default=None, choices=["on", "off"], help="lax.scan over blocks (default: preset)")
    ap.add_argument("--no_torch", action="store_true", help="only our side")
    ap.add_argument("--out", default=None, help="JSON path (default runs/benchmarks/<name>_<preset>.json)")


def on_off(arg: str | None) -> bool | None:
    return None if arg is None else arg == "on"


def default_attention(arg: str | None) -> str:
    import jax

    if arg:
        return arg
    return "cudnn" if jax.devices()[0].platform == "gpu" else "xla"


def build_trainer(p: dict, model_dir, attention_impl: str, *, batch: int, remat=None, **settings):
    """An `RPOTrainer` over our policy of the preset, with its programs instrumented (`arr_jax.perf`)."""
    from arr_jax import perf
    from arr_jax.rpo.trainer import RPOSettings, RPOTrainer

    policy = fp.our_policy(p, model_dir, attention_impl=attention_impl, remat=remat)
    s = RPOSettings(num_steps=p["steps"], pairs_per_batch=batch // 2, micro_batch=batch, **settings)
    trainer = RPOTrainer(policy, fp.NoJudge(), s, seed=0)
    progs = trainer.programs
    for name in ("rollout", "ref_pass", "train_step", "ode", "logp_pass"):
        setattr(progs, name, perf.Instrumented(getattr(progs, name), name))
    return trainer


def torch_lora(model, p: dict) -> None:
    """PEFT LoRA on the attention projections, as the policy has (alpha/rank as the preset)."""
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=p["lora_rank"], lora_alpha=p["lora_alpha"], init_lora_weights=True,
                                 target_modules=list(fp.LORA_TARGETS)))


class DiffusersSide:
    """diffusers' FluxPipeline on the preset's snapshot (+ PEFT LoRA), run in its own process."""

    def __init__(self, p: dict, model_dir, txt, pooled, latents):
        import torch

        self.pipe = fp.torch_pipeline(p, model_dir)
        torch_lora(self.pipe.transformer, p)
        self.kw = dict(prompt_embeds=fp.to_torch(txt, p), pooled_prompt_embeds=fp.to_torch(pooled, p),
                       height=p["res"], width=p["res"], num_inference_steps=p["steps"], guidance_scale=3.5,
                       latents=fp.to_torch(latents, p, torch.float32), output_type="np")
        self.shape, self.device = None, fp.torch_device(p)

    def run(self):
        out = self.pipe(**self.kw).images
        images = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)  # uint8 on the host, as ours
        self.shape = images.shape

    def info(self) -> dict:
        import torch

        return {"torch": torch.__version__, "threads": torch.get_num_threads(), "images": self.shape,
                "device": self.device}


def decode_cost(trainer, batch: int):
    import jax

    from arr_jax import perf

    pol = trainer.policy
    x0 = jax.ShapeDtypeStruct((batch,) + tuple(pol.latent_shape), jax.numpy.float32)
    return perf.program_cost(jax.jit(pol.decode_fn), pol.decode_params, x0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args(argv)
    import jax

    from arr_jax import perf

    p = fp.preset(args.preset, res=args.res, steps=args.steps, num_layers=args.num_layers,
                  num_single_layers=args.num_single_layers, scan_blocks=on_off(args.scan_blocks))
    B = args.batch or p["rollout_batch"]
    reps = args.reps or p["reps"]
    attn = default_attention(args.attention_impl)
    result = report.header("rollout")
    model_dir = fp.snapshot_dir(p) if p["source"] == "files" else None
    trainer = build_trainer(p, model_dir, attn, batch=B)
    prompts = fp.prompts(B // 2)
    key = jax.random.key(0)
    cond = trainer.policy.encode_fn([_item(t) for t in prompts for _ in (0, 1)])

    def ours_sde():
        trainer.rollout(prompts, key)  # images uint8 on the host

    def ours_ode():
        trainer.generate([q for q in prompts for _ in (0, 1)], list(range(B)), sampler="ode")

    sides = {"ours_sde": ours_sde, "ours_ode": ours_ode}
    ref = None
    if not args.no_torch:
        lat = np.stack([np.asarray(jax.random.normal(jax.random.key(i), trainer.latent_shape)) for i in range(B)])
        ref = report.Side(DiffusersSide, p, str(model_dir) if model_dir else None, np.asarray(cond["txt"], np.float32),
                          np.asarray(cond["pooled"], np.float32), lat)
        sides["diffusers"] = ref.fn("run")
    timing = report.interleaved(sides, reps)
    sde_phases = dict(trainer.timing)
    if ref is not None:
        result["torch_side"] = ref.call("info")
        ref.close()

    ro, ode = trainer.programs.rollout, trainer.programs.ode
    dec = decode_cost(trainer, B)
    sde_flops = ro.last.flops + dec.flops  # one micro-batch of B samples
    ode_flops = ode.last.flops + dec.flops
    rows = []
    ref = timing.get("diffusers", {}).get("median_s")
    for row, side, flops in (("sde rollout + decode", "ours_sde", sde_flops), ("ode sample + decode", "ours_ode", ode_flops)):
        t = timing[side]["median_s"]
        r = {"row": row, "ours_img_s": B / t, "ref_img_s": (B / ref) if ref else None, "ours_s": t, "ref_s": ref,
             "ours_tflop_s": flops / t / 1e12, "ours_mfu": perf.mfu(flops, t),
             "ref_mfu": perf.mfu(ode_flops, ref) if ref else None}
        report.add_ratio(r, "ours_img_s", "ref_img_s", [timing[side]], [timing["diffusers"]] if ref else [])
        rows.append(r)
    result.update({
        "preset": p["name"], "batch": B, "steps": p["steps"], "res": p["res"], "tokens": fp.num_tokens(p),
        "dtype": p["dtype"], "attention_impl": attn, "lora_rank": p["lora_rank"],
        "transformer_params": fp.transformer_params(p), "reps": reps, "timing": timing, "rows": rows,
        "ours_phases_s": sde_phases,
        "programs": {"rollout": ro.last.as_dict(), "ode": ode.last.as_dict(), "decode": dec.as_dict()},
        "compile_s": {"rollout": ro.compile_s, "ode": ode.compile_s, "decode": dec.lower_s + dec.compile_s},
    })
    md = report.table(rows, [("row", "row"), ("ours img/s", "ours_img_s"), ("diffusers img/s", "ref_img_s"),
                             ("ratio", "ratio_shown"), ("ours TFLOP/s", "ours_tflop_s"), ("ours MFU", "ours_mfu"),
                             ("diffusers MFU", "ref_mfu")])
    md += (f"\n\npreset {p['name']}: batch {B}, T={p['steps']}, {p['res']}x{p['res']} ({fp.num_tokens(p)} tokens), "
           f"{p['dtype']}, {result['transformer_params'] / 1e6:.1f}M params, LoRA r{p['lora_rank']} both sides, "
           f"attention {attn}; compile rollout {ro.compile_s:.1f}s, ode {ode.compile_s:.1f}s; "
           f"our phases {', '.join(f'{k} {v:.3f}s' for k, v in sde_phases.items())}")
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/rollout_{p['name']}.json")
    report.print_result("rollout", md, result)
    print(f"wrote {out}")
    return result


def _item(text):
    from arr_jax.policies.base import PromptItem

    return PromptItem(text)


if __name__ == "__main__":
    main()
