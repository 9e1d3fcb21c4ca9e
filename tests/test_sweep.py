"""Sweeps: get_hyper expansion (arr_jax.hyper), validation, dry run, TPU commands, runs with
resume, results table and plot (arr_jax.sweep, arr_jax.sweep_report).

The runs use tests/_sweep_entry.py, a stand-in entry point that writes report.json at once."""
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from arr_jax import hyper
from arr_jax.sweep import plan_sweep

ROOT = Path(__file__).resolve().parents[1]

TEST_CONFIG = '''
import ml_collections

ENTRY = "_sweep_entry"


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.workdir = "runs/base"
    c.seed = 0
    c.write_report = True
    c.opt = ml_collections.ConfigDict(dict(lr=1e-3, steps=10, kind="adam", window=(0, 5), warm=False))
    c.net = ml_collections.ConfigDict(dict(steps=2))
    if arg == "small":
        c.opt.steps = 1
    return c


def get_hyper(h):
    return h.product([
        h.sweep("config.opt.lr", HYPER_LR),
        h.zipit([h.sweep("config.opt.kind", ["adam", "sgd"]), h.sweep("opt.window", [(0, 2), (1, 3)])]),
        h.sweep("config.seed", [0, 1]),
    ])
'''


def _config(tmp_path, hyper_body=None, lr="[1e-3, 5e-4]", name="cfg.py"):
    text = TEST_CONFIG.replace("HYPER_LR", lr)
    if hyper_body is not None:
        text = text.split("def get_hyper")[0] + "def get_hyper(h):\n    return " + hyper_body + "\n"
    path = tmp_path / name
    path.write_text(text)
    return path


