"""RPO update throughput: ours (JAX) vs the same objective in PyTorch (diffusers FluxTransformer2DModel + PEFT).

    python benchmarks/update.py --preset tiny        # CPU, seconds (the test suite runs this)
    python benchmarks/update.py --preset small       # CPU, ~118M-parameter FLUX-shaped model, 128x128
    python benchmarks/update.py --preset flux-dev    # GPU, FLUX.1-dev shapes, random weights, bf16, 512x512

One timed call = one optimiser step over a whole rollout batch (B samples x K = T-1 trained steps):

  reference pass   the LoRA-off policy's log-probs of every stored transition (no gradient), then
  update           for each trained step: the policy's velocity (LoRA r16 on the attention projections),
                   the SDE step's log-prob of the stored x_{t-1} in float32, PPO-clip (eps 0.2) + 0.01 * k1 KL,
                   backward (gradients accumulated over the steps); clip the global norm to 1; AdamW.

Ours is `RPOTrainer.optimizer_step` (its jitted reference pass and donated update programs). The
PyTorch reference (`TorchRPO`, written here) does the same on diffusers' transformer with PEFT LoRA
(adapters disabled for the reference pass), ``torch.optim.AdamW`` and, where the preset rematerialises
(flux-dev), diffusers' gradient checkpointing. Both see the same rollout batch (ours, sampled once).

Reported: sample-steps/s (B*K per call) both sides and the ratio; model FLOPs of one call from our
programs' jaxprs (without rematerialisation's recompute; `arr_jax.perf`), achieved TFLOP/s and MFU for
both sides (same work); our compile times; our reference/update split. JSON: runs/benchmarks/update_<preset>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import flux_presets as fp  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks.rollout import add_common_args, build_trainer, default_attention, on_off, torch_lora  # noqa: E402

LOSS = dict(clip_eps=0.2, kl_beta=0.01, eta=0.3, learning_rate=5e-5, weight_decay=1e-4, grad_clip=1.0)


def sde_step(x, v, sigma: float, sigma_next: float, eta: float = LOSS["eta"]):
    """The SDE step's Gaussian ``(mean, std)`` of x_{t-1} given x_t and the velocity ``v`` (torch, float32):
    the flow's score ``-(x - (1 - sigma) x0) / sigma^2`` with ``x0 = x - sigma v``, as our sampler."""
    ds = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - (1.0 - sigma) * x0) / (sigma * sigma)
    return x + ds * v - 0.5 * eta * eta * score * ds, eta * (-ds) ** 0.5


def sde_logp(x, v, x_next, sigma: float, sigma_next: float):
    """Per-sample mean log-density (B,) of ``x_next`` under `sde_step` (float32)."""
    mean, std = sde_step(x, v, sigma, sigma_next)
    logp = -((x_next - mean) ** 2) / (2 * std * std) - np.log(std) - 0.5 * np.log(2 * np.pi)
    return logp.mean(dim=tuple(range(1, logp.ndim)))


