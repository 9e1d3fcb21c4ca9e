"""The policy side of the memory plan: the RPO workload, its activation estimate, the policy-only table.

One code path serves every model family (`FAMILIES`: `arr_jax.memory.flux`,
`arr_jax.memory.qwen_image_edit`); a family module supplies the abstract models and the names of
its components.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from arr_jax.memory import flux, qwen_image_edit
from arr_jax.memory.shards import GB, Topology, dtype_size, per_device, rule_sets

FAMILIES = {"flux_dev": flux, "qwen_image_edit": qwen_image_edit}


@dataclasses.dataclass(frozen=True)
class Workload:
    """The RPO step being planned (SPEC §2 T2I defaults; `qwen_image_edit` for the editing column)."""

    height: int = 512
    width: int = 512
    txt_len: int = 512            # text tokens (T5 / padded Qwen2.5-VL states)
    pairs: int = 32               # prompt pairs per update (2 samples each)
    num_steps: int = 8            # rollout steps T
    micro_batch: int = 16         # samples per forward (global; sharded over data x fsdp)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    remat: bool = True            # per-block rematerialisation in the update
    flash_attention: bool = False  # False: XLA attention materialises (B, H, S, S) scores
    t5_resident: bool = True      # keep the big text encoder (T5-XXL / Qwen2.5-VL) on device in the policy table
    usable: float = 0.9           # fraction of device memory the plan may use
    model: str = "flux_dev"       # a key of FAMILIES
    source_images: int = 0        # editing: source images at the target size, as extra image tokens

    @property
    def target_tokens(self) -> int:
        """Latent tokens of the generated image (16 pixels a side each)."""
        return (self.height // 16) * (self.width // 16)

    @property
    def image_tokens(self) -> int:
        """Image tokens the transformer sees: the target and every source."""
        return self.target_tokens * (1 + self.source_images)

    @classmethod
    def qwen_image_edit(cls, **overrides) -> "Workload":
        """SPEC §2's editing column on Qwen-Image-Edit-2509 (`arr_jax.memory.qwen_image_edit.WORKLOAD`),
        with ``overrides`` on top."""
        return cls(**{**qwen_image_edit.WORKLOAD, **overrides})


WORKLOADS = {"flux_dev": Workload, "qwen_image_edit": Workload.qwen_image_edit}


def family(wl: Workload):
    """The family module of ``wl.model``; ValueError for an unknown model."""
    if wl.model not in FAMILIES:
        raise ValueError(f"unknown model {wl.model!r}; use one of {sorted(FAMILIES)}")
    return FAMILIES[wl.model]


def abstract_models(wl: Workload, *configs, **config_kw) -> dict:
    """``{name: [(shape, itemsize, axes, count), ...]}`` of ``wl.model``'s components at full size
    (FLUX: transformer, lora, t5, clip, vae; Qwen-Image-Edit: transformer, lora, text_encoder, vae),
    plus ``_dit_config`` and ``_vae_top_channels``. Extra arguments go to the family's
    ``abstract_models`` (small configs in tests): `arr_jax.memory.flux.abstract_models`,
    `arr_jax.memory.qwen_image_edit.abstract_models`. ValueError for an unknown ``wl.model``.
    """
    fam = family(wl)
    models = fam.abstract_models(wl, *configs, **config_kw)
    models["_model"] = wl.model
    return models


def activation_bytes(wl: Workload, fc, mesh_shape: dict[str, int], vae_channels: int = 128) -> dict[str, float]:
    """Per-device activation estimate (bytes) for the update and the rollout.

    Per token and block (D = width, t = tensor axis; head/MLP intermediates are split over t):
    double-stream ~ 8D + 16D/t values (norms in float32, modulated input, q/k/v, normed and
    rotated q/k, attention output, projections, 4D MLP pre/post GELU), single-stream
    ~ 5D + 21D/t; plus the (B, H/t, S, S) float32 scores and probabilities of XLA attention.
    S = image tokens (target + sources) + text tokens. The update keeps the block inputs (remat)
    and recomputes one block with its gradients. ``fc``: a `FluxConfig` or `QwenImageConfig`
    (only dual-stream blocks). Returns ``update``, ``rollout``, ``buffers`` (the stored rollout
    batch: latents of T + 1 steps, text states, source latents) and ``local_batch``.
    """
    b = math.ceil(wl.micro_batch / (mesh_shape["data"] * mesh_shape["fsdp"]))
    t = mesh_shape["tensor"]
    a = dtype_size(fc.dtype)
    d, heads = fc.inner_dim, fc.num_attention_heads
    n_single = getattr(fc, "num_single_layers", 0)  # Qwen-Image has only dual-stream blocks
    s = wl.image_tokens + wl.txt_len
    if wl.flash_attention:
        scores = b * math.ceil(heads / t) * s * 4
    else:
        scores = b * math.ceil(heads / t) * s * s * (4 + a)
    double = b * s * (8 * d + 16 * d / t) * a + scores
    single = b * s * (5 * d + 21 * d / t) * a + scores
    n_blocks = fc.num_layers + n_single
    if wl.remat:
        update = n_blocks * b * s * d * a + 2 * max(double, single)
    else:
        update = fc.num_layers * double + n_single * single + max(double, single)
    # Rollout: one block's forward; the VAE decode holds the family's measured number of float32
    # full-resolution feature maps per sample (`VAE_DECODE_MAPS`, from the compiled decode).
    vae = b * wl.height * wl.width * vae_channels * FAMILIES[wl.model].VAE_DECODE_MAPS * 4
    rollout = max(max(double, single), vae)
    # The stored rollout batch the update reads: latents (T+1), text embeddings, sharded by batch.
    samples = 2 * wl.pairs
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    latents = samples * (wl.num_steps + 1) * wl.target_tokens * fc.in_channels * 4
    cond = samples * (wl.txt_len * fc.joint_attention_dim + getattr(fc, "pooled_projection_dim", 0)) * a
    cond += samples * (wl.image_tokens - wl.target_tokens) * fc.in_channels * 4  # editing: source latents
    buffers = (latents + cond) / shards
    return {"update": update, "rollout": rollout, "buffers": buffers, "local_batch": b}


def components(models: dict) -> tuple[str, ...]:
    """The component names of an `abstract_models` result."""
    return FAMILIES[models["_model"]].COMPONENTS


def policy_bytes(models: dict, wl: Workload, mesh_shape: dict[str, int], rules) -> dict[str, Any]:
    """Per-device bytes of the policy on one mesh: ``per_model`` weights, ``lora_opt``, ``act`` (see
    `activation_bytes`)."""
    per = {m: per_device(models[m], rules, mesh_shape) for m in components(models)}
    act = activation_bytes(wl, models["_dit_config"], mesh_shape, models["_vae_top_channels"])
    # LoRA: params + gradient accumulator + step gradient + Adam mu/nu + zero reference.
    return {"per_model": per, "lora_opt": 6 * per["lora"], "act": act}


def models_for(wl: Workload, models: dict | None) -> dict:
    """``models`` (built for ``wl`` when None), checked to be of ``wl.model``'s family."""
    models = models or abstract_models(wl)
    if models.get("_model", wl.model) != wl.model:
        raise ValueError(f"models are for {models['_model']!r}, the workload for {wl.model!r}")
    return {**models, "_model": wl.model}


