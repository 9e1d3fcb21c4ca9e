"""The memory plan: parameter counts of the real model classes, sharding arithmetic, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from arr_jax.memory import (QWEN3_VL_8B_CONFIG, TOPOLOGIES, JudgeWorkload, Topology, Workload, abstract_judge,
                            abstract_models, format_judge_table, format_table, judge_activation_bytes, judge_plan,
                            judge_tokens, parse_topologies, plan, shard_bytes)
from arr_jax.sharding import make_rules


@pytest.fixture(scope="module")
def full_models():
    return abstract_models(Workload())


@pytest.fixture(scope="module")
def judge():
    return abstract_judge()


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
    fit = {(r["topology"], r["rules"]): r["fits"] for r in data["rows"]}
    assert fit[("v6e-8", "fsdp")] is True
    assert fit[("tiny", "fsdp")] is False  # 2 devices x 8 GB cannot hold 35 GB of weights
    # the judge table: both placements of every named topology, printed and in the JSON
    judge_part = res.stdout[res.stdout.index("+ judge Qwen3-VL-8B-Instruct"):]
    got = {(r["topology"], r["placement"]) for r in data["judge_rows"] if r["rules"] == "fsdp"}
    for name in TOPOLOGIES:
        assert {(name, "shared"), (name, "submesh")} <= got
        assert sum(line.startswith(f"{name} ") and " fsdp " in line for line in judge_part.splitlines()) == 2
    assert data["judge_workload"]["batch"] == 8