def _sweep(tmp_path, *args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    env.pop("SWEEP_TEST_FAIL", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "arr_jax.sweep", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_hyper_product_zipit_fixed_chainit():
    p = hyper.product([hyper.sweep("config.a", [1, 2, 3]), hyper.sweep("b.c", ["x", "y"])])
    assert len(p) == 6
    assert p[0] == {"a": 1, "b.c": "x"} and p[1] == {"a": 1, "b.c": "y"} and p[-1] == {"a": 3, "b.c": "y"}
    z = hyper.zipit([hyper.sweep("a", [1, 2]), hyper.sweep("config.b", [0.1, 1.0]), hyper.fixed("c", "k", length=2)])
    assert z == [{"a": 1, "b": 0.1, "c": "k"}, {"a": 2, "b": 1.0, "c": "k"}]
    nested = hyper.product([z, hyper.sweep("seed", hyper.discrete(range(3))), hyper.fixed("d", True)])
    assert len(nested) == 6 and all(q["d"] is True for q in nested)
    assert len(hyper.chainit([z, hyper.sweep("a", [7])])) == 3
    assert hyper.product([]) == [{}]


def test_hyper_errors_name_keys():
    with pytest.raises(ValueError, match=r"a: 2.*b: 3"):
        hyper.zipit([hyper.sweep("a", [1, 2]), hyper.sweep("b", [1, 2, 3])])
    with pytest.raises(ValueError, match="sweep key a is set twice"):
        hyper.product([hyper.sweep("a", [1]), hyper.sweep("config.a", [2])])
    with pytest.raises(ValueError, match="sweep config.x: no values"):
        hyper.sweep("config.x", [])
    with pytest.raises(ValueError, match="not a dotted config path"):
        hyper.sweep("rpo/lr", [1])


def test_expansion_names_overrides_typed(tmp_path):
    cfg = _config(tmp_path, lr="[1e-3, 5e-4, 1]")  # 1 for a float field becomes 1.0
    plan = plan_sweep(f"{cfg}:small", {"net.steps": 5})
    assert len(plan.points) == 3 * 2 * 2
    assert plan.entry == "_sweep_entry"
    # "steps" does not clash (net.steps is not swept); last path components name the points
    p = plan.points[0]
    assert p.name == "lr=0.001,kind=adam,window=0_2,seed=0"
    assert p.workdir == str(Path("runs/base/sweep") / p.name)
    assert p.args == ("--config.opt.lr=0.001", "--config.opt.kind=adam", "--config.opt.window=(0, 2)",
                      "--config.seed=0")
    assert plan.points[-1].values == {"opt.lr": 1.0, "opt.kind": "sgd", "opt.window": (1, 3), "seed": 1}
    assert plan.points[-1].name == "lr=1.0,kind=sgd,window=1_3,seed=1"
    assert len({q.name for q in plan.points}) == 12
    cmd = plan.command(plan.points[-1], "py")
    assert cmd[:5] == ["py", "-m", "_sweep_entry", "--config", f"{cfg}:small"]
    assert cmd[5:7] == ["--config.net.steps=5", f"--config.workdir={plan.points[-1].workdir}"]
    # the command line, parsed the way the entry point parses it, gives the typed values
    from arr_jax.sweep import parse_like_entry

    parsed = parse_like_entry(f"{cfg}:small", cmd[5:])
    assert parsed.opt.lr == 1.0 and isinstance(parsed.opt.lr, float)
    assert parsed.opt.window == (1, 3) and parsed.opt.kind == "sgd" and parsed.seed == 1
    assert parsed.net.steps == 5 and parsed.opt.steps == 1 and parsed.workdir == plan.points[-1].workdir
    # --workdir moves the root; a key clash names the full paths
    other = plan_sweep(str(_config(tmp_path, 'h.product([h.sweep("opt.steps", [1]), h.sweep("net.steps", [2])])',
                                   name="clash.py")), workdir="elsewhere")
    assert other.points[0].name == "opt.steps=1,net.steps=2"
    assert other.root == str(Path("elsewhere/sweep"))


@pytest.mark.parametrize("body, message", [
    ('h.sweep("config.opt.lrr", [1e-3])', r"sweep key opt.lrr is not in .*cfg.py; did you mean opt.lr"),
    ('h.sweep("config.nope.x", [1])', r"sweep key nope.x is not in"),
    ('h.sweep("config.opt.steps", [10, 2.5])', r"sweep key opt.steps: value 2.5 is a float, not an int"),
    ('h.sweep("config.opt.lr", ["1e-3"])', r"sweep key opt.lr: value '1e-3' is a str, not a float"),
    ('h.sweep("config.opt.warm", [1])', r"sweep key opt.warm: value 1 is a int, not a bool"),
    ('h.sweep("config.seed", [True])', r"sweep key seed: value True is a bool, not an int"),
    ('h.sweep("config.opt.kind", [3])', r"sweep key opt.kind: value 3 is a int, not a str"),
    ('h.sweep("config.opt", [1])', r"sweep key opt names a sub-config"),
    ('h.sweep("config.workdir", ["x"])', r"sweep key workdir: the sweep sets"),
])
def test_bad_keys_and_types_are_named(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        plan_sweep(str(_config(tmp_path, body)))


def test_cli_errors_before_anything_runs(tmp_path):
    cfg = _config(tmp_path, 'h.product([h.sweep("config.seed", [0, 1]), h.sweep("config.opt.steps", [3, "4"])])')
    r = _sweep(tmp_path, "--config", str(cfg))
    assert r.returncode == 2
    assert "sweep key opt.steps: value '4' is a str, not an int" in r.stderr
    assert not (tmp_path / "runs").exists()
    r = _sweep(tmp_path, "--config", str(_config(tmp_path)), "--config.seed=3")
    assert r.returncode == 2 and "sweep key seed is also given as --config.seed" in r.stderr


def test_dry_run_and_print_commands(tmp_path):
    cfg = _config(tmp_path)
    r = _sweep(tmp_path, "--config", f"{cfg}:small", "--dry_run", "--config.net.steps=7")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 8
    first = lines[0].split()
    assert first == [str(Path("runs/base/sweep/lr=0.001,kind=adam,window=0_2,seed=0")), "--config.opt.lr=0.001",
                     "--config.opt.kind=adam", "--config.opt.window=(0,", "2)", "--config.seed=0"]
    assert lines[-1].startswith(str(Path("runs/base/sweep/lr=0.0005,kind=sgd,window=1_3,seed=1")) + " ")
    assert not (tmp_path / "runs").exists()

    r = _sweep(tmp_path, "--config", f"{cfg}:small", "--print_commands", "--config.net.steps=7",
               "--tpu_name=my-v5e", "--zone=us-west4-a")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 8
    words = shlex.split(lines[-1])
    assert words[:3] == ["launch/tpu_pod.sh", "my-v5e", "us-west4-a"] and len(words) == 4
    assert lines[-1].startswith('launch/tpu_pod.sh my-v5e us-west4-a "python -m _sweep_entry ')
    inner = shlex.split(words[3])  # the command tpu_pod.sh runs as .venv/bin/$CMD on every host
    workdir = str(Path("runs/base/sweep/lr=0.0005,kind=sgd,window=1_3,seed=1"))
    assert inner == ["python", "-m", "_sweep_entry", "--config", f"{cfg}:small", "--config.net.steps=7",
                     f"--config.workdir={workdir}", "--config.opt.lr=0.0005", "--config.opt.kind=sgd",
                     "--config.opt.window=(1, 3)", "--config.seed=1"]


def _calls(tmp_path, name):
    f = tmp_path / "runs/base/sweep" / name / "calls.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_run_resume_retry_table_and_plot(tmp_path):
    cfg = _config(tmp_path, 'h.product([h.sweep("config.opt.lr", [1e-3, 2e-3]), h.sweep("config.seed", [0, 1])])')
    root = tmp_path / "runs/base/sweep"
    # first invocation: one point fails, the others finish
    r = _sweep(tmp_path, "--config", str(cfg), "--parallel", "2", env_extra={"SWEEP_TEST_FAIL": "lr=0.002,seed=1"})
    assert r.returncode == 1, r.stdout + r.stderr
    assert "lr=0.002,seed=1: FAILED (exit 3)" in r.stdout
    assert "1 of 4 points failed" in r.stderr
    names = ["lr=0.001,seed=0", "lr=0.001,seed=1", "lr=0.002,seed=0", "lr=0.002,seed=1"]
    assert [len(_calls(tmp_path, n)) for n in names] == [1, 1, 1, 1]
    call = _calls(tmp_path, "lr=0.002,seed=0")[0]
    assert call["opt"]["lr"] == 0.002 and call["seed"] == 0
    assert call["workdir"] == str(Path("runs/base/sweep/lr=0.002,seed=0"))
    status = json.loads((root / "lr=0.002,seed=1/sweep_status.json").read_text())
    assert status["status"] == "failed" and status["returncode"] == 3
    assert not (root / "lr=0.002,seed=1/report.json").exists()
    with open(root / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["state"] for t in table] == ["done", "done", "done", "failed"]
    assert table[3]["gain"] == ""

    # second invocation: finished points are skipped, the failed one is retried and now succeeds
    r = _sweep(tmp_path, "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 finished, 1 to run" in r.stdout
    assert [len(_calls(tmp_path, n)) for n in names] == [1, 1, 1, 2]

    with open(root / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [t["lr"] for t in table] == ["0.001", "0.001", "0.002", "0.002"]
    assert [t["state"] for t in table] == ["done"] * 4
    # top-level and one-level-nested numbers; strings, bools and deeper levels left out
    assert {"gain", "steps", "eval.accuracy"} <= set(table[0])
    assert not {"kind", "ok", "eval.name", "eval.deep", "eval.deep.ignored"} & set(table[0])
    gain = [float(t["gain"]) for t in table]
    assert gain == pytest.approx([1.0, 1.01, 0.9, 0.91])
    assert float(table[3]["eval.accuracy"]) == pytest.approx(0.455)
    md = (root / "results.md").read_text().splitlines()
    assert md[2].startswith("| lr | seed | state | gain | steps | eval.accuracy |")
    assert md[-1] == "| 0.002 | 1 | done | 0.91 | 10 | 0.455 |"
    from PIL import Image

    with Image.open(root / "results.png") as im:
        assert im.size == (960, 600)
        assert len(set(im.convert("L").getdata())) > 10  # something was drawn

    # a point that exits 0 without a report.json is finished by the sweep's own marker
    cfg2 = _config(tmp_path, 'h.sweep("config.write_report", [False])', name="noreport.py")
    assert _sweep(tmp_path, "--config", str(cfg2)).returncode == 0
    assert _sweep(tmp_path, "--config", str(cfg2)).returncode == 0
    assert len(_calls(tmp_path, "write_report=False")) == 1


def test_shipped_configs_expand(tmp_path):
    r = _sweep(ROOT, "--config", "configs/demo.py", "--dry_run")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 * 2 * 2  # learning rate × KL beta × seed
    assert lines[0].split()[0] == str(Path("runs/demo/sweep/learning_rate=0.00025,kl_beta=0.01,seed=0"))
    assert {ln.split()[0].rsplit("/", 1)[-1] for ln in lines} >= {"learning_rate=0.0005,kl_beta=0.01,seed=1"}

    from arr_jax.sweep import load_config_module

    assert load_config_module(str(ROOT / "configs/demo.py")).ENTRY == "arr_jax.demo"
    flux = load_config_module(str(ROOT / "configs/flux_dev_t2i.py"))
    assert flux.ENTRY == "arr_jax.train"
    # flux_dev_t2i's get_hyper against its own config; a wrapper supplies `workdir` if the config
    # lacks it (the sweep needs one to place the points)
    wrapper = tmp_path / "flux_wrapper.py"
    wrapper.write_text(
        "from arr_jax.sweep import load_config_module\n"
        f"_flux = load_config_module({str(ROOT / 'configs/flux_dev_t2i.py')!r})\n"
        "ENTRY, get_hyper = _flux.ENTRY, _flux.get_hyper\n"
        "def get_config(arg=None):\n"
        "    c = _flux.get_config(arg)\n"
        "    if 'workdir' not in c:\n"
        "        c.workdir = 'runs/flux'\n"
        "    return c\n")
    r = _sweep(tmp_path, "--config", str(wrapper), "--dry_run")
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.strip().splitlines()]
    assert [ln[1:] for ln in lines] == [["--config.rpo.kl_type=k1", "--config.rpo.lose_penalty=0.1"],
                                       ["--config.rpo.kl_type=gaussian", "--config.rpo.lose_penalty=1.0"]]
    assert lines[0][0].endswith("kl_type=k1,lose_penalty=0.1")
