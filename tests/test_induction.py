"""ARR induction control flow with a scripted backend (the only stand-in in these tests):
first-pass pairs kept, failing pairs refined until they pass or T_max then discarded, counts in
the rubric file, the label never shown to the verifier, and resume without repeated calls."""
import json

import numpy as np
import pytest

from arr_jax.arr.induction import GuideExemplar, InductionSettings, induce
from arr_jax.arr.rubric_file import RubricFile, load_rubric_text
from arr_jax.data.preference_tfds import PreferencePair

T_MAX = 3
# pair -> (label, behaviour): how the scripted generator / verifier treat it
PLAN = {
    "A": (1, "first_pass"),
    "B": (2, "pass_after_1"),      # the verifier is wrong in round 0, right after one refinement
    "C": (1, "never"),             # the verifier is always wrong -> discarded after T_MAX refinements
    "D": (2, "garbage_generate"),  # round-0 rubrics unreadable -> nothing verified, then refined
    "E": (1, "garbage_verify"),    # round-0 verifier answer unreadable in the swapped order
    "F": (2, "first_pass"),
}
THEMES = json.dumps({"themes": [{"name": "Prompt alignment", "tips": ["Every object named is present."]},
                                {"name": "Detail", "tips": ["Hands have five fingers.", "Text is legible."]}]})


def make_pairs(edit_ids=()):
    rng = np.random.default_rng(0)
    out = []
    for pid, (label, _) in PLAN.items():
        im = rng.integers(0, 256, (2, 6, 6, 3), dtype=np.uint8)
        src = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8) if pid in edit_ids else None
        out.append(PreferencePair(id=pid, prompt=f"prompt of {pid}", image1=im[0], image2=im[1], label=label,
                                  source=src, category="x"))
    return out


class Crash(RuntimeError):
    pass


class ScriptedBackend:
    """Answers by the PLAN; records every request; optionally crashes after ``crash_after`` calls."""

    name = "scripted"

    def __init__(self, crash_after=None, structure_garbage_first=True):
        self.requests = []
        self.crash_after = crash_after
        self.structure_garbage_first = structure_garbage_first

    def answer(self, req):
        if req.task == "structure":
            first = sum(r.task == "structure" for r in self.requests) == 1
            return "Sorry, I cannot" if first and self.structure_garbage_first else THEMES
        pid, rnd = req.meta["pair_id"], req.meta["round"]
        label, how = PLAN[pid]
        if req.task in ("generate", "refine"):
            if how == "garbage_generate" and rnd == 0:
                return "Here are the rubrics: none, sorry"
            return json.dumps({"rubrics": [f"{pid} criterion {rnd}.{i}" for i in range(3)], "reason": "r"})
        assert req.task == "verify"
        right = (3 - label) if req.meta["swapped"] else label  # the labelled image, as numbered in this order
        wrong = {"pass_after_1": rnd < 1, "never": True}.get(how, False)
        if how == "garbage_verify" and rnd == 0 and req.meta["swapped"]:
            return "I would rather not say."
        w = 3 - right if wrong else right
        return json.dumps({"rank": [1, 2] if w == 1 else [2, 1], "reason": f"round {rnd}"})

    def generate(self, requests):
        out = []
        for r in requests:
            if self.crash_after is not None and len(self.requests) >= self.crash_after:
                raise Crash("backend went away")
            self.requests.append(r)
            out.append(self.answer(r))
        return out

    def count(self, task, pid=None):
        return sum(r.task == task and (pid is None or r.meta.get("pair_id") == pid) for r in self.requests)


def settings(**kw):
    return InductionSettings(**{**dict(k=3, t_max=T_MAX, verify_orders="both", batch_pairs=4, max_themes=5,
                                       tips_per_theme=4), **kw})


def journal(workdir):
    lines = (workdir / "journal.jsonl").read_text().splitlines()
    return {r["pair_id"]: r for r in map(json.loads, lines[1:])}


