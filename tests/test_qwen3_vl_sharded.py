"""Sharded Qwen3-VL prefill/decode on 8 fake CPU devices equals the unsharded run."""
from __future__ import annotations

import numpy as np
import pytest
from test_qwen3_vl import tiny_snapshot
from test_qwen3_vl_decode import LEN, NEW, decoder, greedy_single, prompts


@pytest.mark.slow
def test_sharded_generate_and_scores_equal_unsharded():
    import jax
    import jax.numpy as jnp

    from arr_jax.convert.qwen3_vl import load_qwen3_vl
    from arr_jax.judge.decode import Decoder, left_pad
    from arr_jax.models.qwen3_vl import prepare_inputs
    from arr_jax.sharding import make_mesh, make_rules

    rules = make_rules(make_mesh(data=2, fsdp=2, tensor=2))
    model, cfg = load_qwen3_vl(tiny_snapshot()[0], jnp.float32, rules=rules)
    q = model.model.language_model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)

    ps = list(prompts()) * 2  # batch 4: divisible by data * fsdp
    ids, mask = left_pad([p[0] for p in ps], pad_id=0, length=LEN)
    inputs = prepare_inputs(cfg, ids, mask, np.concatenate([p[1] for p in ps]),
                            np.concatenate([p[2] for p in ps]), patch_bucket=32, image_bucket=4)
    sharded = Decoder(model, rules=rules)
    toks = sharded.generate(inputs, max_new_tokens=NEW)
    ref_a, ref_b = greedy_single()
    np.testing.assert_array_equal(toks, np.stack([ref_a, ref_b, ref_a, ref_b]))

    cands = [17, 42, 250]
    got = sharded.score_choices(inputs, cands)
    ref = decoder().score_choices(inputs, cands)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
