"""The benchmarks' CPU fallbacks run: each tiny preset prints a table with both sides and a ratio and writes
JSON under the given directory (never into the sources), and gpu_suite.sh --preset tiny writes its summary.

No timing is asserted: only that both sides were measured and the ratio is their quotient.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the benchmarks
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """benchmarks/gpu_suite.sh --preset tiny: the tiny preset of every benchmark, once."""
    out = tmp_path_factory.mktemp("suite")
    env = _env()
    env["OUT"] = str(out)
    env["PYTHON"] = sys.executable
    r = subprocess.run(["bash", "benchmarks/gpu_suite.sh", "--preset", "tiny"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=2400)
    log = (out / "suite.log").read_text() if (out / "suite.log").exists() else ""
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + log[-4000:]
    return out, log


def _result(suite, name: str) -> dict:
    out, log = suite
    f = out / f"{name}.json"
    assert f.exists(), log[-4000:]
    return json.loads(f.read_text())


def _both_sides(row: dict, ours: str, ref: str) -> None:
    assert row[ours] > 0 and row[ref] > 0
    assert abs(row["ratio"] - row[ours] / row[ref]) <= 1e-9 * row["ratio"]


def test_rollout_tiny(suite):
    res = _result(suite, "rollout")
    assert "| sde rollout + decode |" in suite[1] and "diffusers img/s" in suite[1]
    assert [r["row"] for r in res["rows"]] == ["sde rollout + decode", "ode sample + decode"]
    for row in res["rows"]:
        _both_sides(row, "ours_img_s", "ref_img_s")
    assert res["programs"]["rollout"]["flops"] > 0 and res["compile_s"]["rollout"] > 0
    assert res["torch_side"]["images"][0] == res["batch"]  # diffusers made the batch's images
    assert res["commit"] and res["date"] and res["machine"]["platform"] == "cpu"


def test_update_tiny(suite):
    res = _result(suite, "update")
    assert "torch sample-steps/s" in suite[1]
    _both_sides(res["rows"][0], "ours_ss", "ref_ss")
    assert res["trained_steps"] == res["steps"] - 1
    assert res["model_flops"] > 0 and res["ours_metrics"]["grad_norm"] > 0
    assert set(res["torch_split_s"]) == {"reference", "update"}


def test_judge_tiny(suite):
    res = _result(suite, "judge")
    assert "like for like" in suite[1] and "release" in suite[1]
    rows = {r["row"].split(" (")[0]: r for r in res["rows"]}
    _both_sides(rows["prefill tok/s"], "ours", "ref")
    _both_sides(rows["choice decisions/s"], "ours", "ref")
    assert res["prefill_flops"] > 0


def test_iteration_tiny(suite):
    res = _result(suite, "iteration")
    phases = {r["phase"]: r for r in res["rows"]}
    assert {"rollout", "decode", "judge", "reference", "update", "iteration"} <= set(phases)
    for ph in ("rollout", "decode", "judge", "reference", "update"):
        assert phases[ph]["seconds"] > 0 and phases[ph]["gflop"] > 0, ph
    # --against release: the release's loop in PyTorch ran a whole iteration at the same shapes
    assert "against the release's loop" in suite[1]
    rel = res["release"]
    assert rel["verdict_tokens"] == 30 and len(rel["runs"]) == 1
    assert rel["runs"][0]["images"] == [2 * res["pairs"], res["res"], res["res"], 3]
    assert len(rel["runs"][0]["winners"]) == res["pairs"]
    against = {r["phase"]: r for r in res["against_rows"]}
    assert list(against) == ["rollout", "decode", "judge", "reference", "update", "iteration", "images/s"]
    for ph in ("rollout", "decode", "judge", "reference", "update"):
        assert against[ph]["ours_s"] > 0 and against[ph]["ref_s"] > 0, ph
        assert abs(against[ph]["ratio"] - against[ph]["ref_s"] / against[ph]["ours_s"]) <= 1e-9 * against[ph]["ratio"]
    it = against["iteration"]
    assert it["ref_s"] == pytest.approx(sum(rel["runs"][0]["seconds"][ph] for ph in
                                            ("rollout", "decode", "judge", "reference", "update")))
    assert against["images/s"]["ours_s"] == pytest.approx(2 * res["pairs"] / it["ours_s"])
    assert it["ratio_status"] == "one_repeat"  # --iters 1: the table says so instead of a speedup


def test_suite_summary(suite):
    out, _ = suite
    steps = json.loads((out / "suite.json").read_text())
    assert all(steps[name] is not None for name in ("rollout", "update", "judge", "iteration"))
    md = (out / "suite.md").read_text()
    for name in ("rollout", "update", "judge", "iteration"):
        assert f"## {name}" in md
    assert md.count("| ratio |") + md.count("ratio |") >= 3


def test_output_inside_the_sources_is_refused(tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import report

    with pytest.raises(ValueError, match="source tree"):
        report.write({}, ROOT / "benchmarks" / "x.json")
    assert report.write({}, tmp_path / "x.json").exists()


def test_judge_ablation_tiny(tmp_path):
    """ablation.py --what judge: the judge's programs as they were and as they are, interleaved; the
    before and after prefills give the same logits (checked inside), and every row is reported."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import ablation

    res = ablation.main(["--what", "judge", "--preset", "tiny", "--reps", "2", "--out", str(tmp_path / "a.json")])
    assert [r["variant"] for r in res["rows"]] == ["prefill before", "prefill +cache_maker", "prefill after",
                                                    "choice before", "choice after"]
    for r in res["rows"]:
        assert r["ms"] > 0 and r["ratio_status"] in ("ok", "noise", "below_resolution")
    assert (tmp_path / "a.json").exists()