def test_control_flow_and_counts(tmp_path):
    be = ScriptedBackend()
    rf = induce(make_pairs(), be, tmp_path, settings(), progress=False)
    j = journal(tmp_path)
    got = {pid: (r["status"], r["refinements"]) for pid, r in j.items()}
    assert got == {"A": ("first_pass", 0), "B": ("refined", 1), "C": ("discarded", T_MAX),
                   "D": ("refined", 1), "E": ("refined", 1), "F": ("first_pass", 0)}
    # calls: one generation each; a refinement per failed round; two orders per verification
    assert be.count("generate") == 6
    assert [be.count("refine", p) for p in "ABCDEF"] == [0, 1, T_MAX, 1, 1, 0]
    assert [be.count("verify", p) for p in "ABCDEF"] == [2, 4, 2 * (T_MAX + 1), 2, 4, 2]  # D: round 0 unverifiable
    assert be.count("structure") == 2  # the first structuring answer was unusable: retried
    # the rubric file
    p = rf.provenance
    assert (p["pairs"]["first_pass"], p["pairs"]["refined"], p["pairs"]["discarded"]) == (2, 3, 1)
    assert p["pairs"]["used"] == ["A", "B", "D", "E", "F"] and p["pairs"]["discarded_ids"] == ["C"]
    assert p["pairs"]["first_pass_rate"] == pytest.approx(2 / 6) and p["pairs"]["discard_rate"] == pytest.approx(1 / 6)
    assert p["calls"] == {"generate": 6, "refine": 6, "verify": 22, "structure": 2}
    assert p["statuses"]["generate:no_json"] == 1 and p["statuses"]["verify:no_json"] == 1
    assert p["statuses"]["structure:no_json"] == 1 and p["structure_status"] == "ok"
    assert p["model"] == "scripted" and set(p["prompts"]["templates"]) >= {"generate", "verify", "refine", "structure"}
    assert len(p["config_hash"]) == 16
    assert j["B"]["rubrics"] == ["B criterion 1.0", "B criterion 1.1", "B criterion 1.2"] and j["C"]["rubrics"] == []
    # on disk: readable text + JSON provenance, and they agree
    text = (tmp_path / "rubric.txt").read_text()
    assert text.startswith("Theme 1: Prompt alignment\n- Every object named is present.")
    assert load_rubric_text(tmp_path / "rubric.txt") == text == RubricFile.load(tmp_path / "rubric.json").text
    assert json.loads((tmp_path / "rubric.json").read_text())["provenance"]["pairs"]["refined"] == 3
    # the structuring request saw exactly the kept pairs' final rubrics
    st = [r for r in be.requests if r.task == "structure"][-1]
    assert "B criterion 1.0" in st.fields["rubric_sets"] and "C criterion" not in st.fields["rubric_sets"]
    assert "B criterion 0.0" not in st.fields["rubric_sets"]


def test_verifier_never_sees_the_label(tmp_path):
    be = ScriptedBackend()
    pairs = make_pairs(edit_ids=("A",))
    induce(pairs, be, tmp_path, settings(), progress=False)
    by_id = {p.id: p for p in pairs}
    verify = [r for r in be.requests if r.task == "verify"]
    assert verify
    for r in verify:
        text = (r.system + r.user_text).lower()
        assert "prefer" not in text and "expected" not in text and "label" not in text
        assert set(r.fields) == {"edit", "prompt", "rubrics"}
        p = by_id[r.meta["pair_id"]]
        first, second = (p.image2, p.image1) if r.meta["swapped"] else (p.image1, p.image2)
        assert np.array_equal(r.image("1"), first) and np.array_equal(r.image("2"), second)
    orders = {(r.meta["pair_id"], r.meta["round"], r.meta["swapped"]) for r in verify}
    assert ("A", 0, False) in orders and ("A", 0, True) in orders
    # the generator and refiner are told the label; the refiner also sees the verifier's answer
    gen = [r for r in be.requests if r.task == "generate" and r.meta["pair_id"] == "B"][0]
    assert "preferred Image 2 over Image 1" in gen.user_text
    ref = [r for r in be.requests if r.task == "refine" and r.meta["pair_id"] == "C"]
    assert len(ref) == T_MAX and "Expected outcome: Image 1 wins." in ref[-1].user_text
    assert "The judge chose Image 2" in ref[0].user_text and "C criterion 0.0" in ref[0].user_text
    assert "the image shown here as Image 2" in ref[0].user_text
    # editing pairs: Image BASE comes first in every request about them
    for r in be.requests:
        if r.meta.get("pair_id") == "A":
            assert r.parts[1].role == "BASE" and "Image BASE" in r.parts[0] and "Image BASE" in r.system


