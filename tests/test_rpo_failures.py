"""Failure counters of the RPO loop in one unit, pairs (issue #19, kind 5): a symmetrised judge counts a
failed pair once (b13), and every status that yields no decision (no_json, ...) counts against
``judge.max_failure_fraction`` (a judge answering only in prose stops the run at iteration 0)."""
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_policy

from arr_jax.judge import parsing
from arr_jax.judge.base import PairwiseBatch, combine_orders, flip
from arr_jax.judge.text_judge import TextJudge

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))


class _Backend:
    """Pair 0 cut off in both orders (``truncated``); the others: image 1 wins in both orders."""

    name = "fake"

    def __init__(self, prose=False):
        self.prose = prose

    def generate(self, requests):
        out = []
        for r in requests:
            if self.prose:
                out.append("Both images are lovely, each in its own way.")
            elif r.meta["index"] == 0:
                out.append(parsing.FailedReply("", parsing.TRUNCATED, "cut off"))
            else:
                out.append('{"rank": [2, 1]}' if r.meta.get("order") == "rev" else '{"rank": [1, 2]}')
        return out


def _images(n):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8) for _ in range(2)]


@pytest.mark.parametrize("mode", ["agree", "mean"])
def test_symmetrised_judge_counts_a_failed_pair_once(mode):
    a, b = _images(4)
    out = TextJudge(_Backend(), symmetrize=mode).compare(["p"] * 4, a, b)
    assert out.failures == {"truncated": 1}
    assert out.valid.tolist() == [False, True, True, True] and out.statuses[0] == "truncated"
    assert out.winner.tolist() == [0, 1, 1, 1]


def test_combine_orders_counts_pairs_with_and_without_statuses():
    st_f = ["no_json", "ok", "truncated", "tie", "fallback"]
    st_r = ["no_json", "invalid_json", "ok", "ok", "ok"]
    val = lambda st: [s not in parsing.FAILURES for s in st]  # noqa: E731
    fwd = PairwiseBatch(winner=[0, 1, 0, 0, 1], p_first=[.5, 1, .5, .5, 1], valid=val(st_f), statuses=st_f,
                        failures={"no_json": 1, "truncated": 1, "tie": 1, "fallback": 1})
    rev = PairwiseBatch(winner=[0, 0, 2, 2, 2], p_first=[.5, .5, 0, 0, 0], valid=val(st_r), statuses=st_r,
                        failures={"no_json": 1, "invalid_json": 1})
    got = combine_orders(fwd, flip(rev), "agree")
    # pairs 0-2 failed (once each, forward kind first), pair 3 is a tie, pair 4 won in prose
    assert got.failures == {"no_json": 1, "invalid_json": 1, "truncated": 1, "tie": 1, "fallback": 1}
    assert got.valid.tolist() == [False, False, False, True, True]
    bare = combine_orders(PairwiseBatch(fwd.winner, fwd.p_first, failures=fwd.failures, valid=fwd.valid),
                          flip(PairwiseBatch(rev.winner, rev.p_first, failures=rev.failures, valid=rev.valid)))
    assert sum(v for k, v in bare.failures.items() if k in parsing.FAILURES or k == "failed") == 3