class TorchRPO:
    """The RPO optimiser step in PyTorch on diffusers' FluxTransformer2DModel + PEFT LoRA.

    ``batch``: our `RolloutBatch` (one micro-batch): latents (1, T+1, B, N, C), logp_old (1, T, B),
    cond txt (1, B, L, D) / pooled (1, B, P) / guidance (1, B); ``adv`` (B,); ``sigmas`` (T+1,);
    ``steps`` the trained step indices; ``img_ids`` (N, 3).
    """

    def __init__(self, p: dict, model_dir, batch, adv, sigmas, steps, img_ids, remat):
        import torch

        self.torch = torch
        self.p = p
        self.model = fp.torch_transformer(p, model_dir)
        torch_lora(self.model, p)
        self.model.train()
        if remat:
            self.model.enable_gradient_checkpointing()
        self.params = []
        for name, w in self.model.named_parameters():
            w.requires_grad_("lora_" in name)
            if "lora_" in name:
                self.params.append(w)
        self.opt = torch.optim.AdamW(self.params, lr=LOSS["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                                     weight_decay=LOSS["weight_decay"])
        dt = fp.torch_dtype(p)
        f32 = torch.float32
        self.lat = fp.to_torch(batch.latents[0], p, f32)        # (T+1, B, N, C)
        self.logp_old = fp.to_torch(batch.logp_old[0], p, f32)   # (T, B)
        self.txt = fp.to_torch(batch.cond["txt"][0], p, dt)
        self.pooled = fp.to_torch(batch.cond["pooled"][0], p, dt)
        self.guidance = fp.to_torch(batch.cond["guidance"][0], p, f32)
        self.adv = fp.to_torch(np.asarray(adv, np.float32), p, f32)
        self.sigmas = [float(s) for s in np.asarray(sigmas, np.float32)]
        self.steps = [int(j) for j in steps]
        self.img_ids = fp.to_torch(img_ids, p, f32)
        self.txt_ids = torch.zeros((self.txt.shape[1], 3), device=self.txt.device, dtype=f32)
        self.timing: dict[str, float] = {}

    def _sync(self):
        if self.txt.is_cuda:
            self.torch.cuda.synchronize()

    def score(self, j: int):
        """(logp (B,), ...) of the stored transition x_j -> x_{j+1} under the current adapters (dance SDE)."""
        torch = self.torch
        sigma, sigma_next = self.sigmas[j], self.sigmas[j + 1]
        x, x_next = self.lat[j], self.lat[j + 1]
        b = x.shape[0]
        t = torch.full((b,), int(sigma * 1000) / 1000, device=x.device, dtype=torch.float32)
        v = self.model(hidden_states=x.to(self.txt.dtype), encoder_hidden_states=self.txt,
                       pooled_projections=self.pooled, timestep=t.to(self.txt.dtype), img_ids=self.img_ids,
                       txt_ids=self.txt_ids, guidance=self.guidance.to(self.txt.dtype), return_dict=False)[0]
        return sde_logp(x, v.float(), x_next, sigma, sigma_next)

    def step(self) -> dict:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            self.model.disable_adapters()
            logp_ref = {j: self.score(j) for j in self.steps}
            self.model.enable_adapters()
        self._sync()
        t1 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        eps, beta = LOSS["clip_eps"], LOSS["kl_beta"]
        for j in self.steps:
            logp = self.score(j)
            ratio = torch.exp(logp - self.logp_old[j])
            pg = torch.maximum(-self.adv * ratio, -self.adv * torch.clamp(ratio, 1 - eps, 1 + eps))
            kl = logp - logp_ref[j]
            loss = (pg + beta * kl).mean() / len(self.steps)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.params, LOSS["grad_clip"])
        self.opt.step()
        self._sync()
        t2 = time.perf_counter()
        self.timing = {"reference": t1 - t0, "update": t2 - t1}
        return {"loss": total}

    def info(self) -> dict:
        return {"torch": self.torch.__version__, "threads": self.torch.get_num_threads(), "timing": self.timing,
                "device": str(self.txt.device)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--remat", default=None, choices=["off", "full", "dots"],
                    help="rematerialise blocks (default: full for bf16 presets, off for float32)")
    args = ap.parse_args(argv)
    import jax

    from arr_jax import perf

    steps = args.steps or fp.PRESETS[args.preset]["update_steps"]
    p = fp.preset(args.preset, res=args.res, steps=steps, num_layers=args.num_layers,
                  num_single_layers=args.num_single_layers, scan_blocks=on_off(args.scan_blocks))
    B = args.batch or p["update_batch"]
    reps = args.reps or p["reps"]
    attn = default_attention(args.attention_impl)
    remat = ("full" if p["dtype"] != "float32" else False) if args.remat is None else \
        (False if args.remat == "off" else args.remat)
    result = report.header("update")
    model_dir = fp.snapshot_dir(p) if p["source"] == "files" else None
    trainer = build_trainer(p, model_dir, attn, batch=B, remat=remat, kl_type="k1", **LOSS)
    batch = trainer.rollout(fp.prompts(B // 2), jax.random.key(0))
    adv = np.tile(np.asarray([1.0, -0.1], np.float32), B // 2)
    K = len(trainer.s.trained_steps())
    ours_metrics = {}

    def ours():
        ours_metrics.update(trainer.optimizer_step(batch, adv))

    sides = {"ours": ours}
    ref = None
    if not args.no_torch:
        space = trainer.policy.info.get("space") or trainer.policy.info["pipeline"].latent_space(p["res"], p["res"])
        host = SimpleNamespace(latents=np.asarray(batch.latents), logp_old=np.asarray(batch.logp_old),
                               cond={k: np.asarray(v, np.float32) for k, v in batch.cond.items()})
        ref = report.Side(TorchRPO, p, str(model_dir) if model_dir else None, host, adv, np.asarray(trainer.sigmas),
                          trainer.s.trained_steps(), space.img_ids(), remat)
        sides["torch"] = ref.fn("step")
    timing = report.interleaved(sides, reps)
    torch_info = None
    if ref is not None:
        torch_info = ref.call("info")
        ref.close()
    ours_split = {k: trainer.timing.get(k) for k in ("reference",)}
    ts, rp = trainer.programs.train_step, trainer.programs.ref_pass
    fwd_flops = rp.last.flops  # one forward per trained step of the micro-batch (the reference pass)
    program_flops = ts.last.flops + fwd_flops
    # full remat recomputes one forward per trained step; "dots" keeps the matmuls (attention recompute is counted)
    model_flops = program_flops - (fwd_flops if remat in (True, "full") else 0.0)
    rows = []
    t_o = timing["ours"]["median_s"]
    t_r = timing.get("torch", {}).get("median_s")
    row = {"row": "optimiser step (ref pass + update)", "ours_ss": B * K / t_o, "ref_ss": B * K / t_r if t_r else None,
           "ours_tflop_s": model_flops / t_o / 1e12, "ref_tflop_s": model_flops / t_r / 1e12 if t_r else None,
           "ours_mfu": perf.mfu(model_flops, t_o), "ref_mfu": perf.mfu(model_flops, t_r) if t_r else None}
    report.add_ratio(row, "ours_ss", "ref_ss", [timing["ours"]], [timing["torch"]] if t_r else [])
    rows.append(row)
    result.update({
        "preset": p["name"], "batch": B, "steps": p["steps"], "trained_steps": K, "res": p["res"],
        "tokens": fp.num_tokens(p), "dtype": p["dtype"], "attention_impl": attn, "remat": remat,
        "lora_rank": p["lora_rank"], "transformer_params": fp.transformer_params(p), "reps": reps, "timing": timing,
        "rows": rows, "ours_split_s": ours_split, "torch_split_s": None if torch_info is None else torch_info["timing"], "torch_side": torch_info,
        "model_flops": model_flops, "program_flops": program_flops, "ours_metrics": ours_metrics,
        "programs": {"train_step": ts.last.as_dict(), "ref_pass": rp.last.as_dict()},
        "compile_s": {"train_step": ts.compile_s, "ref_pass": rp.compile_s, "rollout": trainer.programs.rollout.compile_s},
    })
    md = report.table(rows, [("row", "row"), ("ours sample-steps/s", "ours_ss"), ("torch sample-steps/s", "ref_ss"),
                             ("ratio", "ratio_shown"), ("ours TFLOP/s", "ours_tflop_s"), ("torch TFLOP/s", "ref_tflop_s"),
                             ("ours MFU", "ours_mfu"), ("torch MFU", "ref_mfu")])
    md += (f"\n\npreset {p['name']}: {B} samples x {K} trained steps (T={p['steps']}), {p['res']}x{p['res']} "
           f"({fp.num_tokens(p)} tokens), {p['dtype']}, {result['transformer_params'] / 1e6:.1f}M params, LoRA "
           f"r{p['lora_rank']}, attention {attn}, remat {remat}; model GFLOP/call {model_flops / 1e9:.1f}; compile "
           f"train_step {ts.compile_s:.1f}s, ref_pass {rp.compile_s:.1f}s; reference pass ours "
           f"{report.fmt(ours_split['reference'])}s"
           + ("" if torch_info is None else f", torch {torch_info['timing']['reference']:.3g}s "
                                            f"(update {torch_info['timing']['update']:.3g}s)"))
    result["markdown_table"] = md
    out = report.write(result, args.out or f"runs/benchmarks/update_{p['name']}.json")
    report.print_result("update", md, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
