"""Failures in the judge stack are counted, named and isolated, never silent and never fatal for
the whole run: non-finite scores (choice probabilities from -inf / NaN log-probs, any judge's
p_first) become counted failures with p = 0.5; one bad input (a 4x1000 strip the Qwen3-VL
processor refuses, an unreadable pair) fails alone in TextJudge, `evaluate` and `induce`,
named, while the rest is judged; a `FailureBudget` stops a run past its failure fraction."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from arr_jax.judge import parsing
from arr_jax.judge.base import (FailureBudget, InputError, PairwiseBatch, TooManyFailuresError,
                                choice_probability, combine_orders, concat, flip)
from arr_jax.judge.text_judge import TextJudge

INF, NAN = float("inf"), float("nan")
SIG1 = 1 / (1 + np.exp(-1.0))           # sigmoid(1)
# (logp("1"), logp("2")) -> P(image 1), NaN where undefined
LOGPROBS = [((-INF, -INF), NAN), ((NAN, -1.0), NAN), ((INF, -INF), NAN), ((0.0, INF), NAN),
            ((-INF, -0.5), 0.0), ((-0.5, -INF), 1.0), ((-1000.0, -1001.0), SIG1), ((-1e6, -1e6 - 1), SIG1),
            ((-0.1, -0.1), 0.5), ((np.log(0.3), np.log(0.1)), 0.75)]


def test_choice_probability_is_stable_and_nan_where_undefined():
    lp = np.array([x for x, _ in LOGPROBS])
    want = np.array([p for _, p in LOGPROBS])
    got = choice_probability(lp[:, 0], lp[:, 1])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-9, atol=1e-15)  # float64 at |lp| = 1e6
    # float32 log-probs far below exp's range still give the exact ratio
    got32 = choice_probability(np.float32(-120.0), np.float32(-121.0))
    np.testing.assert_allclose(got32, SIG1, rtol=1e-6)


def test_flax_backend_p_first_uses_the_stable_ratio():
    from arr_jax.judge.vlm_backend import FlaxVLMBackend

    b = object.__new__(FlaxVLMBackend)        # only the probability step: logits stubbed
    lp = np.array([x for x, _ in LOGPROBS], np.float32)
    b._choice_logprobs = lambda reqs: (lp[:len(reqs)], {})
    p, status, notes = b.p_first_status([None] * len(lp))
    want = np.array([x for _, x in LOGPROBS], np.float32)
    assert p.dtype == np.float32 and status == [None] * len(lp)
    np.testing.assert_array_equal(np.isnan(p), np.isnan(want))
    np.testing.assert_allclose(p[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-6)


class FixedScores:
    """A p_first backend answering from fixed log-probs per (pair index, order)."""

    name = "fixed"

    def __init__(self, fwd, rev=None):
        self.lp = {"fwd": np.asarray(fwd, np.float64), "rev": np.asarray(rev if rev is not None else fwd)}

    def generate(self, requests):
        raise AssertionError("choice scoring must not decode")

    def p_first(self, requests):
        lp = np.array([self.lp[r.meta.get("order", "fwd")][r.meta["index"]] for r in requests])
        return choice_probability(lp[:, 0], lp[:, 1])


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return ([f"prompt {i}" for i in range(n)], rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8))


def test_non_finite_choice_scores_are_counted_failures():
    # -inf/-inf, NaN, +inf/-inf: failures; -inf on one side: a sure answer; equal: a tie
    fwd = [(-INF, -INF), (NAN, -1.0), (INF, -INF), (-INF, -0.5), (-1000.0, -1001.0), (-0.1, -0.1)]
    prompts, a, b = _pairs(len(fwd))
    out, status = TextJudge(FixedScores(fwd), choice_scores=True).compare_with_status(prompts, a, b)
    assert status == ["non_finite"] * 3 + ["ok", "ok", "tie"]
    assert out.winner.tolist() == [0, 0, 0, 2, 1, 0]
    np.testing.assert_allclose(out.p_first, [0.5, 0.5, 0.5, 0.0, SIG1, 0.5], rtol=1e-6)
    assert out.valid.tolist() == [False, False, False, True, True, True]
    assert out.failures == {"non_finite": 3, "tie": 1}
    assert "request 0 (pairwise, index=0)" in out.reasons[0] and "nan" in out.reasons[0]

    # symmetrised: a failure in either order fails the pair; nothing non-finite survives
    rev = [(-1.0, -2.0), (-2.0, -1.0), (-1.0, -2.0), (-INF, -INF), (-1001.0, -1000.0), (-0.1, -0.1)]
    for mode in ("mean", "agree"):
        sym = TextJudge(FixedScores(fwd, rev), choice_scores=True, symmetrize=mode).compare(prompts, a, b)
        assert np.all(np.isfinite(sym.p_first)), (mode, sym.p_first)
        assert sym.valid.tolist() == [False, False, False, False, True, True], mode
        assert sym.winner.tolist() == [0, 0, 0, 0, 1, 0], mode
        np.testing.assert_allclose(sym.p_first, [0.5, 0.5, 0.5, 0.5, SIG1, 0.5], rtol=1e-6)
        # in pairs: pair 5 is one tied pair (judged in two orders), pairs 0-3 four failed pairs
        assert sym.failures == {"non_finite": 4, "tie": 1}, sym.failures


def test_any_judge_batch_with_non_finite_scores_counts_them():
    b = PairwiseBatch(winner=[1, 2, 0, 1], p_first=[NAN, -INF, 1.5, 0.9], failures={"tie": 1},
                      reasons=["a", "b", "", "d"])
    assert b.p_first.tolist() == [0.5, 0.5, 0.5, pytest.approx(0.9)]
    assert b.winner.tolist() == [0, 0, 0, 1] and b.valid.tolist() == [False, False, False, True]
    assert b.failures == {"tie": 1, "non_finite": 2, "bad_value": 1}
    assert b.reasons[0] == "unusable P(image 1) = nan; a" and b.reasons[3] == "d"
    # the flags travel through flip / concat / combine_orders
    f = flip(b)
    assert f.valid.tolist() == b.valid.tolist() and f.failures == b.failures
    c = concat([b, f])
    assert c.valid.tolist() == b.valid.tolist() * 2 and c.failures["non_finite"] == 4
    ok = PairwiseBatch(winner=[1, 1, 1, 1], p_first=[0.9, 0.9, 0.9, 0.9])
    for mode in ("mean", "agree"):
        m = combine_orders(ok, b, mode)
        assert m.valid.tolist() == [False, False, False, True] and m.winner[:3].tolist() == [0, 0, 0]
        assert m.p_first[:3].tolist() == [0.5, 0.5, 0.5]


def test_failure_budget_counts_and_caps():
    budget = FailureBudget(max_failure_fraction=0.1, min_items=20, what="pairs")
    budget.add(10, ["pair a: bad image"], {"bad_image": 1})      # 10% of 10: under min_items anyway
    budget.add(10)                                               # 1 of 20
    assert budget.summary()["failed"] == 1 and budget.fraction == pytest.approx(0.05)
    batch = PairwiseBatch(winner=[0, 0, 1, 0], p_first=[0.5, 0.5, 1.0, 0.5], valid=[False, False, True, True],
                          failures={"too_long": 1, "non_finite": 1, "tie": 1},
                          reasons=["request 0 (pairwise): too long", "P = nan", "", ""])
    with pytest.raises(TooManyFailuresError) as e:
        budget.add_batch(batch, names=["p0", "p1", "p2", "p3"], where="step 3: ")   # 3 of 24 = 12.5%
    msg = str(e.value)
    assert "3 of 24 pairs failed (12.5%" in msg and "max_failure_fraction=0.1" in msg
    assert "bad_image 1" in msg and "too_long 1" in msg and "tie" not in msg
    assert "pair a: bad image" in msg and "step 3: p0: request 0 (pairwise): too long" in msg
    small = FailureBudget(0.1, min_items=20)
    small.add(2, ["x"])                                          # too few items to judge yet
    with pytest.raises(TooManyFailuresError, match="1 of 2 pairs"):
        small.check(final=True)
    FailureBudget(1.0, min_items=0).add(5, ["a"] * 5)            # 1.0 never stops
    with pytest.raises(ValueError, match="max_failure_fraction"):
        FailureBudget(1.5)


# --------------------------------------------------------------------------------------------
# One bad input: the 4x1000 strip a Qwen3-VL processor refuses, through every long run


class ProcessorCheck:
    """The world backend behind a Qwen3-VL-style image check: a request with an image over the
    aspect-ratio limit fails the whole batch with the processor's bare error, which names no
    request (what `Qwen3VLProcessor` used to raise)."""

    name = "world+processor"

    def __init__(self):
        from arr_jax.world.arr_backend import WorldBackend

        self.inner = WorldBackend()
        self.asked = []

    def generate(self, requests):
        from arr_jax.judge.processor import smart_resize

        self.asked += [r.meta.get("pair_id", r.meta.get("index")) for r in requests]
        for r in requests:
            for im in r.images:
                smart_resize(im.shape[0], im.shape[1], 32, 32 * 32, 64 * 64)
        return self.inner.generate(requests)


STRIP = np.zeros((4, 1000, 3), np.uint8)


class Pairs:
    """A random-access pair sequence whose pair ``broken`` cannot be read (like a missing file)."""

    def __init__(self, pairs, broken=None):
        self.pairs, self.broken = list(pairs), broken

    @property
    def ids(self):
        return [p.id for p in self.pairs]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if i == self.broken:
            raise OSError(f"cannot identify image file '/data/{self.pairs[i].id}_b.png'")
        return self.pairs[i]


def world(n, seed=0, split="train", strip_at=None):
    from arr_jax.world import spec
    from arr_jax.world.arr_backend import world_pairs

    pairs = world_pairs(n, seed=seed, prompts=spec.TRAIN_PROMPTS if split == "train" else spec.HELDOUT_PROMPTS,
                        id_prefix=f"w{split}")
    if strip_at is not None:
        pairs[strip_at] = dataclasses.replace(pairs[strip_at], image2=STRIP)
    return pairs


def test_text_judge_names_and_isolates_the_bad_request():
    pairs = world(4, strip_at=1)
    judge = TextJudge(ProcessorCheck())
    out, status = judge.compare_with_status([p.prompt for p in pairs], [p.image1 for p in pairs],
                                            [p.image2 for p in pairs])
    assert status[1] == "input_error" and all(s != "input_error" for k, s in enumerate(status) if k != 1)
    assert out.valid[1] == 0 and out.winner[1] == 0 and out.failures["input_error"] == 1
    assert out.reasons[1].startswith("request 1 (pairwise, index=1): aspect ratio must be at most 200, got 250.0")
    good = [pairs[k] for k in (0, 2, 3)]
    ref = TextJudge(ProcessorCheck()).compare([p.prompt for p in good], np.stack([p.image1 for p in good]),
                                              np.stack([p.image2 for p in good]))
    np.testing.assert_array_equal(out.winner[[0, 2, 3]], ref.winner)
    # what the trainer does with it: count the batch in its budget
    budget = FailureBudget(0.1, min_items=0)
    with pytest.raises(TooManyFailuresError, match=r"(?s)1 of 4 pairs failed .*aspect ratio"):
        budget.add_batch(out, where="step 0: ")


def test_evaluate_goes_on_past_a_bad_pair_and_reports_it(tmp_path):
    from arr_jax.arr.evaluation import evaluate

    pairs = Pairs(world(24, seed=1, split="heldout", strip_at=2), broken=5)
    judge = TextJudge(ProcessorCheck())
    rep = evaluate(judge, pairs, {"direct": None}, out_dir=tmp_path, batch_size=8, progress=False)
    res = rep["conditions"]["direct"]
    assert res["overall"]["n"] == 23 and res["n_errors"] == 2
    strip, broken = pairs.ids[2], pairs.ids[5]
    assert res["errors"][0].startswith(f"pair {broken} (index 5): could not be read: OSError")
    assert res["errors"][1].startswith(f"pair {strip}: input_error: request 2 (pairwise, order=fwd, index=2): "
                                       "aspect ratio must be at most 200")
    assert res["statuses"]["fwd"]["input_error"] == 1 and res["failures"]["load_error"] == 1
    assert rep["failed_pairs"]["failed"] == 2 and rep["failed_pairs"]["items"] == 24
    assert strip in (tmp_path / "report.md").read_text()
    # the other pairs are judged exactly as without the bad ones; the strip pair is a tie
    good = [p for k, p in enumerate(pairs.pairs) if k not in (2, 5)]
    ref = evaluate(TextJudge(ProcessorCheck()), good, {"direct": None}, batch_size=8, progress=False)
    m, r = res["overall"], ref["conditions"]["direct"]["overall"]
    assert m["acc_fwd"] * 23 == pytest.approx(r["acc_fwd"] * 22) and m["tie_fwd"] * 23 >= 1
    # a cap of 0 stops the run, naming counts and the first failures
    with pytest.raises(TooManyFailuresError, match=rf"(?s)2 of 24 judged pairs .*failed.*{broken}"):
        evaluate(judge, pairs, {"direct": None}, batch_size=8, progress=False, max_failure_fraction=0.0)


def test_induce_goes_on_past_a_bad_pair_and_retries_it_on_rerun(tmp_path):
    from arr_jax.arr.induction import InductionSettings, induce

    settings = InductionSettings(k=2, t_max=1, batch_pairs=8)
    pairs = Pairs(world(24, seed=2, strip_at=3), broken=9)
    backend = ProcessorCheck()
    rf = induce(pairs, backend, tmp_path, settings, progress=False)
    prov = rf.provenance["pairs"]
    strip, broken = pairs.ids[3], pairs.ids[9]
    assert prov["failed"] == 2 and set(prov["failed_ids"]) == {strip, broken}
    assert prov["failures"] == {"input_error": 2}
    assert prov["first_pass"] + prov["refined"] + prov["discarded"] == 22
    assert strip not in prov["used"] and rf.themes
    journal = [json.loads(x) for x in (tmp_path / "journal.jsonl").read_text().splitlines()[1:]]
    failed = {r["pair_id"]: r for r in journal if r["status"] == "failed"}
    assert "aspect ratio must be at most 200" in failed[strip]["error"]
    assert f"pair_id={strip}" in failed[strip]["error"] and failed[strip]["kind"] == "input_error"
    assert "could not be read: OSError" in failed[broken]["error"]
    # a rerun with the inputs fixed asks again for the failed pairs only
    fixed = Pairs(world(24, seed=2))
    again = ProcessorCheck()
    rf2 = induce(fixed, again, tmp_path, settings, progress=False)
    assert set(again.asked) <= {strip, broken, None} and strip in again.asked and broken in again.asked
    assert rf2.provenance["pairs"]["failed"] == 0
    # the cap stops a run with the counts and the first failure named
    with pytest.raises(TooManyFailuresError, match=rf"(?s)2 of 2\d pairs failed.*{strip}"):
        induce(pairs, ProcessorCheck(), tmp_path / "capped", dataclasses.replace(settings, max_failure_fraction=0.05),
               progress=False)


def test_processor_error_names_input_error_kind():
    err = InputError("chat 2: image 2 of 2: aspect ratio must be at most 200", index=2, kind=parsing.BAD_IMAGE)
    assert isinstance(err, ValueError) and err.index == 2 and err.kind == "bad_image"


def test_callable_backend_keeps_a_failed_reply():
    from arr_jax.judge.text_judge import CallableBackend

    def fn(chats):
        return [parsing.FailedReply("", parsing.TOO_LONG, "chat 0: prompt too long")] + ['{"rank": [2, 1]}'] * (
            len(chats) - 1)

    prompts, a, b = _pairs(2)
    out, status = TextJudge(CallableBackend(fn)).compare_with_status(prompts, a, b)
    assert status == ["too_long", "ok"] and out.winner.tolist() == [0, 2] and out.reasons[0] == "chat 0: prompt too long"


def test_p_first_backend_raising_for_one_request():
    class Picky(FixedScores):
        def p_first(self, requests):
            for i, r in enumerate(requests):
                if r.meta["index"] == 1:
                    raise InputError(f"chat {i}: image 1 of 2: cannot identify image", index=i, kind="bad_image")
            return super().p_first(requests)

    prompts, a, b = _pairs(3)
    out, status = TextJudge(Picky([(-1.0, -2.0)] * 3), choice_scores=True).compare_with_status(prompts, a, b)
    assert status == ["ok", "bad_image", "ok"] and out.winner.tolist() == [1, 0, 1]
    assert out.failures == {"bad_image": 1} and out.p_first[1] == 0.5
    assert out.reasons[1] == "request 1 (pairwise, index=1): chat 0: image 1 of 2: cannot identify image"
