"""The run's pictures: before/after blocks with per-criterion marks, grouped curve panels."""
import numpy as np
import pytest
from PIL import Image

from arr_jax.rpo.figures import CRITERION_MARKS, save_before_after, save_curves

GREEN, RED = np.array([0x1a, 0x96, 0x41]), np.array([0xd7, 0x19, 0x1c])


def _near(img, colour, tol=40):
    return int((np.abs(img[..., :3].astype(int) - colour).sum(-1) < tol).sum())


def _images(p, k, value):
    x = np.zeros((p, k, 16, 12, 3), np.uint8)
    x[..., 2] = value  # blue only: no pixel of the images is near the marks' green or red
    return x


def test_before_after_marks_follow_the_checks(tmp_path):
    p, k = 3, 2
    crits = ("colour", "shape", "count", "position")
    ok = {c: np.ones((p, k), bool) for c in crits}
    bad = {c: np.zeros((p, k), bool) for c in crits}
    a = np.asarray(Image.open(save_before_after(tmp_path / "a.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t", checks_base=ok, checks_rpo=ok)))
    b = np.asarray(Image.open(save_before_after(tmp_path / "b.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t", checks_base=bad, checks_rpo=ok)))
    assert _near(a, GREEN) > 0 and _near(a, RED) == 0
    assert _near(b, RED) > 0 and 0.3 < _near(b, GREEN) / _near(a, GREEN) < 0.7
    # 3 prompts, 2 blocks per row: two rows of blocks; without checks no marks at all
    c = np.asarray(Image.open(save_before_after(tmp_path / "c.png", ["x", "y", "z"], _images(p, k, 90),
                                                _images(p, k, 200), "t")))
    assert _near(c, GREEN) == 0 and _near(c, RED) == 0
    assert c.shape[0] > c.shape[1] * 0.8  # two block rows, each about as tall as a block is wide
    assert set(CRITERION_MARKS) >= set(crits)


def test_before_after_names_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"\(P=2, K, H, W, 3\)"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 3, 9), "t")
    with pytest.raises(ValueError, match=r"checks_rpo\['shape'\] has shape \(2,\)"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 2, 9), "t",
                          checks_base={"shape": np.ones((2, 2), bool)}, checks_rpo={"shape": np.ones(2, bool)})
    with pytest.raises(ValueError, match=r"checks_base names \['shape'\] but checks_rpo names \['count'\]"):
        save_before_after(tmp_path / "x.png", ["a", "b"], _images(2, 2, 9), _images(2, 2, 9), "t",
                          checks_base={"shape": np.ones((2, 2), bool)}, checks_rpo={"count": np.ones((2, 2), bool)})


def test_curves_group_metrics_into_one_panel(tmp_path):
    hist = [{"iteration": i, "a": i * 0.1, "eval/c/x": 0.2, "eval/c/y": 0.3} for i in range(12)]
    one = np.asarray(Image.open(save_curves(tmp_path / "1.png", hist, ["a", ("eval/c/x", "eval/c/y"), "missing"],
                                            "t", cols=3)))
    two = np.asarray(Image.open(save_curves(tmp_path / "2.png", hist, ["a", "eval/c/x", "eval/c/y"], "t", cols=3)))
    assert one.shape[1] < two.shape[1]  # two panels, not three
    assert save_curves(tmp_path / "3.png", hist, ["missing"], "t") is None


# ------------------------------------------------------------------------------ nothing clipped

LONG = ("ARR-RPO: flux_kontext policy, judge qwen3_vl/pairwise:Qwen3-VL-8B-Instruct/sym-agree with rubric "
        "runs/arr/rubric/rubric.txt, held-out prompts from /data/heldout_edits.jsonl")


