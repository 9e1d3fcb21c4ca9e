"""The Qwen3-VL-8B judge in the memory plan: its weights, one batch of pairwise prompts, its placement.

The judge (`Qwen3VLForConditionalGeneration`, bf16) is traced whole (~1 s). Its activations are an
analytic estimate (`judge_activation_bytes`) of one batch of pairwise prompts through the vision
tower and the prefill, with the KV cache of prompt + answer. `judge_plan` places it next to a
policy (FLUX.1-dev or Qwen-Image-Edit-2509, `arr_jax.memory.policy`): on the same mesh, or on a
sub-mesh of its own.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from arr_jax.memory.policy import Workload, family, models_for, policy_bytes
from arr_jax.memory.shards import GB, Topology, entries, per_device, rule_sets

# The architecture fields of Qwen/Qwen3-VL-8B-Instruct's published config.json
# (https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct/blob/main/config.json, revision 0c351dd; the
# same numbers appear in public verbatim copies of that file, e.g. the "vendored copy" in
# musubi-tuner's Ideogram 4 text-encoder loader). Parsed by our own `Qwen3VLConfig.from_hf`.
QWEN3_VL_8B_CONFIG = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
    "text_config": {
        "model_type": "qwen3_vl_text", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "attention_bias": False, "max_position_embeddings": 262144,
        "rope_theta": 5000000, "tie_word_embeddings": False,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
    "vision_config": {
        "model_type": "qwen3_vl", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
        "in_channels": 3, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2,
        "out_hidden_size": 4096, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
        "hidden_act": "gelu_pytorch_tanh"},
}


@dataclasses.dataclass(frozen=True)
class JudgeWorkload:
    """One batch of pairwise prompts for the Qwen3-VL judge (`arr_jax.judge.vlm_backend`).

    ``text_tokens``: every token of the prompt that is not an image pad or a vision start/end
    marker: the chat markup, the pairwise template (`arr_jax/judge/prompts/pairwise.txt`, ~200
    tokens), the task description, the generation prompt and the rubric (the paper's size, 10
    themes x 4 tips, is ~1.1k tokens at ~4 characters a token), so ~1.5k by default.
    ``answer_tokens``: the decode budget the KV cache is allocated for
    (``judge.qwen3_vl.max_new_tokens``); the default choice-score path (``judge.choice_scores``)
    runs one cache-free forward instead, which needs less.
    """

    batch: int = 8                # judge.qwen3_vl.batch_size: prompts per prefill
    images: int = 2               # a pairwise prompt shows two images
    image_side: int = 512
    text_tokens: int = 1536
    answer_tokens: int = 256      # judge.qwen3_vl.max_new_tokens
    seq_bucket: int = 256         # judge.qwen3_vl.seq_bucket
    patch_bucket: int = 256       # judge.qwen3_vl.patch_bucket


def abstract_judge(config=None) -> tuple[list[tuple], Any]:
    """``([(shape, itemsize, axes, count), ...], Qwen3VLConfig)`` of the bf16 judge, traced whole.

    ``config``: a `Qwen3VLConfig` (default: Qwen3-VL-8B-Instruct, `QWEN3_VL_8B_CONFIG`).
    """
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = config or Qwen3VLConfig.from_hf(QWEN3_VL_8B_CONFIG)
    model = nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, dtype=jnp.bfloat16, rngs=None))
    return entries(model, nnx.Param), cfg


def judge_tokens(jw: "JudgeWorkload", cfg) -> dict[str, int]:
    """Token counts of one pairwise prompt through the Qwen3-VL processor (`arr_jax.judge.processor`).

    An image is resized by `smart_resize` to multiples of patch x merge (512² stays 512²), cut
    into (side/patch)² patches (bucketed to ``patch_bucket``) and merged m x m into tokens
    (512² at patch 16, merge 2: 1024 patches, 256 tokens), each framed by vision start/end.
    Returns ``patches`` per image (bucketed), ``image_tokens`` per image, ``prompt`` (bucketed to
    ``seq_bucket``) and ``cache`` (prompt + answer) per row.
    """
    from arr_jax.judge.processor import ImageConfig, smart_resize

    def _round_up(n: int, multiple: int) -> int:
        return -(-n // multiple) * multiple

    v = cfg.vision
    ic = ImageConfig(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                     temporal_patch_size=v.temporal_patch_size)
    h, w = smart_resize(jw.image_side, jw.image_side, ic.factor, ic.min_pixels, ic.max_pixels)
    patches = (h // v.patch_size) * (w // v.patch_size)
    tokens = patches // v.spatial_merge_size ** 2
    prompt = _round_up(jw.images * (tokens + 2) + jw.text_tokens, jw.seq_bucket)
    return {"patches": _round_up(patches, jw.patch_bucket), "image_tokens": tokens, "prompt": prompt,
            "cache": prompt + jw.answer_tokens}


def judge_activation_bytes(jw: "JudgeWorkload", cfg, mesh_shape: dict[str, int],
                           flash_attention: bool = False, itemsize: int = 2) -> dict[str, float]:
    """Per-device bytes of one judge batch: vision tower, prefill and the KV cache.

    Rows ``b = ceil(batch / (data x fsdp))`` per device (`arr_jax.judge.decode.Decoder` shards the
    batch over the batch axes), frames ``ceil(batch x images / (data x fsdp))``; heads, KV heads and
    the MLP split over the tensor axis t. Activations and KV cache in the model dtype (``itemsize``
    a: 2 for bf16), float32 norms, RoPE and softmax as in `arr_jax.models.qwen3_vl_text` /
    `qwen3_vl_vision`. Inference keeps no activations across layers, so each part is the residual
    stream plus one layer's working set:

    * vision (G frames of L patches, width Ev, MLP Iv): f32 pixels + 2 residual copies + an f32
      norm + max(attention: qkv, f32 rotated q/k, (G, H, L, L) scores; MLP: 2 x Iv) + the merged
      tokens and K deepstack maps it hands on;
    * prefill (b rows of S tokens, cache length T = S + answer): 4 residual copies, the image
      features, f32 cos/sin, the (b, S, T) mask, max(attention: q, f32 rotated q, k/v new and read
      from the cache, (b, H/t, S, T) scores; MLP: 3 x F/t);
    * the KV cache ``2 x L x b x T x KVH/t x D``, live through the whole prefill.

    A score costs 8 + a bytes: the f32 logits, their f32 masked / exponentiated copy and the
    probabilities, the three buffers XLA's CPU buffer assignment keeps for our prefill (checked
    against the compiled program in tests/test_memory.py); a fused softmax on GPU / TPU may keep
    less, so this is an upper estimate. With ``flash_attention`` the scores are not materialised
    (a per-row f32 statistic instead).
    Returns ``vision``, ``prefill``, ``kv_cache``, ``peak`` (= kv_cache + max(vision, prefill)),
    ``rows`` (b) and ``frames`` (G).
    """
    tok = judge_tokens(jw, cfg)
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    t = mesh_shape["tensor"]
    a = itemsize
    b = math.ceil(jw.batch / shards)
    g = math.ceil(jw.batch * jw.images / shards)
    v, x = cfg.vision, cfg.text
    big_l, ev = tok["patches"], v.hidden_size
    merged = big_l // v.spatial_merge_size ** 2
    k_deep = len(v.deepstack_visual_indexes)
    vis_scores = g * v.num_heads * big_l * (4 if flash_attention else big_l * (8 + a))
    vis_attn = g * big_l * 3 * ev * a + 2 * g * big_l * ev * 4 + vis_scores + g * big_l * ev * a
    vis_mlp = 2 * g * big_l * v.intermediate_size * a
    vis_out = (k_deep + 1) * g * merged * v.out_hidden_size * a
    vision = (g * big_l * v.patch_dim * (4 + a) + 2 * g * big_l * ev * a + g * big_l * ev * 4
              + max(vis_attn, vis_mlp) + vis_out + g * merged * ev * v.spatial_merge_size ** 2 * 4)
    s, big_t, e = tok["prompt"], tok["cache"], x.hidden_size
    h, kvh, d = math.ceil(x.num_attention_heads / t), math.ceil(x.num_key_value_heads / t), x.head_dim
    scores = b * h * s * (4 if flash_attention else big_t * (8 + a))
    attn = b * s * h * d * (2 * a + 4) + 2 * b * s * kvh * d * a + 2 * b * big_t * kvh * d * a + scores
    mlp = 3 * b * s * math.ceil(x.intermediate_size / t) * a
    prefill = (4 * b * s * e * a + vis_out + 2 * b * s * d * 4 + b * s * big_t + max(attn, mlp)
               + 2 * b * x.vocab_size * 4)
    kv = 2 * x.num_hidden_layers * b * big_t * kvh * d * a
    return {"vision": vision, "prefill": prefill, "kv_cache": kv, "peak": kv + max(vision, prefill),
            "rows": b, "frames": g}


def judge_workload(wl: Workload, **overrides) -> "JudgeWorkload":
    """The judge batch of ``wl``'s model: images of ``wl.height`` pixels a side, two of them for a T2I
    pair, three for an editing pair (Image BASE, the source, first); ``overrides`` on top."""
    kw = dict(images=family(wl).JUDGE_IMAGES, image_side=wl.height)
    return JudgeWorkload(**{**kw, **overrides})


def judge_plan(topologies: dict[str, Topology], wl: Workload = Workload(), jw: "JudgeWorkload | None" = None, *,
               tensor: int = 2, models=None, judge=None, rules=None) -> list[dict[str, Any]]:
    """Two rows per (topology, rule set): placement ``"shared"`` and ``"submesh"``.

    shared: the judge's bf16 weights sharded by ``rules`` over the whole mesh, next to the policy's
    resident weights (transformer + VAE, LoRA + optimiser, rollout buffers); update, rollout and
    judge run in turn, so the activation peak is the largest of the three. submesh: the judge alone
    on the smallest ``N`` devices (FSDP over N) such that it fits and the policy fits on the other
    ``devices - N`` under the same rule set (N searched separately with the text encoders resident
    and freed).

    The text encoders (``text_encoders``: T5-XXL + CLIP for FLUX.1-dev, Qwen2.5-VL-7B for
    Qwen-Image-Edit) are counted both ways: ``*_t5`` resident, ``*_freed`` after the policy frees
    them once every prompt is encoded (``flux.release_text_encoders`` /
    ``qwen.release_text_encoder``, both on by default). ``wl.model`` picks the policy; ``jw``
    defaults to `judge_workload` of ``wl``. ``models`` as from `abstract_models` of ``wl``,
    ``judge`` as from `abstract_judge` (each built when None). Bytes are per device. ValueError
    when ``models`` are of another model than ``wl``.
    """
    from arr_jax.sharding import make_rules

    rules = rules or make_rules()
    models = models_for(wl, models)
    fam = family(wl)
    jw = jw or judge_workload(wl)
    jentries, jcfg = judge or abstract_judge()
    judge_params = sum(math.prod(sh) * c for sh, _, _, c in jentries)

    def judge_side(mesh_shape):
        return per_device(jentries, rules, mesh_shape), judge_activation_bytes(jw, jcfg, mesh_shape,
                                                                               wl.flash_attention)

    def policy_side(mesh_shape):
        pol = policy_bytes(models, wl, mesh_shape, rules)
        per, act = pol["per_model"], pol["act"]
        resident = sum(per[c] for c in fam.COMPONENTS if c != "lora" and c not in fam.TEXT_ENCODERS)
        resident += pol["lora_opt"] + act["buffers"]
        return resident, sum(per[c] for c in fam.TEXT_ENCODERS), max(act["update"], act["rollout"])

    rows = []
    for key, topo in topologies.items():
        usable = wl.usable * topo.hbm_bytes
        m = topo.devices
        for name, mesh_shape in rule_sets(m, tensor).items():
            base = dict(model=wl.model, topology=key, description=topo.name, devices=m, rules=name, hbm=topo.hbm_bytes,
                        judge_params=judge_params, tokens=judge_tokens(jw, jcfg))
            jwb, jact = judge_side(mesh_shape)
            res, text, pact = policy_side(mesh_shape)
            peak = max(pact, jact["peak"])
            on, off = res + text + jwb + peak, res + jwb + peak
            rows.append(dict(base, placement="shared", judge_devices=m, policy_devices=m, judge_mesh=dict(mesh_shape),
                             policy_mesh=dict(mesh_shape), judge_weights=jwb, judge_act=jact, policy_resident=res,
                             text_encoders=text, policy_act=pact, total_t5=on, total_freed=off,
                             fits_t5=on <= usable, fits_freed=off <= usable))
            splits = {}
            for n in range(1, m):
                pmesh = rule_sets(m - n, tensor).get(name)
                if pmesh is None:
                    continue
                jmesh = {"data": 1, "fsdp": n, "tensor": 1}
                jwb, jact = judge_side(jmesh)
                res, text, pact = policy_side(pmesh)
                splits[n] = dict(judge_devices=n, policy_devices=m - n, judge_mesh=jmesh, policy_mesh=dict(pmesh),
                                 judge_weights=jwb, judge_act=jact, policy_resident=res, text_encoders=text,
                                 policy_act=pact, judge_total=jwb + jact["peak"], policy_total_t5=res + text + pact,
                                 policy_total_freed=res + pact)
            ok = {mode: [n for n, sp in splits.items()
                         if sp["judge_total"] <= usable and sp[f"policy_total_{mode}"] <= usable]
                  for mode in ("t5", "freed")}
            n_t5, n_freed = min(ok["t5"], default=None), min(ok["freed"], default=None)
            shown = splits.get(n_t5 if n_t5 is not None else n_freed) or {}
            rows.append(dict(base, placement="submesh", min_judge_devices_t5=n_t5, min_judge_devices_freed=n_freed,
                             fits_t5=n_t5 is not None, fits_freed=n_freed is not None, splits_tried=sorted(splits),
                             **shown))
    return rows


def format_judge_table(rows: list[dict], jw: JudgeWorkload) -> str:
    """The judge rows of `judge_plan` (one model's) as text (GB per device)."""
    from arr_jax.memory.policy import FAMILIES

    fam = FAMILIES[rows[0].get("model", "flux_dev")]
    tok = rows[0]["tokens"]
    yn = lambda ok: "yes" if ok else "NO"  # noqa: E731
    on = fam.BIG_TEXT_LABEL
    tw = max(24, len(f"total ({on} on / freed)") + 2)
    head = [
        f"+ judge Qwen3-VL-8B-Instruct next to {fam.TITLE}, bf16, {rows[0]['judge_params'] / 1e9:.2f} B parameters "
        f"({rows[0]['judge_params'] * 2 / GB:.1f} GB): a pairwise prompt = {jw.images} images {jw.image_side}² "
        f"({tok['image_tokens']} tokens each) + {jw.text_tokens} text tokens -> {tok['prompt']} tokens; KV cache "
        f"{tok['cache']} tokens (+{jw.answer_tokens} answer); judge batch {jw.batch}",
        "shared: the judge sharded by the same rules over all devices; the update, rollout and judge run in "
        "turn (activation peak = the largest).",
        "own sub-mesh: the judge alone on the smallest N devices (FSDP over N) such that the policy fits on the "
        f"rest; total = judge device | policy device. A policy mesh whose size does not divide a width ({fam.WIDTHS}"
        ") holds that weight whole, as param_shardings does.",
        f"policy = {fam.DIT_LABEL} + VAE + LoRA and optimiser + rollout buffers; pol act = max(update, rollout); "
        f"{on} on: {fam.TEXT_DESC} resident; freed: dropped once the prompts are encoded ({fam.RELEASE}, the "
        "default).",
        "per-device GB:",
        f"{'topology':<13}{'rules':<10}{'placement':<20}{'judge w':>8}{'judge act':>10}{'policy':>8}"
        f"{fam.TEXT_LABEL:>8}{'pol act':>8}  {f'total ({on} on / freed)':<{tw}}{'HBM':>5}  fits ({on} on / freed)",
    ]
    lines = []
    for r in rows:
        if r["placement"] == "shared":
            where = f"shared, {r['devices']} dev"
            total = f"{r['total_t5'] / GB:.1f} / {r['total_freed'] / GB:.1f}"
            fits = f"{yn(r['fits_t5'])} / {yn(r['fits_freed'])}"
        elif "judge_devices" in r:
            where = f"judge {r['judge_devices']} + policy {r['policy_devices']}"
            total = (f"{r['judge_total'] / GB:.1f} | {r['policy_total_t5'] / GB:.1f} / "
                     f"{r['policy_total_freed'] / GB:.1f}")
            n = lambda k: r[k] if r[k] is not None else "-"  # noqa: E731
            fits = (f"{yn(r['fits_t5'])} / {yn(r['fits_freed'])} (smallest N: {n('min_judge_devices_t5')} / "
                    f"{n('min_judge_devices_freed')})")
        elif r["splits_tried"]:
            lines.append(f"{r['topology']:<13}{r['rules']:<10}no split of {r['devices']} devices fits")
            continue
        else:
            lines.append(f"{r['topology']:<13}{r['rules']:<10}no split of {r['devices']} devices leaves the policy "
                         f"a {r['rules']} mesh")
            continue
        lines.append(f"{r['topology']:<13}{r['rules']:<10}{where:<20}{r['judge_weights'] / GB:>8.2f}"
                     f"{r['judge_act']['peak'] / GB:>10.2f}{r['policy_resident'] / GB:>8.2f}"
                     f"{r['text_encoders'] / GB:>8.2f}{r['policy_act'] / GB:>8.2f}  {total:<{tw}}"
                     f"{r['hbm'] / GB:>5.0f}  {fits}")
    return "\n".join(head + lines)


def default_judge_batch() -> int:
    """``judge.qwen3_vl.batch_size`` of `arr_jax.judge.factory.judge_config` (the configured judge)."""
    from arr_jax.judge.factory import judge_config

    return int(judge_config().qwen3_vl.batch_size)
