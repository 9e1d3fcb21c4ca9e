"""Choice scoring and the prefill compute the last layer's queries, MLP and the LM head only at the
position that is read (``last_only``), and give what the full forward gives there."""
from __future__ import annotations

import functools

import numpy as np
import pytest
from test_qwen3_vl import GRIDS, IMAGE, MERGE, PATCH, PATCH_DIM, TPATCH, VEND, VIDEO, VOCAB, VSTART


@functools.lru_cache(maxsize=None)
def model_and_cfg():
    """A tiny random model whose DeepStack reaches the last layer (indexes 0, 1, 2 of 3 layers)."""
    import jax.numpy as jnp
    from flax import nnx

    from arr_jax.models.qwen3_vl import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from arr_jax.models.qwen3_vl_text import TextConfig
    from arr_jax.models.qwen3_vl_vision import VisionConfig

    cfg = Qwen3VLConfig(
        text=TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                        mrope_section=(4, 2, 2), max_position_embeddings=512),
        vision=VisionConfig(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=PATCH,
                            temporal_patch_size=TPATCH, spatial_merge_size=MERGE, out_hidden_size=64,
                            num_position_embeddings=16, deepstack_visual_indexes=(0, 1, 2)),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    return Qwen3VLForConditionalGeneration(cfg, dtype=jnp.float32, rngs=nnx.Rngs(3)), cfg


def batch(end_on_image: bool):
    """Two left-padded prompts; with ``end_on_image`` the first ends on image tokens, so the last
    position takes a DeepStack feature after the last layer."""
    from arr_jax.judge.decode import left_pad
    from arr_jax.models.qwen3_vl import prepare_inputs

    rng = np.random.default_rng(5)
    n = [int(np.prod(g)) // MERGE ** 2 for g in GRIDS]
    a = [5, 6, VSTART, *[IMAGE] * n[0], VEND, 7, VSTART, *[IMAGE] * n[1]]
    if not end_on_image:
        a += [VEND, 9, 10]
    b = [3, VSTART, *[IMAGE] * n[0], VEND, *rng.integers(0, 280, 6).tolist()]
    ids, mask = left_pad([a, b], pad_id=0)
    grids = np.concatenate([GRIDS, GRIDS[:1]])
    pv = rng.standard_normal((int(grids.prod(-1).sum()), PATCH_DIM)).astype(np.float32)
    _, cfg = model_and_cfg()
    inputs = prepare_inputs(cfg, ids, mask, pv, grids, patch_bucket=32, image_bucket=4)
    return {k: v for k, v in inputs.items() if k != "rope_deltas"}


def forward(last_only: bool):
    import jax
    from flax import nnx

    from arr_jax.models.qwen3_vl import model_kwargs

    model, _ = model_and_cfg()
    gd, st = nnx.split(model)

    def fwd(st, inp):
        m = nnx.merge(gd, st)
        return m(inp["input_ids"], inp["positions"], inp["attention_mask"], last_only=last_only,
                 **model_kwargs(inp))

    return gd, st, fwd, jax.jit(fwd)


@pytest.mark.parametrize("end_on_image", [False, True])
def test_last_only_equals_last_row_of_full_forward(end_on_image):
    inp = batch(end_on_image)
    _, st, _, full = forward(False)
    _, _, _, last = forward(True)
    ref = np.asarray(full(st, inp))[:, -1]
    got = np.asarray(last(st, inp))
    assert got.shape == ref.shape == (2, VOCAB)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _dots(fn, *args):
    """Output shapes of every dot_general in ``fn``'s jaxpr (nested jaxprs included)."""
    import jax

    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                shapes.append(tuple(eqn.outvars[0].aval.shape))
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


def test_choice_scoring_reads_the_lm_head_at_one_position_only():
    import functools as ft

    import jax.numpy as jnp

    from arr_jax import perf
    from arr_jax.judge.decode import choice_logprobs, init_cache, prefill

    inp = {k: jnp.asarray(v) for k, v in batch(False).items()}
    gd, st, full, _ = forward(False)
    b, s = inp["input_ids"].shape
    cands = jnp.asarray([11, 12], jnp.int32)
    choice = ft.partial(choice_logprobs, gd)
    vocab_dots = [d for d in _dots(choice, st, inp, cands) if d[-1] == VOCAB]
    assert vocab_dots == [(b, VOCAB)]  # the LM head runs on (B, E), not (B, S, E)
    # the last layer's MLP runs on one row per prompt: one (B*1, 96)-wide up/gate product pair
    mlp = [d for d in _dots(choice, st, inp, cands) if d[-1] == 96]
    assert mlp.count((b, 1, 96)) == 2 and mlp.count((b, s, 96)) == 4
    f_full, _ = perf.jaxpr_flops(full, st, inp)
    f_choice, _ = perf.jaxpr_flops(choice, st, inp, cands)
    assert f_choice < f_full
    cache = init_cache(model_and_cfg()[1], b, s + 4, jnp.float32)
    pre = [d for d in _dots(ft.partial(prefill, gd), st, inp, cache) if d[-1] == VOCAB]
    assert pre == [(b, VOCAB)]


def test_prefill_with_last_only_then_decode_equals_full_forward():
    """The prefill's next-token logits (last layer at the last position only) equal the full forward's
    last row, and the cache it filled gives the first decode step the full forward's logits of the
    prompt extended by that token (so every layer's keys and values were cached)."""
    import jax
    import jax.numpy as jnp

    from arr_jax.judge.decode import Decoder, decode_step, left_pad
    from arr_jax.models.qwen3_vl import prepare_inputs

    inp = batch(False)
    model, cfg = model_and_cfg()
    dec = Decoder(model)
    s = inp["input_ids"].shape[1]
    logits, cache = dec.prefill(dict(inp), s + 2)
    _, st, _, full = forward(False)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full(st, inp))[:, -1], rtol=1e-5, atol=1e-5)
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    nxt, _ = jax.jit(functools.partial(decode_step, dec.graphdef))(dec.state, tok, cache)
    # the same prompts with the token appended, one cache-free forward
    rows = [list(r[m > 0]) + [int(t)] for r, m, t in zip(inp["input_ids"], inp["attention_mask"], np.asarray(tok))]
    ids, mask = left_pad(rows, pad_id=0)
    pv = np.concatenate([r[:n] for r, n in zip(inp["pixel_values"], inp["patch_len"]) if n])
    ext = prepare_inputs(cfg, ids, mask, pv, np.concatenate([GRIDS, GRIDS[:1]]), patch_bucket=32, image_bucket=4)
    ref = np.asarray(full(st, {k: v for k, v in ext.items() if k != "rope_deltas"}))[:, -1]
    np.testing.assert_allclose(np.asarray(nxt), ref, rtol=1e-4, atol=1e-5)
