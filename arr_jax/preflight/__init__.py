"""Pod pre-flight: compile one ARR-RPO iteration for a TPU topology on a CPU machine, and read the
compiler's own memory and cost figures before any hardware is paid for.

    python -m arr_jax.preflight --config configs/flux_dev_t2i.py --topology=v5p-8 --json=preflight.json
    python -m arr_jax.preflight --config configs/qwen_image_edit.py --topology=v6e-8
    python -m arr_jax.preflight --config configs/flux_dev_t2i.py --topology=v6e-8 --config.rpo.micro_batch=256  # exit 1

Needs libtpu (``pip install -e ".[tpu]"``); runs with ``JAX_PLATFORMS=cpu``. The weights are never
materialised: the policy is an `arr_jax.policies.base.AbstractPolicy` (each kind's ``abstract``: shapes
from the snapshot's config files when ``model_dir`` is set, else the published architecture) and the
judge an abstract Qwen3-VL (``judge.model_dir``'s config.json, else Qwen3-VL-8B-Instruct's). The
programs are the trainer's and the judge's own (`arr_jax.preflight.programs`) on the meshes
`arr_jax.rpo.run.mesh_rules` builds from the slice's devices (``judge.mesh`` 0: shared; N: a
sub-mesh), at the config's real shapes.

The report (`preflight`): per program the compile seconds, XLA's per-device argument / output /
alias / temporary bytes, FLOPs and HBM bytes per device and a roofline time; then, per device, the
resident state (weights, LoRA, optimiser, reference, the stored rollout batch) plus the largest
program's temporaries and its outputs beyond the donated ones: the **peak**, against the chip's
HBM (``fits``); the analytic plan's figure (`arr_jax.memory`) beside it; and the roofline bound on one
iteration's seconds (each program times its calls) and on images per chip per second.

A roofline time is a lower bound, not a measurement: ``max(FLOPs / peak, bytes / bandwidth)`` with the
exact FLOPs (loop trip counts included) and XLA's bytes (each loop body counted once, an under-count).
The reported ``bytes_accessed`` scales XLA's bytes by the FLOPs' trip-count factor: an estimate, which
can overstate (a scanned layer's weights are read once per trip), so it stays out of the bound. The
logp_old recompute (the update program run forward only) is costed as one more reference pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from arr_jax.preflight.programs import ProgramReport, compile_program, judge_programs, policy_programs, shard_bytes
from arr_jax.preflight.topology import COLAB, TOPOLOGIES, Slice, TopologyError, tpu_slice

GiB = 2 ** 30


def abstract_policy(cfg, rules):
    """The `AbstractPolicy` of ``cfg.kind`` (its module's ``abstract``; a kind without one, such as the
    demo's ``world``, is built for real, small as it is, and its shapes taken)."""
    import importlib

    from arr_jax.policies import KINDS

    if cfg.kind not in KINDS:
        raise ValueError(f"bad config value kind: {cfg.kind!r} (expected one of {sorted(KINDS)})")
    module = importlib.import_module(KINDS[cfg.kind])
    if hasattr(module, "abstract"):
        return module.abstract(cfg, rules)
    from arr_jax.data.prompts import build_prompts
    from arr_jax.policies import build_policy
    from arr_jax.policies.base import abstract_of

    policy = build_policy(cfg, rules)
    items = build_prompts(cfg, "train")[:2]
    return abstract_of(policy, policy.encode_fn(items), rules, source=f"the built {cfg.kind} policy")


def workload_of(cfg):
    """The analytic memory plan's `arr_jax.memory.Workload` for ``cfg`` (None for a kind it does not model)."""
    from arr_jax.memory import Workload

    r = cfg.rpo
    common = dict(height=r.height, width=r.width, pairs=r.pairs_per_batch, num_steps=r.num_steps,
                  micro_batch=r.micro_batch, lora_rank=r.lora_rank, lora_alpha=r.lora_alpha)
    if cfg.kind in ("flux", "flux_kontext"):
        return Workload(model="flux_dev", txt_len=cfg.flux.t5_max_length, remat=cfg.flux.remat not in ("none", False),
                        t5_resident=not cfg.flux.get("release_text_encoders", True),
                        source_images=int(cfg.kind == "flux_kontext"), **common)
    if cfg.kind == "qwen_image_edit":
        return Workload.qwen_image_edit(txt_len=cfg.qwen.text_len, remat=cfg.qwen.remat not in ("none", False),
                                        t5_resident=not cfg.qwen.get("release_text_encoder", True), **common)
    return None


def analytic_peak(cfg, abstract, sl: Slice, policy_rules) -> dict | None:
    """The analytic plan's per-device figures for the same shapes and mesh (`arr_jax.memory.plan`), or None."""
    from arr_jax.memory import Topology, abstract_models, plan
    from arr_jax.memory.shards import GB

    wl = workload_of(cfg)
    if wl is None or policy_rules is None:
        return None
    mesh = dict(policy_rules.mesh.shape)
    models = abstract_models(wl, **abstract.plan_configs)
    topo = {sl.name: Topology(sl.name, int(policy_rules.mesh.size), sl.hbm_bytes_per_device)}
    rows = plan(topo, wl, tensor=mesh["tensor"] if mesh["tensor"] > 1 else 2, models=models)
    row = next((r for r in rows if r["mesh"] == mesh), rows[0])
    del GB
    return {"total": row["total"], "params": row["params"], "act_update": row["act_update"],
            "act_rollout": row["act_rollout"], "buffers": row["buffers"], "lora_opt": row["lora_opt"]}


def preflight(cfg, topology: str, *, progress: Callable[[str], None] = print,
              only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Compile every program of one RPO iteration of ``cfg`` for ``topology`` and report (see the module doc).

    ``only`` restricts the programs compiled (names as in the report; tests). Raises `TopologyError`
    (one line) for an unknown topology or a missing libtpu, ValueError for a mesh that does not divide
    the slice; a program the compiler refuses (e.g. out of memory) is reported, with ``fits`` False.
    """
    from arr_jax.rpo.run import mesh_rules
    from arr_jax.rpo.trainer import rpo_settings

    sl = tpu_slice(topology)
    settings = rpo_settings(cfg.rpo)
    settings.validate()
    try:
        policy_rules, judge_rules = mesh_rules(cfg, sl.devices)
    except ValueError as e:
        raise TopologyError(f"{topology} ({sl.num_devices} devices): {e}") from None
    if policy_rules is None:
        raise TopologyError(f"{topology} has one device: preflight compiles for a mesh of several")
    nb = int(math.prod(policy_rules.mesh.shape[a] for a in ("data", "fsdp")))
    if settings.micro_batch % nb:
        raise TopologyError(f"rpo.micro_batch={settings.micro_batch} cannot be split over the {nb} devices of "
                            f"{topology}'s batch axes: use a multiple of {nb}")
    abstract = abstract_policy(cfg, policy_rules)
    trainable = "full" if cfg.rpo.get("full_finetune", False) else "lora"
    pol = policy_programs(abstract, settings, policy_rules, trainable=trainable)
    n_pol = policy_rules.mesh.size
    programs = {k: (*v, "policy", n_pol) for k, v in pol.programs.items()}
    resident = {"policy": dict(pol.resident), "judge": {}}
    judge_src = ""
    if cfg.judge.kind == "qwen3_vl":
        jrules = judge_rules or policy_rules
        images = 3 if abstract.policy.is_editing else 2
        jp, jres, judge_src = judge_programs(cfg.judge, jrules, pairs=settings.pairs_per_batch, images=images,
                                             height=cfg.rpo.height, width=cfg.rpo.width,
                                             text_tokens=int(cfg.get("preflight_judge_text_tokens", 1536)))
        # "judge" devices are the judge's own (judge.mesh = N: a sub-mesh); a judge on the policy's devices,
        # all of them or (several hosts) each host's, adds its weights and programs to those devices
        ids = lambda r: {d.id for d in r.mesh.devices.flat}  # noqa: E731
        where = "judge" if not ids(jrules) & ids(policy_rules) else "policy"
        programs.update({k: (*v, where, jrules.mesh.size) for k, v in jp.items()})
        resident[where].update(jres)
    if only:
        programs = {k: v for k, v in programs.items() if k in only}
    reports: dict[str, ProgramReport] = {}
    for i, (name, (fn, args, calls, where, n_dev)) in enumerate(programs.items()):
        progress(f"[{i + 1}/{len(programs)}] compiling {name} for {topology} ({n_dev} devices) ...")
        rep = compile_program(name, fn, args, calls=calls, placement=where, num_devices=n_dev,
                              peak_flops=sl.peak_flops_per_device, hbm_bytes_per_s=sl.hbm_bytes_per_s_per_device)
        reports[name] = rep
        progress(f"    {name}: " + (f"FAILED: {rep.error[:200]}" if rep.error else
                                     f"{rep.compile_s:.1f} s, temporaries {rep.temp_bytes / GiB:.2f} GiB, "
                                     f"roofline {rep.roofline_s * 1e3:.2f} ms x {calls} calls"))
    return summarise(cfg, topology, sl, reports, resident, abstract, policy_rules, judge_rules, judge_src)


def summarise(cfg, topology, sl, reports, resident, abstract, policy_rules, judge_rules, judge_src) -> dict:
    """The report dict (see `preflight`) from the compiled programs and the resident state."""
    hbm = sl.hbm_bytes_per_device
    res_bytes = {w: {k: shard_bytes(v) for k, v in parts.items()} for w, parts in resident.items()}
    peaks, breaking = {}, None
    for where in ("policy", "judge"):
        progs = [r for r in reports.values() if r.placement == where]
        if not progs and not res_bytes[where]:
            continue
        base = sum(res_bytes[where].values())
        extra = [(r.temp_bytes + max(r.output_bytes - r.alias_bytes, 0.0), r.name) for r in progs if not r.error]
        top = max(extra, default=(0.0, ""))
        peaks[where] = {"resident_bytes": base, "largest_program": top[1], "program_bytes": top[0],
                        "peak_bytes": base + top[0]}
    peak = max(p["peak_bytes"] for p in peaks.values())
    failed = [r for r in reports.values() if r.error]
    fits = not failed and peak <= hbm
    if failed:
        breaking = f"{failed[0].name}: {failed[0].error[:200]}"
    elif not fits:
        where = max(peaks, key=lambda w: peaks[w]["peak_bytes"])
        p = peaks[where]
        breaking = (f"{where} devices: resident {p['resident_bytes'] / GiB:.2f} GiB + {p['largest_program']} "
                    f"{p['program_bytes'] / GiB:.2f} GiB = {p['peak_bytes'] / GiB:.2f} GiB > HBM {hbm / GiB:.2f} GiB")
    pol_res = sum(v for k, v in res_bytes["policy"].items() if k != "judge")
    pol_prog = max((r.temp_bytes + max(r.output_bytes - r.alias_bytes, 0.0) for r in reports.values()
                    if not r.error and not r.name.startswith("judge")), default=0.0)
    it_s = sum(r.roofline_s * r.calls for r in reports.values() if not r.error and r.calls)
    images = 2 * cfg.rpo.pairs_per_batch
    analytic = analytic_peak(cfg, abstract, sl, policy_rules)
    rep = {
        "topology": topology, "layout": sl.layout, "device_kind": sl.device_kind, "devices": sl.num_devices,
        "chips": sl.chips, "config": cfg.get("_config_path", ""), "kind": cfg.kind,
        "policy_mesh": dict(policy_rules.mesh.shape),
        "judge_mesh": dict((judge_rules or policy_rules).mesh.shape) if cfg.judge.kind == "qwen3_vl" else None,
        "shapes_from": {"policy": abstract.source, "judge": judge_src},
        "programs": {k: r.as_dict() for k, r in reports.items()},
        "resident_bytes_per_device": res_bytes, "peaks": peaks,
        "peak_bytes_per_device": peak, "hbm_bytes_per_device": hbm, "fits": fits, "breaks": breaking,
        "policy_peak_bytes_per_device": pol_res + pol_prog,
        "analytic_peak_bytes_per_device": None if analytic is None else analytic["total"], "analytic": analytic,
        "iteration_roofline_s": it_s,
        "images_per_chip_per_s_bound": images / it_s / sl.chips if it_s > 0 and not failed else None,
    }
    rep["plan_check"] = compare_to_plan(rep)
    return rep


def compare_to_plan(rep: dict, tolerance: float = 0.25) -> list[dict]:
    """The analytic memory plan's rows against the compiled figures of a preflight report ``rep``:
    the update's activations (update temporaries), the rollout's (the larger of the rollout's and the
    decode's temporaries) and the policy's total (its resident state + largest program, judge left out,
    as the plan's policy table does). ``ok`` is False where they differ by more than ``tolerance``."""
    a, p = rep.get("analytic"), rep["programs"]
    if not a:
        return []
    temp = lambda n: p[n]["temp_bytes"] if n in p and not p[n]["error"] else None  # noqa: E731
    rows = [("update activations", a["act_update"], temp("update")),
            ("rollout activations", a["act_rollout"],
             max((t for t in (temp("rollout"), temp("decode")) if t is not None), default=None)),
            ("policy total", a["total"], rep["policy_peak_bytes_per_device"])]
    out = []
    for name, analytic, compiled in rows:
        if compiled is None:
            continue
        rel = (analytic - compiled) / compiled if compiled else math.inf
        out.append({"row": name, "analytic_bytes": analytic, "compiled_bytes": compiled, "relative": rel,
                    "ok": abs(rel) <= tolerance})
    return out


def format_plan_check(rep: dict) -> str:
    """`compare_to_plan` as lines (GiB per device)."""
    lines = [f"analytic plan vs compiled ({rep['kind']} on {rep['topology']}, GiB per device):"]
    for r in rep.get("plan_check") or compare_to_plan(rep):
        lines.append(f"  {r['row']:<21}{r['analytic_bytes'] / GiB:8.2f} analytic {r['compiled_bytes'] / GiB:8.2f} compiled "
                     f"{r['relative']:+7.0%}  {'ok' if r['ok'] else 'OFF by more than 25%'}")
    return "\n".join(lines)


def format_report(rep: dict) -> str:
    """The report as a table (GiB per device)."""
    g = lambda x: f"{x / GiB:8.2f}" if x is not None and math.isfinite(x) else "       -"  # noqa: E731
    lines = [f"preflight: {rep['kind']} on {rep['topology']} ({rep['layout']}, {rep['devices']} x {rep['device_kind']}, "
             f"HBM {rep['hbm_bytes_per_device'] / GiB:.1f} GiB per device); policy mesh {rep['policy_mesh']}"
             + (f", judge mesh {rep['judge_mesh']}" if rep["judge_mesh"] else ""),
             f"{'program':<15}{'where':<8}{'calls':>6}{'compile s':>10}{'args':>9}{'temps':>9}{'out-alias':>10}"
             f"{'TFLOP/dev':>10}{'roofline ms':>12}  bound"]
    for r in rep["programs"].values():
        if r["error"]:
            lines.append(f"{r['name']:<15}{r['placement']:<8}{r['calls']:>6}  FAILED: {r['error'][:150]}")
            continue
        lines.append(f"{r['name']:<15}{r['placement']:<8}{r['calls']:>6}{r['compile_s']:>10.1f}{g(r['argument_bytes'])} "
                     f"{g(r['temp_bytes'])}{g(max(r['output_bytes'] - r['alias_bytes'], 0))}  "
                     f"{r['flops'] / 1e12:>8.3f}{r['roofline_s'] * 1e3:>12.2f}  {r['bound']}")
    for where, p in rep["peaks"].items():
        parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in rep["resident_bytes_per_device"][where].items() if v)
        lines.append(f"{where} devices: resident {p['resident_bytes'] / GiB:.2f} GiB ({parts}) + {p['largest_program']} "
                     f"{p['program_bytes'] / GiB:.2f} GiB = peak {p['peak_bytes'] / GiB:.2f} GiB")
    a = rep["analytic_peak_bytes_per_device"]
    lines.append(f"peak {rep['peak_bytes_per_device'] / GiB:.2f} GiB of {rep['hbm_bytes_per_device'] / GiB:.2f} GiB: "
                 + ("fits" if rep["fits"] else f"DOES NOT FIT ({rep['breaks']})")
                 + (f"; the analytic plan says {a / GiB:.2f} GiB" if a else ""))
    if rep.get("analytic"):
        lines.append(format_plan_check(rep))
    if rep["images_per_chip_per_s_bound"]:
        lines.append(f"roofline bound: {rep['iteration_roofline_s']:.2f} s per iteration, "
                     f"{rep['images_per_chip_per_s_bound']:.3f} images per chip per second (a bound, not a measurement)")
    return "\n".join(lines)


__all__ = ["COLAB", "ProgramReport", "Slice", "TOPOLOGIES", "TopologyError", "abstract_policy", "compare_to_plan",
           "format_plan_check", "format_report", "preflight", "tpu_slice", "workload_of"]