@pytest.fixture
def text_inside(monkeypatch):
    """Every figure saved while this is on is checked: each visible, non-empty text (titles, labels,
    tick labels) lies inside the figure, to within 1 pixel. Returns the names of the checked files."""
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    checked = []
    save = Figure.savefig

    def savefig(fig, path, *a, **kw):
        if "dpi" in kw:
            fig.set_dpi(kw["dpi"])
        r = fig.canvas.get_renderer()
        fig.draw(r)
        box = fig.bbox

        def inside(e, what):
            assert (e.x0 >= box.x0 - 1 and e.x1 <= box.x1 + 1 and e.y0 >= box.y0 - 1 and e.y1 <= box.y1 + 1), \
                f"{path}: {what} at {e.bounds} leaves the figure {box.bounds}"

        axes = fig.findobj(Axes)
        ticks = {id(t) for ax in axes for axis in (ax.xaxis, ax.yaxis)
                 for tick in axis.get_major_ticks() + axis.get_minor_ticks() for t in (tick.label1, tick.label2)}
        for ax in axes:  # its drawn tick labels, labels and title
            if ax.get_visible() and ax.axison:
                inside(ax.get_tightbbox(r), f"axes {ax.get_title()!r}")
        for t in fig.findobj(Text):
            if id(t) not in ticks and t.get_visible() and str(t.get_text()).strip():
                inside(t.get_window_extent(r), f"text {t.get_text()!r}")
        checked.append(str(path).rsplit("/", 1)[-1])
        return save(fig, path, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return checked


def test_no_figure_clips_a_long_title(tmp_path, text_inside):
    from arr_jax.arr.evaluation import bar_chart
    from arr_jax.rpo.figures import save_grid, save_reward_and_win_rate

    hist = [{"iteration": i, "reward_mean": 0.1 * i, "decisive_rate": 0.5, "kl": 1e-3} for i in range(1, 4)]
    hist[-1].update({"eval/win_rate": 0.6, "eval/win_rate_se": 0.1, "eval/tie_rate": 1.0})
    img = np.zeros((2, 16, 16, 3), np.uint8)
    save_grid(tmp_path / "grid.png", [img, img], ["base", "RPO 20"], LONG, col_labels=[LONG, "short"])
    save_grid(tmp_path / "narrow.png", [img[:1]], ["base"], LONG)
    save_curves(tmp_path / "curves.png", hist, ["reward_mean"], LONG)
    save_reward_and_win_rate(tmp_path / "reward.png", hist, LONG)
    save_before_after(tmp_path / "ba.png", [LONG, "b"], _images(2, 1, 9), _images(2, 1, 9), LONG)
    cond = {"overall": {"acc_fwd": 0.5, "acc_rev": 0.5, "avg": 0.5, "sym_agree_half": 0.5}, "by_category": {}}
    bar_chart({"conditions": {"direct": cond}, "title": LONG}, tmp_path / "accuracy.png")
    from types import SimpleNamespace

    from arr_jax.sweep_report import write_plot

    metric = "eval/criteria/" + "a_very_long_criterion_name_" * 3
    plan = SimpleNamespace(keys=["rpo.learning_rate", "seed"], short={"rpo.learning_rate": "lr", "seed": "seed"})
    rows = [{"values": {"rpo.learning_rate": lr, "seed": sd}, "metrics": {metric: 0.1 * sd + lr}}
            for lr in (1e-4, 3e-4) for sd in (0, 1)]
    assert write_plot(plan, rows, metric, tmp_path / "sweep.png")
    assert text_inside == ["grid.png", "narrow.png", "curves.png", "reward.png", "ba.png", "accuracy.png",
                           "sweep.png"]


def test_editing_eval_grid_shows_each_source_above_its_edits(tmp_path):
    """Evaluator.save_grid for an editing run: a source row (each item's own source, any size) above
    the base and RPO rows, column by column; a text-to-image run has no source row."""
    from arr_jax.policies.base import PromptItem
    from arr_jax.rpo.evaluator import Evaluator

    colours = {"src": (230, 20, 20), "base": (20, 20, 230), "cur": (20, 230, 20)}

    def fill(n, c, h=16, w=16):
        return np.tile(np.asarray(c, np.uint8), (n, h, w, 1))

    srcs = [fill(1, colours["src"], 24, 40)[0], fill(1, colours["src"], 40, 24)[0]]
    items = [PromptItem("make it blue", source=srcs[0]), PromptItem("make it green", source=srcs[1])]
    ev = Evaluator(items, judge=None, outdir=tmp_path / "edit")
    path = ev.save_grid(fill(2, colours["base"]), fill(2, colours["cur"]), np.arange(2), 20)
    img = np.asarray(Image.open(path))[..., :3].astype(int)

    def rows_of(c):
        hit = (np.abs(img - np.asarray(c)).sum(-1) < 30)
        ys = np.nonzero(hit.any(axis=1))[0]
        xs = np.nonzero(hit.any(axis=0))[0]
        return ys, xs, hit

    (ys_s, xs_s, _), (ys_b, xs_b, _), (ys_c, _, _) = (rows_of(colours[k]) for k in ("src", "base", "cur"))
    assert len(ys_s) and len(ys_b) and len(ys_c)
    assert ys_s.max() < ys_b.min() and ys_b.max() < ys_c.min()  # source above base above RPO

    def centres(xs):  # the middle of each run of adjacent columns: one per image cell
        runs = np.split(xs, np.nonzero(np.diff(xs) > 1)[0] + 1)
        return np.array([r.mean() for r in runs])

    # two source cells, each centred over its column of edits
    assert len(centres(xs_s)) == 2 and np.abs(centres(xs_s) - centres(xs_b)).max() < 15
    # text-to-image: no source row
    plain = Evaluator([PromptItem("a red cat"), PromptItem("a dog")], judge=None, outdir=tmp_path / "t2i")
    img = np.asarray(Image.open(plain.save_grid(fill(2, colours["base"]), fill(2, colours["cur"]), np.arange(2), 20)))
    assert not (np.abs(img[..., :3].astype(int) - np.asarray(colours["src"])).sum(-1) < 30).any()
