"""Synthetic world: grammar, rendering, programmatic judge (accuracy), judge interface, tfds."""
import itertools

import numpy as np
import pytest

from arr_jax.judge import base
from arr_jax.world import render, spec
from arr_jax.world.judge import CRITERIA, WorldJudge

REWARD = ("colour", "shape", "count", "position")
N_SCENES = 500


# ---------------------------------------------------------------------------------------
# Grammar.

def test_parse_roundtrip_all_prompts_and_partials():
    assert len(spec.ALL_PROMPTS) == 144
    for p in spec.ALL_PROMPTS:
        assert spec.parse_prompt(p.text) == p
        assert spec.Prompt.from_ints(p.to_ints()) == p
        for drop in itertools.chain.from_iterable(
                itertools.combinations(spec.ATTRIBUTES, k) for k in range(1, 5)):
            q = p.replace(**{a: None for a in drop})
            assert spec.parse_prompt(q.text) == q, q.text
    assert spec.parse_prompt("two red circles on the left") == spec.Prompt("red", "circle", 2, "left")
    assert spec.parse_prompt("two circles on the left").colour is None


@pytest.mark.parametrize("text", ["two red circle", "purple circles", "one red circle on top",
                                  "", "three blue squares on the left side"])
def test_parse_errors_name_the_text(text):
    with pytest.raises(ValueError, match="cannot parse"):
        spec.parse_prompt(text)


def test_split_covers_every_value_pair():
    train, held = set(spec.TRAIN_IDS), set(spec.HELDOUT_IDS)
    assert not train & held and len(train | held) == 144
    assert 30 <= len(held) <= 40
    for a, b in itertools.combinations(spec.ATTRIBUTES, 2):
        for va, vb in itertools.product(spec.values_of(a), spec.values_of(b)):
            assert any(getattr(p, a) == va and getattr(p, b) == vb for p in spec.TRAIN_PROMPTS), (a, va, b, vb)
    assert spec._split() == (spec.TRAIN_IDS, spec.HELDOUT_IDS)  # deterministic


def test_tokenize():
    ids, mask = spec.tokenize(["two red circles on the left", "objects"], max_len=8)
    assert ids.shape == (2, 8) and ids.dtype == np.int32 and mask.dtype == bool
    assert mask.sum(1).tolist() == [6, 1] and (ids[~mask] == 0).all()
    assert spec.detokenize(ids) == ["two red circles on the left", "objects"]
    with pytest.raises(ValueError, match="purple"):
        spec.tokenize(["two purple circles"])
    all_ids, _ = spec.tokenize([p.text for p in spec.ALL_PROMPTS])
    assert all_ids.max() < len(spec.VOCAB)


def test_corrupt_rates_and_parseable():
    rng = np.random.default_rng(0)
    p_wrong = {"colour": 0.5, "shape": 0.2, "count": 0.0, "position": 1.0}
    n, wrong, drop = 2000, dict.fromkeys(spec.ATTRIBUTES, 0), dict.fromkeys(spec.ATTRIBUTES, 0)
    for _ in range(n):
        p = spec.random_scene(rng)
        c = spec.parse_prompt(spec.corrupt(p, rng, p_wrong, p_drop={"colour": 0.2, "count": 0.2}))
        for a in spec.ATTRIBUTES:
            v = getattr(c, a)
            drop[a] += v is None
            wrong[a] += v is not None and v != getattr(p, a)
    assert wrong["position"] == n and drop["position"] == 0
    assert abs(wrong["colour"] / n - 0.5) < 0.05 and abs(wrong["shape"] / n - 0.2) < 0.04
    assert wrong["count"] == 0 and abs(drop["count"] / n - 0.2) < 0.04
    assert abs(drop["colour"] / n - 0.2) < 0.04  # wrong and drop are disjoint events
    spec.tokenize([spec.corrupt(spec.ALL_PROMPTS[7], rng, 0.3, 0.3) for _ in range(50)])


# ---------------------------------------------------------------------------------------
# Rendering.

def test_render_layout_and_determinism():
    rng = np.random.default_rng(0)
    scenes = [spec.random_scene(rng) for _ in range(300)]
    imgs = render.render_batch(scenes, np.random.default_rng(1))
    assert imgs.shape == (300, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, render.render_batch(scenes, np.random.default_rng(1)))
    from scipy import ndimage
    for sc, im in zip(scenes, imgs):
        fg = im.max(-1) > 0
        half = {"left": fg[:, 16:], "right": fg[:, :16], "top": fg[16:], "bottom": fg[:16]}
        assert not half[sc.position].any(), sc.text  # nothing outside the named half
        assert ndimage.label(fg)[1] == sc.count, sc.text  # separated objects
        corners = [im[0, 0], im[0, -1], im[-1, 0], im[-1, -1]]
        assert all((c == 0).all() for c in corners)
    assert render.render(scenes[0], np.random.default_rng(3)).shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------
