"""Bad inputs to the Qwen3-VL judge: prompts past the context and undecodable or unusable images
give clear errors (naming the lengths and the limit, or the request) in the processor and the
decoder (generate and score_choices) before any compute; the Flax backend and a TextJudge over
it leave the bad request out of its batch, counted under its own kind, and judge the others."""
from __future__ import annotations

import numpy as np
import pytest
from test_vlm_judge import MAX_POS, NEW, backend, pair_batch

LIMIT_NOTE = "the text config's max_position_embeddings"


def text_inputs(n_real: int, width: int | None = None):
    """A left-padded text-only batch of one prompt with ``n_real`` tokens in ``width`` columns."""
    from arr_jax.judge.decode import left_pad
    from arr_jax.models.qwen3_vl import prepare_inputs

    ids, mask = left_pad([[7] * n_real], pad_id=0, length=width)
    return prepare_inputs(backend().decoder.cfg, ids, mask)


def test_decoder_rejects_prompts_past_the_context():
    from arr_jax.judge.decode import Decoder

    dec = backend().decoder
    assert dec.context_limit == (MAX_POS, LIMIT_NOTE)
    with pytest.raises(ValueError, match=rf"row 0 has {MAX_POS - 8} prompt tokens \+ 16 new tokens = "
                                         rf"{MAX_POS + 8} > {MAX_POS}, {LIMIT_NOTE}"):
        dec.generate(text_inputs(MAX_POS - 8), max_new_tokens=16)
    with pytest.raises(ValueError, match=rf"{MAX_POS} prompt tokens \+ 1 new tokens = {MAX_POS + 1} > {MAX_POS}"):
        dec.score_choices(text_inputs(MAX_POS), [1, 2])
    # the limit counts real tokens, not the left padding of a bucket; exactly full is allowed
    dec.check_length(dec._prompt_lengths(text_inputs(10, width=MAX_POS + 100)), 16)
    dec.check_length([MAX_POS - 16], 16)
    with pytest.raises(ValueError, match=r"\(2 of 3 rows too long: \[0, 2\]\)"):
        dec.check_length([MAX_POS, 5, MAX_POS - 15], 16)

    # a configured max_length below the model's is the limit, and says so
    short = Decoder(_model(), max_length=64)
    assert short.context_limit == (64, "the configured max_length")
    short.check_length([48], 16)
    with pytest.raises(ValueError, match=r"row 0 has 49 prompt tokens \+ 16 new tokens = 65 > 64, the configured"):
        short.generate(text_inputs(49), max_new_tokens=16)
    with pytest.raises(ValueError, match=r"row 0 has 64 prompt tokens \+ 1 new tokens = 65 > 64"):
        short.score_choices(text_inputs(64), [1, 2])


def _model():
    from flax import nnx

    dec = backend().decoder
    return nnx.merge(dec.graphdef, dec.state)


def test_processor_names_the_long_chat():
    proc = backend().processor
    long_chat = ([{"role": "user", "content": "square " * 3000}], [])
    short_chat = ([{"role": "user", "content": "a red square"}], [])
    with pytest.raises(ValueError, match=rf"prompt too long: chat 1 is \d+ tokens \(0 of them image tokens, "
                                         rf"0 images\), more than the limit of {MAX_POS} \({LIMIT_NOTE}\)"):
        proc([short_chat, long_chat])
    with pytest.raises(ValueError, match=r"chat 0 is \d+ tokens .* more than the limit of 5"):
        proc([short_chat], max_length=5)
    assert proc([short_chat], max_length=64, seq_bucket=None)["input_ids"].shape[1] <= 64