def test_random_and_given_orders(tmp_path):
    be = ScriptedBackend()
    induce(make_pairs(), be, tmp_path / "r", settings(verify_orders="random", seed=3), progress=False)
    v = [r for r in be.requests if r.task == "verify"]
    assert all(sum(x.meta["pair_id"] == r.meta["pair_id"] and x.meta["round"] == r.meta["round"] for x in v) == 1
               for r in v)
    assert {r.meta["swapped"] for r in v} == {False, True}
    be2 = ScriptedBackend()
    induce(make_pairs(), be2, tmp_path / "g", settings(verify_orders="given"), progress=False)
    assert not any(r.meta["swapped"] for r in be2.requests if r.task == "verify")


def test_resume_makes_no_repeated_calls(tmp_path):
    ref = ScriptedBackend()
    full = induce(make_pairs(), ref, tmp_path / "full", settings(batch_pairs=2), progress=False)
    crashing = ScriptedBackend(crash_after=14)
    with pytest.raises(Crash):
        induce(make_pairs(), crashing, tmp_path / "run", settings(batch_pairs=2), progress=False)
    finished = set(journal(tmp_path / "run"))
    assert 0 < len(finished) < 6
    resumed = ScriptedBackend()
    rf = induce(make_pairs(), resumed, tmp_path / "run", settings(batch_pairs=2), progress=False)
    asked = {r.meta["pair_id"] for r in resumed.requests if "pair_id" in r.meta}
    assert asked and not asked & finished  # nothing finished is asked again
    assert asked | finished == set("ABCDEF")
    assert rf.text == full.text
    for key in ("first_pass", "refined", "discarded", "used"):
        assert rf.provenance["pairs"][key] == full.provenance["pairs"][key]
    assert rf.provenance["calls"] == full.provenance["calls"]  # the journal keeps the earlier calls
    # a finished run resumed again only re-structures
    again = ScriptedBackend(structure_garbage_first=False)
    induce(make_pairs(), again, tmp_path / "run", settings(batch_pairs=2), progress=False)
    assert [r.task for r in again.requests] == ["structure"]
    # batching does not change results, another configuration is refused
    with pytest.raises(ValueError, match="another run"):
        induce(make_pairs(), ScriptedBackend(), tmp_path / "run", settings(k=4), progress=False)


def test_guide_exemplars_go_into_generation(tmp_path):
    be = ScriptedBackend()
    guide = [GuideExemplar("two cats on a sofa", "two cats, sharp", "three cats", "The count must match the prompt.")]
    rf = induce(make_pairs(), be, tmp_path, settings(), guide=guide, progress=False)
    gen = [r for r in be.requests if r.task in ("generate", "refine")]
    assert all("The count must match the prompt." in r.system for r in gen)
    assert not any("The count must match" in r.system for r in be.requests if r.task == "verify")
    assert rf.provenance["guide"]["n"] == 1


def test_all_discarded_is_an_error(tmp_path):
    class Never(ScriptedBackend):
        def answer(self, req):
            if req.task == "verify":
                return '{"rank": [1, 1]}'  # a tie never recovers a label
            return super().answer(req)

    with pytest.raises(RuntimeError, match="discarded"):
        induce(make_pairs(), Never(), tmp_path, settings(t_max=1), progress=False)
    assert all(r["status"] == "discarded" for r in journal(tmp_path).values())
