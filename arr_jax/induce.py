"""ARR rubric induction over a preference dataset -> a rubric file.

    python -m arr_jax.induce --config configs/induce_world.py [--config.induction.k=5]
    python -m arr_jax.induce --config configs/induce_world.py:api \\
        --config.backend.openai.model=gpt-5 --config.data.kind=jsonl --config.data.path=pairs.jsonl

Writes ``<workdir>/rubric.txt`` (the protocol judges read) and ``rubric.json`` (provenance),
journaling finished pairs in ``<workdir>/journal.jsonl``: rerun the same command to resume.
The backend and the pairs come from `arr_jax.judge.factory.make_backend` and
`arr_jax.data.pairs.make_pairs` (shared with `arr_jax.evaluate` and the demo). A config may hold
these sections at its top level (`configs/induce_world.py`) or under ``induce`` (`configs/demo.py`).
"""
from __future__ import annotations

from arr_jax import cli
from arr_jax.arr.induction import induce_from_config


def config_section(cfg):
    """The induction section of ``cfg``: ``cfg.induce`` when present (`configs/demo.py`), else ``cfg``."""
    return cfg.induce if "induce" in cfg else cfg


def main(argv):
    del argv
    from arr_jax.arr.induction import NoVerifiedRubricsError

    try:
        induce_from_config(config_section(cli.config_from_flags()))
    except NoVerifiedRubricsError as e:  # a defined outcome, not a crash: the journal keeps every answer
        raise SystemExit(f"induction produced no rubric file: {e}") from None


if __name__ == "__main__":
    cli.run_main(main)
