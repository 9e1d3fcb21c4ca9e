"""The memory plan: parameter counts of the real model classes, sharding arithmetic, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from arr_jax.memory import Topology, Workload, abstract_models, format_table, parse_topologies, plan, shard_bytes
from arr_jax.sharding import make_rules


@pytest.fixture(scope="module")
def full_models():
    return abstract_models(Workload())


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


@pytest.mark.slow
def test_cli_prints_table_and_json(tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, "-m", "arr_jax.memory", "--topologies=v6e-8,tiny=2:8", f"--json={out}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "v6e-8" in res.stdout and "fsdp+tp2" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    fit = {(r["model"], r["topology"], r["rules"]): r["fits"] for r in rows}
    assert fit[("flux_dev", "v6e-8", "fsdp")] is True
    assert fit[("flux_dev", "tiny", "fsdp")] is False  # 2 devices x 8 GB cannot hold 35 GB of weights
    # the paper's editing batch (Qwen-Image-Edit-2509: 20B + 7B) fits on v6e-8, not on 2 x 8 GB
    assert "Qwen-Image-Edit-2509" in res.stdout
    assert fit[("qwen_image_edit", "v6e-8", "fsdp")] is True
    assert fit[("qwen_image_edit", "tiny", "fsdp")] is False


@pytest.mark.parity
def test_qwen_image_edit_sizes_match_the_reference_classes():
    """Our abstract Qwen-Image-Edit-2509 models have exactly the parameters of diffusers' transformer,
    transformers' Qwen2.5-VL-7B (minus the LM head, never used) and diffusers' VAE (minus what a still
    image never meets: the temporal convolutions and all but one temporal tap), all built full size
    on torch's meta device."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    wl = Workload.qwen_image_edit()
    models = abstract_models(wl)
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
