"""Per-device memory plan of RPO for named topologies (abstract shapes only; fast): FLUX.1-dev
text-to-image (SPEC §2's T2I batch) and Qwen-Image-Edit-2509 editing (the editing batch).

    python -m arr_jax.memory [--models=flux_dev,qwen_image_edit] [--topologies=v5p-8,v6e-8]
                             [--micro_batch=16] [--tensor=2] [--json=plan.json]

Parameters come from ``jax.eval_shape`` of our real model classes at full width (FluxTransformer
with LoRA, T5-XXL, CLIP-L, the FLUX VAE; or QwenImageTransformer with LoRA, Qwen2.5-VL-7B and the
Qwen-Image VAE). The blocks of a transformer are identical, so one of each kind is traced and
counted (FLUX: 19 double + 38 single, Qwen-Image: 60 dual-stream; tracing them all costs ~30 s).
Each parameter's bytes per device follow its logical axes through the sharding rules on an
abstract mesh, exactly as `arr_jax.sharding.param_shardings` places it (an axis that does not
divide the dimension replicates it).

Activations are an analytic estimate from the same shapes (see `activation_bytes`): the RPO
update holds one micro-batch at one trained step (forward + backward, per-block remat by
default); the rollout holds one block's forward and the VAE decode. "fits" means the total is
at most ``usable`` (default 90%) of the device memory.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import numpy as np

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    devices: int
    hbm_bytes: float


TOPOLOGIES = {
    "v5p-8": Topology("TPU v5p-8 (4 chips)", 4, 95 * GB),
    "v5p-32": Topology("TPU v5p-32 (16 chips)", 16, 95 * GB),
    "v6e-8": Topology("TPU v6e-8 (8 chips)", 8, 32 * GB),
    "8xH100-80GB": Topology("8x H100 80GB", 8, 80 * GB),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """The RPO step being planned (SPEC §2 T2I defaults; `qwen_image_edit` for the editing column)."""

    height: int = 512
    width: int = 512
    txt_len: int = 512            # T5 tokens
    pairs: int = 32               # prompt pairs per update (2 samples each)
    num_steps: int = 8            # rollout steps T
    micro_batch: int = 16         # samples per forward (global; sharded over data x fsdp)
    lora_rank: int = 16
    lora_alpha: float = 32.0
    remat: bool = True            # per-block rematerialisation in the update
    flash_attention: bool = False  # False: XLA attention materialises (B, H, S, S) scores
    t5_resident: bool = True      # keep T5-XXL on device (False: encode once, cache, free it)
    usable: float = 0.9           # fraction of device memory the plan may use
    model: str = "flux_dev"       # "flux_dev" or "qwen_image_edit"
    source_images: int = 0        # editing: source images at the target size, as extra image tokens

    @property
    def target_tokens(self) -> int:
        return (self.height // 16) * (self.width // 16)

    @property
    def image_tokens(self) -> int:
        """Image tokens the transformer sees: the target and every source."""
        return self.target_tokens * (1 + self.source_images)

    @classmethod
    def qwen_image_edit(cls, **overrides) -> "Workload":
        """SPEC §2's editing column on Qwen-Image-Edit-2509: 16 pairs, T=10, LoRA r32 / alpha 64, 512^2,
        one 512^2 source; ~256 text states (the instruction plus a 384^2 condition image's 196 tokens)."""
        kw = dict(model="qwen_image_edit", pairs=16, num_steps=10, lora_rank=32, lora_alpha=64.0, txt_len=256,
                  source_images=1)
        kw.update(overrides)
        return cls(**kw)


def _dtype_size(x) -> int:
    return int(np.dtype(x).itemsize)


def shard_bytes(shape: Sequence[int], itemsize: int, axes, rules, mesh_shape: dict[str, int]) -> int:
    """Bytes one device holds of a parameter with logical ``axes`` under ``rules`` on a mesh."""
    n = int(math.prod(shape)) * itemsize
    if axes is None or len(axes) != len(shape):
        return n
    spec = rules.spec(axes)
    for dim, ax in zip(shape, spec):
        if ax is None:
            continue
        size = int(math.prod(mesh_shape[a] for a in ((ax,) if isinstance(ax, str) else ax)))
        if dim % size == 0:
            n //= size
    return n


# ---------------------------------------------------------------------------- abstract models

def _entries(model, filt, repeat=None):
    """[(shape, itemsize, axes, count)] of the variables of ``model`` selected by ``filt``."""
    from flax import nnx

    out = []
    for path, v in nnx.to_flat_state(nnx.state(model, filt)):
        val = v.get_value()
        count = 1
        if repeat is not None and path[0] in repeat:
            count = repeat[path[0]]
        out.append((tuple(val.shape), _dtype_size(val.dtype), v.get_metadata().get("axes"), count))
    return out


def abstract_models(wl: Workload, flux_config=None, t5_config=None, clip_config=None, vae_config=None,
                    text_config=None) -> dict:
    """``{name: [(shape, itemsize, axes, count), ...]}`` for transformer, lora, t5, clip, vae (FLUX) or
    transformer, lora, text_encoder, vae (``wl.model == "qwen_image_edit"``; ``flux_config`` is then a
    `QwenImageConfig`, ``text_config`` a `Qwen25VLConfig`, ``vae_config`` a `QwenImageVAEConfig`).

    Default configs are the full-size ones; pass small ones in tests.
    """
    if wl.model == "qwen_image_edit":
        return _abstract_qwen(wl, flux_config, text_config, vae_config)
    if wl.model != "flux_dev":
        raise ValueError(f"unknown model {wl.model!r}; use 'flux_dev' or 'qwen_image_edit'")
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from arr_jax.models.flux import FluxConfig, FluxTransformer
    from arr_jax.models.t5 import T5Encoder, T5EncoderConfig
    from arr_jax.models.vae import AutoencoderKL, VAEConfig
    from arr_jax.nn.lora import LoRAConfig, LoRAParam

    fc = flux_config or FluxConfig.flux_dev(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    fc = fc.replace(lora=LoRAConfig(rank=wl.lora_rank, alpha=wl.lora_alpha))
    one = fc.replace(num_layers=min(fc.num_layers, 1), num_single_layers=min(fc.num_single_layers, 1))
    flux = nnx.eval_shape(lambda: FluxTransformer(one, rngs=nnx.Rngs(0)))

    entries = _entries
    repeat = {"transformer_blocks": fc.num_layers, "single_transformer_blocks": fc.num_single_layers}
    from arr_jax.nn_filters import base_param_filter

    models = {"transformer": entries(flux, base_param_filter(), repeat), "lora": entries(flux, LoRAParam, repeat)}
    t5 = nnx.eval_shape(lambda: T5Encoder(t5_config or T5EncoderConfig(), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    clip = nnx.eval_shape(lambda: CLIPTextModel(clip_config or CLIPTextConfig(), dtype=jnp.bfloat16,
                                                rngs=nnx.Rngs(0)))
    vae = nnx.eval_shape(lambda: AutoencoderKL(vae_config or VAEConfig(), dtype=jnp.float32, rngs=nnx.Rngs(0)))
    models.update(t5=entries(t5, nnx.Param), clip=entries(clip, nnx.Param), vae=entries(vae, nnx.Param))
    models["_dit_config"] = fc
    models["_vae_top_channels"] = (vae_config or VAEConfig()).block_out_channels[0]
    models["_components"] = ("transformer", "lora", "t5", "clip", "vae")
    models["_big_text"] = "t5"
    models["_title"] = "FLUX.1-dev + T5-XXL + CLIP-L + VAE"
    return models


def _abstract_qwen(wl: Workload, qwen_config=None, text_config=None, vae_config=None) -> dict:
    """Qwen-Image-Edit-2509 at full size: the 60-block transformer (one block traced), Qwen2.5-VL-7B
    (bf16, without the LM head Qwen-Image never uses) and the Qwen-Image VAE (float32)."""
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.models.qwen2_5_vl import Qwen25VLConfig, Qwen25VLEncoder
    from arr_jax.models.qwen_image import QwenImageConfig, QwenImageTransformer
    from arr_jax.models.qwen_image_vae import QwenImageVAE, QwenImageVAEConfig
    from arr_jax.nn.lora import LoRAConfig, LoRAParam
    from arr_jax.nn_filters import base_param_filter

    qc = qwen_config or QwenImageConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    qc = qc.replace(lora=LoRAConfig(rank=wl.lora_rank, alpha=wl.lora_alpha))
    dit = nnx.eval_shape(lambda: QwenImageTransformer(qc.replace(num_layers=min(qc.num_layers, 1)), rngs=nnx.Rngs(0)))
    repeat = {"transformer_blocks": qc.num_layers}
    text = nnx.eval_shape(lambda: Qwen25VLEncoder(text_config or Qwen25VLConfig(), dtype=jnp.bfloat16,
                                                  rngs=nnx.Rngs(0)))
    vc = vae_config or QwenImageVAEConfig()
    vae = nnx.eval_shape(lambda: QwenImageVAE(vc, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    return {"transformer": _entries(dit, base_param_filter(), repeat), "lora": _entries(dit, LoRAParam, repeat),
            "text_encoder": _entries(text, nnx.Param), "vae": _entries(vae, nnx.Param), "_dit_config": qc,
            "_vae_top_channels": vc.base_dim * vc.dim_mult[0],
            "_components": ("transformer", "lora", "text_encoder", "vae"), "_big_text": "text_encoder",
            "_title": "Qwen-Image-Edit-2509 (transformer + Qwen2.5-VL-7B + VAE)"}


# ---------------------------------------------------------------------------- activations

def activation_bytes(wl: Workload, fc, mesh_shape: dict[str, int], vae_channels: int = 128) -> dict[str, float]:
    """Per-device activation estimate (bytes) for the update and the rollout.

    Per token and block (D = width, t = tensor axis; head/MLP intermediates are split over t):
    double-stream ~ 8D + 16D/t values (norms in float32, modulated input, q/k/v, normed and
    rotated q/k, attention output, projections, 4D MLP pre/post GELU), single-stream
    ~ 5D + 21D/t; plus the (B, H/t, S, S) float32 scores and probabilities of XLA attention.
    The update keeps the block inputs (remat) and recomputes one block with its gradients.
    """
    b = math.ceil(wl.micro_batch / (mesh_shape["data"] * mesh_shape["fsdp"]))
    t = mesh_shape["tensor"]
    a = _dtype_size(fc.dtype)
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
    # Rollout: one block's forward; the VAE decode holds ~4 full-resolution feature maps per sample.
    vae = b * wl.height * wl.width * vae_channels * 4 * 4
    rollout = max(max(double, single), vae)
    # The stored rollout batch the update reads: latents (T+1), text embeddings, sharded by batch.
    samples = 2 * wl.pairs
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    latents = samples * (wl.num_steps + 1) * wl.target_tokens * fc.in_channels * 4
    cond = samples * (wl.txt_len * fc.joint_attention_dim + getattr(fc, "pooled_projection_dim", 0)) * a
    cond += samples * (wl.image_tokens - wl.target_tokens) * fc.in_channels * 4  # editing: source latents
    buffers = (latents + cond) / shards
    return {"update": update, "rollout": rollout, "buffers": buffers, "local_batch": b}


# ---------------------------------------------------------------------------- the plan

def rule_sets(devices: int, tensor: int = 2) -> dict[str, dict[str, int]]:
    """Mesh shapes of the two rule sets: FSDP over all devices, and FSDP x tensor parallel."""
    sets = {"fsdp": {"data": 1, "fsdp": devices, "tensor": 1}}
    if tensor > 1 and devices % tensor == 0 and devices > tensor:
        sets[f"fsdp+tp{tensor}"] = {"data": 1, "fsdp": devices // tensor, "tensor": tensor}
    return sets


def plan(topologies: dict[str, Topology], wl: Workload = Workload(), *, tensor: int = 2, models=None,
         rules=None) -> list[dict[str, Any]]:
    """One row per (topology, rule set) with per-device bytes and whether it fits."""
    from arr_jax.sharding import make_rules

    rules = rules or make_rules()
    models = models or abstract_models(wl)
    fc, vae_ch = models["_dit_config"], models["_vae_top_channels"]
    comps, big_text = models["_components"], models["_big_text"]
    rows = []
    for key, topo in topologies.items():
        for name, mesh_shape in rule_sets(topo.devices, tensor).items():
            per = {m: sum(shard_bytes(sh, it, ax, rules, mesh_shape) * c for sh, it, ax, c in models[m])
                   for m in comps}
            total_params = {m: sum(math.prod(sh) * it * c for sh, it, ax, c in models[m]) for m in comps}
            act = activation_bytes(wl, fc, mesh_shape, vae_ch)
            # LoRA: params + gradient accumulator + step gradient + Adam mu/nu + zero reference.
            lora_opt = 6 * per["lora"]
            # the big text encoder (T5-XXL / Qwen2.5-VL) counts only while resident
            params = sum(per[m] for m in comps if m not in ("lora", big_text)) + (per[big_text] if wl.t5_resident
                                                                                 else 0)
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


TITLES = {"flux_dev": ("FLUX.1-dev + T5-XXL + CLIP-L + VAE", "T5"),
          "qwen_image_edit": ("Qwen-Image-Edit-2509 (transformer + Qwen2.5-VL-7B + VAE)", "Qwen2.5-VL")}


def format_table(rows: list[dict], wl: Workload) -> str:
    g = lambda x: f"{x / GB:7.2f}"  # noqa: E731
    r0 = rows[0]
    tp = r0["total_params"]
    title, text = TITLES[wl.model]
    sources = f" + {wl.image_tokens - wl.target_tokens} source" if wl.source_images else ""
    head = [
        f"RPO on {title} at {wl.height}x{wl.width} ({wl.target_tokens} image{sources} + "
        f"{wl.txt_len} text tokens); {wl.pairs} pairs, T={wl.num_steps}, LoRA r{wl.lora_rank}, micro-batch "
        f"{wl.micro_batch} samples, remat={wl.remat}, flash_attention={wl.flash_attention}",
        "parameters (all devices): " + ", ".join(f"{m} {tp[m] / GB:.2f} GB" for m in tp)
        + f"; {text} {'resident' if wl.t5_resident else 'freed after encoding'}",
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


def parse_topologies(spec: str) -> dict[str, Topology]:
    """``"v5p-8,v6e-8"`` (names from `TOPOLOGIES`) or custom ``"name=devices:hbm_gb"`` entries."""
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        if "=" in item:
            name, rest = item.split("=", 1)
            n, hbm = rest.split(":")
            out[name] = Topology(name, int(n), float(hbm) * GB)
        elif item in TOPOLOGIES:
            out[item] = TOPOLOGIES[item]
        else:
            raise ValueError(f"unknown topology {item!r}; known: {sorted(TOPOLOGIES)} or name=devices:hbm_gb")
    return out


WORKLOADS = {"flux_dev": Workload, "qwen_image_edit": Workload.qwen_image_edit}


def main(argv) -> None:
    from absl import flags

    f = flags.FLAGS
    topologies = parse_topologies(f.topologies)
    names = [m.strip() for m in f.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"--models: unknown {unknown or names} (use a comma-separated subset of {sorted(WORKLOADS)})")
    workloads, rows = {}, []
    for name in names:
        wl = WORKLOADS[name](height=f.resolution, width=f.resolution, micro_batch=f.micro_batch, remat=f.remat,
                             flash_attention=f.flash_attention, t5_resident=f.t5_resident)
        r = plan(topologies, wl, tensor=f.tensor)
        print(format_table(r, wl) + "\n")
        workloads[name], rows = dataclasses.asdict(wl), rows + r
    if f.json:
        with open(f.json, "w") as fh:
            json.dump({"workload": workloads[names[0]], "workloads": workloads, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    import os

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from absl import app, flags

    flags.DEFINE_string("models", ",".join(WORKLOADS), "comma-separated: flux_dev (T2I batch), qwen_image_edit "
                        "(the editing batch)")
    flags.DEFINE_string("topologies", ",".join(TOPOLOGIES), "comma-separated names or name=devices:hbm_gb")
    flags.DEFINE_integer("micro_batch", Workload.micro_batch, "samples per forward (global)")
    flags.DEFINE_integer("resolution", 512, "image side")
    flags.DEFINE_integer("tensor", 2, "tensor-parallel axis size of the FSDP+TP rule set")
    flags.DEFINE_boolean("remat", True, "per-block rematerialisation in the update")
    flags.DEFINE_boolean("flash_attention", False, "attention without materialised scores")
    flags.DEFINE_boolean("t5_resident", True, "count the big text encoder (T5-XXL / Qwen2.5-VL) as resident")
    flags.DEFINE_string("json", "", "also write the rows here")
    app.run(main)
