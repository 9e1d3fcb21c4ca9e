"""Labelled preference pairs from a ``data`` config section (ARR induction and judge evaluation).

Kinds: "world" (rendered world pairs, `arr_jax.world.arr_backend.world_pairs`), "jsonl" (the
local pairs format of `arr_jax.data.preference_tfds`) and "tfds" (that format built into a
tensorflow-datasets array_record dataset).
"""
from __future__ import annotations

from typing import Sequence


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


