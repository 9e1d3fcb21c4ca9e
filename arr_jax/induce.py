"""ARR rubric induction over a preference dataset -> a rubric file.

    python -m arr_jax.induce --config configs/induce_world.py [--config.induction.k=5]
    python -m arr_jax.induce --config configs/induce_world.py:api \\
        --config.backend.openai.model=gpt-5 --config.data.kind=jsonl --config.data.path=pairs.jsonl

Writes ``<workdir>/rubric.txt`` (the protocol judges read) and ``rubric.json`` (provenance),
journaling finished pairs in ``<workdir>/journal.jsonl``: rerun the same command to resume.
`make_backend` and `make_pairs` build the backend and the pairs from a config (shared with
`arr_jax.evaluate`).
"""
from __future__ import annotations

import time
from typing import Sequence

from arr_jax import cli
from arr_jax.arr.induction import InductionSettings, induce, load_guide
from arr_jax.arr.rubric_file import RubricFile
from arr_jax.judge.templates import TemplateSet

# Backend settings that change what the model answers (others, e.g. timeouts, do not).
_ANSWER_KEYS = {"openai": ("model", "endpoint", "temperature", "max_tokens", "token_param", "image_format",
                           "max_image_side"),
                "world": ("default_criteria", "tie_break"),
                "qwen3_vl": ("model_dir", "dtype", "max_new_tokens", "temperature", "top_p", "seed")}


def make_backend(b):
    """A TextBackend from ``config.backend`` (kind "world", "openai" or "qwen3_vl": the Flax
    judge on a local Hugging Face snapshot, `arr_jax.judge.vlm_backend.FlaxVLMBackend`)."""
    if b.kind == "world":
        from arr_jax.world.arr_backend import WorldBackend

        return WorldBackend(default_criteria=tuple(b.world.default_criteria), tie_break=b.world.tie_break)
    if b.kind == "openai":
        from arr_jax.judge.api import OpenAIBackend

        o = b.openai
        return OpenAIBackend(model=o.model or None, endpoint=o.endpoint or None, api_key_env=o.api_key_env,
                             timeout=o.timeout, max_retries=o.max_retries, backoff=o.backoff,
                             concurrency=o.concurrency, cache_dir=o.cache_dir or None, temperature=o.temperature,
                             max_tokens=o.max_tokens or None, token_param=o.token_param,
                             image_format=o.image_format, max_image_side=o.max_image_side or None)
    if b.kind == "qwen3_vl":
        from arr_jax.judge.vlm_backend import FlaxVLMBackend

        q = b.qwen3_vl
        if not q.model_dir:
            raise ValueError("bad config value backend.qwen3_vl.model_dir: empty (a local Qwen3-VL snapshot "
                             "directory is needed for kind 'qwen3_vl')")
        return FlaxVLMBackend.from_snapshot(
            q.model_dir, q.dtype, max_new_tokens=q.max_new_tokens, temperature=q.temperature, top_p=q.top_p,
            seed=q.seed, batch_size=q.batch_size, seq_bucket=q.seq_bucket or None,
            patch_bucket=q.patch_bucket or None, image_bucket=q.image_bucket or None,
            max_length=q.max_length or None)
    raise ValueError(f"bad config value backend.kind: {b.kind!r} (expected 'world', 'openai' or 'qwen3_vl')")


def backend_identity(b) -> dict:
    """The part of ``config.backend`` that determines answers (hashed into the run)."""
    sub = b.get(b.kind, None)
    keys = _ANSWER_KEYS.get(b.kind, ())
    return {"kind": b.kind, **({k: sub[k] for k in keys} if sub is not None else {})}


def make_pairs(d) -> Sequence:
    """Preference pairs from ``config.data`` (kind "world", "jsonl" or "tfds")."""
    limit = d.limit or None
    if d.kind == "world":
        from arr_jax.world import spec
        from arr_jax.world.arr_backend import world_pairs

        prompts = {"train": spec.TRAIN_PROMPTS, "heldout": spec.HELDOUT_PROMPTS}.get(d.split)
        if prompts is None:
            raise ValueError(f"bad config value data.split: {d.split!r} (expected 'train' or 'heldout')")
        return world_pairs(d.n_pairs, seed=d.seed, prompts=prompts, image_size=d.image_size,
                           label_noise=d.label_noise, preferred_first=d.preferred_first,
                           id_prefix=f"world-{d.split}")[:limit]
    if d.kind == "jsonl":
        from arr_jax.data.preference_tfds import JsonlPairs

        if not d.path:
            raise ValueError("bad config value data.path: empty (a pairs JSONL file is needed for kind 'jsonl')")
        return JsonlPairs(d.path, limit)
    if d.kind == "tfds":
        from arr_jax.data.preference_tfds import build_preference, load_preference

        if d.path:  # build from the JSONL first (no-op when already built)
            b = build_preference(d.data_dir, d.name, {d.tfds_split: d.path})
            name = b.builder_config.name
        else:
            name = d.name
        return load_preference(d.data_dir, name, d.tfds_split, limit)
    raise ValueError(f"bad config value data.kind: {d.kind!r} (expected 'world', 'jsonl' or 'tfds')")


def settings_from(c) -> InductionSettings:
    return InductionSettings(k=c.k, t_max=c.t_max, verify_orders=c.verify_orders, batch_pairs=c.batch_pairs,
                             max_themes=c.max_themes, tips_per_theme=c.tips_per_theme,
                             structure_retries=c.structure_retries, seed=c.seed,
                             max_failure_fraction=c.get("max_failure_fraction", 0.1))


def run(cfg) -> RubricFile:
    """Induce a rubric file as ``cfg`` says; returns it (also written under cfg.workdir)."""
    for key in ("data", "backend", "induction"):
        if key not in cfg:
            raise ValueError(f"config has no '{key}' section: pass --config configs/induce_world.py (or your own)")
    t0 = time.perf_counter()
    pairs = make_pairs(cfg.data)
    backend = make_backend(cfg.backend)
    ic = cfg.induction
    templates = TemplateSet(ic.templates_dir or None)
    guide = load_guide(ic.guide) if ic.guide else []
    rf = induce(pairs, backend, cfg.workdir, settings_from(ic), templates, guide,
                config={"data": cfg.data.to_dict(), "backend": backend_identity(cfg.backend)},
                progress=cfg.get("progress", True))
    p = rf.provenance["pairs"]
    print(f"ARR induction: {p['total']} pairs -> first pass {p['first_pass']} ({100 * p['first_pass_rate']:.1f}%), "
          f"refined {p['refined']}, discarded {p['discarded']} ({100 * p['discard_rate']:.1f}%), "
          f"failed {p['failed']}{' ' + str(p['failures']) if p['failed'] else ''}; "
          f"{len(rf.themes)} themes, structure {rf.provenance['structure_status']}; "
          f"{time.perf_counter() - t0:.1f}s")
    print(f"rubric file: {cfg.workdir}/rubric.txt (+ rubric.json)\n")
    print(rf.text)
    return rf


def main(argv):
    del argv
    from arr_jax.arr.induction import NoVerifiedRubricsError

    try:
        run(cli.config_from_flags())
    except NoVerifiedRubricsError as e:  # a defined outcome, not a crash: the journal keeps every answer
        raise SystemExit(f"induction produced no rubric file: {e}") from None


if __name__ == "__main__":
    cli.run_main(main)
