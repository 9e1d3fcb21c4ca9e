"""Decode loop, batching and choice scoring of the Qwen3-VL judge against transformers."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from test_qwen3_vl import GRIDS, IMAGE, PATCH_DIM, hf_logits, image_prompt, tiny_ours, tiny_snapshot

NEW = 32
LEN, PATCHES, IMAGES = 64, 32, 2  # prompts padded to these buckets: one compile per batch size


@functools.lru_cache(maxsize=None)
def decoder():
    from arr_jax.judge.decode import Decoder

    return Decoder(tiny_ours()[0])


def prompts():
    """Prompt A: two images; prompt B: one image and a longer text tail (different length)."""
    rng = np.random.default_rng(11)
    a = image_prompt(GRIDS, rng)
    b = image_prompt(GRIDS[1:], rng, prefix=(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22))
    pa = rng.standard_normal((int(GRIDS.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    pb = rng.standard_normal((int(GRIDS[1:].prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    return (a, pa, GRIDS), (b, pb, GRIDS[1:])


def inputs_for(ps):
    from arr_jax.judge.decode import left_pad
    from arr_jax.models.qwen3_vl import prepare_inputs

    ids, mask = left_pad([p[0] for p in ps], pad_id=0, length=LEN)
    pv = np.concatenate([p[1] for p in ps])
    grids = np.concatenate([p[2] for p in ps])
    return prepare_inputs(tiny_ours()[1], ids, mask, pv, grids, patch_bucket=PATCHES,
                          image_bucket=IMAGES), (ids, mask, pv, grids)


def single(p, **kw):
    return decoder().generate(inputs_for([p])[0], max_new_tokens=NEW, **kw)[0]


@functools.lru_cache(maxsize=None)
def greedy_single():
    return tuple(single(p) for p in prompts())


@pytest.mark.parity
def test_greedy_decode_token_identical_to_generate():
    import torch

    ids, pv, grids = prompts()[0]
    ti = torch.tensor([ids])
    with torch.no_grad():
        ref = tiny_snapshot()[1].generate(
            input_ids=ti, attention_mask=torch.ones_like(ti), pixel_values=torch.tensor(pv),
            image_grid_thw=torch.tensor(grids), mm_token_type_ids=(ti == IMAGE).long(), max_new_tokens=NEW,
            do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = ref[0, len(ids):].numpy()
    assert len(ref) == NEW
    np.testing.assert_array_equal(greedy_single()[0], ref)


def test_cache_is_donated_and_advanced():
    import jax
    import jax.numpy as jnp

    from arr_jax.judge.decode import init_cache

    dec = decoder()
    inputs, _ = inputs_for([prompts()[0]])
    cache = init_cache(tiny_ours()[1], 1, LEN + NEW, dec.cache_dtype)
    logits, filled = dec._prefill(dec.state, dec._put(inputs), cache)
    assert cache.k.is_deleted() and int(filled.index) == LEN
    assert int(filled.valid.sum()) == len(prompts()[0][0])
    toks, lengths, done = dec._generate(dec.state, logits, filled, jax.random.key(0), jnp.full((4,), -1, jnp.int32),
                                        max_new_tokens=NEW, pad_id=0, temperature=0.0, top_p=1.0)
    assert filled.k.is_deleted() and int(done.index) == LEN + NEW - 1 and int(lengths[0]) == NEW
    np.testing.assert_array_equal(np.asarray(toks)[0], greedy_single()[0])


@pytest.mark.parity
def test_batched_equals_one_by_one_with_stop_tokens():
    inputs, _ = inputs_for(prompts())
    ref_a, ref_b = greedy_single()
    out = decoder().generate(inputs, max_new_tokens=NEW)
    np.testing.assert_array_equal(out, np.stack([ref_a, ref_b]))
    # a stop token taken from row A's output: A ends right after its first occurrence, the rest is pad
    stop = int(ref_a[5])
    out, lengths = decoder().generate(inputs, max_new_tokens=NEW, stop_tokens=[stop], pad_id=-7,
                                      return_lengths=True)
    for row, ref in zip(out, (ref_a, ref_b)):
        hits = np.flatnonzero(ref == stop)
        n = hits[0] + 1 if len(hits) else NEW
        np.testing.assert_array_equal(row[:n], ref[:n])
        assert (row[n:] == -7).all()
    assert lengths[0] == np.flatnonzero(ref_a == stop)[0] + 1


@pytest.mark.parity
def test_score_choices_equal_reference_log_softmax():
    import torch

    inputs, (ids, mask, pv, grids) = inputs_for(prompts())
    cands = [17, 42, 250]
    got = decoder().score_choices(inputs, cands)
    ref = torch.log_softmax(torch.tensor(hf_logits(tiny_snapshot()[1], ids, mask, pv, grids)[:, -1]), -1).numpy()
    np.testing.assert_allclose(got, ref[:, cands], atol=1e-4, rtol=1e-4)


def test_samplers():
    import jax
    import jax.numpy as jnp

    from arr_jax.judge.decode import greedy, sample, top_p_filter

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False], [False, False, True, True]])
    np.testing.assert_array_equal(greedy(logits), [0, 3])
    key = jax.random.key(0)
    # a tiny top-p is greedy; a low temperature concentrates on the argmax
    np.testing.assert_array_equal(sample(logits, key, temperature=1.0, top_p=1e-6), [0, 3])
    keys = jax.random.split(key, 2000)
    many = jax.jit(jax.vmap(lambda k, p: sample(logits, k, temperature=1.0, top_p=p), (0, None)), static_argnums=1)
    draws = np.asarray(many(keys, 0.7))
    assert set(np.unique(draws[:, 0])) == {0, 1} and set(np.unique(draws[:, 1])) == {2, 3}
    assert abs((draws[:, 0] == 0).mean() - 0.5 / 0.8) < 0.05
    draws = np.asarray(many(keys, 1.0))
    assert abs((draws[:, 1] == 3).mean() - 0.4) < 0.05