def test_one_bad_request_fails_alone_and_named():
    """A prompt past the context, an undecodable image, or a 4x1000 strip (aspect ratio 250, over
    the processor's 200) in one request of a batch: that request fails alone under its own kind,
    named with its length and the limit (or its image); the others are judged exactly as they
    are without it, in generate, p_first and a TextJudge over both."""
    import re

    from arr_jax.judge import parsing
    from arr_jax.judge.processor import InputError
    from arr_jax.judge.text_judge import TextJudge

    b = backend()
    judge = TextJudge(b)
    prompts, i1, i2 = pair_batch(3, seed=9)
    long_prompts = list(prompts)
    long_prompts[1] = "a red square " * 1000
    reqs = judge.pair_requests(long_prompts, i1, i2)
    good = [judge.pair_requests(prompts, i1, i2)[k] for k in (0, 2)]
    room = rf"more than the limit of {MAX_POS - NEW} \({MAX_POS}, {LIMIT_NOTE}, minus {NEW} token\(s\)"
    out = b.generate(reqs)
    assert isinstance(out[1], parsing.FailedReply) and out[1].status == parsing.TOO_LONG
    assert re.search(r"prompt too long: request 1 \(pairwise, index=1\) is \d+ tokens \(8 of them image tokens, "
                     r"2 images\), " + room, out[1].reason), out[1].reason
    assert [out[0], out[2]] == b.generate(good)               # greedy answers as without it
    p, status, notes = b.p_first_status(reqs)
    assert status == [None, parsing.TOO_LONG, None] and np.isnan(p[1])
    assert re.search(rf"request 1 \(pairwise, index=1\) .* more than the limit of {MAX_POS - 1} ", notes[1])
    np.testing.assert_allclose(p[[0, 2]], b.p_first(good), atol=1e-6)
    np.testing.assert_array_equal(np.isnan(b.p_first(reqs)), [False, True, False])

    res, st = judge.compare_with_status(long_prompts, i1, i2)   # (the random model's answers are junk)
    assert st[1] == parsing.TOO_LONG and parsing.TOO_LONG not in (st[0], st[2])
    assert res.failures.get(parsing.TOO_LONG) == 1 and res.winner[1] == 0 and res.p_first[1] == 0.5
    assert not res.valid[1] and "request 1 (pairwise, index=1)" in res.reasons[1]
    fast = TextJudge(b, choice_scores=True, symmetrize="agree").compare(long_prompts, i1, i2)
    # failures in pairs (issue #19, b13): the too-long pair counts once though both orders failed; ties are
    # outcomes, listed but not failures
    assert {k: v for k, v in fast.failures.items() if k not in (parsing.TIE, parsing.FALLBACK)} == {
        parsing.TOO_LONG: 1} and fast.valid.tolist() == [True, False, True]
    assert sum(fast.failures.values()) <= 3  # one status per pair
    assert fast.p_first[1] == 0.5 and np.all(np.isfinite(fast.p_first))

    fast = TextJudge(b, choice_scores=True)
    ref = fast.compare(prompts, i1, i2)
    for img, kind, what in [(np.zeros((32, 32, 5), np.uint8), parsing.BAD_IMAGE, "image 2 of 2: "),
                            (np.zeros((4, 1000, 3), np.uint8), parsing.BAD_IMAGE,
                             r"image 2 of 2: aspect ratio must be at most 200, got 250\.0 \(4x1000 pixels\)")]:
        bad = list(i2)
        bad[2] = img
        for j in (judge, fast):
            res, st = j.compare_with_status(prompts, i1, bad)
            assert st[2] == kind and kind not in st[:2] and res.failures.get(kind) == 1 and not res.valid[2], st
            assert re.search(r"request 2 \(pairwise, index=2\): " + what, res.reasons[2]), res.reasons[2]
        np.testing.assert_allclose(res.p_first[:2], ref.p_first[:2], atol=1e-6)
    # the processor itself names the chat and says which one, for a caller to leave it out
    chats = [r.to_chat() for r in judge.pair_requests(prompts, i1, bad)]
    with pytest.raises(InputError, match=r"chat 2: image 2 of 2: aspect ratio must be at most 200") as e:
        b.processor(chats)
    assert e.value.index == 2 and e.value.kind == parsing.BAD_IMAGE