# Programmatic judge accuracy.

@pytest.fixture(scope="module")
def judged():
    """Per criterion: (positive accuracy, negative accuracy) on clean and degraded renders."""
    judge = WorldJudge()
    rng = np.random.default_rng(2026)
    scenes = [spec.random_scene(rng) for _ in range(N_SCENES)]
    texts = [s.text for s in scenes]
    negs = {a: [spec.differ_in(s, a, rng) for s in scenes] for a in REWARD}
    pos_img = render.render_batch(scenes, rng)
    neg_img = {a: render.render_batch(negs[a], rng) for a in REWARD}
    out = {}
    for cond, f in [("clean", lambda x: x),
                    ("noisy", lambda x: render.degrade(x, rng, noise_sigma=0.05 * 255, blur_sigma=0.7))]:
        pos = judge.check(texts, f(pos_img))
        for a in REWARD:
            neg = judge.check(texts, f(neg_img[a]))[a]
            out[cond, a] = (float(pos[a].mean()), float((~neg).mean()))
        out[cond, "clean_background"] = (
            float(pos["clean_background"].mean()),
            float((~judge.check(texts, render.add_specks(f(pos_img), rng, n=6))["clean_background"]).mean()))
    print("\nWorldJudge accuracy over", N_SCENES, "scenes (positive, negative):")
    for k, v in out.items():
        print(f"  {k[0]:6s} {k[1]:17s} {v[0]:.3f} {v[1]:.3f}")
    return out


@pytest.mark.parametrize("criterion", CRITERIA)
def test_judge_accuracy_clean(judged, criterion):
    pos, neg = judged["clean", criterion]
    assert pos >= 0.98 and neg >= 0.98, (pos, neg)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_judge_accuracy_noisy_blurred(judged, criterion):
    pos, neg = judged["noisy", criterion]
    assert pos >= 0.95 and neg >= 0.95, (pos, neg)


def test_describe_matches_scene():
    rng = np.random.default_rng(5)
    det = WorldJudge().describe(render.render(spec.parse_prompt("three green triangles on the top"), rng))
    assert (det.count, det.colour, det.shape, det.position) == (3, "green", "triangle", "top")
    assert det.stray_pixels == 0 and len(det.boxes) == 3
    empty = WorldJudge().describe(np.zeros((32, 32, 3), np.uint8))
    assert empty.count == 0 and empty.position is None
    v = WorldJudge().check(["two red circles on the left"], np.zeros((1, 32, 32, 3), np.uint8))
    assert not any(v[k][0] for k in REWARD) and v["clean_background"][0]
    with pytest.raises(ValueError, match="uint8"):
        WorldJudge().describe(np.zeros((32, 32, 3), np.float32))


def test_compare_picks_the_matching_image():
    judge = WorldJudge()
    rng = np.random.default_rng(7)
    scenes = [spec.random_scene(rng) for _ in range(120)]
    attrs = [REWARD[i % 4] for i in range(120)]
    good = render.render_batch(scenes, rng)
    bad = render.render_batch([spec.differ_in(s, a, rng) for s, a in zip(scenes, attrs)], rng)
    texts = [s.text for s in scenes]
    swap = rng.random(120) < 0.5
    im1 = np.where(swap[:, None, None, None], bad, good)
    im2 = np.where(swap[:, None, None, None], good, bad)
    out = judge.compare(texts, im1, im2)
    expect = np.where(swap, 2, 1)
    assert (out.winner == expect).mean() >= 0.98
    assert np.allclose(out.p_first[out.winner == 1], 1.0) and np.allclose(out.p_first[out.winner == 2], 0.0)
    assert set(out.criteria) == set(CRITERIA) and out.criteria["colour"].shape == (120, 2)
    assert len(out.reasons) == 120 and out.failures["parse_error"] == 0
    # Swapped order gives the flipped judgement.
    rev = base.flip(judge.compare(texts, im2, im1))
    np.testing.assert_array_equal(rev.winner, out.winner)
    np.testing.assert_allclose(rev.p_first, out.p_first)
    for k in CRITERIA:
        np.testing.assert_array_equal(rev.criteria[k], out.criteria[k])
    # Same scene in both: tie. Unparseable prompt: tie and a counted failure.
    tie = judge.compare(texts[:2] + ["a purple cow"], good[:3], good[:3])
    assert tie.winner.tolist() == [0, 0, 0] and np.allclose(tie.p_first, 0.5)
    assert tie.failures["parse_error"] == 1


