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
    fit = {(r["topology"], r["rules"]): r["fits"] for r in rows}
    assert fit[("v6e-8", "fsdp")] is True
    assert fit[("tiny", "fsdp")] is False  # 2 devices x 8 GB cannot hold 35 GB of weights