def plan(topologies: dict[str, Topology], wl: Workload = Workload(), *, tensor: int = 2, models=None,
         rules=None) -> list[dict[str, Any]]:
    """One row per (topology, rule set) with per-device bytes and whether it fits.

    ``models`` as from `abstract_models` of ``wl`` (built when None). The big text encoder
    (T5-XXL / Qwen2.5-VL) counts only with ``wl.t5_resident``; CLIP always does.
    """
    from arr_jax.sharding import make_rules

    rules = rules or make_rules()
    models = models_for(wl, models)
    fam = FAMILIES[wl.model]
    total_params = {m: sum(math.prod(sh) * it * c for sh, it, ax, c in models[m]) for m in fam.COMPONENTS}
    rows = []
    for key, topo in topologies.items():
        for name, mesh_shape in rule_sets(topo.devices, tensor).items():
            pol = policy_bytes(models, wl, mesh_shape, rules)
            per, lora_opt, act = pol["per_model"], pol["lora_opt"], pol["act"]
            params = sum(per[m] for m in fam.COMPONENTS if m not in ("lora", fam.BIG_TEXT))
            params += per[fam.BIG_TEXT] if wl.t5_resident else 0
            peak_act = max(act["update"], act["rollout"])
            total = params + lora_opt + act["buffers"] + peak_act
            usable = wl.usable * topo.hbm_bytes
            per_sample = peak_act / act["local_batch"]
            max_b = int((usable - params - lora_opt - act["buffers"]) // per_sample) if per_sample else 0
            rows.append(dict(model=wl.model, topology=key, description=topo.name, devices=topo.devices, rules=name,
                             mesh=dict(mesh_shape), hbm=topo.hbm_bytes, params=params, per_model=per,
                             total_params=total_params, lora_opt=lora_opt, buffers=act["buffers"],
                             act_update=act["update"], act_rollout=act["rollout"], local_batch=act["local_batch"],
                             total=total, fits=total <= usable, max_local_batch=max(max_b, 0)))
    return rows


def format_table(rows: list[dict], wl: Workload) -> str:
    """The rows of `plan` as text (GB per device)."""
    g = lambda x: f"{x / GB:7.2f}"  # noqa: E731
    fam = family(wl)
    tp = rows[0]["total_params"]
    sources = f" + {wl.image_tokens - wl.target_tokens} source" if wl.source_images else ""
    head = [
        f"RPO on {fam.TITLE} at {wl.height}x{wl.width} ({wl.target_tokens} image{sources} + "
        f"{wl.txt_len} text tokens); {wl.pairs} pairs, T={wl.num_steps}, LoRA r{wl.lora_rank}, micro-batch "
        f"{wl.micro_batch} samples, remat={wl.remat}, flash_attention={wl.flash_attention}",
        "parameters (all devices): " + ", ".join(f"{m} {tp[m] / GB:.2f} GB" for m in tp)
        + f"; {fam.BIG_TEXT_LABEL} {'resident' if wl.t5_resident else 'freed after encoding'}",
        "per-device GB:",
        f"{'topology':<13}{'rules':<10}{'mesh d/f/t':<12}{'params':>8}{'lora+opt':>9}{'buffers':>8}"
        f"{'act upd':>8}{'act roll':>9}{'total':>8}{'HBM':>7}  fits  max samples/dev",
    ]
    lines = []
    for r in rows:
        m = r["mesh"]
        lines.append(f"{r['topology']:<13}{r['rules']:<10}{m['data']}/{m['fsdp']}/{m['tensor']:<8}{g(r['params']):>8}"
                     f"{g(r['lora_opt']):>9}{g(r['buffers']):>8}{g(r['act_update']):>8}{g(r['act_rollout']):>9}"
                     f"{g(r['total']):>8}{r['hbm'] / GB:>7.0f}  {'yes' if r['fits'] else 'NO ':<5} "
                     f"{r['max_local_batch']} (now {r['local_batch']})")
    return "\n".join(head + lines)
