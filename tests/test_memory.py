"""The memory plan: parameter counts of the real model classes, sharding arithmetic, the judge, the
Qwen-Image-Edit editing rows, the CLI."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from arr_jax.memory import (QWEN3_VL_8B_CONFIG, TOPOLOGIES, JudgeWorkload, Topology, Workload, abstract_judge,
                            abstract_models, format_judge_table, format_table, judge_activation_bytes, judge_plan,
                            judge_tokens, judge_workload, parse_topologies, plan, shard_bytes)
from arr_jax.sharding import make_rules

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def full_models():
    return abstract_models(Workload())


@pytest.fixture(scope="module")
def judge():
    return abstract_judge()


@pytest.fixture(scope="module")
def edit_models():
    return abstract_models(Workload.qwen_image_edit())


def test_full_size_parameter_counts(full_models):
    """Abstract shapes of our classes at full size give the published FLUX.1-dev / T5-XXL / CLIP-L / VAE sizes."""
    count = {m: sum(math.prod(s) * c for s, _, _, c in full_models[m]) for m in ("transformer", "t5", "clip", "vae")}
    assert count == {"transformer": 11_901_408_320, "t5": 4_762_310_656, "clip": 123_060_480, "vae": 83_819_683}
    # LoRA r16 on q, k, v, out (+ the context projections of the double-stream blocks):
    # 19 blocks x 8 Linears + 38 blocks x 3 Linears, each 16 x (3072 + 3072).
    lora = sum(math.prod(s) * c for s, _, _, c in full_models["lora"])
    assert lora == (19 * 8 + 38 * 3) * 16 * (3072 + 3072)


def test_sharding_arithmetic(full_models):
    rules = make_rules()
    topo = {"small": Topology("small", 8, 16e9)}
    rows = plan(topo, Workload(micro_batch=16), tensor=2, models=full_models, rules=rules)
    assert [r["rules"] for r in rows] == ["fsdp", "fsdp+tp2"]
    for r in rows:
        n = r["devices"]
        for m, per in r["per_model"].items():
            total = r["total_params"][m]
            assert per * n >= total, (m, r["rules"])   # nothing is lost
            assert per <= total
        # the big weights are sharded ~n ways (norm scales / small biases stay replicated)
        assert r["per_model"]["transformer"] < 1.01 * r["total_params"]["transformer"] / n
        assert r["fits"] == (r["local_batch"] <= r["max_local_batch"])
    fsdp, tp = rows
    assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and tp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert fsdp["local_batch"] == 2 and tp["local_batch"] == 4  # micro-batch split over data x fsdp only
    # FSDP divides an (embed, heads) kernel by the fsdp axis size exactly
    q = (3072, 3072)
    assert shard_bytes(q, 2, ("embed", "heads"), rules, fsdp["mesh"]) == 3072 * 3072 * 2 // 8
    assert shard_bytes(q, 2, ("embed", "heads"), rules, tp["mesh"]) == 3072 * 3072 * 2 // 8
    assert shard_bytes((3072,), 2, ("norm",), rules, fsdp["mesh"]) == 3072 * 2      # replicated
    assert shard_bytes((10, 3), 4, ("embed", None), rules, fsdp["mesh"]) == 120      # 10 % 8 != 0: replicated
    # more devices: less per device; bigger micro-batch: more activation
    rows16 = plan({"big": Topology("big", 16, 16e9)}, Workload(micro_batch=16), models=full_models, rules=rules)
    assert rows16[0]["params"] < fsdp["params"] and rows16[0]["act_update"] < fsdp["act_update"]
    rows_mb = plan(topo, Workload(micro_batch=64), models=full_models, rules=rules)
    assert rows_mb[0]["act_update"] > fsdp["act_update"]
    no_t5 = plan(topo, Workload(t5_resident=False), models=full_models, rules=rules)[0]
    assert fsdp["params"] - no_t5["params"] == fsdp["per_model"]["t5"]
    assert "small" in format_table(rows, Workload())


def test_parse_topologies():
    t = parse_topologies("v6e-8,mine=2:24")
    assert t["v6e-8"].devices == 8 and t["mine"] == Topology("mine", 2, 24e9)
    with pytest.raises(ValueError, match="unknown topology 'v9'"):
        parse_topologies("v9")


def test_judge_parameter_count(judge):
    """Qwen3-VL-8B-Instruct from our classes: the published 8.77 B (HF: "8.8B") and the count of its config."""
    entries, cfg = judge
    n = sum(math.prod(s) * c for s, _, _, c in entries)
    assert abs(n - 8.8e9) / 8.8e9 < 0.01
    # The same count by hand from config.json: text (untied lm_head) + vision tower + 1 + 3 deepstack mergers.
    t, v = QWEN3_VL_8B_CONFIG["text_config"], QWEN3_VL_8B_CONFIG["vision_config"]
    e, f, d = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    h, kv = t["num_attention_heads"] * d, t["num_key_value_heads"] * d
    text = 2 * t["vocab_size"] * e + t["num_hidden_layers"] * (2 * e * h + 2 * e * kv + 2 * d + 3 * e * f + 2 * e) + e
    ev, iv, em = v["hidden_size"], v["intermediate_size"], v["hidden_size"] * v["spatial_merge_size"] ** 2
    patch = v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2
    block = 4 * ev + 3 * ev * ev + 3 * ev + ev * ev + ev + 2 * ev * iv + iv + ev
    merger = em * em + em + em * v["out_hidden_size"] + v["out_hidden_size"]
    vision = (patch * ev + ev + v["num_position_embeddings"] * ev + v["depth"] * block + 2 * ev + merger
              + len(v["deepstack_visual_indexes"]) * (2 * em + merger))
    assert n == text + vision == 8_767_123_696
    assert {it for _, it, _, _ in entries} == {2}  # bf16 weights
    assert (cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.vision.depth) == (36, 8, 27)


def test_judge_workload_defaults_are_the_configured_judge():
    from arr_jax.judge.factory import judge_config

    q, jw = judge_config().qwen3_vl, JudgeWorkload()
    assert (jw.batch, jw.answer_tokens, jw.seq_bucket, jw.patch_bucket) == (
        q.batch_size, q.max_new_tokens, q.seq_bucket, q.patch_bucket)


def test_judge_tokens_follow_the_processor(judge):
    """512² through our Qwen3-VL image preprocessing: a 32 x 32 patch grid, 256 merged tokens."""
    from arr_jax.judge.processor import ImageConfig, preprocess_image

    _, cfg = judge
    patches, grid = preprocess_image(np.zeros((512, 512, 3), np.uint8), ImageConfig())
    tok = judge_tokens(JudgeWorkload(), cfg)
    assert tok["patches"] == len(patches) == 1024 and list(grid) == [1, 32, 32]
    assert tok["image_tokens"] == 1024 // 4 == 256
    # 2 x (256 image pads + vision start/end) + 1536 text = 2052 tokens, bucketed to 256: 2304; + 256 answer.
    assert (tok["prompt"], tok["cache"]) == (2304, 2560)
    assert judge_tokens(JudgeWorkload(text_tokens=100, seq_bucket=64), cfg)["prompt"] == 640  # 616 -> 640


def test_judge_bytes_scale_with_sharding(judge):
    entries, cfg = judge
    rules = make_rules()
    total = sum(math.prod(s) * it * c for s, it, _, c in entries)
    for n in (2, 4, 8, 16):
        mesh = {"data": 1, "fsdp": n, "tensor": 1}
        per = sum(shard_bytes(s, it, ax, rules, mesh) * c for s, it, ax, c in entries)
        assert total / n <= per < 1.01 * total / n   # only norms and biases stay replicated
    tp = sum(shard_bytes(s, it, ax, rules, {"data": 1, "fsdp": 4, "tensor": 2}) * c for s, it, ax, c in entries)
    assert total / 8 <= tp < 1.01 * total / 8
    jw = JudgeWorkload()
    one = judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    eight = judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 8, "tensor": 1})
    assert (one["rows"], one["frames"], eight["rows"], eight["frames"]) == (8, 16, 1, 2)
    for k in ("vision", "prefill", "kv_cache", "peak"):
        assert one[k] == pytest.approx(8 * eight[k], rel=1e-12)   # every term is linear in rows / frames
    # the KV cache: 2 (k, v) x 36 layers x 8 rows x 2560 slots x 8 KV heads x 128 x 2 bytes
    assert one["kv_cache"] == 2 * 36 * 8 * 2560 * 8 * 128 * 2
    tp2 = judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 4, "tensor": 2})
    assert tp2["kv_cache"] == one["kv_cache"] / 8 and tp2["rows"] == 2   # rows over fsdp, KV heads over tensor
    assert judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 16, "tensor": 1})["rows"] == 1  # 8 rows, 16 devices
    flash = judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 1, "tensor": 1}, flash_attention=True)
    assert flash["peak"] < one["peak"] and flash["kv_cache"] == one["kv_cache"]
    longer = judge_activation_bytes(JudgeWorkload(text_tokens=4000), cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    assert longer["kv_cache"] > one["kv_cache"] and longer["prefill"] > one["prefill"]


def test_judge_activation_estimate_against_xla():
    """The estimate against XLA's own buffer assignment for our jitted prefill (`judge.decode.prefill`),
    compiled on CPU in float32 (bf16 on CPU adds f32 copies of the weights that GPU / TPU do not make)."""
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.judge.decode import KVCache, prefill
    from arr_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration, prepare_inputs
    from arr_jax.models.qwen3_vl_text import TextConfig
    from arr_jax.models.qwen3_vl_vision import VisionConfig

    cfg = Qwen3VLConfig(
        text=TextConfig(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=(12, 10, 10)),
        vision=VisionConfig(depth=2, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512,
                            num_position_embeddings=256, deepstack_visual_indexes=(0, 1)))
    jw = JudgeWorkload(batch=4, image_side=256, text_tokens=300, answer_tokens=64)
    tok = judge_tokens(jw, cfg)
    b, s, t = jw.batch, tok["prompt"], tok["cache"]
    row = [1] * 50 + ([cfg.vision_start_token_id] + [cfg.image_token_id] * tok["image_tokens"]
                      + [cfg.vision_end_token_id]) * jw.images + [2] * (jw.text_tokens - 50)
    ids, am = np.zeros((b, s), np.int32), np.zeros((b, s), np.int32)
    ids[:, s - len(row):], am[:, s - len(row):] = row, 1
    side = jw.image_side // cfg.vision.patch_size
    grid = np.array([[1, side, side]] * (jw.images * b))
    pv = np.zeros((len(grid) * side * side, cfg.vision.patch_dim), np.float32)
    inp = prepare_inputs(cfg, ids, am, pv, grid, patch_bucket=jw.patch_bucket, image_bucket=2)
    inp.pop("rope_deltas")
    inp = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in inp.items()}
    gd, state = nnx.split(nnx.eval_shape(lambda: Qwen3VLForConditionalGeneration(cfg, dtype=jnp.float32)))
    x = cfg.text
    kv = jax.ShapeDtypeStruct((x.num_hidden_layers, b, t, x.num_key_value_heads, x.head_dim), jnp.float32)
    cache = KVCache(k=kv, v=kv, valid=jax.ShapeDtypeStruct((b, t), bool), index=jax.ShapeDtypeStruct((), jnp.int32),
                    next_pos=jax.ShapeDtypeStruct((b,), jnp.int32))
    compiled = jax.jit(functools.partial(prefill, gd), donate_argnums=(2,)).lower(state, inp, cache).compile()
    ma = compiled.memory_analysis()
    inputs = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in inp.values())
    xla = ma.temp_size_in_bytes + ma.output_size_in_bytes + inputs
    est = judge_activation_bytes(jw, cfg, {"data": 1, "fsdp": 1, "tensor": 1}, itemsize=4)
    assert ma.output_size_in_bytes >= est["kv_cache"]
    assert 0.95 < est["peak"] / xla < 1.25, (est, xla)  # measured 1.13; scores at 4 + a bytes: 0.86


def test_judge_plan_rows(full_models, judge):
    wl = Workload()
    rows = judge_plan(TOPOLOGIES, wl, tensor=2, models=full_models, judge=judge)
    # every named topology: both placements under FSDP (and FSDP+TP2)
    for name in ("v5p-8", "v5p-32", "v6e-8", "v6e-16", "8xH100-80GB", "8xH200"):
        assert {(r["rules"], r["placement"]) for r in rows if r["topology"] == name} >= {
            ("fsdp", "shared"), ("fsdp", "submesh"), ("fsdp+tp2", "shared"), ("fsdp+tp2", "submesh")}
    policy = {(r["topology"], r["rules"]): r for r in plan(TOPOLOGIES, wl, models=full_models)}
    for r in rows:
        usable = wl.usable * r["hbm"]
        if r["placement"] == "shared":
            p = policy[(r["topology"], r["rules"])]
            # the same policy bytes as the policy-only table, plus the judge's weights; one activation peak
            resident = p["params"] + p["lora_opt"] + p["buffers"]
            assert r["policy_resident"] + r["text_encoders"] == pytest.approx(resident)
            assert r["judge_weights"] < 1.01 * 2 * r["judge_params"] / r["devices"]
            assert r["total_t5"] == pytest.approx(p["total"] - max(p["act_update"], p["act_rollout"])
                                                  + r["judge_weights"] + max(r["policy_act"], r["judge_act"]["peak"]))
            assert r["total_t5"] - r["total_freed"] == pytest.approx(r["text_encoders"])
            assert r["fits_t5"] == (r["total_t5"] <= usable) and r["fits_freed"] == (r["total_freed"] <= usable)
            # the paper's batch fits with the judge on the same mesh, on every named topology
            assert r["fits_t5"] and r["fits_freed"], r["topology"]
        elif r["fits_freed"]:
            n = r["judge_devices"]
            assert n == (r["min_judge_devices_t5"] or r["min_judge_devices_freed"])
            assert n + r["policy_devices"] == r["devices"] and r["judge_mesh"] == {"data": 1, "fsdp": n, "tensor": 1}
            assert r["judge_total"] == pytest.approx(r["judge_weights"] + r["judge_act"]["peak"])
            assert r["judge_total"] <= usable and r["policy_total_freed"] <= usable
            assert r["min_judge_devices_freed"] <= n   # freeing T5 never needs a larger judge sub-mesh
    sub = {(r["topology"], r["rules"]): r for r in rows if r["placement"] == "submesh"}
    # one 32 GB v6e chip cannot hold 17.5 GB of judge weights + a batch of 8 prompts; two can
    assert sub[("v6e-8", "fsdp")]["judge_devices"] == 2 and sub[("8xH200", "fsdp")]["judge_devices"] == 1
    # a 4-chip v5p-8 leaves no FSDP+TP2 mesh for the policy after any split
    assert sub[("v5p-8", "fsdp+tp2")]["splits_tried"] == [] and not sub[("v5p-8", "fsdp+tp2")]["fits_t5"]
    # minimality: one judge device fewer does not fit (v6e-8: a single chip)
    one = judge_plan({"v6e-8": TOPOLOGIES["v6e-8"]}, wl, JudgeWorkload(), models=full_models, judge=judge)
    assert one[1]["min_judge_devices_t5"] == 2
    j1 = 2 * one[1]["judge_params"] + judge_activation_bytes(JudgeWorkload(), judge[1],
                                                             {"data": 1, "fsdp": 1, "tensor": 1})["peak"]
    assert j1 > wl.usable * 32e9
    text = format_judge_table(rows, JudgeWorkload())
    assert "shared, 8 dev" in text and "judge 2 + policy 6" in text and "no split of 4 devices" in text


@pytest.mark.slow
def test_cli_prints_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, "-m", "arr_jax.memory", f"--topologies={','.join(TOPOLOGIES)},tiny=2:8",
                          f"--json={out}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "v6e-8" in res.stdout and "fsdp+tp2" in res.stdout
    data = json.loads(out.read_text())
    fit = {(r["model"], r["topology"], r["rules"]): r["fits"] for r in data["rows"]}
    assert fit[("flux_dev", "v6e-8", "fsdp")] is True
    assert fit[("flux_dev", "tiny", "fsdp")] is False  # 2 devices x 8 GB cannot hold 35 GB of weights
    # the paper's editing batch (Qwen-Image-Edit-2509: 20B + 7B) fits on v6e-8, not on 2 x 8 GB
    assert "Qwen-Image-Edit-2509" in res.stdout
    assert fit[("qwen_image_edit", "v6e-8", "fsdp")] is True
    assert fit[("qwen_image_edit", "tiny", "fsdp")] is False
    # per model: the policy table, then its judge table (both placements of every named topology)
    out_text = res.stdout
    flux_judge = out_text.index("+ judge Qwen3-VL-8B-Instruct next to FLUX.1-dev")
    edit_table = out_text.index("RPO on Qwen-Image-Edit-2509")
    edit_judge = out_text.index("+ judge Qwen3-VL-8B-Instruct next to Qwen-Image-Edit-2509")
    assert out_text.index("RPO on FLUX.1-dev") < flux_judge < edit_table < edit_judge
    for model, part in (("flux_dev", out_text[flux_judge:edit_table]), ("qwen_image_edit", out_text[edit_judge:])):
        got = {(r["topology"], r["placement"]) for r in data["judge_rows"] if r["rules"] == "fsdp"
               and r["model"] == model}
        for name in TOPOLOGIES:
            assert {(name, "shared"), (name, "submesh")} <= got
            assert sum(line.startswith(f"{name} ") and " fsdp " in line for line in part.splitlines()) == 2
    assert data["judge_workload"]["batch"] == 8 and data["judge_workload"] == data["judge_workloads"]["flux_dev"]
    assert data["judge_workloads"]["qwen_image_edit"]["images"] == 3   # Image BASE + the two edits
    assert data["workloads"]["qwen_image_edit"]["source_images"] == 1
    # --models selects; an unknown name is refused by name
    one = subprocess.run([sys.executable, "-m", "arr_jax.memory", "--models=qwen_image_edit", "--topologies=v6e-8",
                          "--nojudge"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    assert "Qwen-Image-Edit-2509" in one.stdout and "FLUX" not in one.stdout and "+ judge" not in one.stdout
    bad = subprocess.run([sys.executable, "-m", "arr_jax.memory", "--models=flux_dev,sdxl", "--topologies=v6e-8"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown ['sdxl']" in bad.stderr


def test_qwen_image_edit_workload_is_the_config():
    """`Workload.qwen_image_edit` is the editing column as configs/qwen_image_edit.py trains it."""
    spec = importlib.util.spec_from_file_location("cfg_memory_qwen_image_edit", ROOT / "configs" / "qwen_image_edit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c, wl = mod.get_config(), Workload.qwen_image_edit()
    assert (wl.pairs, wl.num_steps, wl.lora_rank, wl.lora_alpha, wl.height, wl.width, wl.txt_len, wl.remat) == (
        c.rpo.pairs_per_batch, c.rpo.num_steps, c.rpo.lora_rank, c.rpo.lora_alpha, c.rpo.height, c.rpo.width,
        c.qwen.text_len, True)
    assert c.qwen.remat == "full"  # the memory model's remat=True: only block inputs kept for the backward
    assert wl.micro_batch == c.rpo.micro_batch and c.qwen.release_text_encoder
    assert (wl.target_tokens, wl.image_tokens) == (1024, 2048)   # 512² target + one 512² source
    assert Workload.qwen_image_edit(micro_batch=4).micro_batch == 4
    with pytest.raises(ValueError, match="unknown model 'sdxl'"):
        abstract_models(Workload(model="sdxl"))


def test_editing_rows(full_models, edit_models, judge):
    """Editing: source tokens in the sequence and the buffers, Qwen2.5-VL as the big text encoder,
    the judge shown three images, the same placement arithmetic as FLUX."""
    rules = make_rules()
    wl = Workload.qwen_image_edit()
    topo = {"v6e-8": TOPOLOGIES["v6e-8"]}
    row = plan(topo, wl, models=edit_models, rules=rules)[0]
    per = row["per_model"]
    assert set(per) == {"transformer", "lora", "text_encoder", "vae"} and row["model"] == "qwen_image_edit"
    assert row["params"] == per["transformer"] + per["text_encoder"] + per["vae"]
    freed = plan(topo, Workload.qwen_image_edit(t5_resident=False), models=edit_models, rules=rules)[0]
    assert row["params"] - freed["params"] == per["text_encoder"]
    # the source's 1024 tokens lengthen every attention and add its latents to the stored batch
    no_src = plan(topo, Workload.qwen_image_edit(source_images=0), models=edit_models, rules=rules)[0]
    assert no_src["act_update"] < row["act_update"]
    src_latents = 2 * wl.pairs * 1024 * 64 * 4 / 8   # samples x tokens x 64 channels x f32 / 8 shards
    assert row["buffers"] - no_src["buffers"] == pytest.approx(src_latents)
    with pytest.raises(ValueError, match="models are for 'flux_dev'"):
        plan(topo, wl, models=full_models)

    jw = judge_workload(wl)
    assert (jw.images, jw.image_side) == (3, 512) and judge_workload(Workload()).images == 2
    rows = judge_plan(TOPOLOGIES, wl, models=edit_models, judge=judge, rules=rules)
    assert rows[0]["tokens"]["prompt"] == 2560   # 3 x (256 + 2) + 1536 = 2310, bucketed to 256
    policy = {(r["topology"], r["rules"]): r for r in plan(TOPOLOGIES, wl, models=edit_models, rules=rules)}
    for r in rows:
        if r["placement"] == "shared":
            p = policy[(r["topology"], r["rules"])]
            assert r["policy_resident"] + r["text_encoders"] == pytest.approx(p["params"] + p["lora_opt"]
                                                                              + p["buffers"])
            assert r["text_encoders"] == p["per_model"]["text_encoder"]
            assert r["fits_t5"] and r["fits_freed"], r["topology"]   # co-located, the editing batch fits everywhere
    sub = {(r["topology"], r["rules"]): r for r in rows if r["placement"] == "submesh"}
    # v6e-8 split 2 + 6: 6 does not divide Qwen2.5-VL's 3584, so its 15.5 GB stay whole on every policy
    # device; only with it freed does the policy fit
    v6 = sub[("v6e-8", "fsdp")]
    assert v6["text_encoders"] == sum(math.prod(s) * it * c for s, it, _, c in edit_models["text_encoder"])
    assert not v6["fits_t5"] and v6["fits_freed"] and v6["judge_devices"] == 2
    text = format_judge_table(rows, jw)
    assert "next to Qwen-Image-Edit-2509" in text and "qwen.release_text_encoder" in text and "3 images" in text


@pytest.mark.parity
def test_qwen_image_edit_sizes_match_the_reference_classes(edit_models):
    """Our abstract Qwen-Image-Edit-2509 models have exactly the parameters of diffusers' transformer,
    transformers' Qwen2.5-VL-7B (minus the LM head, never used) and diffusers' VAE (minus what a still
    image never meets: the temporal convolutions and all but one temporal tap), all built full size
    on torch's meta device."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    wl, models = Workload.qwen_image_edit(), edit_models
    ours = {m: sum(math.prod(s) * c for s, _, _, c in models[m]) for m in ("transformer", "text_encoder", "vae")}
    with torch.device("meta"):
        dit = diffusers.QwenImageTransformer2DModel()
        vae = diffusers.AutoencoderKLQwenImage()
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                             num_key_value_heads=4, vocab_size=152064),
            vision_config=dict(hidden_size=1280, out_hidden_size=3584)))
    n = lambda m, skip=(): sum(p.numel() for k, p in m.named_parameters() if not any(x in k for x in skip))  # noqa: E731
    assert ours["transformer"] == n(dit) == 20_430_401_088
    assert ours["text_encoder"] == n(text, ("lm_head",))
    # the VAE keeps only the last temporal tap of each causal 3-D kernel
    assert ours["vae"] == sum(p.numel() // (p.shape[2] if p.ndim == 5 else 1) for k, p in vae.named_parameters()
                              if "time_conv" not in k)
    lora = sum(math.prod(s) * c for s, _, _, c in models["lora"])
    assert lora == 60 * 8 * 32 * (3072 + 3072)  # r32 on q, k, v, out and the text stream's four
    row = plan({"v6e-8": Topology("v6e-8", 8, 32e9)}, wl, models=models)[0]
    assert row["model"] == "qwen_image_edit" and row["fits"]
    assert row["per_model"]["transformer"] < 1.01 * row["total_params"]["transformer"] / 8