def _run(tmp, backend, symmetrize, max_fail, pairs=4):
    import demo as demo_config

    from arr_jax.data.prompts import world_prompts
    from arr_jax.judge.factory import judge_config
    from arr_jax.judge.reward import RubricJudge
    from arr_jax.rpo.run import RPORun
    from arr_jax.rpo.trainer import RPOTrainer, rpo_settings

    cfg = demo_config.get_config("tiny")
    cfg.workdir = str(tmp)
    cfg.judge = judge_config(kind="world", symmetrize=symmetrize, max_failure_fraction=max_fail)
    cfg.rpo.iterations, cfg.rpo.eval_every, cfg.rpo.checkpoint_every = 1, 0, 1
    cfg.rpo.num_steps, cfg.rpo.train_window, cfg.rpo.pairs_per_batch, cfg.rpo.micro_batch = 2, (0, 1), pairs, 8
    policy = make_tiny_policy()
    judge = RubricJudge(TextJudge(backend, symmetrize=symmetrize), identity={"kind": "fake"}, host_only=True)
    trainer = RPOTrainer(policy, judge, rpo_settings(cfg.rpo), seed=0, trainable="lora")
    return RPORun(cfg=cfg, policy=policy, trainer=trainer, judge=judge, evaluator=None,
                  train_prompts=world_prompts("train"), eval_prompts=[], workdir=Path(cfg.workdir))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run (compiled once) shared by the two loop tests below, which run in order."""
    return _run(tmp_path_factory.mktemp("rpo_failures"), _Backend(), "agree", 0.3)


def test_b13_one_failed_pair_of_four_is_25_percent_of_pairs(run):
    """b13: 1 of 4 pairs fails in both orders; the cap is 30% of pairs: the run goes on, counting 1 pair."""
    from arr_jax.rpo.run import judge_failures, train

    hist = train(run, progress=False)
    assert hist[-1]["judge_failures/truncated"] == 1.0 and hist[-1]["judge_failed_pairs"] == 1.0
    assert judge_failures(hist[-1]) == 1.0 and len(hist) == 1


def test_judge_that_never_parses_stops_the_run(run, capsys):
    """A judge answering only in prose (no_json on every pair, both orders) is 4 failed pairs of 4: above
    a 0.1 cap the run stops; with the cap at 1.0 it goes on but says the iteration had no decisive pair."""
    from arr_jax.rpo.run import train

    run.judge.judge.backend = _Backend(prose=True)
    run.cfg.rpo.iterations = 2
    run.cfg.judge.max_failure_fraction = 0.1
    with pytest.raises(RuntimeError, match=r"iteration 2: the judge failed on 4 of 4 pairs .*no_json"):
        train(run, progress=False)
    run.cfg.rpo.iterations = 3
    run.cfg.judge.max_failure_fraction = 1.0
    hist = train(run, progress=False)
    assert hist[-1]["judge_failures/no_json"] == 4.0 and hist[-1]["decisive_rate"] == 0.0
    assert "iteration 3: no decisive pair" in capsys.readouterr().out  # iterations count from 1


def test_b14_resume_with_changed_prompts_or_objective_is_refused_then_recorded(run, capsys):
    """b14 (issue #19, kind 6): resuming with other prompts and a 1000x learning rate is refused, naming
    both; with rpo.allow_resume_changes it goes on, warns, and run.json / the checkpoint record the change."""
    import json

    from arr_jax.data.prompts import world_prompts
    from arr_jax.rpo.run import ResumeMismatchError, train

    run.judge.judge.backend = _Backend()
    run.cfg.judge.max_failure_fraction = 0.3
    lr = run.cfg.rpo.learning_rate
    run.train_prompts = world_prompts("train")[:3]
    run.cfg.rpo.learning_rate = lr * 1000
    run.cfg.rpo.iterations = 4
    with pytest.raises(ResumeMismatchError, match=r"prompts\.count: \d+ -> 3; prompts\.sha256: .*"
                                                  r"rpo\.learning_rate: .* -> .*allow_resume_changes"):
        train(run, progress=False)
    run.cfg.rpo.allow_resume_changes = True
    hist = train(run, progress=False)
    assert len(hist) == 4
    assert "with changed inputs (allow_resume_changes): prompts.count" in capsys.readouterr().out
    meta = json.loads((run.workdir / "run.json").read_text())
    (change,) = meta["resume_changes"]
    assert change["iteration"] == 3 and change["changes"]["rpo.learning_rate"] == [lr, lr * 1000]
    assert meta["resume_signature"]["prompts"]["count"] == 3


def test_a_world_prompt_outside_the_grammar_fails_before_iteration_0(tmp_path):
    """b11's kind for the world policy: a prompts file whose line 2 has a word the world does not know
    (or too many words) is refused by precompute, naming the file's line, not when an iteration draws it."""
    import demo as demo_config

    from arr_jax.policies import build_policy
    from arr_jax.rpo.run import build_prompts

    cfg = demo_config.get_config("tiny")
    policy = build_policy(cfg)
    for line, why in (("one purple dragon on the left", r"unknown word 'purple'"),
                      ("one red circle on the left " * 3, r"has 18 words > max_len=")):
        (tmp_path / "prompts.txt").write_text(f"one red circle on the left\n{line}\n")
        cfg.prompts_file = str(tmp_path / "prompts.txt")
        items = build_prompts(cfg, "train")
        with pytest.raises(ValueError, match=rf"^prompt .*prompts\.txt:2: .*{why}.*grammar"):
            policy.precompute(items)
    policy.precompute(items[:1])  # a caption of the grammar passes


@pytest.mark.parametrize("name", ["demo", "flux_dev_t2i", "flux_kontext", "qwen_image_edit"])
def test_every_training_config_offers_allow_resume_changes(name):
    """--config.rpo.allow_resume_changes=True works on every training config (locked configs refuse
    unknown keys): the demo and flux_dev_t2i set it, flux_kontext and qwen_image_edit inherit it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"cfg_{name}", Path(__file__).resolve().parents[1] / "configs"
                                                  / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for variant in ("", "tiny"):
        assert mod.get_config(variant).rpo.allow_resume_changes is False