def test_reward_criteria_and_rubric():
    judge = WorldJudge(reward_criteria=("colour",))
    rng = np.random.default_rng(8)
    sc = spec.parse_prompt("two red squares on the left")
    a = render.render(sc, rng)[None]
    b = render.render(sc.replace(count=3), rng)[None]  # wrong count only
    assert judge.compare([sc.text], a, b).winner[0] == 0  # count does not count here
    assert WorldJudge().compare([sc.text], a, b).winner[0] == 1
    rub = WorldJudge().rubric("two circles on the left")
    assert rub.names == ("shape", "count", "position", "clean_background")
    assert "circle" in rub.text
    with pytest.raises(ValueError):
        WorldJudge(reward_criteria=("beauty",))
    assert isinstance(judge, base.Judge)


def test_base_helpers():
    fwd = base.PairwiseBatch(winner=[1, 2, 0, 1], p_first=[0.9, 0.2, 0.5, 0.6])
    rev = base.PairwiseBatch(winner=[2, 2, 1, 1], p_first=[0.1, 0.7, 0.8, 0.45])
    rf = base.flip(rev)
    assert rf.winner.tolist() == [1, 1, 2, 2] and np.allclose(rf.p_first, [0.9, 0.3, 0.2, 0.55])
    agree = base.combine_orders(fwd, rf, "agree")
    assert agree.winner.tolist() == [1, 0, 0, 0] and np.allclose(agree.p_first, [0.9, 0.5, 0.5, 0.5])
    mean = base.combine_orders(fwd, rf, "mean")
    assert mean.winner.tolist() == [1, 2, 2, 1]
    cat = base.concat([fwd, rev])
    assert len(cat) == 8 and cat.winner.dtype == np.int8
    assert base.winner_from_p(np.array([0.7, 0.5, 0.45]), tie_band=0.1).tolist() == [1, 0, 0]
    with pytest.raises(ValueError):
        base.PairwiseBatch(winner=[1, 2], p_first=[0.5])


# ---------------------------------------------------------------------------------------
# tfds builder (array_record, no TensorFlow).

def test_world_tfds_build_and_load(tmp_path):
    from arr_jax.data import world_tfds as W

    kw = dict(n_train=600, n_heldout=150, p_wrong={"colour": 1.0, "shape": 0.3},
              p_drop={"shape": 0.1, "count": 0.1})
    W.build_world(tmp_path / "a", progress=False, **kw)
    W.build_world(tmp_path / "b", progress=False, **kw)
    W.build_world(tmp_path / "a", progress=False, **kw)  # already built: no-op
    tr = W.load_world(tmp_path / "a", "train")
    assert len(tr) == 600 and len(W.load_world(tmp_path / "a", "heldout")) == 150
    a = W.to_arrays(tr)
    b = W.to_arrays(W.load_world(tmp_path / "b", "train", config=W.world_config(**kw)))
    for k in a:  # deterministic
        np.testing.assert_array_equal(a[k], b[k])
    assert a["image"].shape == (600, 32, 32, 3) and a["image"].dtype == np.uint8
    assert set(a["prompt_id"]) <= set(spec.TRAIN_IDS)
    h = W.to_arrays(W.load_world(tmp_path / "a", "heldout"))
    assert set(h["prompt_id"]) <= set(spec.HELDOUT_IDS)
    for i in range(600):
        p = spec.parse_prompt(a["prompt"][i])
        assert spec.prompt_id(p) == a["prompt_id"][i] and (p.to_ints() == a["attrs"][i]).all()
        c = spec.parse_prompt(a["caption"][i])
        assert (c.to_ints() == a["caption_attrs"][i]).all()
        assert c.colour is None or c.colour != p.colour  # p_wrong colour = 1
    cap_shape, true_shape = a["caption_attrs"][:, 1], a["attrs"][:, 1]
    assert 0.05 < (cap_shape == -1).mean() < 0.16  # p_drop 0.1
    assert 0.22 < ((cap_shape != -1) & (cap_shape != true_shape)).mean() < 0.38  # p_wrong 0.3
    verdicts = WorldJudge().check(list(a["prompt"][:200]), a["image"][:200])
    assert all(verdicts[k].mean() >= 0.98 for k in CRITERIA)
    with pytest.raises(FileNotFoundError):
        W.load_world(tmp_path / "a", "train", config=W.world_config(n_train=5))
