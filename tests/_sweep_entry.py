"""A stand-in entry point for tests/test_sweep.py: parses ``--config`` like the real entry points
(`arr_jax.cli`, lock_config), appends its config to ``<workdir>/calls.jsonl`` and writes a
``report.json`` whose numbers are a known function of the config.

Exits 3 without writing anything else when ``SWEEP_TEST_FAIL`` is a substring of the workdir.
Writes no report.json when ``config.write_report`` is False (the sweep's own marker then says
the point is finished)."""
import json
import os
from pathlib import Path


def main(argv):
    del argv
    from arr_jax.cli import config_from_flags

    cfg = config_from_flags()
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "calls.jsonl", "a") as fh:
        fh.write(json.dumps(cfg.to_dict()) + "\n")
    fail = os.environ.get("SWEEP_TEST_FAIL")
    if fail and fail in str(work):
        raise SystemExit(3)
    if cfg.write_report:
        score = 1.0 - abs(cfg.opt.lr - 1e-3) * 100 + 0.01 * cfg.seed
        report = {"gain": score, "steps": cfg.opt.steps, "kind": cfg.opt.kind, "ok": True,
                  "eval": {"accuracy": score / 2, "name": "x", "deep": {"ignored": 1.0}}}
        (work / "report.json").write_text(json.dumps(report))


if __name__ == "__main__":
    from arr_jax.cli import run_main

    run_main(main)
