"""Bad inputs to the Qwen3-VL judge: prompts past the context and undecodable images give clear
errors (naming the lengths and the limit, or the request) in the processor, the decoder
(generate and score_choices), the Flax backend and a TextJudge over it — before any compute."""
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


def test_backend_and_judge_reject_long_prompts_and_bad_images():
    from arr_jax.judge.processor import ImageDecodeError
    from arr_jax.judge.text_judge import TextJudge

    b = backend()
    judge = TextJudge(b)
    prompts, i1, i2 = pair_batch(3, seed=9)
    long_prompts = list(prompts)
    long_prompts[1] = "a red square " * 1000
    reqs = judge.pair_requests(long_prompts, i1, i2)
    room = rf"more than the limit of {MAX_POS - NEW} \({MAX_POS}, {LIMIT_NOTE}, minus {NEW} token\(s\)"
    with pytest.raises(ValueError, match=r"prompt too long: request 1 \(pairwise\) is \d+ tokens \(8 of them image "
                                         r"tokens, 2 images\), " + room):
        b.generate(reqs)
    with pytest.raises(ValueError, match=rf"request 1 \(pairwise\) .* more than the limit of {MAX_POS - 1} "):
        b.p_first(reqs)
    calls = dict(b.calls)
    with pytest.raises(ValueError, match="prompt too long: request 1"):
        judge.compare(long_prompts, i1, i2)          # an input error, not a parse failure
    with pytest.raises(ValueError, match="prompt too long"):
        TextJudge(b, choice_scores=True, symmetrize="agree").compare(long_prompts, i1, i2)
    assert dict(b.calls) == calls                    # nothing ran

    bad = list(i2)
    bad[2] = np.zeros((32, 32, 5), np.uint8)         # not an image PIL can make
    with pytest.raises(ImageDecodeError, match=r"request 2 \(pairwise\): could not decode ndarray input"):
        judge.compare(prompts, i1, bad)
    bad[2] = np.zeros((32, 32, 3), np.int64)          # float in [0, 1] is an image; int64 is not
    with pytest.raises(ImageDecodeError, match=r"request 2 \(pairwise\): could not decode ndarray input int64 .*"
                                              r"image arrays must be uint8"):
        judge.compare(prompts, i1, bad)
